"""Flower skin: a Flower simulation (Ray backend) of a run, one SuperNode per client."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from flora.client_app import app as default_client_app
from flora.config import ConfigError, RunConfig
from flora.server_app import make_server_app


def backend_config(config: RunConfig) -> dict:
    """Ray backend resources: each client reserves ``client_cpus`` cores (0 = all, so clients run one at a
    time) and ``client_gpus`` GPUs (fractions share one: 0.5 = two clients per GPU). Ray hides the GPUs from
    a client that reserves none, so ``device = "cuda"`` needs ``client_gpus > 0``."""
    if config.device.startswith("cuda") and not config.client_gpus:
        raise ConfigError(f"device = {config.device!r} in a Flower simulation: set client_gpus > 0 (e.g. 0.5 for "
                          f"two clients per GPU); Ray hides the GPUs from clients that reserve none")
    cpus = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": config.client_cpus or cpus, "num_gpus": config.client_gpus},
            "init_args": {"num_cpus": cpus, "log_to_driver": True}}


def run_flower_simulation(config: RunConfig, resume: bool = False, progress=print,
                          client_app: ClientApp = default_client_app) -> None:
    """Run ``config`` as a Flower simulation; raises ``SystemExit`` if it wrote no round. The server made
    the partitions, so it knows their sizes and ranks. ``client_app``: FLoRA's (the hostile one of
    ``flora/adversary.py`` in the robustness tests)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    server_app = make_server_app(config, resume, progress, known_partitions=True)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_partitions,
                   backend_config=backend_config(config))
    if not (Path(config.out_dir) / "metrics.jsonl").read_text().strip():
        raise SystemExit("flora run: the Flower simulation wrote no rounds; see the log above")
