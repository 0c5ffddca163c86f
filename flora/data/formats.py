"""Instruction-data formats, each converted to one canonical :class:`Record`.

Canonical record: ``messages`` (a list of ``{"role": "system"|"user"|"assistant", "content": str}``)
plus optional ``category`` (Dolly's, used as the partition label) and ``id``.

========= ===================================================== =========================
format    row fields                                            notes
========= ===================================================== =========================
sharegpt  ``conversations: [{from, value}]``                    roles human/user/gpt/...
alpaca    ``instruction``, ``input`` (optional), ``output``
dolly     ``instruction``, ``context`` (optional), ``response`` ``category`` kept
wizard    ``instruction``, ``output`` or ``conversations``      WizardLM 70k / 196k
messages  ``messages: [{role, content}]``                       OpenAI/trl chat JSONL
========= ===================================================== =========================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

FORMATS = ("sharegpt", "alpaca", "dolly", "wizard", "messages")

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """Bad data; the message names the file, the row/line, the field and what was expected."""


class RowError(ValueError):
    """One row cannot be converted; ``kind`` is ``'malformed'`` (structure) or ``'empty'`` (content)."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class Record:
    messages: tuple[Mapping[str, str], ...]
    category: str | None = None
    id: str | None = None

    def to_json(self) -> dict:
        out = {"messages": [dict(m) for m in self.messages]}
        if self.category is not None:
            out["category"] = self.category
        if self.id is not None:
            out["id"] = self.id
        return out


def _field(row: Mapping, name: str, required: bool = True) -> str:
    if name not in row:
        if required:
            raise RowError("malformed", f"missing field {name!r}")
        return ""
    value = row[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError("malformed", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _finish(messages: list[dict[str, str]], category=None, id_=None) -> Record:
    """Check the conversation has a user turn followed by a non-empty assistant turn."""
    messages = [m for m in messages if m["content"].strip() or m["role"] == "assistant"]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowError("empty", "no non-empty assistant turn")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise RowError("empty", "no non-empty user turn")
    # A conversation must not start with the assistant (after an optional system prompt).
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        messages = messages[messages.index(first) + 1:]
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise RowError("empty", "no assistant turn after the first user turn")
    # Trailing user turns have nothing to learn from.
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return Record(tuple(messages), category=category, id=id_)


def _turns(row: Mapping, list_key: str, role_key: str, content_key: str, roles: Mapping[str, str]) -> Record:
    """Messages from a list of turn objects ``row[list_key]``, roles mapped through ``roles``."""
    turns = row.get(list_key)
    if turns is None:
        raise RowError("malformed", f"missing field {list_key!r}")
    if not isinstance(turns, list):
        raise RowError("malformed", f"field {list_key!r} must be a list of {{{role_key}, {content_key}}}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise RowError("malformed", f"{list_key}[{i}] must have {role_key!r} and {content_key!r}")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError("malformed", f"{list_key}[{i}].{role_key} = {turn[role_key]!r}: unknown role; "
                                        f"expected one of {sorted(roles)}")
        if not isinstance(turn[content_key], str):
            raise RowError("malformed", f"{list_key}[{i}].{content_key} must be a string")
        messages.append({"role": role, "content": turn[content_key]})
    return _finish(messages, category=_opt_str(row.get("category")), id_=_opt_str(row.get("id")))


def from_sharegpt(row: Mapping) -> Record:
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)


def from_alpaca(row: Mapping) -> Record:
    instruction, output = _field(row, "instruction"), _field(row, "output")
    extra = _field(row, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _finish(messages, category=row.get("category"), id_=_opt_str(row.get("id")))


def from_dolly(row: Mapping) -> Record:
    instruction, response = _field(row, "instruction"), _field(row, "response")
    context = _field(row, "context", required=False)
    prompt = f"{instruction}\n\nContext:\n{context}" if context.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return _finish(messages, category=_opt_str(row.get("category")), id_=_opt_str(row.get("id")))


def from_wizard(row: Mapping) -> Record:
    if "conversations" in row:
        return from_sharegpt(row)
    return from_alpaca(row)


def from_messages(row: Mapping) -> Record:
    return _turns(row, "messages", "role", "content", {r: r for r in ("system", "user", "assistant")})


CONVERTERS: dict[str, Callable[[Mapping], Record]] = {
    "sharegpt": from_sharegpt, "alpaca": from_alpaca, "dolly": from_dolly,
    "wizard": from_wizard, "messages": from_messages,
}


def detect_format(row: Mapping) -> str:
    """Guess the format from one row's keys."""
    if not isinstance(row, Mapping):
        raise DataError(f"expected each row to be a JSON object, got {type(row).__name__}")
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise DataError(f"cannot detect the data format from fields {sorted(keys)}; expected one of: "
                    "conversations (sharegpt/wizard), messages, instruction+response (dolly), "
                    "instruction+output (alpaca/wizard); or pass the format explicitly")


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


@dataclass
class LoadReport:
    """What loading kept and dropped, and why (nothing is dropped silently)."""

    source: str
    format: str
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated_tail_bytes: int = 0  # bytes after the last complete record of a truncated JSON array

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_json(self) -> dict:
        return {"source": self.source, "format": self.format, "rows": self.rows, "kept": self.kept,
                "skipped": dict(sorted(self.skipped.items(), key=lambda kv: -kv[1])),
                "truncated_tail_bytes": self.truncated_tail_bytes}
