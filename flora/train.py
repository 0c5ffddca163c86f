"""Local LoRA training of one client (peft layers) and adapter loading.

One client's round: :func:`train_client` attaches an adapter of the client's rank to the shared base
model (fresh, or initialised from the factors the server broadcast), trains it for a number of
optimizer steps, returns the factors ``{layer: (A (r, in), B (out, r))}`` with the scaling folded
into ``B``, and detaches the adapter again, so the base weights are untouched. The adapter kind
(LoRA, AdaLoRA) is an object of ``flora/adapters.py``; the loss and model primitives are in
``flora/modeling.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import get_peft_model

from flora.adapters import ADAPTER, ADAPTER_KINDS, LoraSpec, lora_layers
from flora.data.tokenize import Example, collate
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
    peft_model = attach_adapter(model, lora, init_seed=train.seed if init_seed is None else init_seed,
                                init_factors=init_factors, total_steps=train.steps, fill_fresh=fill_fresh)
    try:
        torch.manual_seed(train.seed)  # LoRA dropout
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
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
            kind.after_step(peft_model, step)
            target_tokens += n_targets
            losses.append(step_loss / n_targets)
            if progress is not None:
                progress(step + 1, losses[-1])
        seconds = time.perf_counter() - start
        factors = kind.extract(peft_model)
    finally:
        base = detach_adapter(peft_model)
        base.train(was_training)
    return ClientResult(factors=factors, num_examples=len(examples), train_loss=float(np.mean(losses)),
                        steps=len(losses), target_tokens=target_tokens, tokens=tokens, seconds=seconds, losses=losses)
