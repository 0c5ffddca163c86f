"""Federated rounds on a tiny model: every method, exactness, dropout, catch-up, config errors, Flower parity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flora.client import FederationClient
from flora.config import ConfigError, RunConfig, load_config
from flora.engines import run_in_process
from flora.runner import server_for
from flora.runtime import Runtime


def tiny_config(assets_dir, tmp_path, **overrides) -> RunConfig:
    values = dict(model=str(assets_dir / "model"), data=str(assets_dir / "data.jsonl"), num_clients=3,
                  ranks=[4, 2, 1], rounds=2, local_steps=2, batch_size=4, micro_batch_size=2, lr=5e-3, cutoff=64,
                  max_examples=0, partition="iid", test_fraction=0.1, eval_examples=0, dropout=0.0,
                  out_dir=str(tmp_path / "out"))
    values.update(overrides)
    return RunConfig.from_dict(values)


@pytest.mark.parametrize("method, ranks", [
    ("flora", [4, 2, 1]), ("zeropad", [4, 2, 1]), ("flexlora", [4, 2, 1]), ("fedit", [2]), ("ffa", [2]),
    ("fedex", [2]), ("standalone", [4, 2, 1]), ("centralized", [4, 2, 1]), ("flora-warm", [4, 2, 1]),
    ("raflora", [4, 2, 1]), ("florana", [2]), ("fedplora", [4, 2, 1]),
])
def test_every_method_runs_and_writes_metrics(assets_dir, tmp_path, method, ranks):
    config = tiny_config(assets_dir, tmp_path, method=method, ranks=ranks)
    metrics = run_in_process(config, progress=lambda _: None).metrics
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and [m["round"] for m in lines] == [1, 2]
    for key in ("round", "method", "aggregation_error", "train_loss", "test_loss", "bytes_up", "bytes_down",
                "clients_ok", "clients_failed", "seconds"):
        assert key in lines[0]
    assert all(math.isfinite(m["test_loss"]) for m in metrics)
    if method in ("flora", "fedex", "ffa", "flexlora", "centralized", "flora-warm"):
        assert metrics[-1]["aggregation_error"] < 1e-4
    if method in ("fedit", "zeropad", "raflora", "florana", "fedplora"):
        assert metrics[-1]["aggregation_error"] > 1e-3
    assert (tmp_path / "out" / "config.toml").is_file() and (tmp_path / "out" / "partition.json").is_file()


def test_fedplora_with_equal_ranks_runs_as_fedit(assets_dir, tmp_path):
    """Every client draws all R modules, folds nothing and starts at the global adapter (round 1: FedIT's shared
    initialisation); the server's per-module average is FedIT's: the same run, round for round."""
    fedit = run_in_process(tiny_config(assets_dir, tmp_path / "fedit", method="fedit", ranks=[2]),
                           progress=lambda _: None).metrics
    plora = run_in_process(tiny_config(assets_dir, tmp_path / "plora", method="fedplora", ranks=[2]),
                           progress=lambda _: None).metrics
    for ours, theirs in zip(plora, fedit):
        for key in ("test_loss", "train_loss", "aggregation_error"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        assert ours["bytes_up"] == theirs["bytes_up"] and ours["bytes_down"] == theirs["bytes_down"]


def test_fedplora_client_starts_at_the_global_model_trains_its_drawn_modules_and_restores_its_base(
        assets_dir, tmp_path, runtime):
    from flora.client import global_rank, module_draw

    config = tiny_config(assets_dir, tmp_path, method="fedplora", ranks=[4, 2, 1], rounds=1)
    server = run_in_process(config, runtime=runtime, progress=lambda _: None)
    assert global_rank(config) == 4
    client = FederationClient(config, runtime)
    client.state.apply(server.history, 0)
    adapter = client.state.adapter
    assert all(A.shape[0] == 4 for A, _ in adapter.values())
    draws = {k: module_draw(config, 2, k, config.client_rank(k)) for k in range(3)}
    assert [len(d) for d in draws.values()] == [4, 2, 1] and draws[0] == [0, 1, 2, 3]
    assert module_draw(config, 2, 1, 2) == draws[1]  # seeded: the server draws the same modules
    assert len({tuple(module_draw(config, r, 1, 2)) for r in range(1, 9)}) > 1  # and a new draw each round
    for k in (1, 2):
        init, fold = client.start(k, config.client_rank(k), 2)
        for name, (A, B) in adapter.items():  # folded + trained modules = the global adapter: no init noise
            torch.testing.assert_close(fold[name] + init[name][1] @ init[name][0], B @ A)
            torch.testing.assert_close(init[name][0], A[draws[k]])
    before = {n: p.detach().clone() for n, p in client.state.model.state_dict().items()}
    first, updates = server.updates_for("node-new")
    reply = client.train(1, "node-x", 2, first + len(updates), [])
    assert reply.error is None and all(A.shape[0] == 2 for A, _ in reply.factors.values())
    assert all(torch.equal(before[n], p) for n, p in client.state.model.state_dict().items())  # fold undone exactly
    too_big = client.train(1, "node-x", 2, first + len(updates), [], rank=5)
    assert too_big.factors is None and "global adapter's rank 4" in too_big.error


def test_flora_lowers_test_loss(assets_dir, tmp_path):
    config = tiny_config(assets_dir, tmp_path, rounds=4, local_steps=4, lr=2e-2)
    server_initial = server_for(config, Runtime()).evaluate()
    metrics = run_in_process(config, progress=lambda _: None).metrics
    assert metrics[-1]["test_loss"] < server_initial - 0.2


def test_dropout_round_goes_on_with_renormalised_weights(assets_dir, tmp_path, caplog):
    config = tiny_config(assets_dir, tmp_path, rounds=3)
    metrics = run_in_process(config, progress=lambda _: None, fail=lambda r, k: r == 2 and k == 1).metrics
    assert [m["clients_ok"] for m in metrics] == [3, 2, 3]
    assert [m["clients_failed"] for m in metrics] == [0, 1, 0]
    assert metrics[1]["aggregation_error"] < 1e-4  # exact over the replies that arrived
    assert "client 1 (node node-1) failed: injected failure" in caplog.text


def test_client_that_missed_rounds_catches_up_exactly(assets_dir, tmp_path, runtime):
    config = tiny_config(assets_dir, tmp_path, rounds=3)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    for round_ in range(1, 4):
        replies = []
        for k in range(3):
            if k == 2 and round_ < 3:
                continue  # client 2 misses rounds 1 and 2
            first, updates = server.updates_for(f"node-{k}")
            replies.append(client.train(k, f"node-{k}", round_, first, updates))
        server.aggregate_round(round_, replies, 0, 0.0)
    # A brand-new process for client 2 (restarted): its state is rebuilt from the history alone.
    fresh = FederationClient(config, Runtime())
    first, updates = server.updates_for("node-new")
    assert first == 0 and sum(u.span for u in updates) == 3  # the history may come collapsed (flora/catchup.py)
    fresh.state.apply(updates, first)
    for name, param in server.state.model.state_dict().items():
        other = fresh.state.model.state_dict()[name]
        assert float((param - other).norm()) <= 1e-6 * max(float(param.norm()), 1e-12), name


def test_stale_client_is_left_out_and_resynced(assets_dir, tmp_path, runtime):
    config = tiny_config(assets_dir, tmp_path, rounds=2)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
    server.aggregate_round(1, replies, 0, 0.0)
    restarted = FederationClient(config, Runtime())  # the client process restarted; the server thinks node-0 is in sync
    server.node_applied["node-0"] = 1
    reply = restarted.train(0, "node-0", 2, *server.updates_for("node-0"))
    assert reply.error.startswith("resync") and reply.applied == 0
    record = server.aggregate_round(2, [reply], 0, 0.0)
    assert record["clients_failed"] == 1 and server.node_applied["node-0"] == 0
    assert server.updates_for("node-0")[0] == 0  # next round it gets the whole history


def test_rejected_update_is_logged_and_round_goes_on(assets_dir, tmp_path, caplog, runtime):
    config = tiny_config(assets_dir, tmp_path, rounds=1)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
    name = next(iter(replies[1].factors))
    replies[1].factors[name][1][0, 0] = float("nan")
    record = server.aggregate_round(1, replies, 0, 0.0)
    assert record["clients_ok"] == 2 and record["clients_rejected"] == 1
    assert f"rejected update: client 1 (node node-1): layer '{name}': non-finite" in caplog.text


@pytest.mark.parametrize("overrides, message", [
    (["method=fedavg"], "method = 'fedavg'"),
    (["ranks=4,2"], "expected 1 or num_clients = 4 values"),
    (["method=fedit", "ranks=4,2,2,2"], "needs equal ranks"),
    (["rounds=0"], "rounds = 0"),
    (["rounds=two"], "rounds = 'two': expected int"),
    (["colour=red"], "unknown key"),
    (["sample_fraction=0"], "sample_fraction"),
    (["server_lr=0"], "server_lr = 0.0: expected a finite step > 0"),
    (["server_lr=inf"], "server_lr = inf: expected a finite step > 0"),
    (["method=fedit", "ranks=4", "server_lr=2"], "server_lr = 2.0: a server step applies to methods that merge"),
    (["server_lr=2", "dp_noise_multiplier=0.5", "dp_clip_norm=1", "weighting=uniform"],
     "server_lr = 2.0: with differential privacy"),
    (["dropout_sampler=fast"], "dropout_sampler = 'fast': expected one of sparse, torch"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nmethod = "zeropad"\nranks = [8, 4]\nnum_clients = 2\n')
    config = load_config(path, ["rounds=7", "lr=1e-3"])
    assert (config.method, config.ranks, config.rounds, config.lr) == ("zeropad", [8, 4], 7, 1e-3)
    path.write_text("[run\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_flower_codec_roundtrip():
    from flwr.app import ArrayRecord

    from flora.codec import factors_from_tensors, factors_to_tensors, updates_from_tensors, updates_to_tensors
    from flora.rounds import RoundUpdate

    A, B = torch.randn(3, 5), torch.randn(4, 3)
    updates = [RoundUpdate(round=1, merge={"l.q": (A, B), "l.k": torch.randn(4, 5)}),
               RoundUpdate(round=2, adapter={"l.q": (A, B)}, truncate=True)]
    wire = ArrayRecord(torch_state_dict=updates_to_tensors(updates, 5, rank=2))  # through Flower's record type
    decoded = updates_from_tensors(wire.to_torch_state_dict(), 5, 2)
    torch.testing.assert_close(decoded[0].merge["l.q"][1], B)
    torch.testing.assert_close(decoded[0].merge["l.k"], updates[0].merge["l.k"])
    torch.testing.assert_close(decoded[1].adapter["l.q"][0], A[:2])  # truncated to the node's rank
    torch.testing.assert_close(decoded[1].adapter["l.q"][1], B[:, :2])
    factors = factors_from_tensors(ArrayRecord(torch_state_dict=factors_to_tensors({"a.b": (A, B)})).to_torch_state_dict())
    torch.testing.assert_close(factors["a.b"][0], A)
    torch.testing.assert_close(factors["a.b"][1], B)


def test_flower_path_rejects_bad_input_before_submitting_and_stops_its_superlink(assets_dir, tmp_path):
    """The SuperLink starts while the input is checked; a bad data file is an error naming it, nothing was
    submitted (no out dir), and no SuperLink is left running."""
    import psutil

    from flora.simulation import run_flower_simulation

    config = tiny_config(assets_dir, tmp_path, data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(Exception, match="missing.jsonl"):
        run_flower_simulation(config, progress=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in psutil.Process().children(recursive=True) if "superlink" in " ".join(p.cmdline())]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, dict(dp_noise_multiplier=0.5, dp_clip_norm=0.05, dp_noise_seed=1,
                                               weighting="uniform"), dict(method="fedplora")],
                         ids=["plain", "differential-privacy", "fedplora-seeded-module-draws"])
def test_flower_simulation_matches_in_process_run(assets_dir, tmp_path, options):
    from flora.simulation import run_flower_simulation

    config = tiny_config(assets_dir, tmp_path / "local", **options)
    reference = run_in_process(config, progress=lambda _: None).metrics
    flower_config = tiny_config(assets_dir, tmp_path / "flower", **options)
    run_flower_simulation(flower_config)
    lines = [json.loads(x) for x in (tmp_path / "flower" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["clients_ok"] for m in lines] == [3, 3]
    for ours, theirs in zip(reference, lines):
        assert theirs["test_loss"] == pytest.approx(ours["test_loss"], rel=1e-5)
        assert theirs["bytes_up"] == ours["bytes_up"]
        # federated evaluation: evaluate messages through Flower = the in-process engine's client.evaluate
        assert set(theirs["client_test_losses"]) == {"0", "1", "2"}
        assert theirs["client_test_losses"] == pytest.approx(ours["client_test_losses"], rel=1e-5)
        assert theirs["client_test_tokens"] == ours["client_test_tokens"]
        # the Flower engine counts the serialised payload (.npy headers included), the local engine raw tensor bytes
        assert theirs["bytes_down_eval"] >= ours["bytes_down_eval"] > 0
        if options.get("dp_noise_multiplier"):
            assert theirs["dp_epsilon"] == pytest.approx(ours["dp_epsilon"]) and theirs["dp_participants"] == 3


class Crash(Exception):
    pass


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


@pytest.mark.parametrize("method, ranks", [("flora", [4, 2, 1]), ("zeropad", [4, 2, 1]), ("fedex", [2]),
                                           ("standalone", [4, 2, 1]), ("flora-warm", [4, 2, 1]),
                                           ("fedplora", [4, 2, 1])])
def test_resume_equals_uninterrupted_run(assets_dir, tmp_path, method, ranks):
    config = tiny_config(assets_dir, tmp_path / "full", method=method, ranks=ranks, rounds=3)
    uninterrupted = run_in_process(config, progress=lambda _: None)
    reference, reference_weights = uninterrupted.metrics, _weights(uninterrupted.state.model)

    def crash(round_, client):
        if round_ == 3 and client == 1:
            raise Crash("killed during round 3")
        return False

    stopped = tiny_config(assets_dir, tmp_path / "stopped", method=method, ranks=ranks, rounds=3)
    with pytest.raises(Crash):
        run_in_process(stopped, progress=lambda _: None, fail=crash)
    assert len((tmp_path / "stopped" / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed_server = run_in_process(stopped, progress=lambda _: None, resume=True)  # a new process: nothing cached
    resumed = resumed_server.metrics
    assert [m["round"] for m in resumed] == [1, 2, 3]
    for ours, theirs in zip(reference, resumed):
        for key in ("test_loss", "train_loss", "aggregation_error", "bytes_up", "clients_ok"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-6, abs=1e-12), key
    # restarted client processes download the whole history once: the real cost of the restart
    assert [m["bytes_down"] for m in resumed[:2]] == [m["bytes_down"] for m in reference[:2]]
    assert resumed[2]["bytes_down"] >= reference[2]["bytes_down"]
    lines = (tmp_path / "stopped" / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
    for name, weight in _weights(resumed_server.state.model).items():
        expected = reference_weights[name]
        assert float((weight - expected).norm()) <= 1e-6 * max(float(expected.norm()), 1e-12), name


def test_resume_refuses_changed_config_and_bad_checkpoints(assets_dir, tmp_path):
    from flora.checkpoint import CheckpointError

    config = tiny_config(assets_dir, tmp_path, rounds=1)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run_in_process(config, progress=lambda _: None, resume=True)
    run_in_process(config, progress=lambda _: None)
    state = tmp_path / "out" / "checkpoint" / "state.json"
    saved = state.read_text()
    metrics_before = (tmp_path / "out" / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"lr: 0.005 -> 0.1"):
        run_in_process(tiny_config(assets_dir, tmp_path, rounds=2, lr=0.1), progress=lambda _: None, resume=True)
    # a checkpoint written before dropout_sampler existed ran torch's dropout: resuming it with the new default
    # would not continue the same run, so it is refused by name
    older = json.loads(saved)
    del older["config"]["dropout_sampler"]
    state.write_text(json.dumps(older))
    with pytest.raises(CheckpointError, match=r"dropout_sampler: 'torch' -> 'sparse'"):
        run_in_process(tiny_config(assets_dir, tmp_path, rounds=2), progress=lambda _: None, resume=True)
    state.write_text(saved[: len(saved) // 2])
    with pytest.raises(CheckpointError, match="unreadable checkpoint state"):
        run_in_process(tiny_config(assets_dir, tmp_path, rounds=2), progress=lambda _: None, resume=True)
    state.write_text(saved)
    round_file = tmp_path / "out" / "checkpoint" / "rounds" / "00001.safetensors"
    round_file.write_bytes(round_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="00001.safetensors: unreadable round file"):
        run_in_process(tiny_config(assets_dir, tmp_path, rounds=2), progress=lambda _: None, resume=True)
    # nothing already written was lost
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics_before
    assert state.read_text() == saved
    # a fresh run into the same out dir replaces the old checkpoint instead of mixing with it
    run_in_process(tiny_config(assets_dir, tmp_path, rounds=1, lr=0.1), progress=lambda _: None)
    assert json.loads(state.read_text())["config"]["lr"] == 0.1 and round_file.stat().st_size > 100


def _max_abs_cosine(rows: torch.Tensor, others: torch.Tensor) -> float:
    a = torch.nn.functional.normalize(rows.double(), dim=1)
    b = torch.nn.functional.normalize(others.double(), dim=1)
    return float((a @ b.T).abs().max())


def test_private_broadcast_reveals_no_client_factors_and_merges_like_stacking(assets_dir, tmp_path):
    weights = {}
    for form in ("private", "stacked"):
        runtime = Runtime()
        config = tiny_config(assets_dir, tmp_path / form, rounds=1, broadcast=form)
        server = server_for(config, runtime)
        client = FederationClient(config, runtime)
        replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
        server.aggregate_round(1, replies, 0, 0.0)
        weights[form] = _weights(server.state.model)
        if form != "private":
            continue
        update = server.history[-1]
        assert set(update.forms) <= {"refactorized", "dense"} and update.forms
        for name, merge in update.merge.items():
            for reply in replies:
                A_k, B_k = reply.factors[name]
                if isinstance(merge, torch.Tensor):  # dense Σ p_k B_k A_k: not any single client's product
                    assert float((merge - B_k @ A_k).norm()) > 1e-3 * float(merge.norm())
                    continue
                A, B = merge
                assert _max_abs_cosine(A, A_k) < 1 - 1e-4, name  # no row of A is a (scaled) client row
                assert _max_abs_cosine(B.T, B_k.T) < 1 - 1e-4, name
    for name, expected in weights["stacked"].items():
        got = weights["private"][name]
        assert float((got - expected).norm()) <= 1e-5 * max(float(expected.norm()), 1e-12), name


@pytest.mark.parametrize("attack", ["scaled", "random"])
def test_outlier_update_is_rejected_and_model_stays_near_honest_run(assets_dir, tmp_path, caplog, attack):
    """Client 1 sends its update ×50 or a random one of the same shapes (large norm): with
    ``outlier_mad`` the server rejects it and the global model stays near the honest run."""
    def final_delta(outlier_mad: float, malicious: bool, dropped: bool = False) -> dict[str, torch.Tensor]:
        runtime = Runtime()
        config = tiny_config(assets_dir, tmp_path, rounds=1, num_clients=4, ranks=[4, 2, 2, 1], outlier_mad=outlier_mad)
        server = server_for(config, runtime)
        before = _weights(server.state.model)
        client = FederationClient(config, runtime)
        replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(4)]
        if malicious:
            generator = torch.Generator().manual_seed(1)
            replies[1].factors = {
                name: ((A, B * 50) if attack == "scaled" else
                       (torch.randn(A.shape, generator=generator), torch.randn(B.shape, generator=generator)))
                for name, (A, B) in replies[1].factors.items()}
        if dropped:
            replies.pop(1)
        record = server.aggregate_round(1, replies, 0, 0.0)
        assert record["clients_rejected"] == (1 if malicious and outlier_mad else 0)
        return {k: v - before[k] for k, v in _weights(server.state.model).items()}

    honest = final_delta(3.5, malicious=False)
    defended = final_delta(3.5, malicious=True)
    undefended = final_delta(0.0, malicious=True)
    assert "client 1 (node node-1): norm" in caplog.text and "is an outlier" in caplog.text

    def distance(a, b):
        return sum(float((a[k] - b[k]).norm()) ** 2 for k in a) ** 0.5

    honest_norm = sum(float(v.norm()) ** 2 for v in honest.values()) ** 0.5
    without_client_1 = final_delta(3.5, malicious=False, dropped=True)
    assert distance(defended, without_client_1) <= 1e-6 * honest_norm  # rejection == leaving client 1 out
    assert distance(defended, honest) < honest_norm  # only client 1's honest share is missing
    assert distance(undefended, honest) > 10 * distance(defended, honest)


def test_robust_helpers_reference_values():
    from flora.lora.robust import clip_update, mad_outliers, update_norm

    A, B = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert update_norm({"l": (A, B)}) == pytest.approx(float((B @ A).norm()))
    clipped, factor = clip_update({"l": (A, B)}, 0.5 * float((B @ A).norm()))
    assert factor == pytest.approx(0.5) and update_norm(clipped) == pytest.approx(0.5 * float((B @ A).norm()))
    # median 2, MAD 1: 10 has modified z 0.6745 * 8 = 5.4 > 3.5; 3 has 0.67
    assert mad_outliers([1.0, 2.0, 3.0, 10.0, 2.0], 3.5) == [None, None, None, pytest.approx(5.396), None]
    assert mad_outliers([1.0, 100.0], 3.5) == [None, None]


@pytest.mark.parametrize("method, ranks", [("flora", [4, 2, 1]), ("fedit", [2])])
def test_run_model_from_checkpoint_is_the_final_global_model(assets_dir, tmp_path, method, ranks):
    from flora.checkpoint import load_run_model

    state = run_in_process(tiny_config(assets_dir, tmp_path, method=method, ranks=ranks), progress=lambda _: None).state
    expected = _weights(state.model)
    for name, (A, B) in (state.adapter or {}).items():  # FedIT's final global adapter is part of the model
        expected[f"{name}.weight"] += B @ A
    loaded, config, checkpoint = load_run_model(tmp_path / "out")
    assert config.method == method and checkpoint.rounds_done == 2
    for name, weight in loaded.model.state_dict().items():
        assert float((weight - expected[name]).norm()) <= 1e-6 * max(float(expected[name].norm()), 1e-12), name


def test_eval_every_skips_rounds_and_report_plot_and_resume_handle_them(assets_dir, tmp_path):
    """``eval_every = 2`` over 3 rounds evaluates rounds 2 and 3 (the last) with the losses of a run that evaluates
    every round (evaluation changes nothing), round 1 is NaN (``null`` in metrics.jsonl, ``n/a`` in results.md) and its nodes do not evaluate, the
    plot is written, and a run stopped in round 3 resumes to the same metrics."""
    from flora.report import write_report
    from flora.runner import format_round

    every = run_in_process(tiny_config(assets_dir, tmp_path / "every", rounds=3, eval_every=1),
                           progress=lambda _: None).metrics
    config = tiny_config(assets_dir, tmp_path / "sparse", rounds=3, eval_every=2, client_eval_examples=2)
    sparse = run_in_process(config, progress=lambda _: None).metrics
    assert math.isnan(sparse[0]["test_loss"]) and "client_test_loss" not in sparse[0]  # nor federated evaluation
    assert sparse[0]["eval_seconds"] == 0.0
    for r in (1, 2):
        assert sparse[r]["test_loss"] == pytest.approx(every[r]["test_loss"], rel=1e-9)
        assert len(sparse[r]["client_test_losses"]) == 3
    assert [m["train_loss"] for m in sparse] == pytest.approx([m["train_loss"] for m in every], rel=1e-9)
    out = tmp_path / "sparse" / "out"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["test_loss"] is None
    table = write_report(out)
    assert "| 1 | flora | n/a |" in table and (out / "loss.png").stat().st_size > 0
    assert "test loss n/a" in format_round(sparse[0])

    def crash(round_, client):
        if round_ == 3 and client == 1:
            raise Crash("killed during round 3")
        return False

    stopped = tiny_config(assets_dir, tmp_path / "stopped", rounds=3, eval_every=2, client_eval_examples=2)
    with pytest.raises(Crash):
        run_in_process(stopped, progress=lambda _: None, fail=crash)
    resumed = run_in_process(stopped, progress=lambda _: None, resume=True).metrics
    assert math.isnan(resumed[0]["test_loss"])
    assert [m["test_loss"] for m in resumed[1:]] == pytest.approx([m["test_loss"] for m in sparse[1:]], rel=1e-6)


def test_server_lr_scales_the_merged_update_exactly_and_keeps_the_rule_exact(assets_dir, tmp_path):
    """One round from the same base: the base weights take server_lr × the aggregate FLoRA merges at 1 (same
    client training, same aggregation error); FLoRA-warm stays exact with a server step."""
    from flora.models.loader import load_model

    runs = {lr: run_in_process(tiny_config(assets_dir, tmp_path / str(lr), rounds=1, server_lr=lr),
                               progress=lambda _: None) for lr in (1.0, 2.5)}
    base = load_model(str(assets_dir / "model")).model.state_dict()
    one, step = (runs[lr].state.model.state_dict() for lr in (1.0, 2.5))
    moved = [n for n in base if not torch.equal(one[n], base[n])]
    assert moved and all(".layers." in n for n in moved)
    delta_one = torch.cat([(one[n] - base[n]).flatten().double() for n in moved])
    delta_step = torch.cat([(step[n] - base[n]).flatten().double() for n in moved])
    assert torch.linalg.norm(delta_step - 2.5 * delta_one) <= 1e-4 * torch.linalg.norm(2.5 * delta_one)
    assert all(torch.equal(one[n], step[n]) for n in base if n not in moved)
    assert runs[2.5].metrics[0]["train_loss"] == runs[1.0].metrics[0]["train_loss"]
    assert runs[2.5].metrics[0]["aggregation_error"] == pytest.approx(runs[1.0].metrics[0]["aggregation_error"])
    warm = run_in_process(tiny_config(assets_dir, tmp_path / "warm", method="flora-warm", server_lr=2.0),
                          progress=lambda _: None).metrics
    assert all(m["aggregation_error"] < 1e-4 and math.isfinite(m["test_loss"]) for m in warm)
