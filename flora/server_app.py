"""Flower skin, server app: builds the :class:`FederationServer` and runs :class:`FloraStrategy`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flora.audit import install_open_log
from flora.config import RunConfig
from flora.runner import start_run
from flora.runtime import Runtime
from flora.strategy import FloraStrategy, config_from_run_config


def run_server(grid: Grid, config: RunConfig, resume: bool = False, progress=print,
               known_partitions: bool = False) -> list[dict]:
    # the server's own assets, loaded per run
    server, writer = start_run(config, Runtime(), resume, progress, known_partitions=known_partitions)
    remaining = config.rounds - len(server.history)
    if remaining > 0:
        strategy = FloraStrategy(config, server, writer, progress)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=config.round_timeout)
    return server.metrics


def make_server_app(config: RunConfig | None = None, resume: bool = False, progress=print,
                    known_partitions: bool = False) -> ServerApp:
    """A ServerApp for ``config`` (simulation), or one reading Flower's run config (``flwr run``;
    ``--run-config "resume=true"`` continues from the out dir's checkpoint). ``known_partitions``: the
    clients' partitions are the ones this server's config makes (:func:`flora.simulation.run_flower_simulation`,
    or ``flwr run`` with ``--run-config "simulation=true"``): it writes every partition's shard for its node;
    otherwise (a deployment) each SuperNode brings its own data and the server reads none."""
    server_app = ServerApp()
    install_open_log("server")

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        resume_run = resume or str(run_config.pop("resume", "false")).lower() in ("true", "1")
        # simulation=true (flwr run against a local simulation SuperLink): this server deals the data out
        simulation = known_partitions or str(run_config.pop("simulation", "false")).lower() in ("true", "1")
        run_server(grid, config or config_from_run_config(run_config), resume_run, progress, simulation)

    return server_app


app = make_server_app()
