"""Adapter math: aggregation methods, exact re-factorisation, payload sizes, update validation.

Pure functions over ``{layer: (A (r, in), B (out, r))}`` dicts; nothing here imports ``flwr``.
"""

from flora.lora.aggregate import AggregationResult, aggregation_error
from flora.lora.factors import InvalidUpdateError, check_update, client_weights, normalize_weights
from flora.lora.methods import METHODS, MethodSpec, aggregate, method_spec
from flora.lora.refactor import refactorize, smallest_exact_form

__all__ = [
    "METHODS", "MethodSpec", "method_spec", "AggregationResult", "aggregate", "aggregation_error", "InvalidUpdateError",
    "check_update", "client_weights", "normalize_weights", "refactorize", "smallest_exact_form",
]
