"""Flower skin: a Flower simulation (Ray backend) of a run, one SuperNode per client."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from flora.client_app import app as default_client_app
from flora.config import RunConfig
from flora.server_app import make_server_app


def run_flower_simulation(config: RunConfig, resume: bool = False, progress=print,
                          client_app: ClientApp = default_client_app) -> None:
    """Run ``config`` as a Flower simulation; raises ``SystemExit`` if it wrote no round. The server made
    the partitions, so it knows their sizes and ranks. ``client_app``: FLoRA's (the hostile one of
    ``flora/adversary.py`` in the robustness tests)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cpus = os.cpu_count() or 1
    server_app = make_server_app(config, resume, progress, known_partitions=True)
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=config.num_partitions,
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "log_to_driver": True}})
    if not (Path(config.out_dir) / "metrics.jsonl").read_text().strip():
        raise SystemExit("flora run: the Flower simulation wrote no rounds; see the log above")
