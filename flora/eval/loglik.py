"""Log-likelihood of continuations given contexts, batched (the scoring core of MMLU and friends)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flora.data.tokenize import IGNORE_INDEX, Example, collate
from flora.modeling import causal_lm_parts, eval_mode, pad_token_id, target_token_losses


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
    pad_id = pad_token_id(tokenizer)
    examples = [encode_request(tokenizer, c, x, max_length) for c, x in requests]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    results: list[Scored | None] = [None] * len(examples)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            losses, rows = target_token_losses(model, collate([examples[i] for i in chunk], pad_id))
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, losses.double())
            counts = torch.bincount(rows, minlength=len(chunk))
            for j, i in enumerate(chunk):
                results[i] = Scored(logprob=-float(sums[j]), num_tokens=int(counts[j]))
            if progress is not None:
                progress(len(chunk))
    return results  # type: ignore[return-value]


@torch.no_grad()
def score_shared_contexts(model: torch.nn.Module, tokenizer, groups: Sequence[tuple[str, Sequence[str]]],
                          batch_size: int = 8, max_length: int = 1024,
                          progress: Callable[[int], None] | None = None) -> list[list[Scored]]:
    """``[(context, [continuation, ...])]`` → log-likelihood of every continuation, each context run once.

    Same numbers as :func:`score_continuations` on the ``(context, continuation)`` pairs (tokenised the
    same way), at about the cost of one forward per context: ``batch_size`` contexts run together
    (right-padded), and each context's key/value cache is copied to its continuations, which run as one
    batch after it (MMLU cloze: 4 answers per question). Padding between a context's end and its
    continuations is masked out and positions continue from the context's own length. A context is
    cut from the left so that it and its longest continuation fit ``max_length``.
    """
    decoder, head = causal_lm_parts(model)
    pad_id = pad_token_id(tokenizer)
    encoded = []
    for context, continuations in groups:
        cont_ids = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in continuations]
        if not cont_ids or not all(cont_ids):
            raise ValueError(f"empty continuation after tokenisation in {list(continuations)!r}")
        longest = max(len(ids) for ids in cont_ids)
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"][-max(max_length - longest, 1):]
        encoded.append((ctx_ids, cont_ids))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
    results: list[list[Scored] | None] = [None] * len(encoded)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, scored in zip(chunk, _score_chunk(decoder, head, [encoded[i] for i in chunk], pad_id)):
                results[i] = scored
            if progress is not None:
                progress(sum(len(encoded[i][1]) for i in chunk))
    return results  # type: ignore[return-value]


def _score_chunk(decoder, head, chunk: Sequence[tuple[list[int], list[list[int]]]], pad_id: int
                 ) -> list[list[Scored]]:
    lengths = [len(ctx) for ctx, _ in chunk]
    width = max(lengths)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    ctx_mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for g, (ctx, _) in enumerate(chunk):
        ids[g, :len(ctx)], ctx_mask[g, :len(ctx)] = torch.tensor(ctx), 1
    ctx = decoder(input_ids=ids, attention_mask=ctx_mask, use_cache=True)
    # token 0 of a continuation is predicted by its context's last real position
    first = torch.log_softmax(head(ctx.last_hidden_state[torch.arange(len(chunk)), torch.tensor(lengths) - 1]).float(),
                              dim=-1)  # (G, V)
    owner = [g for g, (_, conts) in enumerate(chunk) for _ in conts]  # continuation row -> its context
    flat = [ids_ for _, conts in chunk for ids_ in conts]
    longest = max(len(x) for x in flat)
    cache = ctx.cache
    cache.batch_select_indices(torch.tensor(owner))
    batch = torch.full((len(flat), longest), pad_id, dtype=torch.long)
    mask = torch.cat([ctx_mask[owner], torch.zeros(len(flat), longest, dtype=torch.long)], dim=1)
    for j, x in enumerate(flat):
        batch[j, :len(x)] = torch.tensor(x)
        mask[j, width:width + len(x)] = 1
    positions = torch.tensor([lengths[g] for g in owner])[:, None] + torch.arange(longest)[None, :]
    hidden = decoder(input_ids=batch, attention_mask=mask, cache=cache, position_ids=positions).last_hidden_state
    # tokens 1.. of continuation j are predicted at its positions 0..len-2: run the head there only (not on padding)
    rows = torch.tensor([j for j, x in enumerate(flat) for _ in x[1:]], dtype=torch.long)
    cols = torch.tensor([t for x in flat for t in range(len(x) - 1)], dtype=torch.long)
    targets = torch.tensor([t for x in flat for t in x[1:]], dtype=torch.long)
    later = torch.zeros(len(flat), dtype=torch.float64)
    if len(rows):
        logprobs = torch.log_softmax(head(hidden[rows, cols]).float(), dim=-1)  # (N, V)
        later.index_add_(0, rows, logprobs[torch.arange(len(rows)), targets].double())
    scored: list[list[Scored]] = [[] for _ in chunk]
    for j, x in enumerate(flat):
        scored[owner[j]].append(Scored(logprob=float(first[owner[j], x[0]]) + float(later[j]), num_tokens=len(x)))
    return scored


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, tokenizer, contexts: Sequence[str], candidates: Sequence[int],
                        batch_size: int = 16, max_length: int = 1024,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``log p(token | context)`` for each context and candidate token id: ``(len(contexts), len(candidates))``.

    One forward per context instead of one per (context, candidate): the fast path for single-token
    continuations such as MMLU's `` A`` … `` D``.
    """
    pad_id = pad_token_id(tokenizer)
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"][-max_length:] for c in contexts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(encoded), len(candidates), dtype=torch.float64)
    decoder, head = causal_lm_parts(model)
    candidate_ids = torch.tensor(list(candidates))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([Example(encoded[i], [IGNORE_INDEX] * len(encoded[i])) for i in chunk], pad_id)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1  # right padding: the last real position per row
            logits = head(hidden[torch.arange(len(chunk)), last]).float()
            out[chunk] = torch.log_softmax(logits, dim=-1)[:, candidate_ids].double()
            if progress is not None:
                progress(len(chunk))
    return out
