"""How the global update reaches a base model's layers, kept exact in float32 whatever the base's precision.

Every party (server and clients) applies the same round updates with :func:`apply_merges`, which picks per
layer:

* **float32 / float64 weights** (the default): ``W ← W + Δ`` in place, as always.
* **bfloat16 / float16 or quantized weights** (bitsandbytes 4-bit / 8-bit): the weights cannot hold the
  update exactly (a quantized one cannot take it at all; a half-precision one would round every round's
  small update against the large weight, and most of it is lost: ``tests/test_hardware.py`` measures it),
  so the accumulated update lives *beside* the layer as a :class:`GlobalDelta`, a frozen float32 term that
  a forward hook adds to the layer's output: ``y = base(x) + x Δᵀ`` with ``Δ = Σ_t Δ_t`` kept as stacked
  factors ``B A`` (concatenation is exact) or, once that would be larger, as a dense float32 matrix. The
  base weights never change after loading; base and delta are the same on every party, so clients start
  each round from exactly the server's global model.

Where rounding enters with such a base: once when the base is loaded (cast or quantized), and in the
activations (the base layer computes in its dtype; ``x Δᵀ`` is computed in float32 and the layer's output
``base(x) + x Δᵀ`` is rounded once to the activation dtype). Never in the global update, the LoRA factors,
the wire or the server's aggregation, which stay float32. Cost: the hook's two thin matrix products per
layer (rank ``R = Σ`` of the rounds' broadcast ranks; dense once ``R (out + in) >= out · in``).

The deltas live on the layer modules themselves (as their forward hooks), so a deep copy of a model (the
server's own model) carries them like merged weights. Shapes: ``A (R, in)``, ``B (out, R)``, ``Δ (out, in)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from flora.lora.factors import Factors, Merge, dense  # noqa: F401 (Factors, Merge: re-exported)
from flora.modeling import merge_update

EXACT_DTYPES = (torch.float32, torch.float64)  # weights that take an update in place without losing it


def keeps_delta_beside(module: torch.nn.Module) -> bool:
    """A layer whose weights cannot hold the global update exactly: half precision or quantized."""
    weight = module.weight
    return weight.dtype not in EXACT_DTYPES or type(module).__module__.startswith("bitsandbytes")


class GlobalDelta:
    """A frozen float32 update beside a layer, added to its output: ``y + x (B A + D)ᵀ``.

    Registered as the layer's forward hook (:func:`global_delta`); ``A (R, in)``, ``B (out, R)`` hold the
    stacked factors of every round so far, ``D (out, in)`` the dense part. Every change replaces the
    tensors (never in place), so :func:`temporary_update` restores them by reference.
    """

    def __init__(self, out_features: int, in_features: int, device: torch.device):
        self.shape = (out_features, in_features)
        self.device = device
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.D: torch.Tensor | None = None

    def add(self, merge: Merge) -> None:
        out_features, in_features = self.shape
        if isinstance(merge, torch.Tensor):
            if tuple(merge.shape) != self.shape:
                raise ValueError(f"global delta: update of shape {tuple(merge.shape)} for a layer of {self.shape}")
            self.D = self._dense_plus(merge.to(self.device, torch.float32))
            return
        A, B = (t.to(self.device, torch.float32) for t in merge)
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"global delta: factors A{tuple(A.shape)} B{tuple(B.shape)} for a layer of {self.shape}")
        if self.A is not None:
            A, B = torch.cat([self.A, A]), torch.cat([self.B, B], dim=1)
        if A.shape[0] * (out_features + in_features) >= out_features * in_features:  # dense is no larger
            self.D, self.A, self.B = self._dense_plus(B @ A), None, None
        else:
            self.A, self.B = A, B

    def _dense_plus(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.clone() if self.D is None else self.D + delta

    def matrix(self) -> torch.Tensor:
        """``Δ (out, in)`` in float32."""
        total = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        if self.A is not None:
            total = total + self.B @ self.A
        if self.D is not None:
            total = total + self.D
        return total

    def state(self) -> tuple:
        return self.A, self.B, self.D

    def restore(self, state: tuple) -> None:
        self.A, self.B, self.D = state

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.A is None and self.D is None:
            return output
        x = args[0].to(torch.float32)
        extra = (x @ self.A.T) @ self.B.T if self.A is not None else 0
        if self.D is not None:
            extra = extra + x @ self.D.T
        return (output.to(torch.float32) + extra).to(output.dtype)  # one rounding, of the sum


def global_delta(module: torch.nn.Module, create: bool = False) -> GlobalDelta | None:
    """The :class:`GlobalDelta` hooked to ``module`` (created and registered with ``create``)."""
    for hook in module._forward_hooks.values():
        if isinstance(hook, GlobalDelta):
            return hook
    if not create:
        return None
    delta = GlobalDelta(module.out_features, module.in_features, module.weight.device)
    module.register_forward_hook(delta)
    return delta


def apply_merges(model: torch.nn.Module, merges: Mapping[str, Merge]) -> None:
    """Add every ``{layer: merge}`` to ``model``'s global update: in place, or beside (module docstring)."""
    in_place = {}
    for name, merge in merges.items():
        module = model.get_submodule(name)
        if keeps_delta_beside(module):
            global_delta(module, create=True).add(merge)
        else:
            in_place[name] = dense(merge)
    merge_update(model, in_place)


@contextmanager
def temporary_update(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``model`` with ``{layer: Δ (out, in)}`` added inside the block; every layer (and delta) is restored bit
    for bit however the block exits (evaluation of base + adapter)."""
    saved, saved_deltas = {}, {}
    try:
        for name, delta in deltas.items():
            module = model.get_submodule(name)
            if keeps_delta_beside(module):
                holder = global_delta(module, create=True)
                saved_deltas[name] = holder.state()
                holder.add(delta)
            else:
                saved[name] = module.weight.detach().clone()
                merge_update(model, {name: delta})
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)
        for name, state in saved_deltas.items():
            global_delta(model.get_submodule(name)).restore(state)
