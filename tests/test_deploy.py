"""Flower deployment (SuperLink + SuperNodes + `flwr run .`) on a tiny model, with a SuperNode killed
during a round: the run finishes with the remaining clients."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_assets

REPO = Path(__file__).resolve().parents[1]


def _free_port_block(size: int = 20) -> int:
    """A base port with ``size`` free ports after it (the SuperLink, one per SuperNode)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size < 65000 and all(_is_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free port block")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _tiny_config(tmp_path, tiny_tokenizer, **extra) -> Path:
    write_tiny_assets(tmp_path, tiny_tokenizer)
    values = dict(model=str(tmp_path / "model"), data=str(tmp_path / "data.jsonl"), num_clients=3, ranks=[4, 2, 1],
                  rounds=2, local_steps=2, batch_size=4, micro_batch_size=2, cutoff=64, max_examples=0,
                  partition="iid", test_fraction=0.1, eval_examples=0, client_eval_examples=0,
                  out_dir=str(tmp_path / "out"))  # federated evaluation: one more ClientApp process per node and round
    values.update(extra)
    import tomli_w
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps({"run": values}))
    return path


@pytest.mark.slow
def test_deployment_survives_a_killed_supernode(tmp_path, tiny_tokenizer):
    # the operator's own held-out set gives the global test loss (the nodes' files come from the script's split)
    config = _tiny_config(tmp_path, tiny_tokenizer, server_test_data=str(tmp_path / "data.jsonl"), eval_examples=8)
    work = tmp_path / "work"
    env = dict(os.environ, FLORA_PYTHON=sys.executable, FLORA_BASE_PORT=str(_free_port_block()))
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "deploy_local.sh"), "--config", str(config),
                                "--work", str(work)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, killed = [], False
    deadline = time.monotonic() + 400
    try:
        for line in process.stdout:
            lines.append(line)
            if not killed and line.startswith("[round 1]"):
                # round 2's messages go out right after round 1's line: node 2 dies during round 2
                os.kill(int((work / "pids" / "supernode-2.pid").read_text()), signal.SIGKILL)
                killed = True
            if time.monotonic() > deadline:
                break
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    log = "".join(lines)
    assert killed, log[-3000:]
    assert process.returncode == 0, log[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert (metrics[0]["clients_ok"], metrics[0]["clients_failed"]) == (3, 0)
    assert (metrics[1]["clients_ok"], metrics[1]["clients_failed"]) == (2, 1), log[-3000:]
    assert metrics[1]["aggregation_error"] < 1e-4 and metrics[1]["test_loss"] < metrics[0]["test_loss"] + 0.5
    # the server's own failure line for the killed node (every round line also says "ok/failed")
    assert re.search(r"round 2: client 2 \(node \d+\) failed: ", log), log[-3000:]


def _kill_matching(fragment: str) -> None:
    """SIGTERM every process whose command line contains ``fragment`` (no pkill needed)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if fragment in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGTERM)
        except (OSError, ProcessLookupError):
            continue


def _netns_available() -> bool:
    if os.geteuid() != 0 or not any(Path(d, "ip").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        return False
    probe = subprocess.run(["ip", "netns", "add", "flora-test-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "flora-test-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs root and `ip netns` (separate network namespaces)")
def test_deployment_across_network_namespaces(tmp_path, tiny_tokenizer):
    config = _tiny_config(tmp_path, tiny_tokenizer)
    env = dict(os.environ, FLORA_PYTHON=sys.executable, FLORA_BASE_PORT=str(_free_port_block()))
    done = subprocess.run(["bash", str(REPO / "scripts" / "deploy_local.sh"), "--config", str(config), "--netns",
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "SuperLink on 10.77.0.1" in done.stdout
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["clients_ok"], m["clients_failed"]) for m in metrics] == [(3, 0), (3, 0)]
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("flora-node")


@pytest.mark.slow
def test_flwr_run_simulation_offline(tmp_path, tiny_tokenizer):
    """`flwr run .` as Flower users type it, against Flower's own local simulation SuperLink."""
    config = _tiny_config(tmp_path, tiny_tokenizer)
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PATH=bin_dir + os.pathsep + os.environ["PATH"],
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port_block(4)))
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]) + 2)
    try:
        done = subprocess.run([str(Path(bin_dir) / "flwr"), "run", ".", "--stream", "--federation-config",
                               "num-supernodes=3", "--run-config",
                               f"config-file='{config}' simulation=true lr=0.002 method='zeropad' ranks='2,2,1'"],
                              cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
    finally:  # Flower leaves its local SuperLink running
        _kill_matching(f"--control-api-address 127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["clients_ok"], m["clients_failed"]) for m in metrics] == [(3, 0), (3, 0)]
    import tomllib
    saved = tomllib.loads((tmp_path / "out" / "config.toml").read_text())["run"]  # the --run-config keys won
    assert (saved["lr"], saved["method"], saved["ranks"], saved["rounds"]) == (0.002, "zeropad", [2, 2, 1], 2)


def _node_files(tmp_path) -> list[Path]:
    """Three nodes' own data files, each in its own directory and format (Alpaca JSONL, a JSON array, Dolly
    JSONL), cut from the tiny data: nothing else names them but their node's --node-config."""
    rows = [json.loads(x) for x in (tmp_path / "data.jsonl").read_text().splitlines()]
    parts = [rows[0:27], rows[27:54], rows[54:80]]
    files = [tmp_path / f"party-{k}" / name for k, name in enumerate(("own-0.jsonl", "own-1.json", "own-2.jsonl"))]
    for path in files:
        path.parent.mkdir()
    files[0].write_text("".join(json.dumps(r) + "\n" for r in parts[0]))
    files[1].write_text(json.dumps(parts[1]))
    files[2].write_text("".join(json.dumps({"instruction": r["instruction"], "response": r["output"]}) + "\n"
                                for r in parts[2]))
    return files


def _opened(directory: Path, role: str) -> dict[str, set[str]]:
    """Per process of ``role``: the files it opened (``flora/audit.py``'s log)."""
    return {p.name: set(p.read_text().splitlines()) for p in directory.glob(f"{role}-*.log")}


@pytest.mark.slow
def test_deployment_over_tls_with_supernode_authentication(tmp_path, tiny_tokenizer):
    """TLS with a CA made by the test, SuperNode keys registered by the script, one SuperNode whose key was
    never registered and one that speaks plaintext: the run completes with the registered TLS nodes only,
    and every private key written is readable by its owner only.

    The same deployment is the node-local-data check (issue 16): every node reads only its own file
    (``--node-data``), the server none. The config's ``data`` names a file that does not exist (a server that
    loaded the dataset would fail the run), and every ServerApp and ClientApp process logs each file it opens
    (``FLORA_OPEN_LOG``, ``flora/audit.py``): no server process opens a node's file, each client process opens
    at most one of them, each is opened. Losses come from federated evaluation only (no server test set)."""
    from flora.deploy_keys import write_tls
    from flora.report import write_report

    config = _tiny_config(tmp_path, tiny_tokenizer, data=str(tmp_path / "missing" / "never-read.jsonl"),
                          client_eval_examples=4)
    node_files = _node_files(tmp_path)
    certs = write_tls(tmp_path / "certs", ["127.0.0.1", "localhost"])
    work = tmp_path / "work"
    opened = tmp_path / "opened"
    opened.mkdir()
    env = dict(os.environ, FLORA_PYTHON=sys.executable, FLORA_BASE_PORT=str(_free_port_block()),
               FLORA_OPEN_LOG=str(opened))
    done = subprocess.run(["bash", str(REPO / "scripts" / "deploy_local.sh"), "--config", str(config),
                           "--certs", str(certs["ca.crt"].parent), "--auth", "--unregistered", "1",
                           "--plaintext", "1", "--work", str(work), "--node-data", ",".join(map(str, node_files))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    assert "TLS, CA" in done.stdout and "SuperNode authentication" in done.stdout, output
    assert "registered 3 SuperNode public keys" in done.stdout, output
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["clients_ok"], m["clients_failed"]) for m in metrics] == [(3, 0), (3, 0)]
    flwr_home = (work / "flwr-home" / "config.toml").read_text()
    assert "insecure" not in flwr_home and str(certs["ca.crt"]) in flwr_home
    rogue_log = (work / "logs" / "unregistered-1.log").read_text()
    assert "Failed to activate SuperNode" in rogue_log, rogue_log[-2000:]  # refused: its key is not registered
    assert all("SuperNode ID:" in (work / "logs" / f"supernode-{k}.log").read_text() for k in range(3))
    plaintext_log = (work / "logs" / "plaintext-1.log").read_text()
    # refused by the transport (TLS), not by authentication: it never gets as far as asking for an id
    assert "[deploy] plaintext-1:" in done.stdout and "SuperNode ID:" not in plaintext_log, plaintext_log[-2000:]
    assert "Connection attempt failed" in plaintext_log and "Failed to activate" not in plaintext_log
    private_keys = [certs["ca.key"], certs["server.key"]] + [
        p for d in ("keys", "keys-unregistered") for p in (work / d).iterdir() if not p.name.endswith(".pub")]
    assert len(private_keys) == 2 + 3 + 1
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in private_keys} == {p.name: "0o600" for p in private_keys}
    # node-local data and federated evaluation
    for m in metrics:
        assert m["aggregation_error"] < 1e-6 and m["test_loss"] is None and "federated evaluation only" in m["test_set"]
        assert set(m["client_test_losses"]) == {"0", "1", "2"}, m
        losses, tokens = m["client_test_losses"], m["client_test_tokens"]
        assert all(math.isfinite(x) and x > 0 for x in losses.values()) and all(t > 0 for t in tokens.values())
        assert m["client_test_loss"] == pytest.approx(sum(losses[k] * tokens[k] for k in losses) / sum(tokens.values()))
        assert m["client_weights_from"] == "uniform"  # reported sizes are unverifiable claims: uniform by default
    assert "[round 2] test loss n/a  client test loss" in done.stdout, output
    assert "| 2 | flora | n/a |" in write_report(tmp_path / "out")  # the report copes with no server test set
    names = [str(f) for f in node_files]
    server_opened, client_opened = _opened(opened, "server"), _opened(opened, "client")
    assert server_opened and client_opened, sorted(p.name for p in opened.iterdir())
    for log_name, paths in server_opened.items():
        assert any(str(tmp_path / "model") in p for p in paths)  # the log sees what the server does read
        assert not [p for p in paths if any(n in p for n in names) or "never-read" in p], log_name
    readers = {n: [log for log, paths in client_opened.items() if n in paths] for n in names}
    assert all(readers.values()), readers  # every node's file was read, by a client process
    assert all(sum(n in paths for n in names) <= 1 for paths in client_opened.values()), client_opened
    superlink = (work / "logs" / "superlink.log").read_text()
    assert not [n for n in names if n in superlink]


def test_deploy_script_never_kills_what_it_did_not_start(tmp_path, tiny_tokenizer):
    """Pid files left in a reused --work dir point at someone else's processes by now: the script must
    not signal them, even when it stops early (here: --certs names a missing directory)."""
    config = _tiny_config(tmp_path, tiny_tokenizer)
    work = tmp_path / "work"
    (work / "pids").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        for name in ("superlink", "supernode-0"):
            (work / "pids" / f"{name}.pid").write_text(str(bystander.pid))
        env = dict(os.environ, FLORA_PYTHON=sys.executable, FLORA_BASE_PORT=str(_free_port_block()))
        done = subprocess.run(["bash", str(REPO / "scripts" / "deploy_local.sh"), "--config", str(config),
                               "--work", str(work), "--certs", str(tmp_path / "missing")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        time.sleep(0.5)
        assert bystander.poll() is None, "the script killed a process it did not start"
        assert not list((work / "pids").glob("*.pid"))  # the stale pid files are gone
    finally:
        bystander.kill()
        bystander.wait()


def test_deploy_keys_make_a_verifiable_chain_and_flower_readable_node_keys(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from flora.deploy_keys import write_node_key, write_tls

    paths = write_tls(tmp_path / "tls", ["127.0.0.1", "10.77.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                         ipaddress.ip_address("10.77.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert oct(paths["server.key"].stat().st_mode & 0o777) == "0o600"
    before = paths["ca.crt"].read_bytes()
    assert write_tls(tmp_path / "tls", ["127.0.0.1"])["ca.crt"].read_bytes() == before  # kept, not replaced
    private, public = write_node_key(tmp_path / "keys", "supernode-0")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()



# --- a deployed node's ClientApp, called directly: a fresh Runtime stands for each message's new process -------

def _as_flower_task(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _message(config, kind: str, first: int, count: int, tensors: dict | None = None):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    meta = ConfigRecord({"flora-config": config.to_json(), "first-index": first, "num-updates": count,
                         "server-round": first + 1, "truncated-rank": 0})
    arrays = ArrayRecord(torch_state_dict=tensors) if tensors else ArrayRecord()
    return Message(content=RecordDict({"arrays": arrays, "config": meta}), dst_node_id=1, message_type=kind)


def _deployed_node(assets_dir, state=None):
    from flwr.app import Context, RecordDict
    return Context(run_id=1, node_id=1, state=state if state is not None else RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 3, "data-path": str(assets_dir / "data.jsonl")})


def _new_process(monkeypatch):
    import flora.client_app as client_app
    from flora.runtime import Runtime
    monkeypatch.setattr(client_app, "PROCESS_RUNTIME", Runtime())
    return client_app


def _node_config(assets_dir, tmp_path, **overrides):
    from test_federation import tiny_config
    return tiny_config(assets_dir, tmp_path, **{"ranks": [4], "local_steps": 3, "lr": 5e-2, "client_eval_examples": 4,
                                                **overrides})


def _eval_loss(reply) -> float:
    assert reply.content["config"]["error"] == ""
    return float(reply.content["metrics"]["eval-loss"])


def test_a_deployed_standalone_node_keeps_its_own_adapter_across_processes(assets_dir, tmp_path, monkeypatch):
    """A per-client method's node (standalone) must continue, and evaluate with, the adapter it trained, which
    never leaves it: a new process evaluating the same round gives the same loss as the process that trained,
    not the base model's."""
    _as_flower_task(monkeypatch)
    config = _node_config(assets_dir, tmp_path, method="standalone", rounds=2, client_eval_examples=8)
    context = _deployed_node(assets_dir)
    client_app = _new_process(monkeypatch)
    assert client_app.train(_message(config, "train", 0, 0), context).content["config"]["error"] == ""
    trained = _eval_loss(client_app.evaluate(_message(config, "evaluate", 0, 1), context))  # round 1: no merge
    again = _eval_loss(_new_process(monkeypatch).evaluate(_message(config, "evaluate", 0, 1), context))
    base = _eval_loss(_new_process(monkeypatch).evaluate(_message(config, "evaluate", 0, 1),
                                                         _deployed_node(assets_dir)))  # a node that trained nothing
    assert again == pytest.approx(trained, rel=1e-6)
    assert abs(trained - base) > 1e-3


def test_a_deployed_node_rebuilds_the_global_weights_from_its_bounded_state(assets_dir, tmp_path, monkeypatch):
    """Evaluate messages built by the server's own catch-up over 12 rounds of random FLoRA-style merges; the node
    takes part in rounds 1-2 and 11-12 (the server folds 3-10 into its history's base meanwhile, so its return
    starts over from index 0). After every message a new process rebuilt from context.state holds the global
    weights, and what the node keeps stays one entry of at most one dense delta."""
    import torch

    from flora.catchup import History, catch_up, dense_model_bytes
    from flora.codec import updates_to_tensors
    from flora.modeling import layer_shapes
    from flora.rounds import RoundUpdate

    _as_flower_task(monkeypatch)
    config = _node_config(assets_dir, tmp_path, rounds=12)
    client_app = _new_process(monkeypatch)
    model = client_app.PROCESS_RUNTIME.client_state(config).model
    base = {name: model.get_submodule(name).weight.detach().double().clone()
            for name in layer_shapes(model, config.targets)}
    history = History(dense_model_bytes(layer_shapes(model, config.targets)))
    generator = torch.Generator().manual_seed(0)
    reference = dict(base)
    context, applied = _deployed_node(assets_dir), 0
    for t in range(1, 13):
        update = RoundUpdate(round=t)
        for name, (out_dim, in_dim) in layer_shapes(model, config.targets).items():
            A, B = torch.randn(6, in_dim, generator=generator) * 0.02, torch.randn(out_dim, 6, generator=generator) * 0.02
            update.merge[name] = (A, B)
            reference[name] = reference[name] + B.double() @ A.double()
        history.append(update)
        if 2 < t < 11:
            continue
        first, entries = catch_up(history, applied)
        tensors = updates_to_tensors(entries, first, None)
        process = _new_process(monkeypatch)
        _eval_loss(process.evaluate(_message(config, "evaluate", first, t - first, tensors), context))
        applied = process.PROCESS_RUNTIME.client_state(config).applied
        assert applied == t and int(context.state["flora-history-count"]["count"]) == t
        kept = context.state["flora-history"].to_torch_state_dict()
        assert "u0.span" in kept or t == 1  # one entry from index 0 standing for every round
        assert sum(v.numel() * v.element_size() for v in kept.values()) <= history.dense_bytes + 8
        rebuilt = _new_process(monkeypatch)
        rebuilt._restore_history(context, config, 0)
        weights = rebuilt.PROCESS_RUNTIME.client_state(config).model
        for name, expected in reference.items():
            ours = weights.get_submodule(name).weight.detach().double()
            assert float((ours - expected).norm()) <= 1e-5 * float(expected.norm()), (t, name)
    assert history.base_span > 2  # the server really folded past the node
