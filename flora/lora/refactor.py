"""Exact re-factorisation of a low-rank product, truncation, and payload sizes.

Given stacked factors ``B (out, R)`` and ``A (R, in)``:

    B = Q_b R_b,  Aᵀ = Q_a R_a            (thin QR)
    M = R_b R_aᵀ = U S Vᵀ                 (small SVD, at most R × R)
    B' = Q_b U S^½,  A' = S^½ Vᵀ Q_aᵀ       so that  B' A' = B A

``B' A'`` is the SVD of ``B A``: the factors depend only on the sum, not on any client's
``(A_k, B_k)``, and cutting them at rank ``k`` is the best rank-``k`` approximation
(Eckart–Young) with relative error ``sqrt(Σ_{i>k} s_i²) / sqrt(Σ s_i²)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refactorized:
    """``B (out, k)`` and ``A (k, in)`` with ``B @ A ≈ original``; ``singular_values`` of length ``k_full``."""

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor  # all singular values of the product, descending
    rank: int  # kept rank k
    relative_error: float  # ‖B'A' − BA‖_F / ‖BA‖_F introduced by truncation (0 when none)


def product_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``B @ A`` without forming it: returns ``U (out, q)``, ``S (q,)``, ``Vh (q, in)``.

    ``q = min(out, in, R)``. Cost is two thin QRs and one SVD of at most ``R × R``.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A (R, in) and B (out, R), got A{tuple(A.shape)} B{tuple(B.shape)}")
    Q_b, R_b = torch.linalg.qr(B, mode="reduced")  # (out, q_b), (q_b, R)
    Q_a, R_a = torch.linalg.qr(A.T, mode="reduced")  # (in, q_a), (q_a, R)
    M = R_b @ R_a.T  # (q_b, q_a)
    U_m, S, Vh_m = torch.linalg.svd(M, full_matrices=False)
    return Q_b @ U_m, S, Vh_m @ Q_a.T


def truncation_rank(singular_values: torch.Tensor, rank: int | None = None, max_dropped_energy: float | None = None,
                    rtol: float | None = None) -> int:
    """How many singular values to keep.

    ``rank`` caps it; ``max_dropped_energy`` keeps the fewest values whose dropped share of
    ``Σ s²`` is at most that fraction; ``rtol`` drops values ``<= rtol · s_max`` (numerical
    rank). With none given, all are kept.
    """
    s = singular_values.double()
    keep = s.numel()
    if rtol is not None and keep:
        keep = int((s > rtol * s[0]).sum())
    if max_dropped_energy is not None:
        if not 0.0 <= max_dropped_energy < 1.0:
            raise ValueError(f"max_dropped_energy must be in [0, 1), got {max_dropped_energy}")
        energy = s.pow(2)
        total = float(energy.sum())
        if total > 0:
            # tail[i] = share of energy dropped when keeping the first i + 1 values
            tail = (total - torch.cumsum(energy, 0)) / total
            fits = (tail <= max_dropped_energy).nonzero()
            keep = min(keep, int(fits[0]) + 1 if len(fits) else keep)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        keep = min(keep, rank)
    return max(keep, 1) if s.numel() else 0


def refactorize(A: torch.Tensor, B: torch.Tensor, rank: int | None = None,
                max_dropped_energy: float | None = None, rtol: float | None = None) -> Refactorized:
    """Re-factorise ``B @ A`` into balanced factors that reveal only the product.

    Without ``rank``/``max_dropped_energy``/``rtol`` the result is exact (up to rounding).
    """
    U, S, Vh = product_svd(A, B)
    k = truncation_rank(S, rank=rank, max_dropped_energy=max_dropped_energy, rtol=rtol)
    root = S[:k].sqrt()
    B_new = U[:, :k] * root  # (out, k)
    A_new = root[:, None] * Vh[:k]  # (k, in)
    return Refactorized(A=A_new, B=B_new, singular_values=S, rank=k,
                        relative_error=relative_tail(S, k))


def relative_tail(singular_values: torch.Tensor, keep: int) -> float:
    """``sqrt(Σ_{i>=keep} s_i²) / sqrt(Σ s_i²)``: the relative Frobenius error of keeping ``keep``."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    return math.sqrt(float(energy[keep:].sum()) / total) if total > 0 else 0.0


# --- payload sizes -------------------------------------------------------------------------

def factors_bytes(rank: int, out_dim: int, in_dim: int, itemsize: int = 4) -> int:
    """Bytes of a factor pair ``A (rank, in)`` + ``B (out, rank)``."""
    return rank * (out_dim + in_dim) * itemsize


def dense_bytes(out_dim: int, in_dim: int, itemsize: int = 4) -> int:
    """Bytes of a dense ``(out, in)`` update."""
    return out_dim * in_dim * itemsize


@dataclass(frozen=True)
class BroadcastChoice:
    form: str  # "stacked" | "refactorized" | "dense"
    nbytes: int
    sizes: dict[str, int]  # bytes of every candidate form
    rank: int  # rank of the chosen factors (min(out, in) for dense)


def smallest_exact_form(stacked_rank: int, numerical_rank: int, out_dim: int, in_dim: int,
                        itemsize: int = 4, private: bool = False) -> BroadcastChoice:
    """Pick the smallest exact encoding of a stacked update of rank ``stacked_rank``.

    ``numerical_rank`` is the rank of the product (``<= min(stacked_rank, out, in)``); the
    re-factorised form costs ``numerical_rank · (out + in)``, the dense one ``out · in``.
    Ties prefer stacked (no compute), then re-factorised. ``private`` leaves out the stacked form,
    which carries every client's own factors: re-factorised is never larger than stacked, so
    privacy costs no bytes, only the re-factorisation's compute.
    """
    sizes = {
        "stacked": factors_bytes(stacked_rank, out_dim, in_dim, itemsize),
        "refactorized": factors_bytes(numerical_rank, out_dim, in_dim, itemsize),
        "dense": dense_bytes(out_dim, in_dim, itemsize),
    }
    order = ["refactorized", "dense"] if private else ["stacked", "refactorized", "dense"]
    form = min(order, key=lambda f: (sizes[f], order.index(f)))
    rank = {"stacked": stacked_rank, "refactorized": numerical_rank, "dense": min(out_dim, in_dim)}[form]
    return BroadcastChoice(form=form, nbytes=sizes[form], sizes=sizes, rank=rank)


def dense_break_even_rank(out_dim: int, in_dim: int) -> int:
    """Smallest total rank ``R`` for which a dense update is smaller than stacked factors."""
    return out_dim * in_dim // (out_dim + in_dim) + 1
