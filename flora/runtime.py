"""The loaded assets of a process and the global states built on them, owned by one explicit object.

A :class:`Runtime` loads the model and tokenizer once per :class:`AssetKey` and keeps the
:class:`~flora.rounds.GlobalState` of the client process on top of that model; ``reset()`` forgets both
(the next run starts from the base weights). Data is loaded apart from the model: a node's own file
(:meth:`Runtime.node_data`, ``flora/data/node.py``) or, only where this process runs a simulation, the one
dataset and its seeded partition (:meth:`Runtime.simulation_data`). Tests and in-process engines make their own
runtime; the Flower ClientApp, which Flower constructs anew for every message of a long-lived client
process, uses :data:`PROCESS_RUNTIME`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flora.config import ConfigError, RunConfig
from flora.data.formats import Record
from flora.data.node import NodeData, load_node_data
from flora.data.partition import Partition, partition
from flora.data.sources import load_records
from flora.data.tokenize import Example, encode_all
from flora.hardware import model_options, prepare_quantized
from flora.lora.warm import WarmSource
from flora.models.loader import check_target_modules, load_model
from flora.modeling import layer_shapes
from flora.precision import global_delta
from flora.rounds import GlobalState


@dataclass(frozen=True)
class AssetKey:
    """The config fields that determine a run's assets (model weights; records and partition in a simulation)."""

    model: str
    data: str
    format: str
    max_examples: int
    num_partitions: int
    partition: str
    dirichlet_alpha: float
    test_fraction: float
    seed: int
    device: str
    dtype: str
    quantize: str

    @classmethod
    def of(cls, config: RunConfig) -> AssetKey:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Assets:
    model: torch.nn.Module
    tokenizer: object
    layer_shapes: dict[str, tuple[int, int]]
    encoded: dict[tuple, list[Example]] = field(default_factory=dict)  # (what, cutoff, limit) -> examples

    def encode(self, what: tuple, records: Sequence[Record], cutoff: int, limit: int = 0) -> list[Example]:
        """Tokenised ``records`` (their first ``limit``; 0 = all), cached under ``what`` (names the records)."""
        key = (what, cutoff, limit)
        if key not in self.encoded:
            self.encoded[key] = encode_all(self.tokenizer, list(records[:limit] if limit else records), cutoff)[0]
        return self.encoded[key]

    def with_own_model(self) -> Assets:
        """The same tokenizer and tokenised examples (shared, not copied) with a private copy of the model."""
        return dataclasses.replace(self, model=copy.deepcopy(self.model))


@dataclass(frozen=True)
class SimulationData:
    """A simulation's one dataset and its seeded partition (never loaded by a deployment's server or nodes)."""

    records: list[Record]
    partition: Partition

    def train(self, client: int) -> list[Record]:
        return [self.records[i] for i in self.partition.clients[client]]

    def test(self) -> list[Record]:
        """The global held-out split (the server's test set in a simulation)."""
        return [self.records[i] for i in self.partition.test]


def load_assets(config: RunConfig) -> Assets:
    """Model and tokenizer for ``config`` (uncached; see :class:`Runtime`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_model(config.model, **model_options(config))
    check_target_modules(loaded.model, config.targets)
    if config.quantize != "none":
        prepare_quantized(loaded.model)
    return Assets(model=loaded.model, tokenizer=loaded.tokenizer, layer_shapes=layer_shapes(loaded.model, config.targets))


def load_simulation_data(config: RunConfig) -> SimulationData:
    """The run's dataset (``data``) dealt into ``num_partitions`` partitions and a global test split."""
    records, _ = load_records(config.data, fmt=config.format)
    num_clients = config.num_partitions
    split = partition(records, num_clients, scheme=config.partition if num_clients > 1 else "iid",
                      alpha=config.dirichlet_alpha, seed=config.seed, test_fraction=config.test_fraction,
                      max_examples=config.max_examples or None)
    return SimulationData(records=records, partition=split)


def check_ranks_fit(config: RunConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """:class:`ConfigError` if a client's rank exceeds ``min(out, in)`` of a target layer (no such LoRA
    adds anything a smaller rank could not, and every update would be rejected)."""
    if not shapes:
        return
    name, shape = min(shapes.items(), key=lambda item: min(item[1]))
    largest = max(config.ranks)
    if largest > min(shape):
        raise ConfigError(f"ranks = {config.ranks}: rank {largest} exceeds min(out, in) = {min(shape)} of target "
                          f"layer {name} {tuple(shape)}; expected ranks <= {min(shape)} for this model and targets")


def global_state(config: RunConfig, model: torch.nn.Module, reload=None) -> GlobalState:
    """The global state a party (server or client process) keeps on ``model`` for ``config``'s method: with the
    warm source where clients warm-start (``config.spec.warm_start``); ``reload`` puts the base weights back."""
    return GlobalState(model, WarmSource(config.warm_source) if config.spec.warm_start else None, reload)


def reload_base(model: torch.nn.Module, config: RunConfig) -> None:
    """Put ``config``'s base weights back into ``model`` in place (a client process that must start over from a
    folded catch-up, ``flora/catchup.py``): every merge added in place is undone by copying the weights the loader
    gives again, and every update kept beside a layer (``flora/precision.py``) is dropped."""
    if config.quantize == "none":  # a quantized base is never changed in place: its deltas are beside it
        fresh = load_model(config.model, **model_options(config)).model.state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict(keep_vars=True).items():
                if name in fresh:
                    tensor.copy_(fresh[name])
    for module in model.modules():
        if (holder := global_delta(module)) is not None:
            holder.restore((None, None, None))


class Runtime:
    """Assets per :class:`AssetKey`, and the client-side global state on each assets' model."""

    def __init__(self) -> None:
        self._assets: dict[AssetKey, Assets] = {}
        self._client_states: dict[AssetKey, GlobalState] = {}
        self._simulation: dict[AssetKey, SimulationData] = {}
        self._node_data: dict[tuple, NodeData] = {}

    def assets(self, config: RunConfig) -> Assets:
        key = AssetKey.of(config)
        if key not in self._assets:
            self._assets[key] = load_assets(config)
        check_ranks_fit(config, self._assets[key].layer_shapes)  # ranks are not part of the key
        return self._assets[key]

    def client_state(self, config: RunConfig) -> GlobalState:
        """The global state a client process keeps across rounds (on the cached model)."""
        key = AssetKey.of(config)
        if key not in self._client_states:
            model = self.assets(config).model
            self._client_states[key] = global_state(config, model, reload=lambda: reload_base(model, config))
        return self._client_states[key]

    def server_assets(self, config: RunConfig) -> Assets:
        """The server's assets: its own copy of the model, the shared tokenizer and tokenised examples."""
        return self.assets(config).with_own_model()

    def simulation_data(self, config: RunConfig) -> SimulationData:
        """The simulation's dataset and partition (the launcher's and a simulation server's, never a node's)."""
        key = AssetKey.of(config)
        if key not in self._simulation:
            self._simulation[key] = load_simulation_data(config)
        return self._simulation[key]

    def node_data(self, config: RunConfig, path: str | Path, fmt: str = "auto") -> NodeData:
        """A node's own records from ``path`` (its ``data-path``, or its shard in a simulation)."""
        try:
            stat = Path(path).expanduser().stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None  # load_node_data names the missing file
        key = (str(path), stamp, fmt, config.test_fraction, config.seed)
        if key not in self._node_data:
            self._node_data[key] = load_node_data(path, fmt, config.test_fraction, config.seed)
        return self._node_data[key]

    def reset(self) -> None:
        """Forget every loaded model, data set and global state: the next run starts from the base weights."""
        self._assets.clear()
        self._client_states.clear()
        self._simulation.clear()
        self._node_data.clear()


PROCESS_RUNTIME = Runtime()
