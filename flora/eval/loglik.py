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
    encoded = _encode_groups(tokenizer, groups, max_length)
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


def _encode_groups(tokenizer, groups: Sequence[tuple[str, Sequence[str]]], max_length: int
                   ) -> list[tuple[list[int], list[list[int]]]]:
    """Context and continuations tokenised separately; a context cut from the left so that it and its longest
    continuation fit ``max_length``."""
    encoded = []
    for context, continuations in groups:
        cont_ids = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in continuations]
        if not cont_ids or not all(cont_ids):
            raise ValueError(f"empty continuation after tokenisation in {list(continuations)!r}")
        longest = max(len(ids) for ids in cont_ids)
        encoded.append((tokenizer(context, add_special_tokens=False)["input_ids"][-max(max_length - longest, 1):],
                        cont_ids))
    return encoded


@torch.no_grad()
def score_packed_contexts(model: torch.nn.Module, tokenizer, groups: Sequence[tuple[str, Sequence[str]]],
                          batch_size: int = 8, max_length: int = 1024,
                          progress: Callable[[int], None] | None = None) -> list[list[Scored]]:
    """``[(context, [continuation, ...])]`` → log-likelihood of every continuation, in one forward pass per batch.

    Same numbers as :func:`score_continuations` on the pairs and :func:`score_shared_contexts` (tokenised and cut
    the same way), with no token run twice: a group is one row, its context followed by all its continuations,
    and a 4-D attention mask lets a continuation's tokens see the context and their own continuation's earlier
    tokens only, at the positions they would have after the context alone (so the 4 answers of an MMLU question
    cost their own tokens, not 4 copies of the question, and no key/value cache is copied). Rows are sorted by
    length, ``batch_size`` per forward, right-padded; the output head runs only where a continuation token is
    predicted.
    """
    decoder, head = causal_lm_parts(model)
    device = head.weight.device
    dtype = head.weight.dtype
    pad_id = pad_token_id(tokenizer)
    encoded = _encode_groups(tokenizer, groups, max_length)
    total = [len(ctx) + sum(map(len, conts)) for ctx, conts in encoded]
    order = sorted(range(len(encoded)), key=lambda i: total[i])  # less padding
    results: list[list[Scored] | None] = [None] * len(encoded)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(total[i] for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.long)
            segment = torch.full((len(chunk), width), -1, dtype=torch.long)  # -1 padding, 0 context, j + 1 answer j
            predictors, targets, owners = [], [], []  # flat: (row, position) predicting a token of answer (row, j)
            for row, i in enumerate(chunk):
                ctx, conts = encoded[i]
                ids[row, :len(ctx)], positions[row, :len(ctx)], segment[row, :len(ctx)] = torch.tensor(ctx), \
                    torch.arange(len(ctx)), 0
                at = len(ctx)
                for j, cont in enumerate(conts):
                    n = len(cont)
                    ids[row, at:at + n] = torch.tensor(cont)
                    positions[row, at:at + n] = torch.arange(len(ctx), len(ctx) + n)
                    segment[row, at:at + n] = j + 1
                    predictors += [(row, len(ctx) - 1)] + [(row, at + t) for t in range(n - 1)]
                    targets += cont
                    owners += [(row, j)] * n
                    at += n
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            q_seg, k_seg = segment[:, :, None], segment[:, None, :]
            allowed = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
            allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves (no empty softmax)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                             position_ids=positions.to(device), use_cache=False).last_hidden_state
            rows = torch.tensor([r for r, _ in predictors], device=device)
            cols = torch.tensor([c for _, c in predictors], device=device)
            logprobs = torch.log_softmax(head(hidden[rows, cols]).float(), dim=-1)
            picked = logprobs[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)].double()
            sums: dict[tuple[int, int], float] = {}
            for owner, value in zip(owners, picked.cpu().tolist()):
                sums[owner] = sums.get(owner, 0.0) + value
            for row, i in enumerate(chunk):
                results[i] = [Scored(logprob=sums[(row, j)], num_tokens=len(cont))
                              for j, cont in enumerate(encoded[i][1])]
            if progress is not None:
                progress(sum(len(encoded[i][1]) for i in chunk))
    return results  # type: ignore[return-value]


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
