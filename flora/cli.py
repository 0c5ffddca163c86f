"""``flora`` command line: run a federation, rebuild its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _run(args) -> int:
    from flora.config import load_config
    from flora.report import write_report

    config = load_config(args.config, args.set)
    if args.engine == "local":
        from flora.runner import run_in_process
        run_in_process(config, resume=args.resume)
    else:
        run_flower_simulation(config, resume=args.resume)
    print(write_report(Path(config.out_dir)))
    return 0


def run_flower_simulation(config, resume: bool = False) -> None:
    """A Flower simulation (Ray backend) of ``config``: one SuperNode per client."""
    import logging

    from flwr.simulation import run_simulation

    from flora.client_app import app as client_app
    from flora.server_app import make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    num_nodes = 1 if config.method == "centralized" else config.num_clients
    cpus = os.cpu_count() or 1
    run_simulation(server_app=make_server_app(config, resume), client_app=client_app, num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "log_to_driver": True}})
    if not (Path(config.out_dir) / "metrics.jsonl").read_text().strip():
        raise SystemExit("flora run: the Flower simulation wrote no rounds; see the log above")


def _report(args) -> int:
    from flora.report import write_report
    print(write_report(Path(args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora", description="Federated LoRA fine-tuning with exact stacking.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federation (Flower simulation by default)")
    run.add_argument("--config", help="TOML run config (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--engine", choices=["flower", "local"], default="flower",
                     help="flower: Flower simulation (Ray); local: the same logic in this process")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in out_dir from its last checkpoint (only rounds/threads may change)")
    run.set_defaults(func=_run)
    report = sub.add_parser("report", help="rebuild results.md and plots from OUT/metrics.jsonl")
    report.add_argument("out")
    report.set_defaults(func=_report)
    args = parser.parse_args(argv)
    from flora.checkpoint import CheckpointError
    from flora.config import ConfigError
    from flora.data.formats import DataError
    from flora.models.loader import ModelLoadError
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as exc:
        print(f"flora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
