"""The server's side of a round, as plain Python: screen the replies, aggregate, apply, evaluate.

:meth:`FederationServer.aggregate_round` runs the four steps, each a method returning a small record,
and merges their records into the round's metrics line. What a method aggregates and what it
broadcasts comes from its registry entry (``config.spec``). The Flower strategy (``strategy.py``) is a
thin skin over this class.

Catch-up: the server keeps the round updates (a bounded :class:`~flora.catchup.History`) and, per node, how
many of them that node has applied; a message carries the ones it lacks, collapsed (``flora/catchup.py``:
per layer no more than the smaller of the missed updates and one dense delta). A client process that holds
fewer (it restarted) says so in its reply, is left out of that round, and gets the full list next round.
What the server keeps per node (``node_applied``, ``node_rank``) is dropped once the node is behind the
history's folded base (it then gets what a new node gets), so it is bounded by the nodes of the kept rounds;
``node_partition`` holds at most one node per partition.

Trust (DESIGN.md §2): a reply is used only after :meth:`FederationServer.screen` checked it against
:meth:`FederationServer.rules_for` (``flora/wire_checks.py``: partition, claimed rank at most the node's
configured rank, example count, ``applied`` exactly what the server sent) and
:func:`~flora.lora.factors.check_update` (dtype, shapes, finiteness, norms in float64). A partition
belongs to the first node whose reply for it was accepted, until that node fails; two nodes claiming
one partition in a round are both rejected. A rejected reply is logged with node, partition and reason
and counted in ``clients_rejected``; the round goes on with the others. Client weights come from the
partitions' sizes where the server knows them (``known_partitions``: an engine that made the
partitions itself), else they are uniform, or with ``max_client_weight`` the claimed sizes capped.

Evaluation: the global ``test_loss`` is the server's own, on the operator's held-out set
(``server_test_data``; in a simulation by default the partitioner's global test split; a deployment
without one has none: ``test_loss`` null and ``test_set`` says so). The clients' losses on their own
held-out splits come from federated evaluation (:meth:`FederationServer.record_evaluation`): each node
reports a loss and its token count, screened like a training reply, and ``client_test_loss`` is their
token-weighted mean. The server never opens a node's data in a deployment.
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

from flora.catchup import History, catch_up, dense_model_bytes
from flora.client import global_rank, initial_adapter, module_draw
from flora.config import RunConfig
from flora.data.tokenize import Example
from flora.lora.aggregate import aggregation_error
from flora.lora.dp import DPRandom, DPSpec, clip_updates, noisy_layer_mean, privacy_spent, truncate_dense
from flora.lora.factors import InvalidUpdateError, cap_weights, check_update, normalize_weights
from flora.lora.methods import aggregate
from flora.lora.refactor import refactorize, smallest_exact_form
from flora.lora.robust import clip_update, mad_outliers, update_norm
from flora.data.formats import Record
from flora.rounds import ClientReply, EvalReply, GlobalState, Merge, RoundUpdate, dense, nbytes
from flora.runtime import Assets, SimulationData, global_state
from flora.wire_checks import EvalRules, RejectedReply, ReplyRules, check_eval_fields, check_reply_fields

# With differential privacy, the only numbers of a round that leave the operator's own files
# (metrics.jsonl): the privatised model's loss on the operator's test set and the accountant's output.
DP_PUBLIC = ("round", "test_loss", "test_ppl", "dp_epsilon", "dp_delta", "dp_noise_std", "dp_guarantee_void")

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
    weights: list[float] = field(default_factory=list)  # p_k of the accepted replies, in their order


class FederationServer:
    """Round bookkeeping, validation, aggregation, broadcast forms and evaluation.

    ``simulation``: the dataset and partition the simulation dealt out (so the server knows each partition's
    size and configured rank: ``known_partitions``); a deployment's server has none (each SuperNode brings its
    own data and rank). ``test_records``: the server's own held-out set (None: federated evaluation only).
    """

    def __init__(self, config: RunConfig, assets: Assets, simulation: SimulationData | None = None,
                 test_records: list[Record] | None = None, test_set: str = "none"):
        self.config = config
        self.assets = assets
        self.simulation = simulation
        self.known_partitions = simulation is not None
        self.test_records = test_records
        self.test_set = test_set if test_records is not None else "none: federated evaluation only"
        self.state: GlobalState = global_state(config, assets.model)
        self.history = self.new_history()
        self.node_applied: dict[str, int] = {}  # how many history entries each node's model holds
        self.sent: dict[str, int] = {}  # this round: node -> history entries its message brings it to
        self.node_partition: dict[str, int] = {}  # partition of each node, bound by its first accepted reply
        self.partition_node: dict[int, str] = {}  # the inverse of node_partition
        self._catch_up: dict[int, tuple[int, list[RoundUpdate]]] = {}  # this round's catch-ups by start index
        self.node_rank: dict[str, int] = {}  # rank of each node's last accepted reply (truncates its adapter)
        self.metrics: list[dict] = []
        self.dp_random = DPRandom(config.dp_noise_seed)
        self._sizes: dict[int, int] = {}
        float_dtypes = {p.dtype for p in assets.model.parameters() if p.is_floating_point()} | {torch.float32}
        self.factor_dtypes = frozenset(float_dtypes)
        self.wire_dtypes = frozenset(_numpy_name(d) for d in float_dtypes if _numpy_name(d))
        if config.dp_enabled and self.dp_random.guarantee_void:
            log.warning("dp_noise_seed = %d: the noise and the participation sample are reproducible from it; "
                        "the differential privacy guarantee is VOID (use dp_noise_seed = -1 for a private run)",
                        config.dp_noise_seed)
        if self.unweighted_claims:
            log.warning("clients' example counts cannot be verified by this server (deployment): clients are "
                        "weighted uniformly; set max_client_weight = c to weight by the counts they claim, no "
                        "client above c")

    def restore(self, history: Sequence[RoundUpdate], metrics: Sequence[dict]) -> None:
        """Continue after ``history`` (a checkpoint). Client processes are new, so every node gets the
        whole history with its first message."""
        self.history = self.new_history()
        for update in history:  # folded as the uninterrupted run folded it
            self.history.append(update)
        self.state.apply(history, 0)
        self._catch_up.clear()
        self.metrics = list(metrics)
        self.node_applied = {}

    def new_history(self) -> History:
        """An empty history, folded (``flora/catchup.py``) unless clients warm-start from its exact entries."""
        return History(dense_model_bytes(self.assets.layer_shapes), fold=not self.config.spec.warm_start)

    # messages ---------------------------------------------------------------------------------
    def updates_for(self, node: str) -> tuple[int, list[RoundUpdate]]:
        """The history entries ``node`` lacks, collapsed (:func:`~flora.catchup.catch_up`): ``(first_index,
        updates)``; remembered as what this round's message to ``node`` brings it to (its reply's ``applied`` is
        checked against it). Nodes with the same start share one catch-up per round."""
        start = self.node_applied.get(node, 0)
        self.sent[node] = len(self.history)
        if start not in self._catch_up:
            # the engines of this process (known partitions) share one client process among many nodes
            self._catch_up[start] = catch_up(self.history, start, keep_newest=self.known_partitions)
        return self._catch_up[start]

    def sent_rank(self, node: str) -> int | None:
        """The rank a truncating method cuts ``node``'s adapter to: its last accepted (bounded) rank."""
        return self.node_rank.get(node)

    # what a reply may contain ------------------------------------------------------------------
    def rules_for(self, node: str) -> ReplyRules:
        """What the server accepts from ``node`` this round (see ``flora/wire_checks.py``)."""
        return ReplyRules(layer_shapes=self.assets.layer_shapes, dtypes=self.wire_dtypes,
                          num_partitions=self.config.num_partitions, rank_bound=self.rank_bound,
                          known_size=self.known_size if self.known_partitions else None,
                          applied_end=self.sent.get(node))

    def rank_bound(self, partition: int) -> int:
        """The largest rank partition ``partition`` may claim: its configured rank where the server knows the
        partitions, else the largest configured rank; never above any layer's ``min(out, in)``."""
        config = self.config
        configured = config.client_rank(partition) if self.known_partitions else max(config.ranks)
        return min([configured] + [min(shape) for shape in self.assets.layer_shapes.values()])

    def known_size(self, partition: int) -> int:
        """Training examples of ``partition`` (what its honest client reports as ``num-examples``)."""
        if partition not in self._sizes:
            records = self.simulation.train(partition)
            self._sizes[partition] = len(self.assets.encode(("partition train", partition), records, self.config.cutoff))
        return self._sizes[partition]

    @property
    def unweighted_claims(self) -> bool:
        """Data-size weighting is asked for but the sizes are claims the server may not use."""
        config = self.config
        return (config.weighting == "num_examples" and not config.dp_enabled and not self.known_partitions
                and not config.max_client_weight)

    def download_bytes(self, node: str, rank: int) -> int:
        """Bytes of this round's message to ``node`` (its catch-up) for a client of ``rank``."""
        start, updates = self.updates_for(node)
        return sum(u.nbytes(rank) for u in updates)

    # the round --------------------------------------------------------------------------------
    def aggregate_round(self, round_: int, replies: Sequence[ClientReply], bytes_down: int,
                        started: float, evaluate: bool = True) -> dict:
        """Screen → aggregate → apply → evaluate; returns (and keeps) the round's metrics record.
        ``evaluate = False``: the caller runs :meth:`evaluate_round` itself and adds its fields to the record
        (the Flower skin, while the nodes evaluate)."""
        config = self.config
        aggregation_started = time.perf_counter()
        screening = self.screen(round_, replies)
        self.sent.clear()  # a reply to this round's message is never valid later
        accepted = screening.accepted
        record = {"round": round_, "method": config.method, "clients_ok": len(accepted),
                  "clients_failed": len(screening.failed), "clients_rejected": len(screening.rejected),
                  "bytes_up": sum(nbytes(f) for r in replies if r.factors for f in r.factors.values()),
                  "bytes_down": bytes_down}
        aggregated = self.aggregate(round_, accepted)
        if not config.dp_enabled and aggregated.weights:
            record["client_weights"] = {str(r.client): p for r, p in zip(accepted, aggregated.weights)}
            record["client_train_loss"] = {str(r.client): r.train_loss for r in accepted}
            record["client_weights_from"] = self.weights_from()
        self.apply(aggregated.update)
        record.update(rank_record(accepted, self.assets.layer_shapes))
        record["aggregation_error"] = aggregated.error
        record.update(aggregated.record)
        record["broadcast_forms"] = aggregated.update.forms
        record["train_loss"] = _weighted_mean([r.train_loss for r in accepted], [r.num_examples for r in accepted])
        record["aggregate_seconds"] = time.perf_counter() - aggregation_started  # validation + aggregation + broadcast
        record["train_tokens"] = sum(r.tokens for r in accepted)
        record["train_seconds"] = sum(r.seconds for r in accepted)  # summed over clients (they may overlap)
        if evaluate:
            record.update(self.evaluate_round() if self.evaluates(round_) else not_evaluated())
        record["seconds"] = time.perf_counter() - started
        self.metrics.append(record)
        return record

    def screen(self, round_: int, replies: Sequence[ClientReply]) -> Screening:
        """Sort the replies: rejected (decoding, fields, partition ownership, update validation, two nodes
        claiming one partition), failed (an error reply), accepted; then norm clipping (``clip_update_norm``)
        and outlier rejection (``outlier_mad``), both optional. Updates what the server believes each node
        holds (``node_applied``: from failed and accepted replies only) and the node-partition bindings."""
        config = self.config
        screening = Screening()
        claims: dict[int, list[ClientReply]] = {}
        for reply in replies:
            reason = self._rejection(reply)
            if reason is not None:
                self._reject(round_, reply, reason, screening)
            elif reply.error is not None:
                screening.failed.append(reply)
                self.node_applied[reply.node] = reply.applied
                if self.node_partition.get(reply.node) == reply.client:  # its partition is free to rebind
                    del self.node_partition[reply.node]
                    del self.partition_node[reply.client]
                log.warning("round %d: client %s (node %s) failed: %s", round_, _client(reply), reply.node,
                            printable(reply.error[:300]))
            else:
                claims.setdefault(reply.client, []).append(reply)
        for partition, claimants in claims.items():
            if len(claimants) > 1:
                nodes = ", ".join(r.node for r in claimants)
                for reply in claimants:
                    self._reject(round_, reply, f"config 'partition-id' = {partition}: claimed by nodes {nodes} "
                                                f"in one round; expected one node per partition", screening)
                continue
            reply = claimants[0]
            screening.accepted.append(reply)
            self.node_applied[reply.node] = reply.applied
            self.node_partition[reply.node] = partition
            self.partition_node[partition] = reply.node
            self.node_rank[reply.node] = reply.rank
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

    def _ownership_rejection(self, reply: ClientReply | EvalReply) -> str | None:
        """Why ``reply``'s partition is not its node's to claim (None: it is): the node is bound to another
        partition, or the partition to another node."""
        bound = self.node_partition.get(reply.node)
        if bound is not None and bound != reply.client:
            return f"config 'partition-id' = {reply.client}: expected {bound}, the partition of node {reply.node}"
        owner = self.partition_node.get(reply.client)
        if owner is not None and owner != reply.node:
            return (f"config 'partition-id' = {reply.client}: partition {reply.client} belongs to node {owner} "
                    f"(bound by its first accepted reply; a node that fails frees it)")
        return None

    def _rejection(self, reply: ClientReply) -> str | None:
        """Why ``reply`` cannot be used (None: it can; an error reply is then a failure)."""
        if reply.rejection is not None:
            return reply.rejection
        try:
            check_reply_fields(reply, self.rules_for(reply.node))
        except RejectedReply as exc:
            return str(exc)
        if reply.error is not None:
            return None
        ownership = self._ownership_rejection(reply)
        if ownership is not None:
            return ownership
        try:
            check_update(reply.factors, client=reply.client, layer_shapes=self.assets.layer_shapes,
                         max_norm=self.config.max_update_norm or None, max_rank=reply.rank, dtypes=self.factor_dtypes)
            if self.config.spec.selects_modules:
                self._check_module_ranks(reply)
        except InvalidUpdateError as exc:
            return exc.reason if exc.layer is None else f"layer {exc.layer!r}: {exc.reason}"
        return None

    def _reject(self, round_: int, reply: ClientReply, reason: str, screening: Screening) -> None:
        screening.rejected.append(reply)
        log.warning("round %d: rejected update: client %s (node %s): %s", round_, _client(reply), reply.node, reason)

    def _clipped(self, round_: int, reply: ClientReply) -> ClientReply:
        factors, factor = clip_update(reply.factors, self.config.clip_update_norm)
        if factor == 1:
            return reply
        if not self.config.dp_enabled:  # with DP a client's norm is an unprivatised statistic
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
            log.warning("round %d: rejected update: client %d (node %s): norm %.4g is an outlier (median %.4g, "
                        "modified z-score %.3g > outlier_mad = %g)", round_, reply.client, reply.node, norm, centre,
                        score, threshold)
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
        weights = self.weights(accepted)
        options = {}
        if spec.warm_start:  # the factors every client started from (a prefix of them, its rank's), as it computed them
            options["start"] = self.state.warm.factors(max(A.shape[0] for u in updates for A, _ in u.values()),
                                                       config.warm_split)
        elif spec.selects_modules:
            options = self._module_options(round_, accepted)
        result = aggregate(config.method, updates, weights, layer_shapes=self.assets.layer_shapes, **options)
        if (bad := _nonfinite(result.global_factors) or _nonfinite(result.residual or {})) is not None:
            return self._unchanged(round_, bad)
        error = aggregation_error(result, updates, weights, dense=config.error_check == "dense")["overall"]
        update = RoundUpdate(round=round_)
        if spec.merges:
            for name, (A, B) in result.global_factors.items():
                # server_lr scales the exact aggregate (B side): the error above is the rule's, before the step
                form, merge = self._broadcast_form(A, B if config.server_lr == 1 else B * config.server_lr)
                update.merge[name] = merge
                update.forms[form] = update.forms.get(form, 0) + 1
        else:
            update.adapter = result.global_factors
            update.truncate = spec.truncates
            if result.residual is not None:
                update.merge = dict(result.residual)
        return Aggregated(update, error, weights=weights)

    def weights(self, accepted: Sequence[ClientReply]) -> list[float]:
        """Client weights ``p_k``: ``uniform``; or by data size, from the partitions' known sizes where the
        server knows them, else from the claimed counts only with ``max_client_weight`` (uniform without);
        with ``max_client_weight = c`` no weight exceeds ``c`` (:func:`~flora.lora.factors.cap_weights`)."""
        config = self.config
        uniform = [1.0] * len(accepted)
        if config.weighting == "uniform" or self.unweighted_claims:
            sizes = uniform
        elif self.known_partitions:
            sizes = [self.known_size(r.client) for r in accepted]
        else:
            sizes = [r.num_examples for r in accepted]
        weights = normalize_weights(sizes)
        return cap_weights(weights, config.max_client_weight) if config.max_client_weight else weights

    def weights_from(self) -> str:
        """What :meth:`weights` based this run's client weights on (recorded with them every round)."""
        config = self.config
        if config.weighting == "uniform" or self.unweighted_claims:
            source = "uniform"
        elif self.known_partitions:
            source = "partition sizes (known to the simulation's server)"
        else:
            source = "example counts the nodes reported"
        return source + (f", capped at max_client_weight = {config.max_client_weight:g}"
                         if config.max_client_weight else "")

    def _unchanged(self, round_: int, layer: str, record: dict | None = None) -> Aggregated:
        """An empty update: the aggregate of ``layer`` is not finite and never touches the global model."""
        log.error("round %d: the aggregate of layer %r is not finite; global model unchanged", round_, layer)
        return Aggregated(RoundUpdate(round=round_), math.nan, record or {})

    def apply(self, update: RoundUpdate) -> None:
        """Append ``update`` to the history and to the server's global state; forget what it kept for nodes now
        behind the history's folded base (they get what a new node gets)."""
        folded = self.history.base_span
        self.history.append(update)
        self.state.apply([update], len(self.history) - 1)
        self._catch_up.clear()
        if self.history.base_span > max(folded, 1):  # rounds were folded into the base
            for node in [n for n, applied in self.node_applied.items() if applied < self.history.base_span]:
                del self.node_applied[node]
                self.node_rank.pop(node, None)

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
        noise = self.dp_random.noise(round_)
        update = RoundUpdate(round=round_)
        error_sq = clean_sq = worst_truncation = 0.0
        for name in sorted(self.assets.layer_shapes):
            clean, noisy = noisy_layer_mean(clipped, name, self.assets.layer_shapes[name], spec, noise)
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
                  "dp_update_norm_median": median(norms) if norms else math.nan,  # guides dp_clip_norm
                  "dp_guarantee_void": self.dp_random.guarantee_void, "dp_random_source": self.dp_random.source}
        # participants, clipped counts and norms are not privatised: they stay in metrics.jsonl, not in logs
        log.info("round %d: DP aggregate, noise std %.3g, epsilon %.3g at delta %g", round_, spec.noise_std,
                 record["dp_epsilon"], config.dp_delta)
        if (bad := _nonfinite(update.merge)) is not None:
            return self._unchanged(round_, bad, record)
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
    def evaluates(self, round_: int) -> bool:
        """Whether ``round_`` is evaluated: every ``eval_every``-th round and the last one."""
        return round_ % self.config.eval_every == 0 or round_ >= self.config.rounds

    def evaluate_round(self) -> dict:
        """Global test loss and perplexity on the server's own held-out set (NaN: it has none), and the
        seconds it took; the clients' losses come later (:meth:`record_evaluation`)."""
        started = time.perf_counter()
        record = {"test_loss": self.evaluate(), "test_set": self.test_set}
        record["test_ppl"] = math.exp(record["test_loss"]) if math.isfinite(record["test_loss"]) else math.nan
        record["eval_seconds"] = time.perf_counter() - started
        return record

    def test_examples(self) -> list[Example]:
        if self.test_records is None:
            return []
        return self.assets.encode(("server test",), self.test_records, self.config.cutoff, self.config.eval_examples)

    @property
    def federated_evaluation(self) -> bool:
        """Nodes evaluate the global model on their own held-out splits (after the rounds ``evaluates``)."""
        return bool(self.config.client_eval_examples) and not self.config.spec.pooled

    def evaluates_clients(self, round_: int) -> bool:
        """Whether the round's nodes evaluate the global model after ``round_``."""
        return self.federated_evaluation and self.evaluates(round_)

    def eval_rules_for(self, node: str) -> EvalRules:
        return EvalRules(num_partitions=self.config.num_partitions, max_examples=self.config.client_eval_examples,
                         max_tokens_per_example=self.config.cutoff, applied_end=self.sent.get(node))

    def record_evaluation(self, round_: int, replies: Sequence[EvalReply], bytes_down: int = 0,
                          seconds: float = 0.0) -> dict:
        """Screen the round's federated-evaluation replies and add them to the round's record: per client its
        loss and token count, ``client_test_loss`` their token-weighted mean (NaN: none), the evaluation's
        download bytes (they also count in ``bytes_down``)."""
        record = self.metrics[-1]
        accepted, claims = [], {}
        for reply in replies:
            reason = reply.rejection
            if reason is None:
                try:
                    check_eval_fields(reply, self.eval_rules_for(reply.node))
                except RejectedReply as exc:
                    reason = str(exc)
            if reason is None and reply.error is None:
                reason = self._ownership_rejection(reply)
            if reason is not None:
                log.warning("round %d: rejected evaluation: client %s (node %s): %s", round_,
                            "?" if reply.client == -1 else reply.client, reply.node, reason)
                continue
            self.node_applied[reply.node] = reply.applied
            if reply.error is not None:
                log.warning("round %d: client %s (node %s) evaluation failed: %s", round_, reply.client, reply.node,
                            printable(reply.error[:300]))
                continue
            claims.setdefault(reply.client, []).append(reply)
        for partition, claimants in sorted(claims.items()):
            if len(claimants) > 1:
                log.warning("round %d: rejected evaluation: client %d (nodes %s): claimed by %d nodes in one round",
                            round_, partition, ", ".join(r.node for r in claimants), len(claimants))
                continue
            accepted.append(claimants[0])
        self.sent.clear()
        scored = [r for r in accepted if r.tokens > 0]
        tokens = sum(r.tokens for r in scored)
        record["client_test_loss"] = sum(r.loss * r.tokens for r in scored) / tokens if tokens else math.nan
        record["client_test_losses"] = {str(r.client): r.loss for r in scored}
        record["client_test_tokens"] = {str(r.client): r.tokens for r in scored}
        record["clients_evaluated"] = len(scored)
        record["bytes_down_eval"] = bytes_down
        record["bytes_down"] += bytes_down
        record["federated_eval_seconds"] = seconds
        record["seconds"] += seconds
        return record

    def evaluate(self) -> float:
        """Global test loss: of the global model, or the mean over clients' own models (standalone); NaN
        without a server test set."""
        examples = self.test_examples()
        if not examples:
            return math.nan
        if self.config.spec.per_client_models:
            losses = [self.state.evaluate(self.assets.tokenizer, examples, adapter)
                      for adapter in self.state.client_adapters.values()]
            return float(sum(losses) / len(losses)) if losses else math.nan
        return self.state.evaluate(self.assets.tokenizer, examples, self.state.adapter)


def not_evaluated() -> dict:
    """The evaluation fields of a round that ``eval_every`` skips: NaN losses (``null`` in metrics.jsonl)."""
    return {"test_loss": math.nan, "test_ppl": math.nan, "eval_seconds": 0.0}


def public_record(config: RunConfig, record: dict) -> dict:
    """What of a round's metrics may leave the operator's files (Flower's metric records, logs): all of it,
    or with differential privacy only :data:`DP_PUBLIC` (the rest is not privatised)."""
    return {k: record[k] for k in DP_PUBLIC if k in record} if config.dp_enabled else dict(record)


def _nonfinite(parts: Mapping[str, Merge]) -> str | None:
    """The first layer whose tensor(s) hold NaN or Inf (None: all finite)."""
    for name, part in parts.items():
        if not all(bool(torch.isfinite(t).all()) for t in (part if isinstance(part, tuple) else (part,))):
            return name
    return None


def printable(text: str) -> str:
    """``text`` with control characters escaped: a client's message cannot forge log lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _client(reply: ClientReply) -> str:
    return "?" if reply.client == -1 else str(reply.client)


def _numpy_name(dtype: torch.dtype) -> str | None:
    """The numpy name of a torch dtype (None: numpy has none, e.g. bfloat16)."""
    try:
        return str(torch.empty(0, dtype=dtype).numpy().dtype)
    except TypeError:
        return None


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
    ``sample_fraction``, or with differential privacy Poisson sampling at that rate (the accountant's model)
    from the DP randomness (:class:`~flora.lora.dp.DPRandom`: secret unless ``dp_noise_seed`` is set)."""
    if config.dp_enabled:
        return DPRandom(config.dp_noise_seed).participants(num_nodes, config.sample_fraction, round_)
    return sample_clients(num_nodes, config.sample_fraction, min(config.min_clients, num_nodes), round_, config.seed)


def sample_clients(num_clients: int, fraction: float, min_clients: int, round_: int, seed: int) -> list[int]:
    """Seeded client sampling for a round: ``max(min_clients, round(fraction · N))`` clients, uniformly without
    replacement by Floyd's algorithm: ``count`` draws, so the cost does not grow with the registered clients."""
    count = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_)
    chosen: set[int] = set()
    for top in range(num_clients - count, num_clients):
        pick = int(torch.randint(top + 1, (1,), generator=generator))
        chosen.add(top if pick in chosen else pick)
    return sorted(chosen)
