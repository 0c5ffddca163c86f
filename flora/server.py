"""The server's side of a round, as plain Python: screen the replies, aggregate, apply, evaluate.

:meth:`FederationServer.aggregate_round` runs the four steps, each a method returning a small record,
and merges their records into the round's metrics line. What a method aggregates and what it
broadcasts comes from its registry entry (``config.spec``). The Flower strategy (``strategy.py``) is a
thin skin over this class.

Catch-up: the server keeps the list of round updates and, per node, how many of them that node has
applied; a message carries the ones it lacks. A client process that holds fewer (it restarted) says
so in its reply, is left out of that round, and gets the full list next round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median

import torch

from flora.client import global_rank, initial_adapter, module_draw
from flora.config import RunConfig
from flora.data.tokenize import Example
from flora.lora.aggregate import aggregation_error
from flora.lora.dp import DPSpec, clip_updates, noise_generator, noisy_layer_mean, poisson_sample, privacy_spent, \
    truncate_dense
from flora.lora.factors import InvalidUpdateError, check_update, client_weights
from flora.lora.methods import aggregate
from flora.lora.refactor import refactorize, smallest_exact_form
from flora.lora.robust import clip_update, mad_outliers, update_norm
from flora.rounds import ClientReply, GlobalState, Merge, RoundUpdate, dense, nbytes
from flora.runtime import Assets, global_state

log = logging.getLogger("flora")


@dataclass
class Screening:
    """A round's replies sorted by the validation and robustness rules (clipped copies, never the originals)."""

    accepted: list[ClientReply] = field(default_factory=list)
    failed: list[ClientReply] = field(default_factory=list)
    rejected: list[ClientReply] = field(default_factory=list)


@dataclass
class Aggregated:
    update: RoundUpdate
    error: float  # relative aggregation error (NaN: nothing aggregated)
    record: dict = field(default_factory=dict)  # method-specific metrics (DP accounting)


class FederationServer:
    """Round bookkeeping, validation, aggregation, broadcast forms and evaluation."""

    def __init__(self, config: RunConfig, assets: Assets):
        self.config = config
        self.assets = assets
        self.state: GlobalState = global_state(config, assets.model)
        self.history: list[RoundUpdate] = []
        self.node_applied: dict[str, int] = {}  # how many history entries each node's model holds
        self.metrics: list[dict] = []

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

    # the round --------------------------------------------------------------------------------
    def aggregate_round(self, round_: int, replies: Sequence[ClientReply], bytes_down: int,
                        started: float) -> dict:
        """Screen → aggregate → apply → evaluate; returns (and keeps) the round's metrics record."""
        config = self.config
        aggregation_started = time.perf_counter()
        for reply in replies:
            self.node_applied[reply.node] = reply.applied
        screening = self.screen(round_, replies)
        accepted = screening.accepted
        record = {"round": round_, "method": config.method, "clients_ok": len(accepted),
                  "clients_failed": len(screening.failed), "clients_rejected": len(screening.rejected),
                  "bytes_up": sum(nbytes(f) for r in replies if r.factors for f in r.factors.values()),
                  "bytes_down": bytes_down}
        aggregated = self.aggregate(round_, accepted)
        self.apply(aggregated.update)
        record.update(rank_record(accepted, self.assets.layer_shapes))
        record["aggregation_error"] = aggregated.error
        record.update(aggregated.record)
        record["broadcast_forms"] = aggregated.update.forms
        record["train_loss"] = _weighted_mean([r.train_loss for r in accepted], [r.num_examples for r in accepted])
        record["aggregate_seconds"] = time.perf_counter() - aggregation_started  # validation + aggregation + broadcast
        record["train_tokens"] = sum(r.tokens for r in accepted)
        record["train_seconds"] = sum(r.seconds for r in accepted)  # summed over clients (they may overlap)
        record.update(self.evaluate_round())
        record["seconds"] = time.perf_counter() - started
        self.metrics.append(record)
        return record

    def screen(self, round_: int, replies: Sequence[ClientReply]) -> Screening:
        """Failed replies, updates that fail validation (shapes, finiteness, ``max_update_norm``), then norm
        clipping (``clip_update_norm``) and outlier rejection (``outlier_mad``), both optional."""
        config = self.config
        screening = Screening()
        for reply in replies:
            if reply.error is not None:
                screening.failed.append(reply)
                log.warning("round %d: client %d (node %s) failed: %s", round_, reply.client, reply.node, reply.error)
                continue
            if self.config.spec.warm_start and reply.applied != len(self.history):
                screening.rejected.append(reply)  # its warm start was cut from another global model than ours
                log.warning("round %d: rejected update: client %d trained on %d round updates, the server holds %d",
                            round_, reply.client, reply.applied, len(self.history))
                continue
            try:
                check_update(reply.factors, client=reply.client, layer_shapes=self.assets.layer_shapes,
                             max_norm=config.max_update_norm or None)
                if config.spec.selects_modules:
                    self._check_module_ranks(reply)
            except InvalidUpdateError as exc:
                screening.rejected.append(reply)
                log.warning("round %d: rejected update: %s", round_, exc)
                continue
            screening.accepted.append(reply)
        if config.clip_update_norm:
            screening.accepted = [self._clipped(round_, reply) for reply in screening.accepted]
        if config.outlier_mad:
            screening.accepted = self._without_outliers(round_, screening.accepted, screening.rejected)
        return screening

    def _check_module_ranks(self, reply: ClientReply) -> None:
        """A module-selecting method's reply holds the same number of drawn modules, at most ``R``, in every layer."""
        ranks = sorted({A.shape[0] for A, _ in reply.factors.values()})
        total = global_rank(self.config)
        if len(ranks) != 1 or ranks[0] > total:
            raise InvalidUpdateError(reply.client, None, f"module ranks {ranks}: expected one rank <= the global "
                                                         f"adapter's {total} in every layer")

    def _module_options(self, round_: int, accepted: Sequence[ClientReply]) -> dict:
        """Fed-PLoRA: the global adapter before this round and the modules each reply trained (the seeded draw)."""
        previous = self.state.adapter or initial_adapter(self.state.model, self.config)
        modules = [module_draw(self.config, round_, r.client, next(iter(r.factors.values()))[0].shape[0])
                   for r in accepted]
        return {"previous": previous, "modules": modules}

    def _clipped(self, round_: int, reply: ClientReply) -> ClientReply:
        factors, factor = clip_update(reply.factors, self.config.clip_update_norm)
        if factor == 1:
            return reply
        log.info("round %d: client %d update clipped by %.3g", round_, reply.client, factor)
        return dataclasses.replace(reply, factors=factors)

    def _without_outliers(self, round_: int, accepted: list[ClientReply], rejected: list[ClientReply]
                          ) -> list[ClientReply]:
        threshold = self.config.outlier_mad
        norms = [update_norm(r.factors) for r in accepted]
        centre = median(norms) if norms else 0.0
        kept = []
        for reply, norm, score in zip(accepted, norms, mad_outliers(norms, threshold)):
            if score is None:
                kept.append(reply)
                continue
            rejected.append(reply)
            log.warning("round %d: rejected update: client %d: norm %.4g is an outlier (median %.4g, modified "
                        "z-score %.3g > outlier_mad = %g)", round_, reply.client, norm, centre, score, threshold)
        return kept

    def aggregate(self, round_: int, accepted: Sequence[ClientReply]) -> Aggregated:
        """The round's update from the accepted replies, by the method's rule (or the DP mechanism)."""
        config, spec = self.config, self.config.spec
        if len(accepted) < config.min_clients and not config.dp_enabled:  # DP: the noisy aggregate always goes out
            log.warning("round %d: %d accepted updates < min_clients=%d; global model unchanged",
                        round_, len(accepted), config.min_clients)
            return Aggregated(RoundUpdate(round=round_), math.nan)
        if config.dp_enabled:
            return self._aggregate_private(round_, accepted)
        if spec.aggregate is None:  # each client keeps its own model
            return Aggregated(RoundUpdate(round=round_, client_adapters={r.client: r.factors for r in accepted}), 0.0)
        updates = [r.factors for r in accepted]
        weights = client_weights([r.num_examples for r in accepted], scheme=config.weighting,
                                 num_clients=len(accepted))
        options = {}
        if spec.warm_start:  # the factors every client started from (a prefix of them, its rank's), as it computed them
            options["start"] = self.state.warm.factors(max(A.shape[0] for u in updates for A, _ in u.values()),
                                                       config.warm_split)
        elif spec.selects_modules:
            options = self._module_options(round_, accepted)
        result = aggregate(config.method, updates, weights, layer_shapes=self.assets.layer_shapes, **options)
        error = aggregation_error(result, updates, weights)["overall"]
        update = RoundUpdate(round=round_)
        if spec.merges:
            for name, (A, B) in result.global_factors.items():
                form, merge = self._broadcast_form(A, B)
                update.merge[name] = merge
                update.forms[form] = update.forms.get(form, 0) + 1
        else:
            update.adapter = result.global_factors
            update.truncate = spec.truncates
            if result.residual is not None:
                update.merge = dict(result.residual)
        return Aggregated(update, error)

    def apply(self, update: RoundUpdate) -> None:
        """Append ``update`` to the history and to the server's global state."""
        self.history.append(update)
        self.state.apply([update], len(self.history) - 1)

    def dp_spec(self) -> DPSpec:
        config = self.config
        return DPSpec(noise_multiplier=config.dp_noise_multiplier, clip_norm=config.dp_clip_norm,
                      sample_rate=config.sample_fraction, num_clients=config.num_clients)

    def _aggregate_private(self, round_: int, accepted: Sequence[ClientReply]) -> Aggregated:
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
            error_sq += float((dense(merge) - clean).double().square().sum())
            clean_sq += float(clean.double().square().sum())
            worst_truncation = max(worst_truncation, truncation_error)
        record = {"dp_epsilon": privacy_spent(spec, round_, config.dp_delta), "dp_delta": config.dp_delta,
                  "dp_noise_std": spec.noise_std, "dp_participants": len(accepted),
                  "dp_clipped": sum(1 for f in clip_factors if f < 1), "dp_truncation_error": worst_truncation,
                  "dp_update_norm_median": median(norms) if norms else math.nan}  # guides dp_clip_norm
        log.info("round %d: DP aggregate of %d clients (%d clipped), noise std %.3g, epsilon %.3g at delta %g",
                 round_, len(accepted), record["dp_clipped"], spec.noise_std, record["dp_epsilon"], config.dp_delta)
        return Aggregated(update, math.sqrt(error_sq / clean_sq) if clean_sq > 0 else math.nan, record)

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
    def evaluate_round(self) -> dict:
        """Global test loss and perplexity, each client's test loss, and the seconds it took."""
        started = time.perf_counter()
        record = {"test_loss": self.evaluate()}
        record["test_ppl"] = math.exp(record["test_loss"]) if math.isfinite(record["test_loss"]) else math.nan
        client_losses = self.evaluate_clients()
        record["client_test_loss"] = [None if math.isnan(x) else x for x in client_losses]
        finite = [x for x in client_losses if math.isfinite(x)]
        record["client_test_loss_mean"] = sum(finite) / len(finite) if finite else math.nan
        record["eval_seconds"] = time.perf_counter() - started
        return record

    def test_examples(self) -> list[Example]:
        return self.assets.examples("test", self.config.cutoff, self.config.eval_examples)

    def evaluate_clients(self) -> list[float]:
        """Loss on each client's own test split (its first ``client_eval_examples``): the global model,
        or where each client keeps its own model (standalone) that model (NaN: no split)."""
        limit, spec = self.config.client_eval_examples, self.config.spec
        if not limit or spec.pooled:
            return []
        losses = []
        for k in range(self.config.num_clients):
            examples = self.assets.examples(f"test:{k}", self.config.cutoff, limit)
            adapter = self.state.adapter_of(k, spec.per_client_models)
            losses.append(self.state.evaluate(self.assets.tokenizer, examples, adapter) if examples else math.nan)
        return losses

    def evaluate(self) -> float:
        """Global test loss: of the global model, or the mean over clients' own models (standalone)."""
        examples = self.test_examples()
        if self.config.spec.per_client_models:
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
            saved += full - sum(nbytes(f) for f in reply.factors.values())
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
