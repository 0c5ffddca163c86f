"""Robust aggregation helpers: update norms, norm clipping, and outlier rejection by median/MAD.

An update is the dict ``{layer: (A (r, in), B (out, r))}``; its norm is ``sqrt(Σ_layers ‖B A‖_F²)``,
the Frobenius norm of the whole model delta it proposes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median

from flora.lora.factors import Factors, product_norm

MAD_TO_SIGMA = 0.6745  # Φ⁻¹(0.75): makes the MAD a consistent estimate of σ for normal data


def update_norm(update: Mapping[str, Factors]) -> float:
    return math.sqrt(sum(product_norm(A, B) ** 2 for A, B in update.values()))


def clip_update(update: Mapping[str, Factors], max_norm: float, norm: float | None = None
                ) -> tuple[dict[str, Factors], float]:
    """Scale ``update`` (through ``B``) so that its norm (``norm`` if already known) is at most ``max_norm``;
    returns the factor used."""
    norm = update_norm(update) if norm is None else norm
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return dict(update), 1.0
    return {name: (A, B * factor) for name, (A, B) in update.items()}, factor


def mad_outliers(norms: Sequence[float], threshold: float) -> list[float | None]:
    """Modified z-score ``0.6745 (x − median) / MAD`` of every norm above the median whose score exceeds
    ``threshold`` (None for the others). Needs at least 3 norms; a zero MAD flags any norm more than
    1e-6 relative above the median."""
    if len(norms) < 3:
        return [None] * len(norms)
    centre = median(norms)
    mad = median(abs(x - centre) for x in norms)
    scores: list[float | None] = []
    for x in norms:
        if x <= centre:
            scores.append(None)
            continue
        z = MAD_TO_SIGMA * (x - centre) / mad if mad > 0 else (math.inf if x > centre * (1 + 1e-6) else 0.0)
        scores.append(z if z > threshold else None)
    return scores
