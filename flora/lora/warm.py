"""Warm start for exact aggregation (method ``flora-warm``): clients continue from the best rank-``r_k`` part
of the global update instead of a fresh adapter, and the aggregate stays exact.

FLoRA merges every round's aggregate into the base weights and restarts each client with a fresh LoRA
(``A`` random, ``B = 0``), which moves ``ΔW = B A`` slowly for many steps (DESIGN.md §1, "FLoRA's restart
cost"). Here the client's frozen base absorbs the part of the global model its warm adapter holds, so its
model is still exactly the global one. Per adapted layer (weights ``(out, in)``), round ``t + 1``:

============== ============================================================================================
``G``          what the warm factors are cut from (``warm_source``): ``accumulated`` = ``Σ_{s≤t} M_s``, the sum
               of every round's merge (= ``W_t − W_0``), or ``last`` = ``M_t``, the latest merge of the layer.
               Both are functions of the broadcast history every party holds: no extra download.
``G = U S Vᵀ`` its SVD in float64; components with ``s_i ≤ rtol · s_1`` are dropped (numerical rank ``q``).
client ``k``   rank ``r_k``, ``q_k = min(r_k, q)`` warm ranks; scaling folded into ``B`` as everywhere:
               ``lora`` split (default): ``A⁰_k = c · V_{q_k}ᵀ (q_k, in)``, ``B⁰_k = U_{q_k} S_{q_k} / c (out, q_k)``
               ``balanced`` split: ``A⁰_k = S^½ Vᵀ``, ``B⁰_k = U S^½`` (first ``q_k`` ranks);
               ``B⁰_k A⁰_k`` is the best rank-``q_k`` approximation of ``G`` (Eckart–Young) whatever the split.
               peft holds ``B⁰_k / s_k`` (``s_k = alpha_k / r_k``, un-folded by ``set_adapter_factors``), so
               ``s_k · B A`` starts at ``B⁰_k A⁰_k``; the factors do not depend on ``s_k``.
               The adapter's other ``r_k − q_k`` ranks start fresh (seeded ``A`` rows, ``B = 0``: product 0);
               in round 1 (``G`` = 0) every rank does, so round 1 is FLoRA's.
client base    ``W_t − B⁰_k A⁰_k`` while it trains (the exact saved weights are copied back afterwards; no
               ``+ B⁰A⁰``: rounding), so base + adapter = ``W_t``: every client starts at the global model.
reply          ``(A_k, B_k)`` as in FLoRA: ``r_k`` ranks, no extra upload.
contribution   ``Δ_k = B_k A_k − B⁰_k A⁰_k = [B_k, −B⁰_k] [A_k; A⁰_k]`` (rank ``≤ 2 r_k``); the server recomputes
               ``B⁰_k A⁰_k`` from its own copy of the history with the same code (``r_k`` = the reply's rank).
aggregate      ``Σ p_k Δ_k = Σ p_k B_k A_k − Σ_i w_i s_i u_i v_iᵀ`` with ``w_i = Σ_{k: q_k > i} p_k``: the clients'
               starts are nested prefixes of one factorisation, so they stack as one block:
               ``A = [A_1; …; A_K; A⁰]``, ``B = [p_1 B_1, …, p_K B_K, −B⁰ diag(w)]``, rank ``Σ r_k + max q_k``.
merge          ``W_{t+1} = W_t + Σ p_k Δ_k``, broadcast as FLoRA's (``private``: the exact re-factorisation of
               the sum, no client's factors; ``w`` is not sent).
============== ============================================================================================

Why ``c = 1/√3``: peft initialises ``A`` with ``kaiming_uniform_(a=√5)``, entries ``U(−1/√in, 1/√in)`` of
variance ``1/(3 in)``, so a fresh row has squared norm ``1/3`` in expectation. With the ``lora`` split the warm
``A⁰`` has a fresh adapter's scale and ``B⁰`` carries the magnitude: ``d(BA) = dB·A + B·dA`` then moves at least
as fast as a fresh adapter's (``dB·A``) plus ``B·dA``; balanced factors ``√s`` of a small update are small on
both sides and learn slowly (measured: DESIGN.md §1).

Optimiser state: AdamW starts fresh every round, as for every method here. The moments refer to last round's
factors, which the SVD re-split replaces by a different parametrisation of (a part of) the same product, and
clients keep no state between rounds (they may be sampled out, fail or restart).

LoRA dropout acts on the adapter's input, so while training the warm part ``B⁰A⁰`` sees dropped inputs and
the base's share does not: the training-mode function equals the global model in expectation only.
Evaluation, the reply and the merge are unaffected.

Both sides must compute bit-identical ``B⁰_k A⁰_k``: same tensors (the broadcast history), same code, float64
on the CPU. On machines whose LAPACK differs, a near tie ``s_{q_k} ≈ s_{q_k + 1}`` could pick different
subspaces; a deployment across such machines should send each client its start (not done here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from flora.lora.factors import Factors, Merge, dense
from flora.lora.refactor import product_svd

LORA_ROW_NORM = 1.0 / math.sqrt(3.0)  # row norm of peft's kaiming-uniform(a=√5) A initialisation
SOURCES = ("accumulated", "last")
SPLITS = ("lora", "balanced")
RTOL = 1e-6  # singular values at or below rtol · s_1 are noise of the float32 merges: those ranks start fresh

Part = Merge  # a merge part: factors (A, B) or a dense (out, in) update
Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (out, q), S (q,), Vh (q, in), float64


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, split: str = "lora") -> Factors:
    """``(A⁰ (q, in), B⁰ (out, q))`` with ``B⁰ A⁰ = U diag(S) Vh``, split between the factors as ``split`` says
    (module docstring)."""
    if split == "lora":
        return LORA_ROW_NORM * Vh, U * (S / LORA_ROW_NORM)
    if split == "balanced":
        root = S.sqrt()
        return root[:, None] * Vh, U * root
    raise ValueError(f"warm_split = {split!r}: expected one of {', '.join(SPLITS)}")


def _float64(part: Part) -> Part:
    if isinstance(part, torch.Tensor):
        return part.detach().to("cpu", torch.float64)
    return tuple(t.detach().to("cpu", torch.float64) for t in part)


def add_parts(total: Part, part: Part) -> Part:
    """``total + part``: concatenated factors while they are smaller than a dense matrix, else dense."""
    if isinstance(total, torch.Tensor) or isinstance(part, torch.Tensor):
        return dense(total) + dense(part)
    (A_t, B_t), (A_p, B_p) = total, part
    out_dim, in_dim = B_t.shape[0], A_t.shape[1]
    if (A_t.shape[0] + A_p.shape[0]) * (out_dim + in_dim) < out_dim * in_dim:
        return torch.cat([A_t, A_p]), torch.cat([B_t, B_p], dim=1)
    return dense(total) + dense(part)


def top_svd(part: Part, rank: int | None = None, rtol: float = RTOL) -> Svd:
    """The SVD of ``part`` (factors: through :func:`product_svd`, never forming the product), keeping at most
    ``rank`` components and none with ``s_i ≤ rtol · s_1``."""
    if isinstance(part, torch.Tensor):
        U, S, Vh = torch.linalg.svd(part, full_matrices=False)
    else:
        U, S, Vh = product_svd(*part)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    return U[:, :keep].contiguous(), S[:keep].contiguous(), Vh[:keep].contiguous()


class WarmSource:
    """``G`` per layer (module docstring), kept as the merges arrive, and its top singular triplets.

    Factors while a concatenation is smaller than the dense matrix, then a dense float64 sum. The SVD of a layer
    is computed on first use after a change and cached: one per round in every process, whatever the number of
    clients it trains.
    """

    def __init__(self, source: str = "accumulated", rtol: float = RTOL):
        if source not in SOURCES:
            raise ValueError(f"warm_source = {source!r}: expected one of {', '.join(SOURCES)}")
        self.source = source
        self.rtol = rtol
        self.parts: dict[str, Part] = {}
        self._svd: dict[str, tuple[int | None, Svd]] = {}  # layer -> (rank asked for, its SVD)

    def add(self, merge: Mapping[str, Part]) -> None:
        """Take in one round's merge ``{layer: (A, B) or dense}`` (a layer it leaves out keeps its ``G``)."""
        for name, part in merge.items():
            part = _float64(part)
            if self.source == "accumulated" and name in self.parts:
                part = add_parts(self.parts[name], part)
            self.parts[name] = part
            self._svd.pop(name, None)

    def svd(self, name: str, rank: int | None = None) -> Svd:
        """Top singular triplets of ``G`` for ``name`` (at most ``rank``; float64, CPU)."""
        cached = self._svd.get(name)
        if cached is not None and (cached[0] is None or (rank is not None and rank <= cached[0])):
            U, S, Vh = cached[1]
            return U[:, :rank], S[:rank], Vh[:rank]
        self._svd[name] = (rank, top_svd(self.parts[name], rank, self.rtol))
        return self._svd[name][1]

    def factors(self, rank: int, split: str = "lora", dtype: torch.dtype = torch.float32) -> dict[str, Factors]:
        """``{layer: (A⁰ (q, in), B⁰ (out, q))}`` of a rank-``rank`` client, ``q = min(rank, numerical rank of G)``
        (scaling folded into ``B⁰``). Layers without any merge yet, or with ``G`` = 0, are left out: the client
        starts them fresh. The factors of a smaller rank are the first ranks of a larger one's, bit for bit."""
        start = {}
        for name in self.parts:
            U, S, Vh = self.svd(name, rank)
            if S.numel():
                A, B = split_factors(U, S, Vh, split)
                start[name] = (A.to(dtype), B.to(dtype))
        return start
