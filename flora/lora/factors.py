"""Adapter state as plain tensors, client weights, and validation of client updates.

Conventions used across ``flora.lora`` (see DESIGN.md §1):

* one client's update is ``{layer_name: (A, B)}`` with ``A`` of shape ``(r_k, in)`` and
  ``B`` of shape ``(out, r_k)``; the LoRA scaling ``s_k`` is already folded into ``B``, so
  the client's dense update is ``ΔW_k = B @ A`` of shape ``(out, in)``;
* client weights ``p_k`` are non-negative and sum to one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))
ClientUpdate = Mapping[str, Factors]
Merge = Factors | torch.Tensor  # (A, B) whose product is added, or a dense (out, in) tensor


def dense(merge: Merge) -> torch.Tensor:
    """The ``(out, in)`` update a merge part adds."""
    if isinstance(merge, torch.Tensor):
        return merge
    A, B = merge
    return B @ A


class InvalidUpdateError(ValueError):
    """A client update that cannot be aggregated; the message names client, layer and reason."""

    def __init__(self, client: int | str, layer: str | None, reason: str):
        self.client = client
        self.layer = layer
        self.reason = reason
        where = f"client {client}" + (f", layer {layer!r}" if layer is not None else "")
        super().__init__(f"{where}: {reason}")


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scaling ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def client_weights(
    num_examples: Sequence[int] | None = None,
    scheme: str = "num_examples",
    given: Sequence[float] | None = None,
    num_clients: int | None = None,
) -> list[float]:
    """Client weights ``p_k``: by data size (the paper's default), ``uniform``, or ``given``."""
    if scheme == "num_examples":
        if num_examples is None:
            raise ValueError("weight scheme 'num_examples' needs the clients' example counts")
        return normalize_weights([float(n) for n in num_examples])
    if scheme == "uniform":
        n = num_clients if num_clients is not None else len(num_examples or [])
        if n <= 0:
            raise ValueError("weight scheme 'uniform' needs at least one client")
        return [1.0 / n] * n
    if scheme == "given":
        if given is None:
            raise ValueError("weight scheme 'given' needs the weights")
        return normalize_weights(given, num_clients)
    raise ValueError(f"unknown weight scheme {scheme!r}; expected 'num_examples', 'uniform' or 'given'")


def normalize_weights(weights: Sequence[float], num_clients: int | None = None) -> list[float]:
    """Validate client weights (finite, non-negative, not all zero, one per client); scale to sum 1."""
    values = [float(w) for w in weights]
    if num_clients is not None and len(values) != num_clients:
        raise ValueError(f"weights: expected one per client ({num_clients}), got {len(values)}")
    if not values:
        raise ValueError("weights: empty; expected one weight per client")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] = {w}: expected a finite, non-negative number")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("weights: all zero; expected at least one positive weight")
    return [w / total for w in values]


def check_update(
    update: ClientUpdate,
    client: int | str = 0,
    layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    expected_layers: set[str] | None = None,
    max_norm: float | None = None,
    max_rank: int | None = None,
    dtypes: Collection[torch.dtype] | None = None,
) -> None:
    """Raise :class:`InvalidUpdateError` if one client's update cannot be aggregated.

    Checks: layer set (against ``expected_layers`` or ``layer_shapes``), one real floating dtype for
    every factor (one of ``dtypes`` when given; complex and integer tensors are refused), 2-D factors
    whose inner dimension (the rank) agrees and is >= 1, shapes against the base layer ``(out, in)``,
    rank no larger than ``min(out, in)`` nor than ``max_rank`` (the rank the client may use), finite
    values, factors small enough that their products cannot overflow the dtype
    (:func:`overflow_bound`; norms in float64), and, when ``max_norm`` is given,
    ``‖B A‖_F <= max_norm`` per layer.
    """
    if not isinstance(update, Mapping) or not update:
        raise InvalidUpdateError(client, None, "empty update: expected {layer: (A, B)} with at least one layer")
    expected = expected_layers if expected_layers is not None else (set(layer_shapes) if layer_shapes else None)
    if expected is not None and set(update) != expected:
        missing = sorted(expected - set(update))
        extra = sorted(set(update) - expected)
        raise InvalidUpdateError(client, None, f"layer set differs: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, pair in update.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidUpdateError(client, name, "expected a pair (A, B)")
        A, B = pair
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
            raise InvalidUpdateError(client, name, "A and B must be torch tensors")
        for factor in (A, B):
            if not factor.dtype.is_floating_point or (dtypes is not None and factor.dtype not in dtypes):
                allowed = sorted(str(d) for d in dtypes) if dtypes is not None else "a real floating dtype"
                raise InvalidUpdateError(client, name, f"dtype {factor.dtype}: expected {allowed}")
        if A.dtype != B.dtype or A.dtype != first_dtype(update):
            raise InvalidUpdateError(client, name, f"dtypes A {A.dtype}, B {B.dtype}: expected one dtype for "
                                                   f"every factor ({first_dtype(update)})")
        if A.ndim != 2 or B.ndim != 2:
            raise InvalidUpdateError(client, name, f"A and B must be 2-D, got A{tuple(A.shape)} B{tuple(B.shape)}")
        rank = A.shape[0]
        if rank == 0 or B.shape[1] == 0:
            raise InvalidUpdateError(client, name, "rank 0: expected rank >= 1")
        if B.shape[1] != rank:
            raise InvalidUpdateError(
                client, name, f"rank mismatch: A{tuple(A.shape)} is (r, in) but B{tuple(B.shape)} is not (out, r={rank})"
            )
        if layer_shapes is not None:
            out_dim, in_dim = layer_shapes[name]
            if A.shape[1] != in_dim or B.shape[0] != out_dim:
                raise InvalidUpdateError(
                    client, name,
                    f"shape A{tuple(A.shape)} B{tuple(B.shape)} does not fit layer (out={out_dim}, in={in_dim})",
                )
            if rank > min(out_dim, in_dim):
                raise InvalidUpdateError(client, name, f"rank {rank} exceeds the layer's min(out, in) = {min(out_dim, in_dim)}")
        if max_rank is not None and rank > max_rank:
            raise InvalidUpdateError(client, name, f"rank {rank} exceeds the client's rank {max_rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InvalidUpdateError(client, name, "non-finite values (NaN or Inf)")
        size = float(A.double().norm()) * float(B.double().norm())  # bounds every entry of B @ A and ‖B A‖_F
        if not size <= overflow_bound(A.dtype):
            raise InvalidUpdateError(client, name, f"factor norms ‖A‖·‖B‖ = {size:.3g} exceed {overflow_bound(A.dtype):.3g}: "
                                                   f"products would overflow {A.dtype}")
        if max_norm is not None:
            norm = product_norm(A, B)
            if not norm <= max_norm:
                raise InvalidUpdateError(client, name, f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")


def first_dtype(update: ClientUpdate) -> torch.dtype:
    """The dtype of an update's first factor (every factor must share it)."""
    return next(iter(update.values()))[0].dtype


def overflow_bound(dtype: torch.dtype) -> float:
    """Largest ``‖A‖_F·‖B‖_F`` accepted for factors of ``dtype``: ``sqrt(finfo.max)`` (1.8e19 for float32).

    It bounds every entry of ``B A`` (Cauchy-Schwarz) far below the overflow threshold, leaves room for the
    activations the merged update multiplies later, and is never approached by a trained adapter (≈ 1).
    """
    return math.sqrt(torch.finfo(dtype).max)


def check_updates(
    updates: Sequence[ClientUpdate],
    layer_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Check every client's update and that all clients agree on layers and (out, in) shapes."""
    if not updates:
        raise ValueError("updates: empty; expected one update per client")
    reference_layers = set(layer_shapes) if layer_shapes is not None else set(updates[0])
    shapes = dict(layer_shapes) if layer_shapes is not None else None
    for k, update in enumerate(updates):
        check_update(update, client=k, layer_shapes=shapes, expected_layers=reference_layers)
        if shapes is None:  # first client defines the (out, in) every other must match
            shapes = {name: (B.shape[0], A.shape[1]) for name, (A, B) in update.items()}


def product_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """``‖B A‖_F`` without forming the ``(out, in)`` product: ``sqrt(tr((BᵀB)(AAᵀ)))``, in float64 (real
    factors only: :func:`check_update` refuses complex ones)."""
    gram = (B.T.double() @ B.double()) * (A.double() @ A.T.double())
    return float(gram.sum().clamp_min(0).sqrt())


def cap_weights(weights: Sequence[float], cap: float) -> list[float]:
    """Weights (summing to 1) with none above ``cap``: the excess of capped clients goes to the others in
    proportion to their weights (water-filling), so the order of the uncapped ones is kept. With
    ``cap < 1/K`` no such weights exist and every client gets ``1/K``."""
    p = normalize_weights(weights)
    if cap * len(p) <= 1:
        return [1.0 / len(p)] * len(p)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(p)) if i not in capped]
        mass = 1.0 - cap * len(capped)
        total = math.fsum(p[i] for i in free)
        scaled = {i: (p[i] * mass / total if total > 0 else mass / len(free)) for i in free}
        over = {i for i, w in scaled.items() if w > cap}
        if not over:
            return [cap if i in capped else scaled[i] for i in range(len(p))]
        capped |= over


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> Factors:
    """The first ``rank`` ranks of ``(A, B)``, zero-padded when there are fewer (HetLoRA/FlexLoRA rule)."""
    A_r, B_r = A[:rank], B[:, :rank]
    if A_r.shape[0] < rank:
        pad = rank - A_r.shape[0]
        A_r = torch.cat([A_r, A.new_zeros(pad, A.shape[1])])
        B_r = torch.cat([B_r, B.new_zeros(B.shape[0], pad)], dim=1)
    return A_r, B_r
