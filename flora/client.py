"""One client process, as plain Python: keep the global state in sync, train a partition's adapter on the
node's own data, evaluate the global model on the node's own held-out split.

A node's data is its own file only (``flora/data/node.py``): its ``data-path`` in a deployment, its
partition's shard (``OUT/shards/partition-K.jsonl``, written by the simulation launcher) otherwise.

How the client starts its adapter each round comes from the method's registry entry
(``config.spec``: fresh, the global adapter, its first ``r_k`` ranks, its own, or warm factors with
the base weights shifted); the Flower ClientApp (``client_app.py``) is a thin skin over
:meth:`FederationClient.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from flora.adapters import LoraSpec
from flora.config import RunConfig
from flora.data.formats import DataError
from flora.data.node import NodeData, shard_path
from flora.lora.factors import Factors
from flora.precision import temporary_update
from flora.rounds import ClientReply, EvalReply, RoundUpdate
from flora.runtime import Runtime
from flora.train import TrainSpec, attach_adapter, detach_adapter, extract_factors, train_client


def lora_spec(config: RunConfig, rank: int, client: int = 0) -> LoraSpec:
    # A pooled run (centralized) trains one plain LoRA whatever the per-client adapter list says.
    adapter = "lora" if config.spec.pooled else config.client_adapter(client)
    return LoraSpec(rank=rank, alpha=config.alpha_per_rank * rank, dropout=config.dropout,
                    dropout_sampler=config.dropout_sampler,
                    targets=tuple(config.targets), freeze_a=config.spec.freeze_a, adapter=adapter,
                    target_rank=max(1, round(rank * config.adalora_target_ratio)),
                    warmup_fraction=config.adalora_warmup, final_fraction=config.adalora_final,
                    init=config.adalora_init, lr_ratio=config.adalora_lr_ratio,
                    value_lr_ratio=config.adalora_value_lr_ratio, orth_reg_weight=config.adalora_orth_weight)


def train_seed(config: RunConfig, round_: int, client: int) -> int:
    """Seed of a client's batch order and dropout in a round."""
    return config.seed * 100_003 + round_ * 1_009 + client


def init_seed(config: RunConfig, round_: int, client: int) -> int:
    """Seed of a fresh adapter's A: one for every client where the method shares its initialisation,
    else one per round and client."""
    return config.seed * 7919 + (0 if config.spec.shared_init else round_ * 1_009 + client + 1)


def global_rank(config: RunConfig) -> int:
    """Rank ``R`` of the global adapter of a module-selecting method (Fed-PLoRA): the largest client rank."""
    return max(config.ranks)  # = max over the clients' ranks (one value, or one per client)


def module_draw(config: RunConfig, round_: int, client: int, rank: int) -> list[int]:
    """The ``rank`` modules (of ``global_rank``) client ``client`` trains in ``round_``: drawn uniformly without
    replacement, seeded by (seed, round, client), sorted. Client and server compute it alike, so the server
    knows which modules each reply holds without being told."""
    total = global_rank(config)
    if not 1 <= rank <= total:
        raise ValueError(f"rank {rank}: expected 1 <= rank <= the global adapter's rank {total}")
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + round_ * 7_919 + client * 104_729 + 17)
    return sorted(torch.randperm(total, generator=generator)[:rank].tolist())


def initial_adapter(model: torch.nn.Module, config: RunConfig) -> dict[str, Factors]:
    """The global adapter before round 1 for a module-selecting method: rank ``global_rank`` with ``A`` as a fresh
    LoRA of the shared initialisation seed starts (so with equal ranks round 1 is FedIT's) and ``B = 0``.
    The model is unchanged."""
    peft_model = attach_adapter(model, lora_spec(config, global_rank(config)), init_seed=init_seed(config, 1, 0))
    try:
        return extract_factors(peft_model)
    finally:
        detach_adapter(peft_model)


class FederationClient:
    """A client process: the global state it holds (in ``runtime``) and the training of one partition."""

    def __init__(self, config: RunConfig, runtime: Runtime):
        self.config = config
        self.runtime = runtime
        self.assets = runtime.assets(config)
        self.state = runtime.client_state(config)

    def data(self, client: int, node: str, data_path: str | None = None, data_format: str = "auto") -> NodeData:
        """The node's own records: ``data_path`` (a deployed node's ``data-path``), else its partition's shard;
        :class:`DataError` naming the node, its partition and the file otherwise."""
        path = data_path or shard_path(self.config.out_dir, client)
        try:
            return self.runtime.node_data(self.config, path, data_format)
        except DataError as exc:
            hint = "" if data_path else ("; a deployed SuperNode names its own file with --node-config "
                                         "\"data-path='FILE'\"; a `flwr run` simulation needs --run-config "
                                         "\"simulation=true\"")
            raise DataError(f"node {node} (partition-id {client}): {exc}{hint}") from None

    def train(self, client: int, node: str, round_: int, first_index: int, updates: Sequence[RoundUpdate],
              rank: int | None = None, data_path: str | None = None, data_format: str = "auto",
              on_step: Callable[[int, int, float], None] | None = None) -> ClientReply:
        """``on_step(step, steps, loss)`` after every optimizer step (progress lines)."""
        config, spec = self.config, self.config.spec
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
        try:
            data = self.data(client, node, data_path, data_format)
        except DataError as exc:
            return ClientReply(client=client, node=node, factors=None, error=str(exc), applied=self.state.applied)
        examples = self.assets.encode(("node train", data.source, data.stamp), data.train, config.cutoff)
        steps = config.local_steps * (config.num_clients if spec.pooled else 1)  # same token budget as the federation
        train_spec = TrainSpec(steps=steps, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
                               lr=config.lr, seed=train_seed(config, round_, client),
                               gradient_checkpointing=config.gradient_checkpointing,
                               lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
                               schedule_start=(round_ - 1) * steps, schedule_steps=config.rounds * steps)
        try:
            init, shift = self.start(client, rank, round_)
        except ValueError as exc:
            return ClientReply(client=client, node=node, factors=None, error=str(exc), applied=self.state.applied)
        with temporary_update(self.state.model, shift):  # the base the adapter trains on top of (``start``)
            result = train_client(self.state.model, self.assets.tokenizer, examples, lora_spec(config, rank, client),
                                  train_spec, init_seed=init_seed(config, round_, client), init_factors=init,
                                  fill_fresh=spec.warm_start,
                                  progress=(lambda step, loss: on_step(step, steps, loss)) if on_step else None)
        if spec.per_client_models:
            self.state.client_adapters[client] = result.factors  # never leaves this client in a deployment
        return ClientReply(client=client, node=node, factors=result.factors, num_examples=result.num_examples,
                           train_loss=result.train_loss, tokens=result.tokens, seconds=result.seconds,
                           applied=self.state.applied, rank=rank)

    def evaluate(self, client: int, node: str, first_index: int, updates: Sequence[RoundUpdate],
                 data_path: str | None = None, data_format: str = "auto") -> EvalReply:
        """Federated evaluation: catch up with the global model, then its loss on the first
        ``client_eval_examples`` of the node's held-out split (standalone: the node's own model's) and the
        number of target tokens that loss averages over."""
        config = self.config
        try:
            self.state.apply(updates, first_index)
            data = self.data(client, node, data_path, data_format)
        except (RuntimeError, DataError) as exc:
            prefix = "resync: " if isinstance(exc, RuntimeError) else ""
            return EvalReply(client=client, node=node, error=f"{prefix}{exc}", applied=self.state.applied)
        examples = self.assets.encode(("node test", data.source, data.stamp), data.test, config.cutoff,
                                      config.client_eval_examples)
        adapter = self.state.adapter_of(client, config.spec.per_client_models)
        loss, tokens = self.state.evaluate_tokens(self.assets.tokenizer, examples, adapter)
        return EvalReply(client=client, node=node, loss=loss if tokens else math.nan, tokens=tokens,
                         examples=len(examples), applied=self.state.applied)

    def start(self, client: int, rank: int, round_: int
              ) -> tuple[dict[str, Factors] | None, dict[str, torch.Tensor]]:
        """The factors this round's adapter starts from (None: a fresh adapter), and the dense updates added to
        the frozen base while it trains, so that base + adapter is the global model:

        * warm start (``flora/lora/warm.py``): ``(A⁰, B⁰)`` of at most ``rank`` ranks per layer (ranks and layers
          it leaves out start fresh), base shifted by ``−B⁰ A⁰``;
        * Fed-PLoRA's Select-N-Fold: the drawn rank-1 modules of the global adapter, the others folded in;
        * otherwise the method's start (fresh, global, truncated, own) and no shift.
        The exact saved weights come back after training (``precision.temporary_update``)."""
        spec = self.config.spec
        if spec.warm_start:
            init = self.state.warm.factors(rank, self.config.warm_split)
            return init, {name: -(B @ A) for name, (A, B) in init.items()}
        if spec.fresh_adapters:
            return None, {}
        if not spec.selects_modules:
            return self.state.init_factors(client, rank, truncate=spec.truncates), {}
        adapter = self.state.adapter or initial_adapter(self.state.model, self.config)
        drawn = module_draw(self.config, round_, client, rank)
        rest = sorted(set(range(global_rank(self.config))) - set(drawn))
        init = {name: (A[drawn], B[:, drawn]) for name, (A, B) in adapter.items()}
        fold = {name: B[:, rest] @ A[rest] for name, (A, B) in adapter.items()} if rest else {}
        return init, fold
