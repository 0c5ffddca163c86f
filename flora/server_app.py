"""Flower skin, server app: builds the :class:`FederationServer` and runs :class:`FloraStrategy`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flora.config import RunConfig
from flora.runner import ResultsWriter, server_for
from flora.strategy import FloraStrategy, config_from_run_config


def run_server(grid: Grid, config: RunConfig, progress=print) -> list[dict]:
    server = server_for(config)
    writer = ResultsWriter(config, server.assets.partition.report())
    progress(f"[flora] {config.method}: ranks {config.ranks}, {config.rounds} rounds, {config.local_steps} local "
             f"steps; initial test loss {server.evaluate():.4f}")
    strategy = FloraStrategy(config, server, writer, progress)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=config.rounds, timeout=3600)
    return server.metrics


def make_server_app(config: RunConfig | None = None, progress=print) -> ServerApp:
    """A ServerApp for ``config`` (simulation), or one reading Flower's run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config or config_from_run_config(dict(context.run_config)), progress)

    return server_app


app = make_server_app()
