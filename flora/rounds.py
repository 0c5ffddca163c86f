"""What a round changes, what a client replies, and the global model state every party holds.

Global state after round ``t`` is the base weights plus every round's ``merge`` part, plus the latest
global adapter (methods whose clients continue from it keep training it); see the method registry
(``flora/lora/methods.py``) for which method produces which part:

* merging methods (``flora``, ``centralized``): ``merge`` = the aggregate ``Σ p_k B_k A_k`` in its
  broadcast form; clients start a fresh adapter of their rank every round;
* ``flora-warm``: ``merge`` = the aggregate ``Σ p_k (B_k A_k − B⁰_k A⁰_k)``; every party also keeps the
  warm source (``GlobalState.warm``) the clients' start factors are cut from;
* continuing methods (``fedit``, ``ffa``, ``zeropad``, ``flexlora``): ``adapter`` = the aggregated
  adapter (each client takes its first ``r_k`` ranks where the method truncates);
* ``fedex``: ``adapter`` = averages, ``merge`` = the dense residual;
* ``standalone``: ``client_adapters`` = each client's own adapter, nothing is aggregated.

How a ``merge`` reaches a layer depends on its weights (``flora/precision.py``): added in place to float32
weights; kept beside half-precision and quantized ones as a frozen float32 delta added to the layer's output.
The global update stays exact in float32 in every case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flora.data.tokenize import Example
from flora.lora.factors import Factors, truncate_factors
from flora.lora.warm import WarmSource
from flora.modeling import evaluate_loss_tokens
from flora.precision import Merge, apply_merges, dense, temporary_update  # noqa: F401 (Merge, dense: re-exported)


def nbytes(obj) -> int:
    """Bytes of a tensor or of a (nested) tuple of tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(nbytes(o) for o in obj)


@dataclass
class RoundUpdate:
    """What one round changes in the global state (see the module docstring)."""

    round: int
    merge: dict[str, Merge] = field(default_factory=dict)
    adapter: dict[str, Factors] | None = None
    truncate: bool = False  # client k continues from the first r_k ranks of ``adapter`` (the method truncates)
    client_adapters: dict[int, dict[str, Factors]] | None = None  # standalone: each client's own adapter
    forms: dict[str, int] = field(default_factory=dict)  # broadcast form -> number of layers
    span: int = 1  # history entries it stands for (> 1: several rounds collapsed, ``flora/catchup.py``)

    def nbytes(self, rank: int | None) -> int:
        """Bytes a client of ``rank`` receives for this update.

        A truncating method sends each client only its first ``rank`` ranks; a standalone client's
        adapter never leaves it in a real deployment and counts 0.
        """
        total = sum(nbytes(m) for m in self.merge.values())
        if self.adapter is not None:
            for A, B in self.adapter.values():
                kept = min(rank, A.shape[0]) if self.truncate and rank is not None else A.shape[0]
                total += kept * (A.shape[1] + B.shape[0]) * A.element_size()
        return total


@dataclass
class ClientReply:
    client: int  # partition id
    node: str
    factors: dict[str, Factors] | None
    num_examples: int = 0
    train_loss: float = math.nan
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    applied: int = 0  # round updates the client's model holds after this round's catch-up
    rank: int = 0  # the adapter's (initial) rank; AdaLoRA may send fewer
    rejection: str | None = None  # why the server's decoding rejected the reply (``flora/wire_checks.py``)


@dataclass
class EvalReply:
    """A node's federated evaluation of the global model (its own model, standalone) on its held-out split."""

    client: int  # partition id
    node: str
    loss: float = math.nan  # mean loss over ``tokens`` target tokens (NaN: no held-out examples)
    tokens: int = 0
    examples: int = 0
    applied: int = 0
    error: str | None = None
    rejection: str | None = None


class GlobalState:
    """Base weights with every applied ``merge``, and the latest adapters (held by the server and by
    every client process); with ``warm`` (a warm-starting method) also the source of the warm factors,
    fed with every applied merge."""

    def __init__(self, model: torch.nn.Module, warm: WarmSource | None = None,
                 reload: Callable[[], None] | None = None):
        self.model = model
        self.applied = 0  # number of round updates merged into ``model``
        self.adapter: dict[str, Factors] | None = None
        self.client_adapters: dict[int, dict[str, Factors]] = {}
        self.warm = warm
        self.reload = reload  # puts the base weights back into ``model`` (a client process's runtime)

    def apply(self, updates: Sequence[RoundUpdate], first_index: int) -> None:
        """Apply ``updates`` (history entries from ``first_index`` on, each standing for ``span`` of them) not yet
        applied. An entry from index 0 that covers part of what is held (the server's folded history,
        ``flora/catchup.py``) starts over from the base weights (``reload``); any other partly held entry cannot
        be split: :class:`RuntimeError`."""
        if first_index > self.applied:
            raise RuntimeError(f"out of sync: holds {self.applied} round updates, message starts at {first_index}")
        index = first_index
        for update in updates:
            end = index + update.span
            if end <= self.applied:
                index = end
                continue
            if index < self.applied:
                if index > 0 or self.reload is None:
                    raise RuntimeError(f"out of sync: holds {self.applied} round updates, a collapsed catch-up "
                                       f"entry covers {index}..{end - 1}")
                self.restart()
            apply_merges(self.model, update.merge)  # in place, or beside the layer (precision.py)
            if self.warm is not None:
                self.warm.add(update.merge)
            if update.adapter is not None:
                self.adapter = update.adapter
            if update.client_adapters is not None:
                self.client_adapters.update(update.client_adapters)
            self.applied = index = end

    def restart(self) -> None:
        """Back to the base weights with nothing applied."""
        self.reload()
        self.applied = 0
        self.adapter = None
        self.client_adapters = {}
        if self.warm is not None:
            self.warm = type(self.warm)(self.warm.source, self.warm.rtol)

    def init_factors(self, client: int, rank: int, truncate: bool) -> dict[str, Factors] | None:
        """The adapter client ``client`` continues from (None: a fresh one)."""
        if client in self.client_adapters:
            return self.client_adapters[client]
        if self.adapter is None or not truncate:
            return self.adapter
        return {name: truncate_factors(A, B, rank) for name, (A, B) in self.adapter.items()}

    def evaluate(self, tokenizer, examples: Sequence[Example], adapter: Mapping[str, Factors] | None,
                 batch_size: int = 8) -> float:
        """Loss of base + ``adapter`` (merged temporarily; the base weights are restored bit for bit, also
        when merging or evaluating fails half-way)."""
        return self.evaluate_tokens(tokenizer, examples, adapter, batch_size)[0]

    def evaluate_tokens(self, tokenizer, examples: Sequence[Example], adapter: Mapping[str, Factors] | None,
                        batch_size: int = 8) -> tuple[float, int]:
        """:meth:`evaluate` and the number of target tokens the loss averages over."""
        with temporary_update(self.model, {name: B @ A for name, (A, B) in (adapter or {}).items()}):
            return evaluate_loss_tokens(self.model, tokenizer, examples, batch_size)

    def adapter_of(self, client: int, per_client: bool) -> dict[str, Factors] | None:
        """The adapter on top of the merged weights that makes client ``client``'s model: its own
        (``per_client``, standalone) or the global one."""
        return self.client_adapters.get(client) if per_client else self.adapter
