"""Adapter kinds a client can train, as objects: how peft builds one, what it adds to each step, and how
its state becomes plain factors ``{layer: (A (r, in), B (out, r))}`` with the scaling folded into ``B``.

``ADAPTER_KINDS[name]`` is what the config's ``adapters`` key selects; training code calls the hooks and
never tests the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from flora.lora.factors import Factors

ADAPTER = "default"  # peft's adapter name
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DROPOUT_SAMPLERS = ("sparse", "torch")  # see flora/lora/dropout.py
ADALORA_INITS = ("gaussian", "orthonormal")  # AdaLoRA's P and Q at the start (Λ = 0 either way: ΔW = 0)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    dropout_sampler: str = "sparse"  # "sparse": draw only the dropped positions on CPU (flora/lora/dropout.py) | "torch"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    freeze_a: bool = False  # FFA-LoRA: A stays at its (shared, seeded) initialisation
    adapter: str = "lora"  # a key of ``ADAPTER_KINDS``: "lora", or "adalora" (initial rank ``rank``)
    target_rank: int | None = None  # AdaLoRA's target average rank (default rank // 2)
    orth_reg_weight: float = 0.5  # AdaLoRA's orthogonality regulariser on P and Q
    warmup_fraction: float = 0.1  # AdaLoRA: share of the steps before pruning (tinit) ...
    final_fraction: float = 0.2  # ... and at the final budget (tfinal)
    init: str = "gaussian"  # AdaLoRA's P, Q at the start: peft's N(0, 0.02²), or "orthonormal" (ADALORA_INITS)
    lr_ratio: float = 1.0  # AdaLoRA: learning rate of its singular vectors P, Q as a multiple of the run's lr
    value_lr_ratio: float = 1.0  # AdaLoRA: learning rate of its singular values Λ as a multiple of the run's lr

    @property
    def kind(self) -> LoraKind | AdaLoraKind:
        return ADAPTER_KINDS[self.adapter]


def lora_layers(peft_model):
    """``(base-model layer name, peft LoRA module)`` for every adapted layer."""
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            yield name.removeprefix(prefix), module


@dataclass(frozen=True)
class LoraKind:
    """Plain LoRA: ``ΔW = scaling · B A``."""

    name: str = "lora"
    accepts_init_factors: bool = True  # can start from broadcast factors (FedIT-style methods)

    def peft_config(self, lora: LoraSpec, total_steps: int):
        from peft import LoraConfig
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.targets), use_rslora=lora.rslora, bias="none")

    def initialise(self, peft_model, lora: LoraSpec) -> None:
        return None

    def param_groups(self, peft_model, lora: LoraSpec, lr: float) -> list[dict]:
        return [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": lr}]

    def regulariser(self, peft_model, lora: LoraSpec) -> torch.Tensor | None:
        return None

    def after_step(self, peft_model, step: int) -> None:
        return None

    def extract(self, peft_model) -> dict[str, Factors]:
        """``{layer: (A (r, in), scaling · B (out, r))}`` detached copies of the trained adapter."""
        factors = {}
        for name, module in lora_layers(peft_model):
            A = module.lora_A[ADAPTER].weight.detach().clone()
            B = module.lora_B[ADAPTER].weight.detach().clone() * module.scaling[ADAPTER]
            factors[name] = (A, B)
        return factors


@dataclass(frozen=True)
class AdaLoraKind:
    """peft's AdaLoRA: initial rank ``lora.rank``, pruned towards ``lora.target_rank`` on a budget schedule
    over the round's optimizer steps; always fresh (its rank changes within a round)."""

    name: str = "adalora"
    accepts_init_factors: bool = False

    def peft_config(self, lora: LoraSpec, total_steps: int):
        from peft import AdaLoraConfig
        return AdaLoraConfig(init_r=lora.rank, target_r=lora.target_rank or max(1, lora.rank // 2),
                             lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                             total_step=total_steps, tinit=int(total_steps * lora.warmup_fraction),
                             tfinal=int(total_steps * lora.final_fraction), deltaT=1,
                             orth_reg_weight=lora.orth_reg_weight)

    def initialise(self, peft_model, lora: LoraSpec) -> None:
        """``orthonormal``: P's columns and Q's rows start as random orthonormal vectors (the SVD form the
        orthogonality regulariser pulls towards, so it starts at its minimum); Λ stays 0, so ΔW = 0 as in the
        paper. ``gaussian`` keeps peft's N(0, 0.02²). Draws from torch's global generator (seeded by the caller)."""
        if lora.init == "gaussian":
            return
        from flora.lora.adalora import adalora_layers, orthonormal_rows
        with torch.no_grad():
            for _, module in adalora_layers(peft_model, ADAPTER):
                Q, P = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
                Q.copy_(orthonormal_rows(Q.shape[0], Q.shape[1]))
                P.copy_(orthonormal_rows(P.shape[1], P.shape[0]).T)

    def param_groups(self, peft_model, lora: LoraSpec, lr: float) -> list[dict]:
        """AdaLoRA's own learning rates: the singular vectors P, Q at ``lr × lora.lr_ratio``, the singular values Λ
        (``lora_E``) at ``lr × lora.value_lr_ratio``."""
        params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in params if "lora_E" not in n], "lr": lr * lora.lr_ratio},
                {"params": [p for n, p in params if "lora_E" in n], "lr": lr * lora.value_lr_ratio}]

    def regulariser(self, peft_model, lora: LoraSpec) -> torch.Tensor | None:
        """AdaLoRA's orthogonality term, as peft adds it in ``AdaLoraModel.forward`` (our loss does not go
        through that forward): ``orth_reg_weight ×`` the mean over P and Q of ``‖MᵀM − I‖_F``."""
        if not lora.orth_reg_weight:
            return None
        terms = []
        for name, param in peft_model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and param.requires_grad:
                para_cov = param @ param.T if "lora_A" in name else param.T @ param
                identity = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
                terms.append(torch.norm(para_cov - identity, p="fro"))
        return lora.orth_reg_weight * (torch.stack(terms).mean() if terms else torch.zeros(()))

    def after_step(self, peft_model, step: int) -> None:
        """Sensitivity from this step's gradients, then prune to the step's budget."""
        peft_model.base_model.update_and_allocate(step)

    def extract(self, peft_model) -> dict[str, Factors]:
        from flora.lora.adalora import extract_adalora_factors
        return extract_adalora_factors(peft_model, ADAPTER)


ADAPTER_KINDS: Mapping[str, LoraKind | AdaLoraKind] = MappingProxyType({"lora": LoraKind(), "adalora": AdaLoraKind()})
