"""LoRA dropout on the CPU at a fraction of the cost, with the same distribution.

peft drops the adapter's input with ``nn.Dropout``: one uniform draw per element (``bernoulli_``), a mask
tensor, and a multiply in both passes. At LoRA's small rates (0.05) that draw is ~8 % of a CPU training step of
the embedded model: 7 adapted layers × 30 blocks draw over every activation, forward only.

:class:`SparseDropout` draws only the dropped positions. In an iid Bernoulli(p) sequence the gaps between
successive successes are iid Geometric(p) (support 1, 2, …), so ``cumsum(gaps) - 1`` over enough gaps lists
exactly the positions a Bernoulli draw would drop: ~n·p draws instead of n. The kept elements are scaled by
``1 / (1 - p)``, as in ``nn.Dropout``; only the positions are saved for the backward pass. Same distribution,
different random stream from torch's dropout (so a run's losses differ from one with ``dropout_sampler =
"torch"`` by the noise of a different draw, not in expectation).

It is used where it is cheaper: CPU tensors, ``0 < p ≤ SPARSE_MAX_P``. Elsewhere (CUDA's fused dropout kernel,
large rates) it is ``nn.Dropout``.
"""

from __future__ import annotations

import math

import torch

SPARSE_MAX_P = 0.3  # above this, a draw per dropped element costs about what torch's per-element draw does


def drop_positions(n: int, p: float, generator: torch.Generator | None = None, chunk: int | None = None
                   ) -> torch.Tensor:
    """Sorted flat indices in ``[0, n)`` that iid Bernoulli(``p``) draws over ``n`` elements drop (int64).

    Gaps between drops are Geometric(``p``), drawn ``chunk`` at a time until they pass ``n``; by default
    enough to do so in one draw with overwhelming probability (mean + 6 σ)."""
    if not 0 < p < 1:
        raise ValueError(f"drop_positions: p = {p!r}, expected 0 < p < 1")
    if chunk is None:
        expected = n * p
        chunk = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    parts, end = [], -1
    while end < n - 1:
        # float64: a uniform draw of exactly 0 gives an infinite gap (kept as "past the end", not cast to int64)
        gaps = torch.empty(chunk, dtype=torch.float64).geometric_(p, generator=generator).clamp_(max=n + 1)
        positions = gaps.cumsum_(0).add_(end).to(torch.int64)
        end = int(positions[-1])
        parts.append(positions)
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, n))]


class _DropPositions(torch.autograd.Function):
    """``x · scale`` with the elements at flat ``positions`` (of the contiguous layout) set to 0; the same in
    the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        out = x.mul(scale).contiguous()
        out.view(-1).index_fill_(0, positions, 0)
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad_in = grad.mul(ctx.scale).contiguous()
        grad_in.view(-1).index_fill_(0, positions, 0)
        return grad_in, None, None


class SparseDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU draw lists the dropped positions (module docstring); identity in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p > SPARSE_MAX_P or self.inplace:
            return super().forward(x)
        return _DropPositions.apply(x, drop_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))


def use_sparse_dropout(model: torch.nn.Module) -> int:
    """Swap every adapter dropout (peft's ``lora_dropout`` entries that are ``nn.Dropout``) for a
    :class:`SparseDropout` of the same rate; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                replacement = SparseDropout(dropout.p, inplace=dropout.inplace)
                replacement.train(dropout.training)
                dropouts[name] = replacement
                swapped += 1
    return swapped
