"""Flower skin: a run as a Flower simulation on Flower's supported path, one SuperNode per client.

``flora run`` checks the config, model, data (and the checkpoint it resumes) in this process first, so bad
input fails with ``flora: error: ...`` before anything is submitted. Then it does what ``flwr run`` against a
local simulation SuperLink does, with nothing shared with other runs: it starts its own
``flower-superlink --simulation`` on free ports with a private Flower home, submits the run with
``flwr run APP --run-config ... --federation-config ...`` (every RunConfig key by name:
:func:`flora.app_config.run_config_overrides`; SuperNodes and client resources in the federation config),
streams the run's log (progress lines included) and stops the SuperLink it started.

APP is a Flower app directory written for the run: a ``pyproject.toml`` naming the ServerApp and ClientApp by
object reference (``flora.server_app:simulation_app``, whose server knows the partitions it made;
``flora.client_app:app`` or, in the robustness tests, ``flora.adversary:hostile_app``) and declaring the run
config; the code is the installed ``flora`` package, which Flower's simulation process imports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w
from flwr.supercore.constant import FLWR_DISABLE_UPDATE_CHECK

from flora.app_config import app_config_table, run_config_overrides
from flora.config import ConfigError, RunConfig
from flora.progress import ProgressView
from flora.tracking import check_tracking

CLIENT_APP = "flora.client_app:app"
SERVER_APP = "flora.server_app:simulation_app"
CONNECTION = "flora-local"
SHOWN = ("[flora]", "[round ", "  round ", "flora: ")  # the run's own lines; the rest goes to OUT/flower.log
QUIET_SHOWN = ("[round ", "flora: ", "[flora] WARNING", "[flora] ERROR")  # what --quiet keeps of them
STARTUP_SECONDS = 120.0


def federation_config(config: RunConfig) -> dict:
    """Flower's simulation settings (``--federation-config``): one SuperNode per client; each client reserves
    ``client_cpus`` cores (0 = all, so clients run one at a time) and ``client_gpus`` GPUs (fractions share one:
    0.5 = two clients per GPU). Ray hides the GPUs from a client that reserves none, so ``device = "cuda"``
    needs ``client_gpus > 0``."""
    if config.device.startswith("cuda") and not config.client_gpus:
        raise ConfigError(f"device = {config.device!r} in a Flower simulation: set client_gpus > 0 (e.g. 0.5 for "
                          f"two clients per GPU); Ray hides the GPUs from clients that reserve none")
    cpus = os.cpu_count() or 1
    return {"num-supernodes": config.num_partitions, "client-resources-num-cpus": config.client_cpus or cpus,
            "client-resources-num-gpus": float(config.client_gpus), "init-args-num-cpus": cpus,
            "init-args-log-to-driver": True}


def preflight(config: RunConfig, resume: bool) -> None:
    """Load what the run's server will load (model, data, partition; the checkpoint to resume): bad input
    raises here, in the caller's process, before anything is submitted."""
    from flora.checkpoint import load_checkpoint
    from flora.runtime import Runtime

    federation_config(config)
    run_config_overrides(config)
    check_tracking(config)
    if resume:
        load_checkpoint(config.out_dir, config)
    runtime = Runtime()
    runtime.server_assets(config)
    runtime.simulation_data(config)  # the dataset and partition the simulation server deals out


def write_app(directory: Path, client_app: str = CLIENT_APP, server_app: str = SERVER_APP) -> Path:
    """A Flower app directory: ``pyproject.toml`` with the components and the run config's keys."""
    directory.mkdir(parents=True, exist_ok=True)
    project = {"project": {"name": "flora-run", "version": "1.0.0", "description": "a flora run",
                           "license": "Apache-2.0", "dependencies": []},
               "tool": {"flwr": {"app": {"publisher": "flora",
                                         "components": {"serverapp": server_app, "clientapp": client_app},
                                         "config": app_config_table()}}}}
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _flower_env(home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    env[FLWR_DISABLE_UPDATE_CHECK] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the simulation process imports flora from where this process does (a checkout on PYTHONPATH included)
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"flora run: `{name}` not found (install flwr[simulation])")
    return found


def _wait_ready(link: subprocess.Popen, port: int, log: Path) -> None:
    import httpx
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if link.poll() is not None:
            raise SystemExit(f"flora run: flower-superlink exited with code {link.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"flora run: flower-superlink did not answer within {STARTUP_SECONDS:.0f} s; see {log}")


def _stop(process: subprocess.Popen) -> None:
    """Stop ``process`` and its session (the simulation process and Ray's workers it started)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_flower_simulation(config: RunConfig, resume: bool = False, progress: Callable[[str], None] = print,
                          client_app: str = CLIENT_APP, quiet: bool = False, checked: bool = False) -> None:
    """Run ``config`` as a Flower simulation (see the module docstring); raises ``SystemExit`` if it did not
    finish its rounds. ``client_app``: the ClientApp's object reference (the hostile one of
    ``flora/adversary.py`` in the robustness tests). ``progress`` gets the run's lines (per-client step lines
    become progress bars on a terminal), ``quiet`` keeps only the round lines. ``checked``: the caller ran
    :func:`preflight`."""
    out = Path(config.out_dir)
    log_path = out / "flower.log"
    view = ProgressView(progress, quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="flora-flower-") as tmp:
        home = Path(tmp)
        app = write_app(home / "app", client_app)
        port = _free_port()
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}))
        env = _flower_env(home)
        link_log = home / "superlink.log"
        command = [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
                   "--control-api-address", f"127.0.0.1:{_free_port()}"]
        with link_log.open("w") as link_out:
            # the SuperLink starts (seconds) while this process checks the run's input; nothing is submitted
            # to it before that check passes, and it is stopped if it fails
            link = subprocess.Popen(command, env=env, stdout=link_out, stderr=subprocess.STDOUT,
                                    cwd=os.getcwd(), start_new_session=True)
            log = None
            try:
                if not checked:
                    preflight(config, resume)
                out.mkdir(parents=True, exist_ok=True)
                log = log_path.open("a" if resume else "w")
                _wait_ready(link, port, link_log)
                federation = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                      for k, v in federation_config(config).items())
                submit = [_tool("flwr"), "run", str(app), CONNECTION, "--stream",
                          "--run-config", run_config_overrides(config) + f" resume={str(resume).lower()}",
                          "--federation-config", federation]
                with subprocess.Popen(submit, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1, cwd=os.getcwd()) as flwr:
                    for raw in flwr.stdout:
                        log.write(raw)
                        text = _strip(raw.rstrip("\n"))
                        if text.startswith(SHOWN) or "[flora] round " in text:
                            if quiet and not text.startswith(QUIET_SHOWN):
                                continue
                            view.line(text)
                    flwr.wait()
            finally:
                view.close()
                _stop(link)
                if log is not None:
                    log.write(link_log.read_text(errors="replace")[-20000:] if link_log.exists() else "")
                    log.close()
    rounds = _rounds_written(out)
    if rounds < config.rounds:
        raise SystemExit(f"flora run: the Flower simulation finished {rounds} of {config.rounds} rounds; "
                         f"see {log_path}:\n" + _errors(log_path))


def _strip(text: str) -> str:
    """A log line without Ray's worker prefix (``(ClientAppActor pid=12)``) and colour codes."""
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return re.sub(r"^\(\w+ pid=\d+(?:, ip=[^)]*)?\)\s*", "", text)


def _rounds_written(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _errors(log_path: Path, limit: int = 15) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    picked = [x for x in lines if "ERROR" in x or "Error" in x or "Traceback" in x]
    return "\n".join((picked or lines)[-limit:])
