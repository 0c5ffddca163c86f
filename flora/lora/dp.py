"""Client-level differential privacy for FLoRA's aggregate (DP-FedAvg, McMahan et al. 2018).

Every round, with clip norm ``C``, noise multiplier ``σ``, ``N`` clients each sampled independently
with probability ``q`` (Poisson sampling, seeded per round), and ``S`` the sampled set:

    ΔW_k  = B_k A_k  clipped so that  sqrt(Σ_layers ‖ΔW_k‖_F²) ≤ C       (whole-model L2 clip)
    ΔW    = ( Σ_{k∈S} ΔW_k + N(0, σ² C² I) ) / (q N)                       (fixed denominator)

Adding or removing one client changes the noiseless sum by at most ``C`` in L2, so each round is a
Poisson-subsampled Gaussian mechanism with noise multiplier ``σ``; the server's broadcast is then
post-processing, so truncating the noisy ``ΔW`` to a low rank (the smallest exact *form* of what is
sent) costs no privacy. Rounds compose; :func:`privacy_spent` asks Google's ``dp-accounting`` RDP
accountant for ``ε`` at ``δ`` — no hand-written formulas.

Client weights are uniform (``1/(qN)``): data-size weights ``n_k/Σn`` would themselves depend on
private data and change the sensitivity.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flora.lora.factors import Factors
from flora.lora.robust import clip_update


@dataclass(frozen=True)
class DPSpec:
    noise_multiplier: float  # σ: noise std in units of the clip norm
    clip_norm: float  # C: bound on each client's whole-model ‖ΔW_k‖
    sample_rate: float  # q: each client's probability of taking part in a round
    num_clients: int  # N

    @property
    def denominator(self) -> float:
        """Expected number of participants ``q N`` (fixed, so it leaks nothing about who took part)."""
        return self.sample_rate * self.num_clients

    @property
    def noise_std(self) -> float:
        """Per-entry std of the noise in the averaged update: ``σ C / (q N)``."""
        return self.noise_multiplier * self.clip_norm / self.denominator


def poisson_sample(num_clients: int, rate: float, round_: int, seed: int) -> list[int]:
    """Clients taking part in ``round_``: each independently with probability ``rate`` (seeded)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_ + 7)
    return torch.nonzero(torch.rand(num_clients, generator=generator) < rate).flatten().tolist()


def noise_generator(noise_seed: int, round_: int) -> torch.Generator:
    """The round's noise source: from the OS's secure random source when ``noise_seed < 0`` (the only
    private choice: whoever knows the seed can subtract the noise), else seeded (tests, reproduction)."""
    seed = secrets.randbits(63) if noise_seed < 0 else noise_seed * 1_000_003 + round_
    return torch.Generator().manual_seed(seed)


def clip_updates(updates: Sequence[Mapping[str, Factors]], clip_norm: float, norms: Sequence[float] | None = None
                 ) -> tuple[list[dict[str, Factors]], list[float]]:
    """Every update scaled (through ``B``) to whole-model norm at most ``clip_norm``; the factors used.
    ``norms``: the updates' norms when the caller has them already."""
    norms = norms if norms is not None else [None] * len(updates)
    pairs = [clip_update(update, clip_norm, norm) for update, norm in zip(updates, norms)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def noisy_layer_mean(clipped: Sequence[Mapping[str, Factors]], name: str, shape: tuple[int, int], spec: DPSpec,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(clean, noisy)`` mean ``Σ_k B_k A_k / (qN)`` and the same plus ``N(0, σ²C²) / (qN)``
    per entry, both dense ``(out, in)``. Call it for the layers in one fixed (sorted) order so a seeded
    generator gives the same noise whatever order the clients' replies arrive in."""
    out_dim, in_dim = shape
    total = torch.zeros(out_dim, in_dim)
    for update in clipped:
        A, B = update[name]
        total += B @ A
    clean = total / spec.denominator
    noise = torch.randn(out_dim, in_dim, generator=generator) * (spec.noise_multiplier * spec.clip_norm)
    return clean, clean + noise / spec.denominator


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[Factors | torch.Tensor, float]:
    """The cheaper of ``delta`` itself and its best rank-``rank`` factorisation ``(A (k, in), B (out, k))``
    (balanced ``U S^½``, ``S^½ Vᵀ``), with the relative Frobenius error of the truncation (0 for dense)."""
    out_dim, in_dim = delta.shape
    rank = min(rank, out_dim, in_dim)
    if rank * (out_dim + in_dim) >= out_dim * in_dim:
        return delta, 0.0
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    energy = float((S ** 2).sum())
    dropped = float((S[rank:] ** 2).sum())
    root = S[:rank].sqrt()
    A = (root[:, None] * Vh[:rank]).to(delta.dtype)
    B = (U[:, :rank] * root[None, :]).to(delta.dtype)
    return (A, B), math.sqrt(dropped / energy) if energy > 0 else 0.0


def privacy_spent(spec: DPSpec, rounds: int, delta: float) -> float:
    """``ε`` after ``rounds`` rounds at ``δ`` (RDP accountant of ``dp-accounting``, add/remove-one-client
    adjacency); ``inf`` when ``σ = 0``, 0 for no rounds."""
    if rounds <= 0:
        return 0.0
    if spec.noise_multiplier <= 0:
        return math.inf
    try:
        from dp_accounting import dp_event
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as exc:  # an optional extra
        raise RuntimeError("differential privacy accounting needs `dp-accounting`: pip install 'flora-llm[privacy]'"
                           ) from exc
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(spec.sample_rate, dp_event.GaussianDpEvent(spec.noise_multiplier))
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
