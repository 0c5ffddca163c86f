"""A hostile ClientApp: the robustness tests' and benchmarks' attacker (never part of a real run).

:func:`make_hostile_app` returns a ClientApp for a Flower simulation in which partitions below
``honest`` run FLoRA's own ClientApp and record their replies (so a test can recompute the honest-only
aggregate), and every other partition forges, in each round, one malformed or malicious reply kind of
:data:`KINDS`: slot ``(round - 1) · adversaries + (partition - honest)`` of the list. Every kind starts
from a reply the server would accept (:func:`valid_reply`: the partition's own rank, example count and
``applied``, small random factors) and changes one thing, so the server's reason names exactly that.

``KINDS[kind] = (mutation, fragment)``: ``fragment`` is what the server's rejection line must contain.
Federated evaluation gets the same treatment: an attacker answers every evaluate message with one kind of
:data:`EVAL_KINDS` (slot ``(round - 1) · adversaries + attacker``, cycling), each a change to a valid
evaluation reply (:func:`valid_eval_reply`): a NaN, infinite or negative loss, impossible token or example
counts, wrong records, another node's partition.
Records of what each node did go to ``OUT/../hostile/`` (``OUT`` = the run's ``out_dir``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flora import client_app as honest_app
from flora.config import RunConfig
from flora.runtime import PROCESS_RUNTIME

GIANT_BYTES = 8 * 2 ** 20  # the "giant array" kind's payload (the benchmark sends more)


@dataclass
class Situation:
    """What an attacker in a simulation knows: the run config (it ships with every message), the layer
    shapes and partition sizes (same data), and what the server's message said."""

    config: RunConfig
    partition: int
    round: int
    applied_end: int  # first-index + num-updates of the server's message
    layer_shapes: Mapping[str, tuple[int, int]]
    sizes: Mapping[int, int]  # partition -> training examples


@dataclass
class Forged:
    """A reply under construction: plain dicts turned into Flower records by :meth:`content`."""

    config: dict
    metrics: dict
    arrays: dict[str, Array]
    kinds: dict[str, str] = field(default_factory=lambda: {"arrays": "array", "metrics": "metric",
                                                             "config": "config"})

    def content(self) -> RecordDict:
        make = {"array": _array_record, "metric": MetricRecord, "config": ConfigRecord}
        values = {"arrays": self.arrays, "metrics": self.metrics, "config": self.config}
        return RecordDict({name: make[kind](values.get(name, {})) for name, kind in self.kinds.items()})


def _array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """The arrays as they are (``ArrayRecord(dict)`` would rebuild them and refuse forged metadata)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def valid_reply(situation: Situation, partition: int | None = None) -> Forged:
    """A reply the server accepts for ``partition`` (default: the attacker's own): its configured rank,
    exact example count and ``applied``, and small random float32 factors."""
    config = situation.config
    partition = situation.partition if partition is None else partition
    rank = config.client_rank(partition)
    generator = torch.Generator().manual_seed(situation.round * 1_000 + situation.partition)
    arrays = {}
    for name, (out_dim, in_dim) in situation.layer_shapes.items():
        arrays[f"{name}.A"] = Array(torch.randn(rank, in_dim, generator=generator) * 1e-2)
        arrays[f"{name}.B"] = Array(torch.randn(out_dim, rank, generator=generator) * 1e-2)
    return Forged(config={"partition-id": partition, "rank": rank, "error": ""},
                  metrics={"num-examples": situation.sizes[partition], "train-loss": 2.0, "tokens": 100,
                           "seconds": 1.0, "applied": situation.applied_end},
                  arrays=arrays)


def _first(forged: Forged, part: str) -> str:
    return next(key for key in forged.arrays if key.endswith(f".{part}"))


def _replace_array(forged: Forged, key: str, values: np.ndarray) -> None:
    forged.arrays[key] = Array(values)


def _scale(forged: Forged, factor: float) -> None:
    key = _first(forged, "A")
    _replace_array(forged, key, forged.arrays[key].numpy() * np.float32(factor))


def _set_value(value: float) -> Callable[[Forged, Situation], None]:
    def mutate(forged: Forged, situation: Situation) -> None:
        key = _first(forged, "B")
        values = forged.arrays[key].numpy().copy()
        values[0, 0] = value
        _replace_array(forged, key, values)
    return mutate


def _as_dtype(dtype: str) -> Callable[[Forged, Situation], None]:
    def mutate(forged: Forged, situation: Situation) -> None:
        key = _first(forged, "A")
        values = forged.arrays[key].numpy()
        _replace_array(forged, key, values.astype(dtype) if dtype != "<U4" else values.astype(str).astype("<U4"))
    return mutate


def _field(record: str, key: str, value) -> Callable[[Forged, Situation], None]:
    def mutate(forged: Forged, situation: Situation) -> None:
        getattr(forged, record)[key] = value
    return mutate


def _drop_record(name: str) -> Callable[[Forged, Situation], None]:
    def mutate(forged: Forged, situation: Situation) -> None:
        del forged.kinds[name]
    return mutate


def _meta(**changes) -> Callable[[Forged, Situation], None]:
    """Change an array's metadata (what Flower's ``Array`` claims) without touching its bytes."""
    def mutate(forged: Forged, situation: Situation) -> None:
        array = forged.arrays[_first(forged, "A")]
        for name, value in changes.items():
            setattr(array, name, value)
    return mutate


def _rank_above_configured(forged: Forged, situation: Situation) -> None:
    rank = situation.config.client_rank(situation.partition) + 1
    for name, (out_dim, in_dim) in situation.layer_shapes.items():
        forged.arrays[f"{name}.A"] = Array(torch.full((rank, in_dim), 1e-3))
        forged.arrays[f"{name}.B"] = Array(torch.full((out_dim, rank), 1e-3))
    forged.config["rank"] = rank


def _shape_mismatch(forged: Forged, situation: Situation) -> None:
    key = _first(forged, "A")
    _replace_array(forged, key, forged.arrays[key].numpy()[:, :-1].copy())


def _three_dims(forged: Forged, situation: Situation) -> None:
    key = _first(forged, "A")
    _replace_array(forged, key, forged.arrays[key].numpy()[None])


def _rank_mismatch(forged: Forged, situation: Situation) -> None:
    key = _first(forged, "B")
    values = forged.arrays[key].numpy()
    _replace_array(forged, key, np.concatenate([values, values], axis=1))


def _more_data_than_shape(forged: Forged, situation: Situation) -> None:
    array = forged.arrays[_first(forged, "A")]
    array.data = array.data + bytes(4 * 64)


def _giant(forged: Forged, situation: Situation) -> None:
    array = forged.arrays[_first(forged, "A")]
    array.data = array.data + bytes(GIANT_BYTES)


def _header_lies(forged: Forged, situation: Situation) -> None:
    """Metadata says float32 (r, in); the .npy bytes hold int32 of the same size."""
    array = forged.arrays[_first(forged, "A")]
    forged.arrays[_first(forged, "A")] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                                                data=Array(np.zeros(tuple(array.shape), dtype=np.int32)).data)


def _missing_b(forged: Forged, situation: Situation) -> None:
    del forged.arrays[_first(forged, "B")]


def _extra_array(forged: Forged, situation: Situation) -> None:
    forged.arrays["evil.payload"] = Array(np.zeros((2, 2), dtype=np.float32))


def _honest_partition(forged: Forged, situation: Situation) -> None:
    """An honest node's partition (0), with a reply that is otherwise valid for it."""
    stolen = valid_reply(situation, partition=0)
    forged.config, forged.metrics, forged.arrays = stolen.config, stolen.metrics, stolen.arrays


def _shared_partition(forged: Forged, situation: Situation) -> None:
    """The last partition, claimed by two attackers in one round (each reply otherwise valid for it)."""
    shared = valid_reply(situation, partition=situation.config.num_partitions - 1)
    forged.config, forged.metrics, forged.arrays = shared.config, shared.metrics, shared.arrays


def _impossible_error(forged: Forged, situation: Situation) -> None:
    forged.config["error"] = "resync: please send everything again"
    forged.metrics.update({"num-examples": 0, "applied": situation.applied_end + 10 ** 6})
    forged.arrays = {}


Mutation = Callable[[Forged, Situation], None]
KINDS: dict[str, tuple[Mutation, str]] = {
    "missing config record": (_drop_record("config"), "records = missing ['config']"),
    "missing metrics record": (_drop_record("metrics"), "records = missing ['metrics']"),
    "missing arrays record": (_drop_record("arrays"), "records = missing ['arrays']"),
    "extra record": (lambda f, s: f.kinds.update(extra="config"), "unexpected ['extra']"),
    "metrics sent as a config record (text count)": (
        lambda f, s: (f.kinds.update(metrics="config"), f.metrics.update({"num-examples": "12"})),
        "record 'metrics' = 'ConfigRecord': expected a MetricRecord"),
    "config without rank": (lambda f, s: f.config.pop("rank"), "config record = missing ['rank']"),
    "extra config key": (_field("config", "shell", "rm -rf /"), "unexpected ['shell']"),
    "rank as text": (_field("config", "rank", "4"), "config 'rank' = '4'"),
    "rank as a list": (_field("config", "rank", [4]), "config 'rank' = [4]"),
    "rank 10^7": (_field("config", "rank", 10 ** 7), "config 'rank' = 10000000: expected 1.."),
    "rank above the node's configured rank": (_rank_above_configured, "config 'rank' = "),
    "rank 0": (_field("config", "rank", 0), "config 'rank' = 0"),
    "partition-id out of range": (_field("config", "partition-id", 99), "config 'partition-id' = 99"),
    "partition-id as bool": (_field("config", "partition-id", True), "config 'partition-id' = True"),
    "num-examples NaN": (_field("metrics", "num-examples", math.nan), "metrics 'num-examples' = nan"),
    "num-examples inf": (_field("metrics", "num-examples", math.inf), "metrics 'num-examples' = inf"),
    "num-examples -1": (_field("metrics", "num-examples", -1), "metrics 'num-examples' = -1"),
    "num-examples as a list": (_field("metrics", "num-examples", [12]), "metrics 'num-examples' = [12]"),
    "num-examples 10^18": (_field("metrics", "num-examples", 10 ** 18),
                           "metrics 'num-examples' = 1000000000000000000"),
    "train-loss inf": (_field("metrics", "train-loss", math.inf), "metrics 'train-loss' = inf"),
    "applied 0 (full-history resend)": (_field("metrics", "applied", 0), "metrics 'applied' = 0"),
    "applied beyond the history": (_field("metrics", "applied", 10 ** 6), "metrics 'applied' = 1000000"),
    "applied as a float (the right value)": (lambda f, s: f.metrics.update(applied=float(s.applied_end)),
                                             "metrics 'applied' = "),
    "error reply with an impossible applied": (_impossible_error, "metrics 'applied' = 100000"),
    "error as a number": (_field("config", "error", 1), "config 'error' = 1"),
    "x.A without x.B": (_missing_b, ".B'], unexpected []"),
    "extra array key": (_extra_array, "unexpected ['evil.payload']"),
    "object dtype (metadata)": (_meta(dtype="object"), "dtype = 'object'"),
    "unicode dtype": (_as_dtype("<U4"), "dtype = '<U4'"),
    "complex64 dtype": (_as_dtype("complex64"), "dtype = 'complex64'"),
    "int64 dtype": (_as_dtype("int64"), "dtype = 'int64'"),
    "float64 dtype (not the run's)": (_as_dtype("float64"), "dtype = 'float64'"),
    "NaN value": (_set_value(math.nan), "non-finite values"),
    "Inf value": (_set_value(math.inf), "non-finite values"),
    "finite 1e20 factors": (lambda f, s: _scale(f, 1e22), "products would overflow"),
    "norm above max_update_norm": (lambda f, s: _scale(f, 1e6), "exceeds the bound"),
    "shape mismatch": (_shape_mismatch, "shapes = "),
    "3-D array": (_three_dims, "shape = (1, "),
    "A and B ranks differ": (_rank_mismatch, "shapes = "),
    "shape as text (metadata)": (_meta(shape=("2", "32")), "shape = ('2', '32')"),
    "more bytes than the shape": (_more_data_than_shape, "bytes = "),
    "giant array (8 MiB)": (_giant, ": expected at most "),
    "declared shape 10^7 rows (metadata)": (_meta(shape=(10 ** 7, 32)), "rank (rows) = 10000000"),
    "stype not numpy": (_meta(stype="torch.pickle"), "stype = 'torch.pickle'"),
    ".npy header disagrees with the metadata": (_header_lies, ".npy header"),
    "partition of an honest node": (_honest_partition, "partition 0 belongs to node"),
    # the pair below must share a round: two attackers claim one partition
    "one partition claimed twice (first)": (_shared_partition, "in one round; expected one node per partition"),
    "one partition claimed twice (second)": (_shared_partition, "in one round; expected one node per partition"),
}


def valid_eval_reply(situation: Situation) -> Forged:
    """A federated-evaluation reply the server accepts: the attacker's partition, two examples, ``applied``."""
    return Forged(config={"partition-id": situation.partition, "error": ""},
                  metrics={"eval-loss": 2.0, "eval-tokens": 10, "eval-examples": 2, "applied": situation.applied_end},
                  arrays={}, kinds={"metrics": "metric", "config": "config"})


EVAL_KINDS: dict[str, tuple[Mutation, str]] = {
    "eval-loss NaN": (_field("metrics", "eval-loss", math.nan), "metrics 'eval-loss' = nan"),
    "eval-loss inf": (_field("metrics", "eval-loss", math.inf), "metrics 'eval-loss' = inf"),
    "eval-loss negative": (_field("metrics", "eval-loss", -3.0), "metrics 'eval-loss' = -3.0"),
    "eval-tokens negative": (_field("metrics", "eval-tokens", -10), "metrics 'eval-tokens' = -10"),
    "eval-tokens above examples x cutoff": (_field("metrics", "eval-tokens", 10 ** 9),
                                            "metrics 'eval-tokens' = 1000000000"),
    "eval-examples above client_eval_examples": (_field("metrics", "eval-examples", 10 ** 6),
                                                 "metrics 'eval-examples' = 1000000"),
    "eval-tokens as a float": (_field("metrics", "eval-tokens", 10.5), "metrics 'eval-tokens' = 10.5"),
    "eval with an arrays record": (lambda f, s: f.kinds.update(arrays="array"), "unexpected ['arrays']"),
    "eval metrics as a config record": (lambda f, s: f.kinds.update(metrics="config"),
                                        "record 'metrics' = 'ConfigRecord'"),
    "eval applied 0": (_field("metrics", "applied", 0), "metrics 'applied' = 0"),
    "eval of an honest node's partition": (_field("config", "partition-id", 0), "partition 0 belongs to node"),
}


def forge_eval(kind: str, situation: Situation) -> RecordDict:
    forged = valid_eval_reply(situation)
    mutation, _ = EVAL_KINDS[kind]
    mutation(forged, situation)
    return forged.content()


def eval_kind(adversaries: int, round_: int, attacker: int) -> str:
    kinds = list(EVAL_KINDS)
    return kinds[((round_ - 1) * adversaries + attacker) % len(kinds)]


def schedule(adversaries: int) -> list[list[str]]:
    """Kinds per round (one per attacker), in :data:`KINDS` order; the last round is padded by repeating
    the first kinds."""
    kinds = list(KINDS)
    rounds = math.ceil(len(kinds) / adversaries)
    padded = kinds + kinds[: rounds * adversaries - len(kinds)]
    return [padded[r * adversaries:(r + 1) * adversaries] for r in range(rounds)]


def forge(kind: str, situation: Situation) -> RecordDict:
    forged = valid_reply(situation)
    mutation, _ = KINDS[kind]
    mutation(forged, situation)
    return forged.content()


def situation_of(msg: Message, context: Context) -> Situation:
    meta = msg.content["config"]
    config = RunConfig.from_dict(json.loads(str(meta["flora-config"])), "message")
    assets = PROCESS_RUNTIME.assets(config)
    data = PROCESS_RUNTIME.simulation_data(config)  # an attacker in a simulation knows the whole dataset
    sizes = {k: len(assets.encode(("partition train", k), data.train(k), config.cutoff))
             for k in range(config.num_partitions)}
    return Situation(config=config, partition=int(context.node_config["partition-id"]),
                     round=int(meta["server-round"]), applied_end=int(meta["first-index"]) + int(meta["num-updates"]),
                     layer_shapes=assets.layer_shapes, sizes=sizes)


def record_dir(config: RunConfig) -> Path:
    return Path(config.out_dir).parent / "hostile"


def make_hostile_app(honest: int) -> ClientApp:
    """Partitions ``< honest`` run FLoRA's ClientApp (their replies saved for the reference aggregate);
    the others forge the kinds of :func:`schedule` for ``num_partitions - honest`` attackers."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        situation = situation_of(msg, context)
        out = record_dir(situation.config)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"round{situation.round}-partition{situation.partition}"
        if situation.partition < honest:
            reply = honest_app.train(msg, context)
            from safetensors.torch import save_file
            factors = reply.content["arrays"].to_torch_state_dict()
            save_file(factors, str(out / f"{stem}.safetensors"),
                      metadata={"num_examples": str(reply.content["metrics"]["num-examples"]),
                                "node": str(context.node_id)})
            return reply
        attacker = situation.partition - honest
        kinds = schedule(situation.config.num_partitions - honest)
        kind = kinds[situation.round - 1][attacker] if situation.round <= len(kinds) else "missing config record"
        (out / f"{stem}.json").write_text(json.dumps({"node": str(context.node_id), "kind": kind}))
        return Message(content=forge(kind, situation), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        situation = situation_of(msg, context)
        if situation.partition < honest:
            return honest_app.evaluate(msg, context)
        kind = eval_kind(situation.config.num_partitions - honest, situation.round, situation.partition - honest)
        out = record_dir(situation.config)
        stem = f"eval-round{situation.round}-partition{situation.partition}"
        (out / f"{stem}.json").write_text(json.dumps({"node": str(context.node_id), "kind": kind}))
        return Message(content=forge_eval(kind, situation), reply_to=msg)

    return app


# By object reference for a Flower simulation (``flora.adversary:hostile_app``): partitions 0 and 1 honest,
# the rest hostile (tests/test_adversarial.py).
hostile_app = make_hostile_app(honest=2)
