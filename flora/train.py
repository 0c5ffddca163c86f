"""Local LoRA training of one client (peft layers) and adapter loading.

One client's round: :func:`train_client` attaches an adapter of the client's rank to the shared base
model (fresh, or initialised from the factors the server broadcast), trains it for a number of
optimizer steps, returns the factors ``{layer: (A (r, in), B (out, r))}`` with the scaling folded
into ``B``, and detaches the adapter again, so the base weights are untouched. The adapter kind
(LoRA, AdaLoRA) is an object of ``flora/adapters.py``; the loss and model primitives are in
``flora/modeling.py``.

The model may sit on any device and in any dtype (``flora/hardware.py``): batches follow the model, the
adapter is float32 (peft keeps LoRA weights of a half-precision base in float32), and the factors come back
float32 on the host, whatever the base. Learning-rate schedules (:func:`lr_factor`) run over the whole run's
optimizer steps; ``constant`` without warm-up adds no scheduler at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import get_peft_model

from flora.adapters import ADAPTER, ADAPTER_KINDS, LoraSpec, lora_layers
from flora.data.tokenize import Example, collate
from flora.hardware import set_checkpointing
from flora.lora.dropout import use_sparse_dropout
from flora.lora.factors import Factors
from flora.modeling import micro_batches, pad_token_id, target_loss_sum

@dataclass(frozen=True)
class TrainSpec:
    steps: int = 10  # optimizer steps per round
    batch_size: int = 8  # examples per optimizer step
    micro_batch_size: int = 4  # examples per forward/backward pass
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in the backward pass
    lr_schedule: str = "constant"  # constant | cosine | linear (:func:`lr_factor`)
    warmup_steps: int = 0
    schedule_start: int = 0  # optimizer steps of the schedule before this round's first (whole-run schedule)
    schedule_steps: int = 0  # the schedule's length in optimizer steps (0 = this round's ``steps``)

    @property
    def scheduled(self) -> bool:
        """The learning rate changes over the steps (else a plain constant, with no scheduler object)."""
        return self.lr_schedule != "constant" or self.warmup_steps > 0


@dataclass
class ClientResult:
    factors: dict[str, Factors]
    num_examples: int
    train_loss: float
    steps: int
    target_tokens: int  # tokens that carried a loss
    tokens: int  # non-padding tokens processed
    seconds: float
    losses: list[float] = field(default_factory=list)


def attach_adapter(model: torch.nn.Module, lora: LoraSpec, init_seed: int,
                   init_factors: Mapping[str, Factors] | None = None, total_steps: int = 1, fill_fresh: bool = False):
    """Wrap ``model`` with a fresh adapter (A seeded by ``init_seed``, B zero), or one initialised from
    ``init_factors`` (scaling folded into B, as the server sends them). ``total_steps``: the optimizer
    steps of the round (AdaLoRA's budget schedule). ``fill_fresh``: ``init_factors`` may cover only the first
    ranks of a layer, or leave a layer out; the rest keeps the fresh initialisation (warm starts)."""
    kind = lora.kind
    if init_factors is not None and not kind.accepts_init_factors:
        raise ValueError(f"{kind.name} clients start a fresh adapter every round (a method whose clients restart, "
                         f"e.g. 'flora')")
    torch.manual_seed(init_seed)
    peft_model = get_peft_model(model, kind.peft_config(lora, total_steps))
    kind.initialise(peft_model, lora)
    if lora.dropout_sampler == "sparse":
        use_sparse_dropout(peft_model)
    if init_factors is not None:
        set_adapter_factors(peft_model, init_factors, fill_fresh=fill_fresh)
    if lora.freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def detach_adapter(peft_model) -> torch.nn.Module:
    """Remove the LoRA layers without merging; returns the (unchanged) base model."""
    return peft_model.unload()


def extract_factors(peft_model) -> dict[str, Factors]:
    """``{layer: (A (r, in), scaling · B (out, r))}`` of a plain LoRA adapter."""
    return ADAPTER_KINDS["lora"].extract(peft_model)


def on_host(factors: Mapping[str, Factors]) -> dict[str, Factors]:
    """The factors as float32 host tensors (what travels and is aggregated); no copy where they already are."""
    return {name: (A.to("cpu", torch.float32), B.to("cpu", torch.float32)) for name, (A, B) in factors.items()}


def set_adapter_factors(peft_model, factors: Mapping[str, Factors], fill_fresh: bool = False) -> None:
    """Load ``(A, scaling · B)`` factors into the adapter (un-folding the scaling). ``fill_fresh``: factors of
    ``q`` ranks replace the adapter's first ``q`` ranks and a layer left out is left alone (the rest keeps its
    fresh initialisation); otherwise every layer needs factors of exactly the adapter's shapes."""
    seen = set()
    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            if name not in factors:
                if fill_fresh:
                    continue
                raise KeyError(f"init factors: no entry for layer {name!r}")
            A, B = factors[name]
            lora_A, lora_B = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            q = A.shape[0] if fill_fresh else lora_A.shape[0]
            if A.shape != lora_A[:q].shape or B.shape != lora_B[:, :q].shape:
                raise ValueError(f"init factors for {name!r}: A{tuple(A.shape)} B{tuple(B.shape)} do not fit the "
                                 f"adapter A{tuple(lora_A.shape)} B{tuple(lora_B.shape)}")
            lora_A[:q] = A
            lora_B[:, :q] = B / module.scaling[ADAPTER]
            seen.add(name)
    extra = set(factors) - seen
    if extra:
        raise KeyError(f"init factors: layers {sorted(extra)[:5]} are not adapted in this model")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``: linear warm-up
    ``step / warmup`` over the first ``warmup`` steps, then ``constant`` 1, ``linear`` decay to 0 at ``total``,
    or ``cosine`` (half a cosine) to 0 at ``total``; the formulas of transformers' ``get_scheduler``
    (``constant_with_warmup``, ``linear``, ``cosine``), so a run matches a centralised trainer's schedule."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"lr_schedule {schedule!r}: expected constant, cosine or linear")


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec):
    """A ``LambdaLR`` stepping :func:`lr_factor` from ``train.schedule_start``; None when the lr is constant."""
    if not train.scheduled:
        return None
    total = train.schedule_steps or train.steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        train.lr_schedule, train.schedule_start + step, total, train.warmup_steps))


def batch_schedule(num_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices for each optimizer step: seeded epochs of shuffled examples."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    needed = steps * batch_size
    while len(order) < needed:
        order.extend(rng.permutation(num_examples).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train_client(model: torch.nn.Module, tokenizer, examples: Sequence[Example], lora: LoraSpec, train: TrainSpec,
                 init_seed: int | None = None, init_factors: Mapping[str, Factors] | None = None,
                 progress=None, fill_fresh: bool = False) -> ClientResult:
    """Train one client's adapter on ``examples`` and return its factors; the base model is unchanged.

    ``init_seed`` seeds the adapter's A (FFA-LoRA passes the same one to every client); default
    ``train.seed``. ``fill_fresh``: see :func:`attach_adapter`. ``progress(step, loss)`` is called after
    every optimizer step. The optimizer (AdamW) starts without state: every round, for every method.
    """
    if not examples:
        raise ValueError("train_client: the client has no training examples")
    was_training = model.training
    kind = lora.kind
    if train.gradient_checkpointing:
        set_checkpointing(model, True)
    peft_model = attach_adapter(model, lora, init_seed=train.seed if init_seed is None else init_seed,
                                init_factors=init_factors, total_steps=train.steps, fill_fresh=fill_fresh)
    try:
        torch.manual_seed(train.seed)  # LoRA dropout
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(kind.param_groups(peft_model, lora, train.lr), lr=train.lr,
                                      weight_decay=train.weight_decay)
        scheduler = make_scheduler(optimizer, train)
        pad_id = pad_token_id(tokenizer)
        peft_model.train()
        losses, tokens, target_tokens = [], 0, 0
        start = time.perf_counter()
        for step, indices in enumerate(batch_schedule(len(examples), train.steps, train.batch_size, train.seed)):
            batch = [examples[i] for i in indices]
            n_targets = sum(e.num_target_tokens for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in micro_batches(batch, train.micro_batch_size):
                loss_sum, _ = target_loss_sum(peft_model, collate(micro, pad_id))
                (loss_sum / n_targets).backward()  # token-weighted mean over the whole batch
                step_loss += float(loss_sum.detach())
                tokens += sum(len(e.input_ids) for e in micro)
            regulariser = kind.regulariser(peft_model, lora)
            if regulariser is not None:
                regulariser.backward()
            if train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            kind.after_step(peft_model, step)
            target_tokens += n_targets
            losses.append(step_loss / n_targets)
            if progress is not None:
                progress(step + 1, losses[-1])
        seconds = time.perf_counter() - start
        factors = on_host(kind.extract(peft_model))
    finally:
        base = detach_adapter(peft_model)
        base.train(was_training)
        if train.gradient_checkpointing:
            set_checkpointing(base, False)
    return ClientResult(factors=factors, num_examples=len(examples), train_loss=float(np.mean(losses)),
                        steps=len(losses), target_tokens=target_tokens, tokens=tokens, seconds=seconds, losses=losses)
