"""Server-side aggregation of client LoRA updates: one pure function per method.

Each ``aggregate_<method>(updates, weights)`` takes validated updates and normalised weights (the
dispatcher :func:`flora.lora.methods.aggregate` checks them, and equal ranks where the method's
registry entry asks for them) and returns an :class:`AggregationResult`. Every method's effective
global update for a layer is

    result.delta(layer) = B_g @ A_g (+ residual for FedEx-LoRA)      shape (out, in)

where ``(A_g, B_g) = result.global_factors[layer]``. What clients receive differs per method
(see DESIGN.md §1):

========== ============================================== ======== ==========
method     server computes                                exact?   ranks
========== ============================================== ======== ==========
flora      A = [A_1; …; A_K], B = [p_1 B_1, …, p_K B_K]   yes      any mix
fedit      A = Σ p_k A_k, B = Σ p_k B_k                   no       equal
zeropad    pad to r_max, average; client k keeps r_k      no       any mix
flexlora   ΔW = Σ p_k B_k A_k; client k gets rank-r_k SVD yes*     any mix
ffa        A shared and frozen, B = Σ p_k B_k             yes      equal
fedex      fedit + residual Σ p_k B_k A_k − B̄ Ā           yes      equal
flora-warm stack B_k A_k − B⁰_k A⁰_k (warm starts, below)     yes      any mix
========== ============================================== ======== ==========

(*) the global update is exact; each client's truncation error is in ``truncation_error``.

``flora-warm``'s clients start from warm factors ``(A⁰_k, B⁰_k)`` (``flora/lora/warm.py``), so a client's
contribution is ``B_k A_k − B⁰_k A⁰_k``, not its uploaded product; ``result.contributions`` holds them and
:func:`aggregation_error` measures against ``Σ p_k`` of those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flora.lora.factors import ClientUpdate, Factors, normalize_weights, truncate_factors
from flora.lora.refactor import product_svd, relative_tail


@dataclass
class AggregationResult:
    """What a method produced, for every layer.

    ``global_factors[layer] = (A_g, B_g)``: the adapter whose product is the global update
    (stacked for ``flora``, averaged for ``fedit``/``zeropad``/``fedex``, exact SVD factors
    for ``flexlora``). ``client_factors[k][layer]``: what client ``k`` continues from, when it
    differs per client (``zeropad``, ``flexlora``). ``residual[layer]``: the dense correction
    FedEx-LoRA adds into the base weights.
    """

    method: str
    weights: list[float]
    global_factors: dict[str, Factors]
    client_factors: list[dict[str, Factors]] | None = None
    residual: dict[str, torch.Tensor] | None = None
    truncation_error: list[dict[str, float]] | None = None  # flexlora: per client, per layer
    contributions: list[dict[str, Factors]] | None = None  # flora-warm: client k's B_k A_k − B⁰_k A⁰_k as factors

    @property
    def layer_names(self) -> list[str]:
        return list(self.global_factors)

    def delta(self, layer: str) -> torch.Tensor:
        """The dense ``(out, in)`` update this method applies to the global model for ``layer``."""
        A, B = self.global_factors[layer]
        update = B @ A
        if self.residual is not None:
            update = update + self.residual[layer]
        return update


# --- methods -----------------------------------------------------------------------------------

def _stack(layer_factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """``A (Σr_k, in)`` rows of every A_k; ``B (out, Σr_k)`` columns of every p_k·B_k."""
    A = torch.cat([A_k for A_k, _ in layer_factors], dim=0)
    B = torch.cat([p * B_k for (_, B_k), p in zip(layer_factors, weights)], dim=1)
    return A, B


def _average(layer_factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    A = sum(p * A_k for (A_k, _), p in zip(layer_factors, weights))
    B = sum(p * B_k for (_, B_k), p in zip(layer_factors, weights))
    return A, B


def _by_layer(updates: Sequence[ClientUpdate]) -> dict[str, list[Factors]]:
    return {name: [u[name] for u in updates] for name in updates[0]}


def aggregate_flora(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """Stacking: ``B A = Σ p_k B_k A_k`` exactly, for any mix of ranks."""
    stacked = {name: _stack(fs, weights) for name, fs in _by_layer(updates).items()}
    return AggregationResult("flora", list(weights), stacked)


def aggregate_fedit(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """FedIT: average ``A`` and ``B`` separately (``B̄ Ā ≠ Σ p_k B_k A_k``: cross terms)."""
    averaged = {name: _average(fs, weights) for name, fs in _by_layer(updates).items()}
    return AggregationResult("fedit", list(weights), averaged)


def aggregate_zeropad(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """Zero-padding (HetLoRA-style): pad each ``A_k``/``B_k`` to ``r_max`` with zeros and average.

    Row ``i`` of ``Ā`` is ``Σ_{k: r_k > i} p_k A_k[i]`` (the zeros count in the average, as in
    the FLoRA paper's baseline); client ``k`` continues from ``(Ā[:r_k], B̄[:, :r_k])``.
    """
    global_factors: dict[str, Factors] = {}
    for name, fs in _by_layer(updates).items():
        r_max = max(A_k.shape[0] for A_k, _ in fs)
        A_sum = torch.zeros(r_max, fs[0][0].shape[1], dtype=fs[0][0].dtype)
        B_sum = torch.zeros(fs[0][1].shape[0], r_max, dtype=fs[0][1].dtype)
        for (A_k, B_k), p in zip(fs, weights):
            r = A_k.shape[0]
            A_sum[:r] += p * A_k
            B_sum[:, :r] += p * B_k
        global_factors[name] = (A_sum, B_sum)
    client_factors = [
        {name: (A[: u[name][0].shape[0]], B[:, : u[name][0].shape[0]]) for name, (A, B) in global_factors.items()}
        for u in updates
    ]
    return AggregationResult("zeropad", list(weights), global_factors, client_factors=client_factors)


def aggregate_flexlora(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """FlexLoRA: dense ``ΔW = Σ p_k B_k A_k``; client ``k`` gets its best rank-``r_k`` approximation.

    The SVD of ``ΔW`` is taken through the stacked factors (``product_svd``), so the dense
    matrix is never decomposed: cost ~ ``(out + in) · R²`` instead of ``out · in · min(out, in)``.
    """
    global_factors: dict[str, Factors] = {}
    client_factors: list[dict[str, Factors]] = [{} for _ in updates]
    truncation_error: list[dict[str, float]] = [{} for _ in updates]
    for name, fs in _by_layer(updates).items():
        A_s, B_s = _stack(fs, weights)
        U, S, Vh = product_svd(A_s, B_s)
        root = S.sqrt()
        B_full, A_full = U * root, root[:, None] * Vh  # (out, q), (q, in)
        global_factors[name] = (A_full, B_full)
        for k, (A_k, _) in enumerate(fs):
            r = A_k.shape[0]
            # Zero ranks pad a truncation shorter than r_k so the client keeps its rank.
            client_factors[k][name] = truncate_factors(A_full, B_full, r)
            truncation_error[k][name] = relative_tail(S, r)
    return AggregationResult("flexlora", list(weights), global_factors, client_factors=client_factors,
                             truncation_error=truncation_error)


def aggregate_ffa(updates: Sequence[ClientUpdate], weights: Sequence[float], a_atol: float = 0.0) -> AggregationResult:
    """FFA-LoRA: ``A`` is frozen and shared (same seed on every client); ``B = Σ p_k B_k``.

    Exact because ``Σ p_k B_k A = (Σ p_k B_k) A``. Raises if the clients' ``A`` differ by more
    than ``a_atol`` (they must not have trained ``A``).
    """
    global_factors: dict[str, Factors] = {}
    for name, fs in _by_layer(updates).items():
        A_0 = fs[0][0]
        for k, (A_k, _) in enumerate(fs[1:], start=1):
            gap = float((A_k - A_0).abs().max())
            if gap > a_atol:
                raise ValueError(
                    f"ffa: client {k}, layer {name!r}: A differs from client 0's by {gap:.3g} (> a_atol={a_atol}); "
                    "FFA-LoRA needs the same frozen A on every client"
                )
        B = sum(p * B_k for (_, B_k), p in zip(fs, weights))
        global_factors[name] = (A_0, B)
    return AggregationResult("ffa", list(weights), global_factors)


def aggregate_fedex(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """FedEx-LoRA: FedIT's averages plus the dense residual ``Σ p_k B_k A_k − B̄ Ā`` (exact)."""
    global_factors: dict[str, Factors] = {}
    residual: dict[str, torch.Tensor] = {}
    for name, fs in _by_layer(updates).items():
        A_bar, B_bar = _average(fs, weights)
        A_s, B_s = _stack(fs, weights)
        global_factors[name] = (A_bar, B_bar)
        residual[name] = B_s @ A_s - B_bar @ A_bar
    return AggregationResult("fedex", list(weights), global_factors, residual=residual)


def aggregate_flora_warm(updates: Sequence[ClientUpdate], weights: Sequence[float],
                         start: Mapping[str, Factors] | None = None) -> AggregationResult:
    """FLoRA with warm starts: ``Σ p_k (B_k A_k − B⁰_k A⁰_k)`` exactly, for any mix of ranks.

    ``start[layer] = (A⁰ (q, in), B⁰ (out, q))``: the warm factors every client's start is a prefix of (scaling
    folded into ``B⁰``); client ``k`` started from its first ``q_k = min(r_k, q)`` ranks, ``r_k`` = its reply's
    rank. A layer missing from ``start`` (round 1) started fresh: plain stacking. Because the starts are nested,
    ``Σ p_k B⁰_k A⁰_k = B⁰ diag(w) A⁰`` with ``w_i = Σ_{k: q_k > i} p_k``, so the global factors are

        A = [A_1; …; A_K; A⁰]   (Σ r_k + max q_k, in)      B = [p_1 B_1, …, p_K B_K, −B⁰ diag(w)]   (out, ·)

    (``max q_k`` extra ranks, not ``Σ q_k``). ``contributions[k][layer] = ([A_k; A⁰_k], [B_k, −B⁰_k])`` per client,
    the reference :func:`aggregation_error` checks the stacked sum against.
    """
    start = start or {}
    global_factors: dict[str, Factors] = {}
    contributions: list[dict[str, Factors]] = [dict(u) for u in updates]
    for name, fs in _by_layer(updates).items():
        A, B = _stack(fs, weights)
        if name in start:
            A0, B0 = (t.to(A.dtype) for t in start[name])
            q = [min(A_k.shape[0], A0.shape[0]) for A_k, _ in fs]
            w = torch.tensor([sum(p for p, q_k in zip(weights, q) if q_k > i) for i in range(max(q))], dtype=B.dtype)
            A, B = torch.cat([A, A0[:len(w)]]), torch.cat([B, -B0[:, :len(w)] * w], dim=1)
            for k, ((A_k, B_k), q_k) in enumerate(zip(fs, q)):
                contributions[k][name] = (torch.cat([A_k, A0[:q_k]]), torch.cat([B_k, -B0[:, :q_k]], dim=1))
        global_factors[name] = (A, B)
    return AggregationResult("flora-warm", list(weights), global_factors, contributions=contributions)


# --- error ---------------------------------------------------------------------------------------

def reference_delta(updates: Sequence[ClientUpdate], weights: Sequence[float], layer: str) -> torch.Tensor:
    """``Σ p_k B_k A_k`` for one layer, in float64, by the plain loop."""
    p = normalize_weights(weights, num_clients=len(updates))
    total = None
    for update, p_k in zip(updates, p):
        A_k, B_k = update[layer]
        term = p_k * (B_k.double() @ A_k.double())
        total = term if total is None else total + term
    return total


def aggregation_error(result: AggregationResult, updates: Sequence[ClientUpdate],
                      weights: Sequence[float]) -> dict[str, float]:
    """Relative Frobenius error ``‖Δ_method − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖``.

    ``B_k A_k`` is client ``k``'s contribution: its update, or ``result.contributions[k]`` where the method
    records one (warm starts). Returns ``{layer: error, ..., "overall": error}``; overall pools the squared
    norms of all layers. Computed in float64.
    """
    if result.contributions is not None:
        updates = result.contributions
    errors: dict[str, float] = {}
    err_sq_total = ref_sq_total = 0.0
    for name in result.layer_names:
        reference = reference_delta(updates, weights, name)
        err_sq = float((result.delta(name).double() - reference).pow(2).sum())
        ref_sq = float(reference.pow(2).sum())
        errors[name] = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
        err_sq_total += err_sq
        ref_sq_total += ref_sq
    errors["overall"] = math.sqrt(err_sq_total / ref_sq_total) if ref_sq_total > 0 else math.sqrt(err_sq_total)
    return errors
