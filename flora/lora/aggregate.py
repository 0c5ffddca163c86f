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
raflora    rank partitions averaged over the clients that no (**)  any mix
           cover them; client k gets its rank-r_k SVD
florana    B̂ = Σ q_u B_u, Â = Σ p_u A_u, (p, q) minimise   no       equal
           ‖B̂ Â − Σ p_k B_k A_k‖ (alternating least sq.)
fedplora   R rank-1 modules; module j averaged over the   no       any mix
           clients that trained it (untrained: kept)
========== ============================================== ======== ==========

(*) the global update is exact; each client's truncation error is in ``truncation_error``.
(**) by design: ranks above the smallest are re-weighted (with equal ranks it is ``flexlora``, exact).

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
    truncation_error: list[dict[str, float]] | None = None  # flexlora, raflora: per client, per layer
    contributions: list[dict[str, Factors]] | None = None  # flora-warm: client k's B_k A_k − B⁰_k A⁰_k as factors
    # fedplora: the global adapter the clients started from and the modules each trained (the others were
    # folded into its base, so its whole model is previous with its trained modules substituted)
    previous: dict[str, Factors] | None = None
    modules: list[list[int]] | None = None

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

    def folded_factors(self, layer: str) -> Factors | None:
        """``Σ_k p_k`` (the global modules client ``k`` folded into its base) as float64 factors: what its whole
        model holds beyond its upload, ``(A_prev, B_prev · m)`` with ``m_j = Σ_{k: j ∉ S_k} p_k``; None where
        clients fold nothing."""
        if self.previous is None:
            return None
        A, B = self.previous[layer]
        folded = torch.zeros(A.shape[0], dtype=torch.float64)
        for p_k, selected in zip(self.weights, self.modules):
            folded += p_k
            folded[selected] -= p_k
        return A.double(), B.double() * folded

    def folded_delta(self, layer: str) -> torch.Tensor | None:
        """:meth:`folded_factors` as the dense ``(out, in)`` product (None where clients fold nothing)."""
        factors = self.folded_factors(layer)
        return None if factors is None else factors[1] @ factors[0]


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


def _redistribute(A_s: torch.Tensor, B_s: torch.Tensor, ranks: Sequence[int]
                  ) -> tuple[Factors, list[Factors], list[float]]:
    """SVD of ``B_s A_s`` as balanced global factors (``U √S``, ``√S Vᵀ``), each client's top-``r_k`` part
    (zero-padded when the product has fewer ranks, so the client keeps its rank) and its truncation error.

    The SVD is taken through the factors (``product_svd``), so the dense matrix is never decomposed:
    cost ~ ``(out + in) · R²`` instead of ``out · in · min(out, in)``.
    """
    U, S, Vh = product_svd(A_s, B_s)
    root = S.sqrt()
    B_full, A_full = U * root, root[:, None] * Vh  # (out, q), (q, in)
    return ((A_full, B_full), [truncate_factors(A_full, B_full, r) for r in ranks],
            [relative_tail(S, r) for r in ranks])


def _svd_result(method: str, weights: Sequence[float], stacked: dict[str, Factors],
                ranks: dict[str, list[int]]) -> AggregationResult:
    """FlexLoRA-style redistribution of every layer's stacked update (``_redistribute``)."""
    global_factors: dict[str, Factors] = {}
    num_clients = len(next(iter(ranks.values())))
    client_factors: list[dict[str, Factors]] = [{} for _ in range(num_clients)]
    truncation_error: list[dict[str, float]] = [{} for _ in range(num_clients)]
    for name, (A_s, B_s) in stacked.items():
        global_factors[name], per_client, errors = _redistribute(A_s, B_s, ranks[name])
        for k in range(num_clients):
            client_factors[k][name], truncation_error[k][name] = per_client[k], errors[k]
    return AggregationResult(method, list(weights), global_factors, client_factors=client_factors,
                             truncation_error=truncation_error)


def _ranks(layer_factors: Sequence[Factors]) -> list[int]:
    return [A_k.shape[0] for A_k, _ in layer_factors]


def aggregate_flexlora(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """FlexLoRA: dense ``ΔW = Σ p_k B_k A_k``; client ``k`` gets its best rank-``r_k`` approximation."""
    layers = _by_layer(updates)
    return _svd_result("flexlora", weights, {name: _stack(fs, weights) for name, fs in layers.items()},
                       {name: _ranks(fs) for name, fs in layers.items()})


def rank_partition_weights(ranks: Sequence[int], weights: Sequence[float]) -> list[torch.Tensor]:
    """raFLoRA's weight of every rank index of every client: ``ω_k[i] = p_k / Σ_{l: r_l > i} p_l``.

    Rank index ``i`` lies in the partition ``[ρ_{j-1}, ρ_j)`` between consecutive distinct ranks, and the
    clients covering that partition are exactly those with ``r_l > i``; so this is the partition's average
    weighted by data among the clients that cover it. A partition whose clients all have weight 0 gets 0.
    """
    out = []
    for r_k, p_k in zip(ranks, weights):
        cover = [math.fsum(p for r, p in zip(ranks, weights) if r > i) for i in range(r_k)]
        out.append(torch.tensor([p_k / c if c > 0 else 0.0 for c in cover], dtype=torch.float64))
    return out


def aggregate_raflora(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AggregationResult:
    """raFLoRA (Wu et al., "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client
    Heterogeneity", arXiv 2602.13486): rank-partitioned aggregation, then FlexLoRA's SVD redistribution.

    Written from the paper's abstract and the issue's description (the method section was not reachable
    from this machine, so no equation numbers are cited). The rule:

    1. partition the rank axis at the distinct client ranks ``ρ_1 < … < ρ_m``: partition ``j`` holds rank
       indices ``[ρ_{j-1}, ρ_j)`` (``ρ_0 = 0``) of every client whose rank covers it (``r_k ≥ ρ_j``);
    2. average each partition over those clients only, weighted by their data among them:
       ``ΔW_j = Σ_{k: r_k ≥ ρ_j} (p_k / Σ_{l: r_l ≥ ρ_j} p_l) B_k[:, P_j] A_k[P_j]``;
    3. ``ΔW = Σ_j ΔW_j``; client ``k`` continues from the top-``r_k`` SVD factors of ``ΔW`` (FlexLoRA).

    FlexLoRA's ``Σ_k p_k B_k A_k`` weighs the ranks above ``r_min`` by the share of *all* data, so their
    energy shrinks by ``Σ_{k: r_k > i} p_k < 1`` every round ("rank collapse", the paper's diagnosis);
    here each partition's weights sum to one. With equal ranks there is one partition and it is FlexLoRA.
    Computed as stacking with per-rank-index weights (:func:`rank_partition_weights`); the dense ``ΔW`` is
    never formed. Its ``aggregation_error`` (against ``Σ p_k B_k A_k``) is the re-weighting, by design.
    """
    layers = _by_layer(updates)
    ranks = {name: _ranks(fs) for name, fs in layers.items()}
    stacked = {}
    for name, fs in layers.items():
        omegas = rank_partition_weights(ranks[name], weights)
        A = torch.cat([A_k for A_k, _ in fs], dim=0)
        B = torch.cat([B_k * w.to(B_k.dtype) for (_, B_k), w in zip(fs, omegas)], dim=1)
        stacked[name] = (A, B)
    return _svd_result("raflora", weights, stacked, ranks)


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


@dataclass(frozen=True)
class Mixing:
    """FLoRA-NA's mixing of one layer: ``Â = Σ p_u A_u``, ``B̂ = Σ q_u B_u``."""

    p: torch.Tensor  # (U,) float64
    q: torch.Tensor  # (U,) float64
    residual: float  # ‖B̂ Â − Σ w_u B_u A_u‖_F / ‖Σ w_u B_u A_u‖_F (from the Gram identity: resolves ~1e-8)
    fedit_residual: float  # the same for FedIT's p = q = w (where the solver starts)
    iterations: int


def florana_mixing(layer_factors: Sequence[Factors], weights: Sequence[float], max_iterations: int = 30,
                   tol: float = 1e-6) -> Mixing:
    """Mixing vectors ``p, q`` minimising ``f(p, q) = ‖(Σ q_u B_u)(Σ p_u A_u) − T‖_F²``, ``T = Σ w_u B_u A_u``.

    Solver (the paper leaves it open; our choice): alternating least squares in closed form, starting at
    FedIT (``p = q = w``). With ``p`` fixed, ``f`` is a linear least-squares problem in ``q`` with normal
    equations ``G q = b``, ``G_uv = ⟨B_u Â, B_v Â⟩ = tr(B_uᵀB_v ÂÂᵀ)``, ``b_u = ⟨B_u Â, T⟩``; likewise for
    ``p`` with ``q`` fixed. Every step minimises exactly (pseudo-inverse for singular ``G``), so ``f`` never
    increases: the result is never worse than FedIT. Everything is computed from the two Gram matrices
    ``[A_u A_vᵀ]`` and ``[B_uᵀ B_v]`` (``U r × U r``, float64); no ``(out, in)`` matrix is formed. Stops when
    an iteration lowers ``f`` by less than ``tol · ‖T‖²`` or after ``max_iterations`` (the defaults: on
    SmolLM2's shapes with random factors the residual is within 0.1 % of full convergence, at about a third of
    its ~50 iterations; ``benchmarks/bench_aggregate.py``). Finally ``p`` and
    ``q`` are rescaled (``c p``, ``q / c``: the product is unchanged) to equal norms, so neither factor
    shrinks or grows round after round.
    """
    num, rank = len(layer_factors), layer_factors[0][0].shape[0]
    A_s = torch.cat([A.double() for A, _ in layer_factors], dim=0)  # (U r, in)
    B_s = torch.cat([B.double() for _, B in layer_factors], dim=1)  # (out, U r)
    GA = (A_s @ A_s.T).reshape(num, rank, num, rank)  # GA[u, i, v, j] = A_u[i] · A_v[j]
    GB = (B_s.T @ B_s).reshape(num, rank, num, rank)  # GB[u, i, v, j] = B_u[:, i] · B_v[:, j]
    w = torch.tensor(list(weights), dtype=torch.float64)
    target_sq = float(torch.einsum("k,l,kilj,ljki->", w, w, GB, GA))

    def objective(p: torch.Tensor, q: torch.Tensor) -> float:
        AA = torch.einsum("u,v,uivj->ij", p, p, GA)  # Â Âᵀ
        BB = torch.einsum("u,v,uivj->ij", q, q, GB)  # B̂ᵀ B̂
        Ak_Ahat = torch.einsum("v,kivj->kij", p, GA)  # A_k Âᵀ
        Bhat_Bk = torch.einsum("v,vikj->kij", q, GB)  # B̂ᵀ B_k
        cross = torch.einsum("k,kij,kji->", w, Bhat_Bk, Ak_Ahat)  # ⟨B̂ Â, T⟩
        return max(float(torch.einsum("ij,ji->", BB, AA) - 2 * cross) + target_sq, 0.0)

    def solve(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.pinv(G, hermitian=True, rtol=1e-12) @ b

    p, q = w.clone(), w.clone()
    start = best = objective(p, q)
    iterations = 0
    while iterations < max_iterations and best > 1e-15 * target_sq:  # below: the Gram identity cannot resolve it
        iterations += 1
        AA = torch.einsum("u,v,uivj->ij", p, p, GA)
        Ak_Ahat = torch.einsum("v,kivj->kij", p, GA)
        q = solve(torch.einsum("uivj,ji->uv", GB, AA), torch.einsum("k,uikj,kji->u", w, GB, Ak_Ahat))
        BB = torch.einsum("u,v,uivj->ij", q, q, GB)
        Bhat_Bk = torch.einsum("v,vikj->kij", q, GB)
        p = solve(torch.einsum("ij,vjui->uv", BB, GA), torch.einsum("k,kij,kjui->u", w, Bhat_Bk, GA))
        value = objective(p, q)
        improved, best = best - value, min(best, value)
        if improved <= tol * target_sq:
            break
    norm_p, norm_q = float(p.norm()), float(q.norm())
    if norm_p > 0 and norm_q > 0:
        scale = math.sqrt(norm_q / norm_p)
        p, q = p * scale, q / scale
    relative = (lambda v: math.sqrt(v / target_sq)) if target_sq > 0 else (lambda v: math.sqrt(v))
    return Mixing(p=p, q=q, residual=relative(best), fedit_residual=relative(start), iterations=iterations)


def aggregate_florana(updates: Sequence[ClientUpdate], weights: Sequence[float], max_iterations: int = 30,
                      tol: float = 1e-6) -> AggregationResult:
    """FLoRA-NA (Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in Federated
    Low-Rank Adaptation", arXiv 2509.26399): equal ranks; the server estimates the aggregated factors
    ``Â = Σ p_u A_u``, ``B̂ = Σ q_u B_u`` whose product is nearest to the ideal ``Σ w_u B_u A_u`` (the
    abstract's ``∇W̄ = Σ_u B_u A_u`` vs ``∇Ŵ = B̂ Â``, client weights ``w`` folded in) and broadcasts them:
    the same bytes as FedIT, clients continue from ``(Â, B̂)``.

    Written from the abstract and the issue's description (the method section was not reachable from this
    machine; no equation numbers are cited). Per layer, mixing vectors from :func:`florana_mixing`
    (alternating least squares, our choice of solver; never worse than FedIT). Inexact: a rank-``r``
    product cannot equal a sum of rank up to ``U r`` in general.
    """
    global_factors: dict[str, Factors] = {}
    for name, fs in _by_layer(updates).items():
        mixing = florana_mixing(fs, weights, max_iterations=max_iterations, tol=tol)
        dtype = fs[0][0].dtype
        A = sum(float(p_u) * A_u.double() for (A_u, _), p_u in zip(fs, mixing.p)).to(dtype)
        B = sum(float(q_u) * B_u.double() for (_, B_u), q_u in zip(fs, mixing.q)).to(dtype)
        global_factors[name] = (A, B)
    return AggregationResult("florana", list(weights), global_factors)


def aggregate_fedplora(updates: Sequence[ClientUpdate], weights: Sequence[float],
                       modules: Sequence[Sequence[int]] | None = None,
                       previous: dict[str, Factors] | None = None) -> AggregationResult:
    """Fed-PLoRA (Zhang, Hu, Xu, "Heterogeneous Federated Fine-Tuning with Parallel One-Rank Adaptation",
    ICLR 2026, arXiv 2602.16936), the server's side.

    Written from the abstract, a public summary and the issue's description (the paper's method section was
    not reachable from this machine; no equation numbers are cited). PLoRA writes the global rank-``R``
    adapter as ``R`` parallel rank-1 modules, ``ΔW = Σ_{j=1}^{R} B_(j) A_(j)``. Select-N-Fold: in a round,
    client ``k`` trains the ``r_k`` modules ``S_k`` (``updates[k]`` holds them, row/column ``i`` = module
    ``modules[k][i]``) from their global values, with the other modules folded into its frozen base
    (``flora/client.py``). The server averages each module over the clients that trained it, weighted by
    their data among them (our reading of "aggregates": ``Ā_(j) = Σ_{k: j∈S_k} p_k A_k(j) / Σ_{k: j∈S_k} p_k``,
    likewise ``B``); a module nobody trained keeps its value from ``previous``.

    ``modules`` defaults to ``S_k = {0, …, r_k − 1}``; ``previous`` (the global adapter before the round,
    ``R`` modules) defaults to zeros with ``R = 1 + the largest index``. With every client training all
    ``R`` modules (equal ranks) this is FedIT's average. ``aggregation_error`` compares with the average of
    the clients' whole models (``previous`` with each client's trained modules substituted; see
    :meth:`AggregationResult.folded_delta`).
    """
    layers = _by_layer(updates)
    ranks = _ranks(next(iter(layers.values())))
    modules = [list(range(r)) for r in ranks] if modules is None else [list(map(int, s)) for s in modules]
    if len(modules) != len(updates):
        raise ValueError(f"fedplora: {len(modules)} module lists for {len(updates)} clients")
    if previous is not None:
        total = next(iter(previous.values()))[0].shape[0]
    else:
        total = 1 + max((j for s in modules for j in s), default=-1)
    for k, selected in enumerate(modules):
        if len(set(selected)) != len(selected) or any(not 0 <= j < total for j in selected):
            raise ValueError(f"fedplora: client {k}: modules {selected} must be distinct indices in [0, {total})")
    index = [torch.tensor(s, dtype=torch.long) for s in modules]
    coverage = torch.zeros(total, dtype=torch.float64)
    for p_k, idx in zip(weights, index):
        coverage[idx] += p_k
    trained = coverage > 0
    global_factors: dict[str, Factors] = {}
    for name, fs in layers.items():
        A_0, B_0 = fs[0]
        if previous is not None:
            A_prev, B_prev = previous[name]
        else:
            A_prev, B_prev = A_0.new_zeros(total, A_0.shape[1]), B_0.new_zeros(B_0.shape[0], total)
        A_sum, B_sum = torch.zeros_like(A_prev), torch.zeros_like(B_prev)
        for k, ((A_k, B_k), p_k, idx) in enumerate(zip(fs, weights, index)):
            if A_k.shape[0] != len(idx):
                raise ValueError(f"fedplora: client {k}, layer {name!r}: rank {A_k.shape[0]} but {len(idx)} modules drawn")
            A_sum.index_add_(0, idx, A_k.to(A_prev.dtype), alpha=p_k)
            B_sum.index_add_(1, idx, B_k.to(B_prev.dtype), alpha=p_k)
        cover = coverage.to(A_prev.dtype)
        A_new, B_new = A_prev.clone(), B_prev.clone()
        A_new[trained] = A_sum[trained] / cover[trained, None]
        B_new[:, trained] = B_sum[:, trained] / cover[trained]
        global_factors[name] = (A_new, B_new)
    return AggregationResult("fedplora", list(weights), global_factors, modules=modules,
                             previous=dict(previous) if previous is not None else None)


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


def low_rank_norm(A: torch.Tensor, *Bs: torch.Tensor) -> float | list[float]:
    """``‖B A‖_F`` of float64 factors ``A (R, in)``, ``B (out, R)``, without the ``(out, in)`` product while
    ``R < min(out, in)``: thin QR ``Aᵀ = Q T``, so ``B A = (B Tᵀ) Qᵀ`` and ``‖B A‖ = ‖B Tᵀ‖`` (``Q`` has
    orthonormal columns). Cost ``~ (out + in) R²`` instead of ``out · in · R``. Several ``B`` sharing ``A``:
    one QR, a list of norms.

    Safe under cancellation (``B = [B_1, −B_2]``, ``A = [A_1; A_2]`` with ``B_1 A_1 ≈ B_2 A_2``): the entries of
    ``B Tᵀ`` are the difference's own entries in a rotated basis, each rounded relative to its summands, so a
    relative difference of 1e-12 is still resolved. The Gram trace ``tr(BᵀB · AAᵀ)`` (``product_norm``) is not:
    its terms are of size ``‖B‖² ‖A‖²`` and their rounding swamps a squared difference below ~1e-15 of them.
    """
    rank, in_dim = A.shape
    if rank >= min(Bs[0].shape[0], in_dim):  # the dense product is no larger than the factors' work
        norms = [float(torch.linalg.matrix_norm(B @ A)) for B in Bs]
    else:
        _, T = torch.linalg.qr(A.T, mode="r")
        norms = [float(torch.linalg.matrix_norm(B @ T.T)) for B in Bs]
    return norms[0] if len(Bs) == 1 else norms


def _error_factors(result: AggregationResult, updates: Sequence[ClientUpdate], weights: Sequence[float],
                   layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(A, B_err, B_ref)``: ``B_err A = Δ_method − reference`` (its dense residual not included) and
    ``B_ref A = Σ p_k B_k A_k (+ folded)``, with ``A`` the method's global ``A`` stacked on every client's."""
    p = normalize_weights(weights, num_clients=len(updates))
    A_g, B_g = (t.double() for t in result.global_factors[layer])
    A_parts = [A_g] + [u[layer][0].double() for u in updates]
    B_parts = [p_k * u[layer][1].double() for u, p_k in zip(updates, p)]
    folded = result.folded_factors(layer)
    if folded is not None:
        A_parts.append(folded[0])
        B_parts.append(folded[1])
    B_ref = torch.cat(B_parts, dim=1)
    return torch.cat(A_parts), torch.cat([B_g, -B_ref], dim=1), torch.cat([torch.zeros_like(B_g), B_ref], dim=1)


def aggregation_error(result: AggregationResult, updates: Sequence[ClientUpdate],
                      weights: Sequence[float], dense: bool = False) -> dict[str, float]:
    """Relative Frobenius error ``‖Δ_method − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖``.

    ``B_k A_k`` is client ``k``'s contribution: its upload, or ``result.contributions[k]`` where the method
    records one (warm starts), plus (fedplora) the global modules it folded into its base
    (:meth:`AggregationResult.folded_factors`). Returns ``{layer: error, ..., "overall": error}``; overall pools
    the squared norms of all layers. Computed in float64: by default from the factors (the difference of two
    low-rank products is low-rank: :func:`low_rank_norm`; a dense residual, FedEx-LoRA's, is added to the
    difference's one float64 product); ``dense=True`` is the plain reference, every client's ``(out, in)``
    product summed (``reference_delta``), which the tests hold the factored form to.
    """
    if result.contributions is not None:
        updates = result.contributions
    errors: dict[str, float] = {}
    err_sq_total = ref_sq_total = 0.0
    for name in result.layer_names:
        if dense:
            err_sq, ref_sq = _dense_error(result, updates, weights, name)
        else:
            A, B_err, B_ref = _error_factors(result, updates, weights, name)
            if result.residual is not None:
                err_sq = float((B_err @ A + result.residual[name].double()).square().sum())
                ref_sq = low_rank_norm(A, B_ref) ** 2
            else:
                err, ref = low_rank_norm(A, B_err, B_ref)
                err_sq, ref_sq = err ** 2, ref ** 2
        errors[name] = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
        err_sq_total += err_sq
        ref_sq_total += ref_sq
    errors["overall"] = math.sqrt(err_sq_total / ref_sq_total) if ref_sq_total > 0 else math.sqrt(err_sq_total)
    return errors


def _dense_error(result: AggregationResult, updates: Sequence[ClientUpdate], weights: Sequence[float],
                 layer: str) -> tuple[float, float]:
    """``(‖Δ_method − reference‖², ‖reference‖²)`` from dense float64 ``(out, in)`` matrices."""
    reference = reference_delta(updates, weights, layer)
    folded = result.folded_delta(layer)
    if folded is not None:
        reference = reference + folded
    A, B = result.global_factors[layer]
    delta = B.double() @ A.double()
    if result.residual is not None:
        delta = delta + result.residual[layer].double()
    return float((delta - reference).pow(2).sum()), float(reference.pow(2).sum())
