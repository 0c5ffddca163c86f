"""Local LoRA training of one client (peft layers), adapter extraction, and merging updates into the base.

One client's round: :func:`train_client` attaches a LoRA of the client's rank to the shared
base model (fresh, or initialised from the factors the server broadcast), trains it for a number
of optimizer steps, returns the factors ``{layer: (A (r, in), B (out, r))}`` with the scaling
folded into ``B``, and detaches the adapter again, so the base weights are untouched.
:func:`merge_update` then adds a global update into the base weights in place, with no reload.

Speed: the loss runs the 49k-row output head only on positions that carry a target (assistant)
token, and each batch is split into micro-batches of similar length to cut padding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from flora.data.tokenize import IGNORE_INDEX, Example, collate
from flora.lora.factors import Factors

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    freeze_a: bool = False  # FFA-LoRA: A stays at its (shared, seeded) initialisation
    adapter: str = "lora"  # or "adalora": peft's AdaLoRA, initial rank ``rank``, pruned towards ``target_rank``
    target_rank: int | None = None  # AdaLoRA's target average rank (default rank // 2)
    orth_reg_weight: float = 0.5  # AdaLoRA's orthogonality regulariser on P and Q
    warmup_fraction: float = 0.1  # AdaLoRA: share of the steps before pruning (tinit) ...
    final_fraction: float = 0.2  # ... and at the final budget (tfinal)


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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def layer_shapes(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` for every linear layer whose last name part is a target."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def attach_adapter(model: torch.nn.Module, lora: LoraSpec, init_seed: int,
                   init_factors: Mapping[str, Factors] | None = None, total_steps: int = 1):
    """Wrap ``model`` with a fresh LoRA adapter (A seeded by ``init_seed``, B zero), or one
    initialised from ``init_factors`` (scaling folded into B, as the server sends them).

    AdaLoRA (``lora.adapter == "adalora"``): budget schedule over ``total_steps`` optimizer steps
    (warm-up and final phases as fractions of them); always fresh (FLoRA restarts adapters)."""
    if lora.adapter == "adalora":
        if init_factors is not None:
            raise ValueError("AdaLoRA clients start a fresh adapter every round (method = 'flora')")
        from peft import AdaLoraConfig
        config = AdaLoraConfig(init_r=lora.rank, target_r=lora.target_rank or max(1, lora.rank // 2),
                               lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                               total_step=total_steps, tinit=int(total_steps * lora.warmup_fraction),
                               tfinal=int(total_steps * lora.final_fraction), deltaT=1,
                               orth_reg_weight=lora.orth_reg_weight)
    else:
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.targets), use_rslora=lora.rslora, bias="none")
    torch.manual_seed(init_seed)
    peft_model = get_peft_model(model, config)
    if init_factors is not None:
        set_adapter_factors(peft_model, init_factors)
    if lora.freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def detach_adapter(peft_model) -> torch.nn.Module:
    """Remove the LoRA layers without merging; returns the (unchanged) base model."""
    return peft_model.unload()


def _lora_layers(peft_model):
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            yield name[len(prefix):] if name.startswith(prefix) else name, module


def extract_factors(peft_model) -> dict[str, Factors]:
    """``{layer: (A (r, in), scaling · B (out, r))}`` detached copies of the trained adapter."""
    factors = {}
    for name, module in _lora_layers(peft_model):
        A = module.lora_A[ADAPTER].weight.detach().clone()
        B = module.lora_B[ADAPTER].weight.detach().clone() * module.scaling[ADAPTER]
        factors[name] = (A, B)
    return factors


def set_adapter_factors(peft_model, factors: Mapping[str, Factors]) -> None:
    """Load ``(A, scaling · B)`` factors into the adapter (un-folding the scaling)."""
    seen = set()
    with torch.no_grad():
        for name, module in _lora_layers(peft_model):
            if name not in factors:
                raise KeyError(f"init factors: no entry for layer {name!r}")
            A, B = factors[name]
            lora_A, lora_B = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            if A.shape != lora_A.shape or B.shape != lora_B.shape:
                raise ValueError(f"init factors for {name!r}: A{tuple(A.shape)} B{tuple(B.shape)} do not fit the "
                                 f"adapter A{tuple(lora_A.shape)} B{tuple(lora_B.shape)}")
            lora_A.copy_(A)
            lora_B.copy_(B / module.scaling[ADAPTER])
            seen.add(name)
    extra = set(factors) - seen
    if extra:
        raise KeyError(f"init factors: layers {sorted(extra)[:5]} are not adapted in this model")


def merge_update(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """``W ← W + Δ`` in place for every ``{layer: Δ (out, in)}``."""
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            if weight.shape != delta.shape:
                raise ValueError(f"merge: update for {name!r} has shape {tuple(delta.shape)}, layer is {tuple(weight.shape)}")
            weight.add_(delta.to(weight.dtype))


def causal_lm_parts(model: torch.nn.Module):
    """(decoder returning hidden states, output head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def target_token_losses(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every target token ``(N,)`` and the batch row it belongs to ``(N,)``.

    The output head runs on target positions only: ``hidden (B, T, h)`` → ``(N, h)`` for the
    ``N`` positions whose next token is a target, → logits ``(N, V)``.
    """
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask])
    losses = F.cross_entropy(logits.float(), targets[mask], reduction="none")
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
    return losses, rows


def target_loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count."""
    losses, _ = target_token_losses(model, batch)
    return losses.sum(), int(losses.numel())


def _micro_batches(batch: Sequence[Example], size: int) -> list[list[Example]]:
    ordered = sorted(batch, key=lambda e: len(e.input_ids))  # similar lengths together: less padding
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


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
                 progress=None) -> ClientResult:
    """Train one client's adapter on ``examples`` and return its factors; the base model is unchanged.

    ``init_seed`` seeds the adapter's A (FFA-LoRA passes the same one to every client); default
    ``train.seed``. ``progress(step, loss)`` is called after every optimizer step.
    """
    if not examples:
        raise ValueError("train_client: the client has no training examples")
    was_training = model.training
    peft_model = attach_adapter(model, lora, init_seed=train.seed if init_seed is None else init_seed,
                                init_factors=init_factors, total_steps=train.steps)
    adalora = lora.adapter == "adalora"
    try:
        torch.manual_seed(train.seed)  # LoRA dropout
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        peft_model.train()
        losses, tokens, target_tokens = [], 0, 0
        start = time.perf_counter()
        for step, indices in enumerate(batch_schedule(len(examples), train.steps, train.batch_size, train.seed)):
            batch = [examples[i] for i in indices]
            n_targets = sum(e.num_target_tokens for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in _micro_batches(batch, train.micro_batch_size):
                loss_sum, _ = target_loss_sum(peft_model, collate(micro, pad_id))
                (loss_sum / n_targets).backward()  # token-weighted mean over the whole batch
                step_loss += float(loss_sum.detach())
                tokens += sum(len(e.input_ids) for e in micro)
            if adalora and lora.orth_reg_weight:
                (lora.orth_reg_weight * adalora_orthogonality(peft_model)).backward()
            if train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            if adalora:  # sensitivity from this step's gradients, then prune to the step's budget
                peft_model.base_model.update_and_allocate(step)
            target_tokens += n_targets
            losses.append(step_loss / n_targets)
            if progress is not None:
                progress(step + 1, losses[-1])
        seconds = time.perf_counter() - start
        if adalora:
            from flora.lora.adalora import extract_adalora_factors
            factors = extract_adalora_factors(peft_model)
        else:
            factors = extract_factors(peft_model)
    finally:
        base = detach_adapter(peft_model)
        base.train(was_training)
    return ClientResult(factors=factors, num_examples=len(examples), train_loss=float(np.mean(losses)),
                        steps=len(losses), target_tokens=target_tokens, tokens=tokens, seconds=seconds, losses=losses)


def adalora_orthogonality(peft_model) -> torch.Tensor:
    """AdaLoRA's regulariser, as peft adds it in ``AdaLoraModel.forward``: the mean over P and Q of
    ``‖MᵀM − I‖_F`` (our loss does not go through that forward)."""
    terms = []
    for name, param in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and param.requires_grad:
            para_cov = param @ param.T if "lora_A" in name else param.T @ param
            identity = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
            terms.append(torch.norm(para_cov - identity, p="fro"))
    return torch.stack(terms).mean() if terms else torch.zeros(())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Mean next-token loss over assistant tokens (``exp`` of it is the perplexity)."""
    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for micro in _micro_batches(list(examples), batch_size):
        loss_sum, n = target_loss_sum(model, collate(micro, pad_id))
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / count
