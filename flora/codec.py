"""One wire and checkpoint format: round updates and client factors as flat ``{key: tensor}`` dicts.

The Flower skin wraps these dicts in ``ArrayRecord``s; checkpoints write them with safetensors.

Keys of one :class:`RoundUpdate`: ``m.{layer}.A|B`` merge factors or ``m.{layer}.D`` dense merge,
``a.{layer}.A|B`` global adapter, ``c{k}.{layer}.A|B`` client ``k``'s own adapter (standalone).
A message carrying several history entries prefixes each entry's keys with ``u{index}.``; an entry standing
for several rounds (a collapsed catch-up, ``flora/catchup.py``) also carries ``u{index}.span``.
Client factors: ``{layer}.A|B``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flora.lora.factors import Factors, truncate_factors
from flora.rounds import RoundUpdate


def update_to_tensors(update: RoundUpdate, rank: int | None = None,
                      with_client_adapters: bool = True) -> dict[str, torch.Tensor]:
    """Flat tensor dict of ``update``; a truncating method's adapter is cut to ``rank`` when given. The wire
    leaves out standalone clients' adapters (each client keeps its own)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, merge in update.merge.items():
        if isinstance(merge, torch.Tensor):
            tensors[f"m.{name}.D"] = merge
        else:
            tensors[f"m.{name}.A"], tensors[f"m.{name}.B"] = merge
    for name, (A, B) in (update.adapter or {}).items():
        if update.truncate and rank is not None:
            A, B = truncate_factors(A, B, rank)
        tensors[f"a.{name}.A"], tensors[f"a.{name}.B"] = A, B
    for client, adapter in (update.client_adapters or {}).items() if with_client_adapters else ():
        for name, (A, B) in adapter.items():
            tensors[f"c{client}.{name}.A"], tensors[f"c{client}.{name}.B"] = A, B
    return {key: value.contiguous() for key, value in tensors.items()}


def update_from_tensors(tensors: Mapping[str, torch.Tensor], round_: int = 0, truncate: bool = False,
                        forms: Mapping[str, int] | None = None) -> RoundUpdate:
    """Inverse of :func:`update_to_tensors`."""
    update = RoundUpdate(round=round_, truncate=truncate, forms=dict(forms or {}))
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, rest = key.split(".", 1)
        layer, part = rest.rsplit(".", 1)
        if kind == "m" and part == "D":
            update.merge[layer] = tensor
        else:
            pairs.setdefault((kind, layer), {})[part] = tensor
    for (kind, layer), parts in sorted(pairs.items()):
        factors = (parts["A"], parts["B"])
        if kind == "m":
            update.merge[layer] = factors
        elif kind == "a":
            update.adapter = update.adapter or {}
            update.adapter[layer] = factors
        else:
            update.client_adapters = update.client_adapters or {}
            update.client_adapters.setdefault(int(kind[1:]), {})[layer] = factors
    return update


def updates_to_tensors(updates: Sequence[RoundUpdate], first_index: int, rank: int | None) -> dict[str, torch.Tensor]:
    """History entries from ``first_index`` on for one node (adapters cut to its ``rank`` where the method
    truncates; no standalone adapters). An entry standing for several rounds (``span`` > 1, a collapsed
    catch-up) carries ``u{i}.span``; the next entry's index follows it."""
    tensors: dict[str, torch.Tensor] = {}
    index = first_index
    for update in updates:
        wire = update_to_tensors(update, rank, with_client_adapters=False)
        tensors.update({f"u{index}.{key}": value for key, value in wire.items()})
        if update.span != 1:
            tensors[f"u{index}.span"] = torch.tensor([update.span], dtype=torch.int64)
        index += update.span
    return tensors


def updates_from_tensors(tensors: Mapping[str, torch.Tensor], first_index: int, count: int) -> list[RoundUpdate]:
    """Inverse of :func:`updates_to_tensors` for the entries covering ``count`` history indices."""
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, rest = key.split(".", 1)
        grouped.setdefault(int(head[1:]), {})[rest] = tensor
    updates, index = [], first_index
    while index < first_index + count:
        entry = grouped.get(index, {})
        span = int(entry.pop("span").item()) if "span" in entry else 1
        update = update_from_tensors(entry)
        update.span = span
        updates.append(update)
        index += span
    return updates


def factors_to_tensors(factors: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.contiguous(), B.contiguous()
    return tensors


def factors_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, Factors]:
    return {name[:-2]: (tensors[name], tensors[name[:-2] + ".B"]) for name in tensors if name.endswith(".A")}
