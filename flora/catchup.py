"""The server's bounded round history and the catch-up a node gets after missed rounds.

A node that missed rounds needs the round updates it lacks. Sent one by one they cost the sum of their
bytes, which grows with every round it missed; the sum of their merges is one update of the same layers,
so the server sends it **collapsed** (:func:`collapse`): per layer the concatenated factors of the missed
merges (``[B_s … B_t] [A_s; …; A_t] = Σ B_i A_i`` exactly; the same bytes as sending them one by one) or,
where that is larger, their dense sum (float64 sum, one float32 matrix: ``out · in`` values), the last
global adapter only (a continuing method's earlier adapters are superseded), every standalone adapter. So a
returning node downloads, per layer, no more than the smaller of its missed updates and one dense delta.
Where one client process serves several nodes (the engines of this process: in-process, Flower simulation;
``keep_newest``), that process may already hold all but the newest round, and an entry it holds part of cannot
be split: there the newest round travels on its own beside the collapsed rest, which the process skips whole
(the bound is then the smaller of the missed updates and one dense delta plus the newest round).

The server's history is bounded (:class:`History`): round ``1``'s entry is the *base*, and the oldest
later round is folded into it (:func:`collapse` again) once the rounds after it already weigh a dense
delta of every layer, so the history holds at most about two dense deltas plus one round, however many rounds
ran. A node behind the base gets the base and the rest collapsed, starting at history index 0: its process
reloads its base weights first (``GlobalState.reload``) and ends at the global weights up to float32 rounding
of the sums (tests: ≤ 1e-6). Such a node missed rounds weighing at least one dense delta, so the bound above
holds for it too. The disk checkpoint still keeps every round (``flora/checkpoint.py``); resuming replays
them through the same folding, so a resumed server holds the same history as an uninterrupted one.

Warm-starting methods (``flora-warm``) need the exact history on every party (their start factors are SVDs of
it, computed bit for bit alike): their history is kept whole and sent round by round.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from flora.lora.factors import Merge
from flora.rounds import RoundUpdate, nbytes

MAX_WINDOW = 1024  # rounds kept unfolded at most (empty rounds weigh nothing; this bounds them too)


def collapse_merges(parts: Sequence[Merge]) -> tuple[str, Merge]:
    """One merge equal to the sum of ``parts`` (one layer's merges, in order): ``("stacked", (A, B))`` with the
    factors concatenated while that is no larger than dense, else ``("dense", Σ)`` summed in float64."""
    if len(parts) == 1:
        return ("dense" if isinstance(parts[0], torch.Tensor) else "stacked"), parts[0]
    first = parts[0]
    out_dim, in_dim = first.shape if isinstance(first, torch.Tensor) else (first[1].shape[0], first[0].shape[1])
    if all(isinstance(p, tuple) for p in parts):
        rank = sum(A.shape[0] for A, _ in parts)
        if rank * (out_dim + in_dim) <= out_dim * in_dim:
            return "stacked", (torch.cat([A for A, _ in parts]), torch.cat([B for _, B in parts], dim=1))
    total = torch.zeros(out_dim, in_dim, dtype=torch.float64)
    for part in parts:
        total += part.double() if isinstance(part, torch.Tensor) else part[1].double() @ part[0].double()
    return "dense", total.to(torch.float32)


def collapse(updates: Sequence[RoundUpdate]) -> RoundUpdate:
    """One entry standing for ``updates`` (consecutive history entries) applied in order: merges summed per
    layer (:func:`collapse_merges`), the last adapter, every standalone adapter (later ones win)."""
    if len(updates) == 1:
        return updates[0]
    result = RoundUpdate(round=updates[-1].round, span=sum(u.span for u in updates))
    by_layer: dict[str, list[Merge]] = {}
    for update in updates:
        for name, merge in update.merge.items():
            by_layer.setdefault(name, []).append(merge)
        if update.adapter is not None:
            result.adapter, result.truncate = update.adapter, update.truncate
        if update.client_adapters is not None:
            result.client_adapters = {**(result.client_adapters or {}), **update.client_adapters}
    for name, parts in by_layer.items():
        form, result.merge[name] = collapse_merges(parts)
        result.forms[form] = result.forms.get(form, 0) + 1
    return result


def stored_bytes(update: RoundUpdate) -> int:
    """Bytes the server holds for ``update`` (merges, the whole adapter, standalone adapters)."""
    total = update.nbytes(rank=None)
    for adapter in (update.client_adapters or {}).values():
        total += sum(nbytes(f) for f in adapter.values())
    return total


def dense_model_bytes(layer_shapes: Mapping[str, tuple[int, int]], itemsize: int = 4) -> int:
    """Bytes of one dense float32 delta of every adapted layer."""
    return sum(o * i for o, i in layer_shapes.values()) * itemsize


class History:
    """The round updates a server keeps for catch-up, bounded (module docstring).

    ``len(history)`` is the number of rounds done; iterating yields the kept entries in order (the first may
    stand for several rounds: ``span``), which applied in order give the global model.
    """

    def __init__(self, dense_bytes: int, fold: bool = True):
        self.dense_bytes = dense_bytes
        self.fold = fold
        self.entries: list[RoundUpdate] = []
        self.rounds = 0
        self._bytes: list[int] = []  # stored_bytes of each entry

    def __len__(self) -> int:
        return self.rounds

    def __iter__(self) -> Iterator[RoundUpdate]:
        return iter(self.entries)

    def __getitem__(self, index: int) -> RoundUpdate:
        return self.entries[index]

    @property
    def base_span(self) -> int:
        """Rounds folded into the first entry (1 while nothing is folded)."""
        return self.entries[0].span if self.entries else 0

    def append(self, update: RoundUpdate) -> None:
        self.entries.append(update)
        self._bytes.append(stored_bytes(update))
        self.rounds += update.span
        while self.fold and len(self.entries) >= 3 and (sum(self._bytes[2:]) >= self.dense_bytes
                                                        or len(self.entries) > MAX_WINDOW):
            base = collapse(self.entries[:2])
            self.entries[:2] = [base]
            self._bytes[:2] = [stored_bytes(base)]

    def since(self, start: int) -> tuple[int, list[RoundUpdate]]:
        """The kept entries covering history indices ``[first, len)`` with ``first <= start``: ``first = start``
        unless ``start`` falls inside the folded base, then 0."""
        if start >= self.rounds:
            return self.rounds, []
        if start < self.base_span:
            return 0, list(self.entries)
        return start, self.entries[start - self.base_span + 1:]

    def nbytes(self) -> int:
        return sum(self._bytes)


def catch_up(history: History, start: int, keep_newest: bool = False) -> tuple[int, list[RoundUpdate]]:
    """What a node holding history entries ``[0, start)`` is sent: ``(first_index, entries)``, collapsed into one
    entry where the history folds (module docstring), else the entries as kept. ``keep_newest``: the newest round
    travels beside the collapsed rest (client processes that serve several nodes)."""
    first, entries = history.since(start)
    if not history.fold or len(entries) <= (2 if keep_newest else 1):
        return first, entries
    return first, ([collapse(entries[:-1]), entries[-1]] if keep_newest else [collapse(entries)])


def node_history(held: Sequence[RoundUpdate], first: int, updates: Sequence[RoundUpdate],
                 fold: bool = True) -> list[RoundUpdate] | None:
    """The entries a deployed node keeps between messages to rebuild its global state in a new process.

    ``held`` covers history indices ``[0, n)``; the message brings ``updates`` from ``first`` on. They are taken
    as :meth:`flora.rounds.GlobalState.apply` takes them: entries already held are skipped, an entry from index
    0 over part of what is held (the server's folded history) starts over from the base, the rest is appended.
    Where the history folds (every method but the warm-starting ones) the result is collapsed into one entry
    (:func:`collapse`): it weighs no more than the smaller of the rounds' updates and one dense delta (plus the
    last adapter) however many rounds ran, and a new process applies one entry. None where the message cannot
    follow what is held (it starts past it, or an entry covers part of it from a later index)."""
    kept = list(held)
    count = sum(u.span for u in kept)
    if first > count:
        return None
    index = first
    for update in updates:
        end = index + update.span
        if end <= count:
            index = end
            continue
        if index < count:
            if index > 0:
                return None
            kept, count = [], 0
        kept.append(update)
        count = index = end
    return [collapse(kept)] if fold and len(kept) > 1 else kept
