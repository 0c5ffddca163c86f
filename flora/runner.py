"""Start (or resume) a run's server and write its results: ``OUT/metrics.jsonl``, ``OUT/config.toml``,
``OUT/partition.json``, the checkpoint; in a simulation also every partition's shard (``OUT/shards/``), the
only data its node reads. The engines (``engines.py``) drive the rounds."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from flora.checkpoint import checkpoint_dir, load_checkpoint, record_to_json, remove_checkpoint, save_round
from flora.config import RunConfig, save_config
from flora.data.node import SHARD_DIR, write_shards
from flora.data.sources import load_records
from flora.runtime import Runtime
from flora.server import FederationServer
from flora.tracking import open_tracker, scalars

ROUND0 = "round0.json"  # the base model's test loss, before round 1


class ResultsWriter:
    """Creates the out dir, saves config and partition report; after every round writes the checkpoint,
    then appends the round's JSON line to ``metrics.jsonl``.

    On resume ``metrics.jsonl`` is rewritten from the checkpoint (the source of truth), so a line
    written after the last checkpoint of a crashed run does not appear twice.
    """

    def __init__(self, config: RunConfig, partition_report: dict, metrics: list[dict] | None = None,
                 resume: bool = False):
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(config, self.out / "config.toml")
        (self.out / "partition.json").write_text(json.dumps(partition_report, indent=2))
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("".join(_json_line(m) for m in metrics or []))
        self.tracker = open_tracker(config, resume)  # report_to (flora/tracking.py)

    def initial(self, test_loss: float) -> None:
        """The base model's test loss (round 0) of a fresh run: ``OUT/round0.json``, the loss plot's first point."""
        loss = test_loss if math.isfinite(test_loss) else None  # None: no server test set (federated evaluation only)
        (self.out / ROUND0).write_text(json.dumps({"round": 0, "test_loss": loss}) + "\n")
        self.tracker.log(0, {"test_loss": test_loss} if test_loss == test_loss else {})

    def round_done(self, server: FederationServer) -> None:
        save_round(self.out, self.config, server.history, server.metrics)
        with self.metrics_path.open("a") as handle:
            handle.write(_json_line(server.metrics[-1]))
        self.tracker.log(server.metrics[-1]["round"], scalars(server.metrics[-1]))
        if len(server.history) >= self.config.rounds:
            self.tracker.close()


def _json_line(record: dict) -> str:
    return json.dumps(record_to_json(record)) + "\n"


DEPLOYMENT_DATA = {"data": "each SuperNode holds its own data (its node config 'data-path'); the server never "
                            "reads it"}


def server_for(config: RunConfig, runtime: Runtime, known_partitions: bool = True) -> FederationServer:
    """A server with its own copy of the model (clients in the same runtime share the cached one).
    ``known_partitions``: a simulation: this process deals the dataset out (see :class:`FederationServer`) and
    writes every partition's shard (``OUT/shards/``), the only data its node reads; otherwise (a deployment)
    the server loads no data but its own test set (``server_test_data``)."""
    assets = runtime.server_assets(config)  # model, data and test set first: bad input fails before anything is written
    simulation = runtime.simulation_data(config) if known_partitions else None
    if config.server_test_data:
        test_records, _ = load_records(config.server_test_data)
        test_set = f"server_test_data {config.server_test_data}"
    elif simulation is not None:
        test_records, test_set = simulation.test(), "the simulation's global held-out split"
    else:
        test_records, test_set = None, "none"
    if simulation is not None:
        write_shards(simulation.records, simulation.partition, Path(config.out_dir) / SHARD_DIR)
    return FederationServer(config, assets, simulation=simulation, test_records=test_records, test_set=test_set)


def start_run(config: RunConfig, runtime: Runtime, resume: bool = False, progress: Callable[[str], None] = print,
              known_partitions: bool = False) -> tuple[FederationServer, ResultsWriter]:
    """Server and results writer for a new run, or for one resumed from ``OUT/checkpoint``.
    ``known_partitions``: the engine made the clients' partitions itself (in-process, Flower simulation)."""
    checkpoint = load_checkpoint(config.out_dir, config) if resume else None
    # model, data and partition first: bad input fails before anything is replaced
    server = server_for(config, runtime, known_partitions)
    stale = checkpoint_dir(config.out_dir)
    if not resume and (stale.exists() or stale.is_symlink()):  # a fresh run must not leave another run's rounds
        remove_checkpoint(stale)  # refuses (CheckpointError) a directory that is not a FLoRA checkpoint
        progress(f"[flora] {config.out_dir} held an earlier run's checkpoint: starting fresh "
                 f"(use --resume to continue it instead)")
    if checkpoint is not None:
        server.restore(checkpoint.updates, checkpoint.metrics)
    simulation = server.simulation
    writer = ResultsWriter(config, simulation.partition.report() if simulation else DEPLOYMENT_DATA, server.metrics,
                           resume=checkpoint is not None)
    header = (f"[flora] {config.method}: {config.num_partitions} clients, ranks {config.ranks}, {config.rounds} rounds, "
              f"{config.local_steps} local steps")
    if checkpoint is not None:
        progress(f"{header}; resumed after round {checkpoint.rounds_done} "
                 f"(test loss {loss_text(server.metrics[-1]['test_loss'] if server.metrics else math.nan)})")
    else:
        initial = server.evaluate()
        writer.initial(initial)
        progress(f"{header}; initial test loss {loss_text(initial)}")
    return server, writer


def round_line(round_: int, rounds: int, who: str) -> str:
    """The line that opens round ``round_`` of ``rounds``: ``who`` trains in it."""
    return f"[flora] round {round_}/{rounds}: training {who}"


def loss_text(loss: float | None) -> str:
    """A loss for a progress line or table; ``n/a`` where there is none (NaN or null: no server test set, or a
    round ``eval_every`` skipped)."""
    return "n/a" if loss is None or (isinstance(loss, float) and math.isnan(loss)) else f"{loss:.4f}"


def client_line(round_: int, reply) -> str:
    """A client's progress line (``reply``: a successful :class:`~flora.rounds.ClientReply`)."""
    return (f"  round {round_} client {reply.client} (rank {reply.rank}): train loss {reply.train_loss:.4f}, "
            f"{reply.tokens / max(reply.seconds, 1e-9):.0f} tok/s")


def format_round(record: dict) -> str:
    """A round's progress line; for a differentially private run's public record (no client statistics,
    see :func:`flora.server.public_record`) only the test loss and the privacy spent."""
    if "train_loss" not in record:
        return (f"[round {record['round']}] test loss {loss_text(record['test_loss'])}  differential privacy: epsilon "
                f"{record['dp_epsilon']:.4g} at delta {record['dp_delta']:g}"
                + ("  (dp_noise_seed set: guarantee VOID)" if record.get("dp_guarantee_void") else ""))
    federated = (f"  client test loss {loss_text(record['client_test_loss'])} ({record['clients_evaluated']} clients)"
                 if "client_test_loss" in record else "")
    return (f"[round {record['round']}] test loss {loss_text(record['test_loss'])}{federated}  "
            f"train loss {record['train_loss']:.4f}  "
            f"agg. error {record['aggregation_error']:.2e}  up {record['bytes_up'] / 2**20:.1f} MiB  "
            f"down {record['bytes_down'] / 2**20:.1f} MiB  clients ok/failed {record['clients_ok']}/"
            f"{record['clients_failed']}  {record['seconds']:.1f}s")


def results_table(metrics: list[dict]) -> str:
    lines = ["| round | method | test loss | train loss | agg. error | MiB up | MiB down | ok/failed | s |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in metrics:
        lines.append(f"| {r['round']} | {r['method']} | {loss_text(r['test_loss'])} | {r['train_loss']:.4f} | "
                     f"{r['aggregation_error']:.2e} | {r['bytes_up'] / 2**20:.2f} | {r['bytes_down'] / 2**20:.2f} | "
                     f"{r['clients_ok']}/{r['clients_failed']} | {r['seconds']:.1f} |")
    return "\n".join(lines)
