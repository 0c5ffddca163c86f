"""Log-likelihood of continuations given contexts, batched (the scoring core of MMLU and friends)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flora.data.tokenize import IGNORE_INDEX, Example, collate
from flora.train import causal_lm_parts, target_token_losses


@dataclass(frozen=True)
class Scored:
    logprob: float  # Σ log p(continuation token | everything before it)
    num_tokens: int


def encode_request(tokenizer, context: str, continuation: str, max_length: int) -> Example:
    """Context and continuation tokenised separately (so the continuation's tokens do not depend on
    the context) and joined; a context too long is cut from the left."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not continuation_ids:
        raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
    ids = (context_ids + continuation_ids)[-max_length:]
    kept = min(len(continuation_ids), len(ids) - 1)
    labels = [IGNORE_INDEX] * (len(ids) - kept) + ids[len(ids) - kept:]
    return Example(ids, labels)


@torch.no_grad()
def score_continuations(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                        batch_size: int = 16, max_length: int = 1024,
                        progress: Callable[[int], None] | None = None) -> list[Scored]:
    """``[(context, continuation)]`` → log-likelihood of each continuation; ``progress(n)`` after each batch."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [encode_request(tokenizer, c, x, max_length) for c, x in requests]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    results: list[Scored | None] = [None] * len(examples)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            losses, rows = target_token_losses(model, collate([examples[i] for i in chunk], pad_id))
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, losses.double())
            counts = torch.bincount(rows, minlength=len(chunk))
            for j, i in enumerate(chunk):
                results[i] = Scored(logprob=-float(sums[j]), num_tokens=int(counts[j]))
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, tokenizer, contexts: Sequence[str], candidates: Sequence[int],
                        batch_size: int = 16, max_length: int = 1024,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``log p(token | context)`` for each context and candidate token id: ``(len(contexts), len(candidates))``.

    One forward per context instead of one per (context, candidate): the fast path for single-token
    continuations such as MMLU's `` A`` … `` D``.
    """
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"][-max_length:] for c in contexts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(encoded), len(candidates), dtype=torch.float64)
    decoder, head = causal_lm_parts(model)
    candidate_ids = torch.tensor(list(candidates))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([Example(encoded[i], [IGNORE_INDEX] * len(encoded[i])) for i in chunk], pad_id)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1  # right padding: the last real position per row
            logits = head(hidden[torch.arange(len(chunk)), last]).float()
            out[chunk] = torch.log_softmax(logits, dim=-1)[:, candidate_ids].double()
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out
