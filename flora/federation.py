"""Federated rounds as plain Python: what the server computes and what a client does, no ``flwr``.

The Flower apps (``server_app.py``, ``client_app.py``) are thin skins over :class:`FederationServer`
and :class:`FederationClient`; :func:`run_in_process` drives the same logic in one process.

Global state after round ``t`` is the base weights plus every round's ``merge`` part, plus the
latest global adapter (FedIT-style methods keep training it):

* ``flora``: ``merge`` = the stacked update ``Σ p_k B_k A_k`` (in its smallest exact form);
  clients start a fresh adapter of their rank every round;
* ``fedit`` / ``ffa`` / ``zeropad`` / ``flexlora``: ``adapter`` = the aggregated adapter (per
  client for ``zeropad``/``flexlora``), which clients continue training;
* ``fedex``: ``adapter`` = averages, ``merge`` = the dense residual;
* ``standalone``: each client continues its own adapter, nothing is aggregated;
* ``centralized``: one client holding all training data, FLoRA rounds.

Catch-up: the server keeps the list of round updates and, per node, how many of them that node
has applied; a message carries the ones it lacks. A client process that holds fewer (it restarted)
says so in its reply, is left out of that round, and gets the full list next round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median

import torch

from flora.config import ConfigError, RunConfig
from flora.data.partition import Partition, partition
from flora.data.sources import load_records
from flora.data.tokenize import Example, encode_all
from flora.lora.aggregate import aggregate, aggregation_error
from flora.lora.dp import DPSpec, clip_updates, noise_generator, noisy_layer_mean, poisson_sample, privacy_spent, \
    truncate_dense
from flora.lora.factors import Factors, InvalidUpdateError, check_update, client_weights, truncate_factors
from flora.lora.refactor import refactorize, smallest_exact_form
from flora.lora.robust import clip_update, mad_outliers, update_norm
from flora.models.loader import check_target_modules, load_model
from flora.train import LoraSpec, TrainSpec, evaluate_loss, layer_shapes, merge_update, train_client

log = logging.getLogger("flora")

Merge = Factors | torch.Tensor  # (A, B) whose product is added, or a dense (out, in) tensor


@dataclass
class RoundUpdate:
    """What one round changes in the global state (see the module docstring)."""

    round: int
    merge: dict[str, Merge] = field(default_factory=dict)
    adapter: dict[str, Factors] | None = None
    truncate: bool = False  # zeropad / flexlora: client k continues from the first r_k ranks of ``adapter``
    client_adapters: dict[int, dict[str, Factors]] | None = None  # standalone: each client's own adapter
    forms: dict[str, int] = field(default_factory=dict)  # broadcast form -> number of layers

    def nbytes(self, rank: int) -> int:
        """Bytes a client of ``rank`` receives for this update.

        A truncating method sends each client only its first ``rank`` ranks; a standalone client's
        adapter never leaves it in a real deployment and counts 0.
        """
        total = sum(_nbytes(m) for m in self.merge.values())
        if self.adapter is not None:
            for A, B in self.adapter.values():
                kept = min(rank, A.shape[0]) if self.truncate else A.shape[0]
                total += kept * (A.shape[1] + B.shape[0]) * A.element_size()
        return total


def update_to_tensors(update: RoundUpdate, rank: int | None = None,
                      with_client_adapters: bool = True) -> dict[str, torch.Tensor]:
    """Flat tensor dict of ``update`` (wire and checkpoint format); a truncating method's adapter is cut
    to ``rank`` when given. The wire leaves out standalone clients' adapters (each client keeps its own).

    Keys: ``m.{layer}.A|B`` merge factors or ``m.{layer}.D`` dense merge, ``a.{layer}.A|B`` adapter,
    ``c{k}.{layer}.A|B`` client ``k``'s own adapter (standalone).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, merge in update.merge.items():
        if isinstance(merge, torch.Tensor):
            tensors[f"m.{name}.D"] = merge
        else:
            tensors[f"m.{name}.A"], tensors[f"m.{name}.B"] = merge
    for name, (A, B) in (update.adapter or {}).items():
        if update.truncate and rank is not None:
            A, B = truncate_factors(A, B, rank)
        tensors[f"a.{name}.A"], tensors[f"a.{name}.B"] = A, B
    for client, adapter in (update.client_adapters or {}).items() if with_client_adapters else ():
        for name, (A, B) in adapter.items():
            tensors[f"c{client}.{name}.A"], tensors[f"c{client}.{name}.B"] = A, B
    return {key: value.contiguous() for key, value in tensors.items()}


def update_from_tensors(tensors: Mapping[str, torch.Tensor], round_: int = 0, truncate: bool = False,
                        forms: Mapping[str, int] | None = None) -> RoundUpdate:
    """Inverse of :func:`update_to_tensors`."""
    update = RoundUpdate(round=round_, truncate=truncate, forms=dict(forms or {}))
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, rest = key.split(".", 1)
        layer, part = rest.rsplit(".", 1)
        if kind == "m" and part == "D":
            update.merge[layer] = tensor
        else:
            pairs.setdefault((kind, layer), {})[part] = tensor
    for (kind, layer), parts in sorted(pairs.items()):
        factors = (parts["A"], parts["B"])
        if kind == "m":
            update.merge[layer] = factors
        elif kind == "a":
            update.adapter = update.adapter or {}
            update.adapter[layer] = factors
        else:
            update.client_adapters = update.client_adapters or {}
            update.client_adapters.setdefault(int(kind[1:]), {})[layer] = factors
    return update


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(_nbytes(o) for o in obj)


@dataclass
class ClientReply:
    client: int  # partition id
    node: str
    factors: dict[str, Factors] | None
    num_examples: int = 0
    train_loss: float = math.nan
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    applied: int = 0  # round updates the client's model holds after this round's catch-up
    rank: int = 0  # the adapter's (initial) rank; AdaLoRA may send fewer


# --- assets ------------------------------------------------------------------------------------

@dataclass
class Assets:
    model: torch.nn.Module
    tokenizer: object
    partition: Partition
    records: list
    layer_shapes: dict[str, tuple[int, int]]
    _encoded: dict = field(default_factory=dict)

    def examples(self, which: str, cutoff: int, limit: int = 0) -> list[Example]:
        """Tokenised examples of a split: ``train:K``, ``test:K`` (client K) or ``test`` (global)."""
        key = (which, cutoff, limit)
        if key not in self._encoded:
            if which == "test":
                indices = self.partition.test
            elif which == "train:all":
                indices = sorted(i for c in self.partition.clients for i in c)
            else:
                kind, k = which.split(":")
                indices = (self.partition.clients if kind == "train" else self.partition.client_tests)[int(k)]
            if limit:
                indices = indices[:limit]
            self._encoded[key] = encode_all(self.tokenizer, [self.records[i] for i in indices], cutoff)[0]
        return self._encoded[key]


_ASSETS: dict[str, Assets] = {}


def load_assets(config: RunConfig) -> Assets:
    """Model, tokenizer, records and partition for ``config``; cached per process (a fresh model copy
    per cache entry, so server and clients in one process must use separate keys)."""
    key = "|".join(str(v) for v in (config.model, config.data, config.format, config.max_examples, config.num_clients,
                                    config.partition, config.dirichlet_alpha, config.test_fraction, config.seed,
                                    config.method == "centralized"))
    if key not in _ASSETS:
        if config.threads:
            torch.set_num_threads(config.threads)
        loaded = load_model(config.model)
        check_target_modules(loaded.model, config.targets)
        records, _ = load_records(config.data, fmt=config.format)
        num_clients = config.num_partitions
        split = partition(records, num_clients, scheme=config.partition if num_clients > 1 else "iid",
                          alpha=config.dirichlet_alpha, seed=config.seed, test_fraction=config.test_fraction,
                          max_examples=config.max_examples or None)
        _ASSETS[key] = Assets(model=loaded.model, tokenizer=loaded.tokenizer, partition=split, records=records,
                              layer_shapes=layer_shapes(loaded.model, config.targets))
    check_ranks_fit(config, _ASSETS[key].layer_shapes)  # ranks are not part of the cache key
    return _ASSETS[key]


def check_ranks_fit(config: RunConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """:class:`ConfigError` if a client's rank exceeds ``min(out, in)`` of a target layer (no such LoRA
    adds anything a smaller rank could not, and every update would be rejected)."""
    if not shapes:
        return
    name, shape = min(shapes.items(), key=lambda item: min(item[1]))
    largest = max(config.client_rank(k) for k in range(config.num_partitions))
    if largest > min(shape):
        raise ConfigError(f"ranks = {config.ranks}: rank {largest} exceeds min(out, in) = {min(shape)} of target "
                          f"layer {name} {tuple(shape)}; expected ranks <= {min(shape)} for this model and targets")


def clear_assets() -> None:
    _ASSETS.clear()


# --- global model state (held by the server and by every client process) -----------------------

class GlobalState:
    """Base weights with every applied ``merge``, and the latest adapters."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.applied = 0  # number of round updates merged into ``model``
        self.adapter: dict[str, Factors] | None = None
        self.client_adapters: dict[int, dict[str, Factors]] = {}

    def apply(self, updates: Sequence[RoundUpdate], first_index: int) -> None:
        """Apply ``updates`` (history entries ``first_index, first_index + 1, ...``) not yet applied."""
        if first_index > self.applied:
            raise RuntimeError(f"out of sync: holds {self.applied} round updates, message starts at {first_index}")
        for index, update in enumerate(updates, start=first_index):
            if index < self.applied:
                continue
            merge_update(self.model, {name: _dense(m) for name, m in update.merge.items()})
            if update.adapter is not None:
                self.adapter = update.adapter
            if update.client_adapters is not None:
                self.client_adapters.update(update.client_adapters)
            self.applied = index + 1

    def init_factors(self, client: int, rank: int, truncate: bool) -> dict[str, Factors] | None:
        """The adapter client ``client`` continues from (None: a fresh one)."""
        if client in self.client_adapters:
            return self.client_adapters[client]
        if self.adapter is None or not truncate:
            return self.adapter
        return {name: truncate_factors(A, B, rank) for name, (A, B) in self.adapter.items()}

    def evaluate(self, tokenizer, examples: Sequence[Example], adapter: Mapping[str, Factors] | None,
                 batch_size: int = 8) -> float:
        """Loss of base + ``adapter`` (merged temporarily; the base weights are restored bit for bit)."""
        adapter = adapter or {}
        saved = {name: self.model.get_submodule(name).weight.detach().clone() for name in adapter}
        merge_update(self.model, {name: B @ A for name, (A, B) in adapter.items()})
        try:
            return evaluate_loss(self.model, tokenizer, examples, batch_size)
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    self.model.get_submodule(name).weight.copy_(weight)


def _dense(merge: Merge) -> torch.Tensor:
    if isinstance(merge, torch.Tensor):
        return merge
    A, B = merge
    return B @ A


# --- client -----------------------------------------------------------------------------------

def lora_spec(config: RunConfig, rank: int, client: int = 0) -> LoraSpec:
    adapter = "lora" if config.method == "centralized" else config.client_adapter(client)
    return LoraSpec(rank=rank, alpha=config.alpha_per_rank * rank, dropout=config.dropout,
                    targets=tuple(config.targets), freeze_a=config.method == "ffa", adapter=adapter,
                    target_rank=max(1, round(rank * config.adalora_target_ratio)),
                    warmup_fraction=config.adalora_warmup, final_fraction=config.adalora_final)


class FederationClient:
    """One client process: keeps the global state in sync and trains a partition's adapter."""

    _states: dict[int, GlobalState] = {}

    def __init__(self, config: RunConfig):
        self.config = config
        self.assets = load_assets(config)
        self.state = self._states.setdefault(id(self.assets.model), GlobalState(self.assets.model))

    def train(self, client: int, node: str, round_: int, first_index: int, updates: Sequence[RoundUpdate],
              rank: int | None = None) -> ClientReply:
        config = self.config
        num_partitions = config.num_partitions
        if not 0 <= client < num_partitions:
            return ClientReply(client=client, node=node, factors=None, applied=self.state.applied,
                               error=f"partition-id {client} is outside this run's {num_partitions} partitions "
                                     f"(num_clients = {config.num_clients}); start as many SuperNodes as clients")
        try:
            self.state.apply(updates, first_index)
        except RuntimeError as exc:
            return ClientReply(client=client, node=node, factors=None, error=f"resync: {exc}",
                               applied=self.state.applied)
        rank = rank or config.client_rank(client)
        split = "train:all" if config.method == "centralized" else f"train:{client}"
        examples = self.assets.examples(split, config.cutoff)
        steps = config.local_steps * (config.num_clients if config.method == "centralized" else 1)
        train_spec = TrainSpec(steps=steps, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                               lr=config.lr, seed=config.seed * 100_003 + round_ * 1_009 + client)
        # FedIT-style methods start round 1 from one shared initialisation, FLoRA from a fresh one per client.
        shared_init = config.method in ("fedit", "ffa", "fedex", "zeropad", "flexlora")
        init_seed = config.seed * 7919 + (0 if shared_init else round_ * 1_009 + client + 1)
        init_factors = None if config.method in ("flora", "centralized") else \
            self.state.init_factors(client, rank, truncate=config.method in ("zeropad", "flexlora"))
        result = train_client(self.state.model, self.assets.tokenizer, examples, lora_spec(config, rank, client),
                              train_spec, init_seed=init_seed, init_factors=init_factors)
        if config.method == "standalone":
            self.state.client_adapters[client] = result.factors  # never leaves this client in a deployment
        return ClientReply(client=client, node=node, factors=result.factors, num_examples=result.num_examples,
                           train_loss=result.train_loss, tokens=result.tokens, seconds=result.seconds,
                           applied=self.state.applied, rank=rank)


# --- server -----------------------------------------------------------------------------------

class FederationServer:
    """Round bookkeeping, validation, aggregation, broadcast forms and evaluation."""

    def __init__(self, config: RunConfig, assets: Assets):
        self.config = config
        self.assets = assets
        self.state = GlobalState(assets.model)
        self.history: list[RoundUpdate] = []
        self.node_applied: dict[str, int] = {}  # how many history entries each node's model holds
        self.metrics: list[dict] = []
        self._dp_record: dict = {}  # the last private round's dp_* metrics (see _aggregate_private)

    def restore(self, history: Sequence[RoundUpdate], metrics: Sequence[dict]) -> None:
        """Continue after ``history`` (a checkpoint). Client processes are new, so every node gets the
        whole history with its first message."""
        self.history = list(history)
        self.state.apply(self.history, 0)
        self.metrics = list(metrics)
        self.node_applied = {}

    # messages ---------------------------------------------------------------------------------
    def updates_for(self, node: str) -> tuple[int, list[RoundUpdate]]:
        """The history entries ``node`` lacks: ``(first_index, updates)``."""
        start = self.node_applied.get(node, 0)
        return start, self.history[start:]

    def download_bytes(self, node: str, rank: int) -> int:
        start, updates = self.updates_for(node)
        return sum(u.nbytes(rank) for u in updates)

    # aggregation ------------------------------------------------------------------------------
    def aggregate_round(self, round_: int, replies: Sequence[ClientReply], bytes_down: int,
                        started: float) -> dict:
        config = self.config
        aggregation_started = time.perf_counter()
        accepted, failed, rejected = [], [], []
        for reply in replies:
            self.node_applied[reply.node] = reply.applied
            if reply.error is not None:
                failed.append(reply)
                log.warning("round %d: client %d (node %s) failed: %s", round_, reply.client, reply.node, reply.error)
                continue
            try:
                check_update(reply.factors, client=reply.client, layer_shapes=self.assets.layer_shapes,
                             max_norm=config.max_update_norm or None)
            except InvalidUpdateError as exc:
                rejected.append(reply)
                log.warning("round %d: rejected update: %s", round_, exc)
                continue
            accepted.append(reply)
        accepted = self._robust_filter(round_, accepted, rejected)
        bytes_up = sum(_nbytes(f) for r in replies if r.factors for f in r.factors.values())
        record = {"round": round_, "method": config.method, "clients_ok": len(accepted),
                  "clients_failed": len(failed), "clients_rejected": len(rejected),
                  "bytes_up": bytes_up, "bytes_down": bytes_down}
        if len(accepted) < config.min_clients and not config.dp_enabled:  # DP: the noisy aggregate always goes out
            log.warning("round %d: %d accepted updates < min_clients=%d; global model unchanged",
                        round_, len(accepted), config.min_clients)
            update, error = RoundUpdate(round=round_), math.nan
        else:
            update, error = self._aggregate(round_, accepted)
        self.history.append(update)
        self.state.apply([update], len(self.history) - 1)
        record.update(rank_record(accepted, self.assets.layer_shapes))
        record["aggregation_error"] = error
        if config.dp_enabled:
            record.update(self._dp_record)
        record["broadcast_forms"] = update.forms
        record["train_loss"] = _weighted_mean([r.train_loss for r in accepted], [r.num_examples for r in accepted])
        record["aggregate_seconds"] = time.perf_counter() - aggregation_started  # validation + aggregation + broadcast
        record["train_tokens"] = sum(r.tokens for r in accepted)
        record["train_seconds"] = sum(r.seconds for r in accepted)  # summed over clients (they may overlap)
        evaluation_started = time.perf_counter()
        record["test_loss"] = self.evaluate()
        record["test_ppl"] = math.exp(record["test_loss"]) if math.isfinite(record["test_loss"]) else math.nan
        client_losses = self.evaluate_clients()
        record["client_test_loss"] = [None if math.isnan(x) else x for x in client_losses]
        finite = [x for x in client_losses if math.isfinite(x)]
        record["client_test_loss_mean"] = sum(finite) / len(finite) if finite else math.nan
        record["eval_seconds"] = time.perf_counter() - evaluation_started
        record["seconds"] = time.perf_counter() - started
        self.metrics.append(record)
        return record

    def _robust_filter(self, round_: int, accepted: list[ClientReply], rejected: list[ClientReply]
                       ) -> list[ClientReply]:
        """Norm clipping (``clip_update_norm``) then outlier rejection (``outlier_mad``), both optional."""
        config = self.config
        if config.clip_update_norm:
            for reply in accepted:
                reply.factors, factor = clip_update(reply.factors, config.clip_update_norm)
                if factor < 1:
                    log.info("round %d: client %d update clipped by %.3g", round_, reply.client, factor)
        if not config.outlier_mad:
            return accepted
        norms = [update_norm(r.factors) for r in accepted]
        centre = median(norms) if norms else 0.0
        kept = []
        for reply, norm, score in zip(accepted, norms, mad_outliers(norms, config.outlier_mad)):
            if score is None:
                kept.append(reply)
                continue
            rejected.append(reply)
            log.warning("round %d: rejected update: client %d: norm %.4g is an outlier (median %.4g, modified "
                        "z-score %.3g > outlier_mad = %g)", round_, reply.client, norm, centre, score,
                        config.outlier_mad)
        return kept

    def _aggregate(self, round_: int, accepted: Sequence[ClientReply]) -> tuple[RoundUpdate, float]:
        config = self.config
        if config.dp_enabled:
            return self._aggregate_private(round_, accepted)
        updates = [r.factors for r in accepted]
        weights = client_weights([r.num_examples for r in accepted], scheme=config.weighting,
                                 num_clients=len(accepted))
        if config.method == "standalone":
            return RoundUpdate(round=round_, client_adapters={r.client: r.factors for r in accepted}), 0.0
        method = "flora" if config.method == "centralized" else config.method
        result = aggregate(method, updates, weights, layer_shapes=self.assets.layer_shapes)
        error = aggregation_error(result, updates, weights)["overall"]
        update = RoundUpdate(round=round_)
        if method == "flora":
            for name, (A, B) in result.global_factors.items():
                form, merge = self._broadcast_form(A, B)
                update.merge[name] = merge
                update.forms[form] = update.forms.get(form, 0) + 1
        else:
            update.adapter = result.global_factors
            update.truncate = result.client_factors is not None
            if result.residual is not None:
                update.merge = dict(result.residual)
        return update, error

    def dp_spec(self) -> DPSpec:
        config = self.config
        return DPSpec(noise_multiplier=config.dp_noise_multiplier, clip_norm=config.dp_clip_norm,
                      sample_rate=config.sample_fraction, num_clients=config.num_clients)

    def _aggregate_private(self, round_: int, accepted: Sequence[ClientReply]) -> tuple[RoundUpdate, float]:
        """Clipped, noised mean of the clients' ``B_k A_k`` (see ``flora/lora/dp.py``), broadcast per layer as
        the cheaper of dense and its rank-``dp_broadcast_rank`` truncation (post-processing: no privacy cost).
        The aggregation error is the broadcast's relative distance from the noiseless clipped mean."""
        config, spec = self.config, self.dp_spec()
        norms = [update_norm(r.factors) for r in accepted]
        clipped, clip_factors = clip_updates([r.factors for r in accepted], spec.clip_norm, norms)
        rank = config.dp_broadcast_rank or sum(config.client_rank(k) for k in range(config.num_clients))
        generator = noise_generator(config.dp_noise_seed, round_)
        update = RoundUpdate(round=round_)
        error_sq = clean_sq = worst_truncation = 0.0
        for name in sorted(self.assets.layer_shapes):
            clean, noisy = noisy_layer_mean(clipped, name, self.assets.layer_shapes[name], spec, generator)
            merge, truncation_error = truncate_dense(noisy, rank)
            form = "dense" if isinstance(merge, torch.Tensor) else "truncated"
            update.merge[name] = merge
            update.forms[form] = update.forms.get(form, 0) + 1
            error_sq += float((_dense(merge) - clean).double().square().sum())
            clean_sq += float(clean.double().square().sum())
            worst_truncation = max(worst_truncation, truncation_error)
        self._dp_record = {"dp_epsilon": privacy_spent(spec, round_, config.dp_delta), "dp_delta": config.dp_delta,
                           "dp_noise_std": spec.noise_std, "dp_participants": len(accepted),
                           "dp_clipped": sum(1 for f in clip_factors if f < 1),
                           "dp_truncation_error": worst_truncation,
                           "dp_update_norm_median": median(norms) if norms else math.nan}  # guides dp_clip_norm
        log.info("round %d: DP aggregate of %d clients (%d clipped), noise std %.3g, epsilon %.3g at delta %g",
                 round_, len(accepted), self._dp_record["dp_clipped"], spec.noise_std,
                 self._dp_record["dp_epsilon"], config.dp_delta)
        return update, math.sqrt(error_sq / clean_sq) if clean_sq > 0 else math.nan

    def _broadcast_form(self, A: torch.Tensor, B: torch.Tensor) -> tuple[str, Merge]:
        form = self.config.broadcast
        out_dim, in_dim = B.shape[0], A.shape[1]
        if form in ("smallest", "private"):
            form = smallest_exact_form(A.shape[0], min(A.shape[0], out_dim, in_dim), out_dim, in_dim,
                                       private=form == "private").form
        if form == "dense":
            return form, B @ A
        if form == "refactorized":
            private = refactorize(A, B)
            return form, (private.A, private.B)
        return form, (A, B)

    # evaluation -------------------------------------------------------------------------------
    def test_examples(self) -> list[Example]:
        return self.assets.examples("test", self.config.cutoff, self.config.eval_examples)

    def evaluate_clients(self) -> list[float]:
        """Loss on each client's own test split (its first ``client_eval_examples``): the global model,
        or for ``standalone`` the client's own model (NaN: no split or evaluation off)."""
        limit = self.config.client_eval_examples
        if not limit or self.config.method == "centralized":
            return []
        losses = []
        for k in range(self.config.num_clients):
            examples = self.assets.examples(f"test:{k}", self.config.cutoff, limit)
            adapter = self.state.client_adapters.get(k) if self.config.method == "standalone" else self.state.adapter
            losses.append(self.state.evaluate(self.assets.tokenizer, examples, adapter) if examples else math.nan)
        return losses

    def evaluate(self) -> float:
        examples = self.test_examples()
        if self.config.method == "standalone":
            losses = [self.state.evaluate(self.assets.tokenizer, examples, adapter)
                      for adapter in self.state.client_adapters.values()]
            return float(sum(losses) / len(losses)) if losses else math.nan
        return self.state.evaluate(self.assets.tokenizer, examples, self.state.adapter)


def rank_record(accepted: Sequence[ClientReply], shapes: Mapping[str, tuple[int, int]]) -> dict:
    """Effective ranks (mean over layers) per client, their sum (the paper's "sum of local ranks"), and
    the upload bytes saved against plain LoRA at each client's initial rank (AdaLoRA prunes)."""
    ranks, saved = {}, 0
    for reply in accepted:
        sizes = [0 if not B.any() else A.shape[0] for A, B in reply.factors.values()]  # a zero pair: pruned
        ranks[str(reply.client)] = sum(sizes) / len(sizes) if sizes else 0.0
        if reply.rank:
            itemsize = next(iter(reply.factors.values()))[0].element_size()
            full = sum(reply.rank * (o + i) for o, i in (shapes[name] for name in reply.factors)) * itemsize
            saved += full - sum(_nbytes(f) for f in reply.factors.values())
    return {"client_ranks": ranks, "sum_local_ranks": sum(ranks.values()), "bytes_saved_vs_initial_rank": saved}


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return float(sum(v * w for v, w in zip(values, weights)) / total) if total else math.nan


def round_clients(config: RunConfig, num_nodes: int, round_: int) -> list[int]:
    """Indices (of ``num_nodes``) of the clients asked to train in ``round_``: a seeded sample of
    ``sample_fraction``, or with differential privacy Poisson sampling at that rate (the accountant's model)."""
    if config.dp_enabled:
        return poisson_sample(num_nodes, config.sample_fraction, round_, config.seed)
    return sample_clients(num_nodes, config.sample_fraction, min(config.min_clients, num_nodes), round_, config.seed)


def sample_clients(num_clients: int, fraction: float, min_clients: int, round_: int, seed: int) -> list[int]:
    """Seeded client sampling for a round: ``max(min_clients, round(fraction · N))`` clients."""
    count = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_)
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())
