"""Flower skin, server app: builds the :class:`FederationServer` and runs :class:`FloraStrategy`."""

from __future__ import annotations

import logging
import sys

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flora.app_config import config_from_flower, flag
from flora.audit import install_open_log
from flora.config import RunConfig
from flora.runner import start_run
from flora.runtime import Runtime
from flora.strategy import FloraStrategy


def run_server(grid: Grid, config: RunConfig, resume: bool = False, progress=print,
               known_partitions: bool = False) -> list[dict]:
    # the server's own assets, loaded per run
    server, writer = start_run(config, Runtime(), resume, progress, known_partitions=known_partitions)
    remaining = config.rounds - len(server.history)
    if remaining > 0:
        strategy = FloraStrategy(config, server, writer, progress)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=config.round_timeout)
    return server.metrics


def make_server_app(known_partitions: bool = False, progress=print) -> ServerApp:
    """A ServerApp reading Flower's run config (:func:`flora.app_config.config_from_flower`: every RunConfig key,
    plus ``config-file`` and ``resume``). ``known_partitions``: the clients' partitions are the ones this
    server's config makes (a simulation started by ``flora run``); the run config's ``simulation = true``
    says the same for ``flwr run`` against a local simulation SuperLink. Such a server writes every partition's
    shard for its node; otherwise (a deployment) each SuperNode brings its own data and the server reads none."""
    server_app = ServerApp()
    install_open_log("server")

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stream()
        config, resume = config_from_flower(dict(context.run_config), dict(grid.run.override_config))
        simulation = known_partitions or flag(dict(context.run_config), "simulation")
        run_server(grid, config, resume, progress, simulation)

    return server_app


def _log_to_stream() -> None:
    """The server's warnings (rejected updates, failed nodes) as ``[flora] WARNING: ...`` lines in this process's
    output, which Flower's log stream carries to ``flwr run --stream`` / ``flwr log`` (and ``flora run``)."""
    logger = logging.getLogger("flora")
    if not any(getattr(h, "flora_stream", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[flora] %(levelname)s: %(message)s"))
        handler.flora_stream = True
        logger.addHandler(handler)
        logger.propagate = False


app = make_server_app()  # `flwr run .`: a deployment, or Flower's own local simulation
simulation_app = make_server_app(known_partitions=True)  # `flora run` (flora/simulation.py)
