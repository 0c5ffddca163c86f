"""Model primitives shared by training, evaluation and the global state: the target-token loss, mode
switching, padding id, layer shapes and in-place merging of updates. No adapters, no federation.

Speed: the loss runs the large output head (49k rows for SmolLM2) only on positions that carry a
target (assistant) token, and batches are split into micro-batches of similar length to cut padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from flora.data.tokenize import IGNORE_INDEX, Example, collate


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` inside the block; the previous train/eval mode is restored however it exits."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The id batches are right-padded with (0 when the tokenizer has no pad token; padded positions
    are masked out of attention and loss, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def layer_shapes(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` for every linear layer whose last name part is a target."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def merge_update(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
    """``W ← W + Δ`` in place for every ``{layer: Δ (out, in)}``."""
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            if weight.shape != delta.shape:
                raise ValueError(f"merge: update for {name!r} has shape {tuple(delta.shape)}, layer is {tuple(weight.shape)}")
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))


def causal_lm_parts(model: torch.nn.Module):
    """(decoder returning hidden states, output head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def target_token_losses(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of every target token ``(N,)`` and the batch row it belongs to ``(N,)``.

    The output head runs on target positions only: ``hidden (B, T, h)`` → ``(N, h)`` for the
    ``N`` positions whose next token is a target, → logits ``(N, V)``. The batch moves to the model's
    device; the losses (float32) stay there.
    """
    decoder, head = causal_lm_parts(model)
    device = head.weight.device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask])
    losses = F.cross_entropy(logits.float(), targets[mask], reduction="none")
    rows = torch.arange(mask.shape[0], device=device).unsqueeze(1).expand_as(mask)[mask]
    return losses, rows


def target_loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count."""
    losses, _ = target_token_losses(model, batch)
    return losses.sum(), int(losses.numel())


def micro_batches(batch: Sequence[Example], size: int) -> list[list[Example]]:
    """``batch`` in chunks of ``size``, similar lengths together (less padding)."""
    ordered = sorted(batch, key=lambda e: len(e.input_ids))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def evaluate_loss(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Mean next-token loss over assistant tokens (``exp`` of it is the perplexity); NaN without examples."""
    return evaluate_loss_tokens(model, tokenizer, examples, batch_size)[0]


@torch.no_grad()
def evaluate_loss_tokens(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 8
                         ) -> tuple[float, int]:
    """:func:`evaluate_loss` and the number of target tokens it averages over (a federated evaluation's weight)."""
    if not examples:
        return math.nan, 0
    pad_id = pad_token_id(tokenizer)
    total, count = 0.0, 0
    with eval_mode(model):
        for micro in micro_batches(list(examples), batch_size):
            loss_sum, n = target_loss_sum(model, collate(micro, pad_id))
            total += float(loss_sum)
            count += n
    return (total / count if count else math.nan), count
