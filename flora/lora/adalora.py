"""AdaLoRA state → plain LoRA factors, so the aggregation core stacks AdaLoRA clients unchanged.

peft's AdaLoRA layer holds ``P = lora_B (out, r)``, ``Λ = lora_E (r, 1)`` and ``Q = lora_A (r, in)``
and adds ``ΔW = P (Q ⊙ Λ) · scaling / (ranknum + 1e-5)``; the rank allocator prunes by setting
entries of ``Λ`` to zero. Dropping those entries and folding ``Λ`` and the scaling into ``B`` gives
``A = Q[kept] (r', in)``, ``B = P[:, kept] · diag(Λ[kept]) · scaling / (ranknum + 1e-5) (out, r')``
with ``B A = ΔW`` and ``r'`` the effective rank (non-pruned singular values). A layer pruned to
rank 0 is sent as a zero rank-1 pair, so every update keeps the layer set the server validates.

Why peft's start barely moves in a few steps (issue 20): Λ starts at 0, so the first-order change is
``Σ_i δΛ_i p_i q_iᵀ``. Adam moves each ``Λ_i`` by about ``lr`` per step, and with peft's ``P, Q ~ N(0,
0.02²)`` each ``p_i q_iᵀ`` has norm ``0.02² √(out · in)`` (0.23 for a 576 × 576 projection); LoRA's
``B`` moves all ``out × r`` entries by about ``lr`` each against rows of ``A`` of norm ~0.58, i.e.
``√out`` times more directions per rank. P and Q themselves get gradients only through Λ, so they
stay put until Λ has grown, which takes far more steps than a round's fresh adapter gets. The paper's
runs (thousands of steps) never see this. Two keys address it without changing the method:
``adalora_init = "orthonormal"`` starts P and Q as orthonormal singular vectors (the regulariser's
target, ``‖p_i q_iᵀ‖ = 1``; Λ = 0 keeps ΔW = 0), and ``adalora_lr_ratio`` gives P, Λ, Q their own
learning rate as a multiple of ``lr``.
"""

from __future__ import annotations

import torch

from flora.lora.factors import Factors


def adalora_to_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_E: torch.Tensor, scaling: float,
                       ranknum: float) -> Factors:
    """Plain factors of one AdaLoRA layer with pruned ranks removed (shapes in the module docstring)."""
    values = lora_E.detach().reshape(-1)
    kept = torch.nonzero(values != 0).reshape(-1)
    if kept.numel() == 0:  # the whole layer pruned: an exact zero update of rank 1 (ranks must be >= 1)
        return lora_A.detach().new_zeros(1, lora_A.shape[1]), lora_B.detach().new_zeros(lora_B.shape[0], 1)
    factor = scaling / (float(ranknum) + 1e-5)
    A = lora_A.detach()[kept].clone()
    B = (lora_B.detach()[:, kept] * values[kept] * factor).clone()
    return A, B


def adalora_layers(peft_model, adapter: str = "default"):
    """``(base-model layer name, peft AdaLoRA module)`` for every AdaLoRA layer of ``peft_model``."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_A:
            yield name.removeprefix("base_model.model."), module


def orthonormal_rows(rows: int, columns: int) -> torch.Tensor:
    """A random ``(rows, columns)`` matrix with orthonormal rows (``rows <= columns``; torch's global generator):
    the Q of a Gaussian matrix's QR decomposition, signs fixed so the draw is uniform (Haar)."""
    if rows > columns:
        raise ValueError(f"orthonormal_rows: {rows} rows cannot be orthonormal in {columns} dimensions")
    q, r = torch.linalg.qr(torch.randn(columns, rows))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def extract_adalora_factors(peft_model, adapter: str = "default") -> dict[str, Factors]:
    """``{base-model layer name: (A, B)}`` for every AdaLoRA layer of ``peft_model``."""
    factors = {}
    for layer, module in adalora_layers(peft_model, adapter):
        factors[layer] = adalora_to_factors(module.lora_A[adapter], module.lora_B[adapter], module.lora_E[adapter],
                                            module.scaling[adapter], float(module.ranknum[adapter]))
    return factors


def effective_ranks(factors: dict[str, Factors]) -> dict[str, int]:
    return {name: int(A.shape[0]) for name, (A, _) in factors.items()}
