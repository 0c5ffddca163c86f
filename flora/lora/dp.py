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

Randomness (:class:`DPRandom`): who takes part and the noise must be unpredictable to everyone but the
(trusted) server. By default every round draws a fresh 256-bit key from the operating system's CSPRNG
(``secrets.token_bytes``) and expands it with ChaCha20 into the Poisson sample's uniforms and the noise's
Gaussians (Box-Muller in float64 on 53-bit uniforms); nothing public — the config, its ``seed`` — can
reproduce them. ``dp_noise_seed >= 0`` seeds both from that number instead: reproducible (tests), and
whoever knows the seed can subtract the noise, so the guarantee is void (``dp_guarantee_void`` in the
metrics, and a warning).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
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


KEY_BYTES = 32  # 256 bits from the OS per round and purpose (at least 128 are required)


class ChaChaStream:
    """A CSPRNG: the ChaCha20 keystream of a fresh 256-bit key from the operating system's secure source."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key = secrets.token_bytes(KEY_BYTES)
        self._cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()  # one key, one stream

    def uniform(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms in ``(0, 1]`` (53 random bits each; never 0, so ``log`` is finite)."""
        words = np.frombuffer(self._cipher.update(bytes(8 * count)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard Gaussians (float32) by Box-Muller in float64."""
        count = math.prod(shape)
        half = (count + 1) // 2
        u = self.uniform(2 * half)
        radius, angle = np.sqrt(-2.0 * np.log(u[:half])), 2.0 * np.pi * u[half:]
        values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return torch.from_numpy(values.astype(np.float32)).reshape(tuple(shape))


class SeededStream:
    """The same interface from a seeded torch generator: reproducible, so NOT private."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def uniform(self, count: int) -> np.ndarray:
        return torch.rand(count, generator=self._generator, dtype=torch.float64).numpy()

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self._generator)


@dataclass(frozen=True)
class DPRandom:
    """Where the DP mechanism's randomness comes from: ``noise_seed < 0`` the OS CSPRNG (fresh 256-bit keys
    every round; the only private choice), else that seed (reproducible; the guarantee is void)."""

    noise_seed: int = -1

    @property
    def guarantee_void(self) -> bool:
        return self.noise_seed >= 0

    @property
    def source(self) -> str:
        """The source in words (metrics and logs)."""
        if self.guarantee_void:
            return f"dp_noise_seed = {self.noise_seed} (reproducible: the privacy guarantee is void)"
        return f"OS CSPRNG (secrets.token_bytes, {8 * KEY_BYTES}-bit key per round) expanded by ChaCha20"

    def stream(self, round_: int, purpose: int) -> ChaChaStream | SeededStream:
        """A fresh stream for one round and purpose (0: participation, 1: noise)."""
        if self.guarantee_void:
            return SeededStream((self.noise_seed * 1_000_003 + round_) * 2 + purpose)
        return ChaChaStream()

    def participants(self, num_clients: int, rate: float, round_: int) -> list[int]:
        """Poisson sample of ``round_``: each client independently with probability ``rate``."""
        uniforms = self.stream(round_, 0).uniform(num_clients)
        return [k for k in range(num_clients) if uniforms[k] < rate]

    def noise(self, round_: int) -> ChaChaStream | SeededStream:
        """The round's noise source (draw every layer from it in one fixed order)."""
        return self.stream(round_, 1)


def clip_updates(updates: Sequence[Mapping[str, Factors]], clip_norm: float, norms: Sequence[float] | None = None
                 ) -> tuple[list[dict[str, Factors]], list[float]]:
    """Every update scaled (through ``B``) to whole-model norm at most ``clip_norm``; the factors used.
    ``norms``: the updates' norms when the caller has them already."""
    norms = norms if norms is not None else [None] * len(updates)
    pairs = [clip_update(update, clip_norm, norm) for update, norm in zip(updates, norms)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def noisy_layer_mean(clipped: Sequence[Mapping[str, Factors]], name: str, shape: tuple[int, int], spec: DPSpec,
                     noise_source: ChaChaStream | SeededStream) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(clean, noisy)`` mean ``Σ_k B_k A_k / (qN)`` and the same plus ``N(0, σ²C²) / (qN)``
    per entry, both dense ``(out, in)``. Call it for the layers in one fixed (sorted) order so a seeded
    source gives the same noise whatever order the clients' replies arrive in."""
    out_dim, in_dim = shape
    total = torch.zeros(out_dim, in_dim)
    for update in clipped:
        A, B = update[name]
        total += B @ A
    clean = total / spec.denominator
    noise = noise_source.normal((out_dim, in_dim)) * (spec.noise_multiplier * spec.clip_norm)
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
