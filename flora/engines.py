"""Engines that drive a run's rounds: ``local`` (every client in this process, no Flower) and ``flower``
(a Flower simulation, one SuperNode per client). Both call the same server and client code, so they
give the same metrics; the CLI, ``flora compare`` and the benchmarks all start runs through :func:`run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flora.client import FederationClient
from flora.config import RunConfig
from flora.rounds import ClientReply
from flora.progress import ProgressView, step_printer
from flora.runner import client_line, format_round, round_line, start_run
from flora.runtime import Runtime
from flora.server import FederationServer, public_record, round_clients

ENGINES = ("flower", "local")


def run(config: RunConfig, engine: str = "flower", resume: bool = False,
        progress: Callable[[str], None] = print, quiet: bool = False) -> list[dict]:
    """Run (or with ``resume`` continue) ``config`` to its last round on ``engine``; the metrics of every
    round. Each call starts from the base weights (its own :class:`Runtime`). ``quiet``: round lines only."""
    if engine == "local":
        return run_in_process(config, progress=progress, resume=resume, quiet=quiet).metrics
    if engine == "flower":
        from flora.simulation import run_flower_simulation
        run_flower_simulation(config, resume=resume, progress=progress, quiet=quiet)
        from flora.report import read_metrics
        return read_metrics(Path(config.out_dir))
    raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")


def run_in_process(config: RunConfig, runtime: Runtime | None = None, progress: Callable[[str], None] = print,
                   fail: Callable[[int, int], bool] | None = None, resume: bool = False,
                   quiet: bool = False) -> FederationServer:
    """All rounds in this process (no Flower): the reference the Flower run is checked against. Returns the
    server (its ``metrics``, ``history`` and global ``state``).

    ``fail(round, client)`` returning True makes that client error in that round (dropout tests).
    ``resume`` continues from ``OUT/checkpoint``. ``runtime``: a fresh one unless given. ``quiet``: the
    round lines only (no per-client progress).
    """
    runtime = runtime or Runtime()
    server, writer = start_run(config, runtime, resume, progress, known_partitions=True)
    client = FederationClient(config, runtime)
    view = ProgressView(progress, quiet=quiet)
    for round_ in range(len(server.history) + 1, config.rounds + 1):
        started = time.perf_counter()
        replies, bytes_down = [], 0
        chosen = round_clients(config, config.num_partitions, round_)
        private = config.dp_enabled  # with DP who takes part and their losses are unprivatised statistics
        if not quiet and not private:
            progress(round_line(round_, config.rounds, 'clients ' + ', '.join(map(str, chosen))))
        for k in chosen:
            node = f"node-{k}"
            first, updates = server.updates_for(node)
            rank = config.client_rank(k)
            bytes_down += server.download_bytes(node, rank)
            if fail is not None and fail(round_, k):
                replies.append(ClientReply(client=k, node=node, factors=None, error="injected failure",
                                           applied=server.node_applied.get(node, 0)))
                continue
            reply = client.train(k, node, round_, first, updates,
                                 on_step=None if private else step_printer(round_, config.rounds, k, view.line))
            if not private and not quiet:
                view.line(client_line(round_, reply))
            replies.append(reply)
        record = server.aggregate_round(round_, replies, bytes_down, started)
        if server.evaluates_clients(round_):
            evaluate_in_process(server, client, round_, chosen)
        writer.round_done(server)
        view.line(format_round(public_record(config, record)))
    view.close()
    return server


def evaluate_in_process(server: FederationServer, client: FederationClient, round_: int,
                        clients: Sequence[int]) -> None:
    """Federated evaluation after ``round_`` by the round's ``clients`` (what the Flower engine's evaluate
    messages do): each catches up with the global model and scores its own held-out split."""
    config = server.config
    started = time.perf_counter()
    replies, bytes_down = [], 0
    for k in clients:
        node = f"node-{k}"
        bytes_down += server.download_bytes(node, config.client_rank(k))
        first, updates = server.updates_for(node)
        replies.append(client.evaluate(k, node, first, updates))
    server.record_evaluation(round_, replies, bytes_down, time.perf_counter() - started)
