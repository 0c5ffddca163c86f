"""Tokenise conversations with the model's chat template; the loss mask covers assistant turns only.

The template is applied to the whole conversation once; the character spans of the assistant
turns are found by rendering prefixes (``messages[:i]`` with the generation prompt, and
``messages[:i+1]``), and tokens whose first character falls in a span are trained on (the
turn's end-of-message token included, so the model learns to stop).

Only the head of a conversation survives the cutoff, so :func:`encode` tokenises a growing prefix
of the text (not the whole of it) and renders prefixes only for the assistant turns that start
before the cut: the same tokens and labels as tokenising everything, at a fraction of the cost on
long conversations (ShareGPT: ~6,000 characters for 128 tokens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flora.data.formats import Record

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def assistant_spans(tokenizer, messages: Sequence[dict], text: str | None = None, until: int | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    ``until``: only the turns that start before this character (later spans are not needed).
    """
    messages = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False) if text is None else text
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        if until is not None and len(start_text) >= until:
            break
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "assistant-only loss masking needs a template where it does")
        spans.append((len(start_text), len(end_text)))
    return text, spans


_CHARS_PER_TOKEN_GUESS = 6
_WORD_END = re.compile(r"\S(?=\s)")  # a non-space character followed by a space


def _splits_at_spaces(tokenizer) -> bool:
    """Whether the tokenizer pre-splits text at spaces (byte-level BPE, Metaspace): the prefix cut relies on it.

    Tokenizers without a pre-tokenizer (BPE over the whole normalised text) get the whole text tokenised.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    return pre_tokenizer is not None and len(pre_tokenizer.pre_tokenize_str("ab cd")) >= 2


def _head_tokens(tokenizer, text: str, cutoff: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The first ``cutoff`` tokens of ``text`` (ids, character offsets), tokenising only a prefix.

    The prefix ends where a word ends and a space begins, so every pre-token before the cut (byte-level
    BPE works within pre-tokens: words with their leading space, runs of punctuation, digits or
    spaces; special tokens hold no spaces) is complete and tokenises as in the whole text. If such a
    prefix gives ``cutoff`` tokens, they are the whole text's first ``cutoff``; otherwise a prefix
    twice as long is tried, up to the whole text.
    """
    def head(prefix: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                            max_length=cutoff)
        return encoded["input_ids"], encoded["offset_mapping"]

    if _splits_at_spaces(tokenizer):
        chars = cutoff * _CHARS_PER_TOKEN_GUESS
        while chars < len(text):
            ends = [m.end() for m in _WORD_END.finditer(text, chars // 2, chars)]
            if ends and len((found := head(text[:ends[-1]]))[0]) >= cutoff:
                return found
            chars *= 2
    return head(text)


def encode(tokenizer, record: Record, cutoff: int) -> Example | None:
    """Token ids and labels for one conversation, cut at ``cutoff`` tokens; None if nothing to learn."""
    messages = [dict(m) for m in record.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, offsets = _head_tokens(tokenizer, text, cutoff)
    _, spans = assistant_spans(tokenizer, messages, text=text, until=offsets[-1][1] if offsets else 0)
    labels = []
    span_index = 0
    for token, (start, _end) in zip(ids, offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        inside = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
        labels.append(token if inside else IGNORE_INDEX)
    example = Example(input_ids=list(ids), labels=labels)
    return example if example.num_target_tokens else None


def encode_whole_text(tokenizer, record: Record, cutoff: int) -> Example | None:
    """The plain definition :func:`encode` must equal (tests and ``benchmarks/bench_tokenize.py``):
    tokenise the whole conversation, render every assistant turn's span, keep the first ``cutoff``."""
    text, spans = assistant_spans(tokenizer, record.messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=cutoff)
    labels = [token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    example = Example(input_ids=list(encoded["input_ids"]), labels=labels)
    return example if example.num_target_tokens else None


@dataclass
class EncodeReport:
    encoded: int = 0
    dropped_no_target: int = 0  # cut before the first assistant token
    truncated: int = 0  # longer than cutoff


def encode_all(tokenizer, records: Sequence[Record], cutoff: int) -> tuple[list[Example], EncodeReport]:
    report = EncodeReport()
    examples = []
    for record in records:
        example = encode(tokenizer, record, cutoff)
        if example is None:
            report.dropped_no_target += 1
            continue
        report.truncated += len(example.input_ids) >= cutoff
        examples.append(example)
    report.encoded = len(examples)
    return examples, report


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels`` of shape (batch, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
