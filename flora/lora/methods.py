"""The method registry: everything that differs between federated LoRA methods, in one place.

Config validation, the client, the server, ``flora compare`` and the docs read a method's
:class:`MethodSpec` and never test its name. Adding a method is one entry here (plus its pure
aggregation function in ``aggregate.py``, and tests).

How a client starts a round (``start``):

========== =======================================================================================
fresh      a new adapter of the client's rank (A seeded, B = 0); the server merges the aggregate into
           the base weights (``flora``, ``centralized``)
global     the global adapter the server broadcast (``fedit``, ``ffa``, ``fedex``)
truncated  the first ``r_k`` ranks of the global adapter (``zeropad``, ``flexlora``, ``raflora``)
modules    ``r_k`` rank-1 modules of the rank-``R`` global adapter, drawn per (seed, round, client), from
           their global values; the other modules are folded into the client's frozen base for the round
           (``fedplora``; ``R`` = the largest client rank)
own        its own adapter of the last round; nothing is aggregated (``standalone``)
warm       the best rank-``r_k`` part of the global update, which its base weights give up while it
           trains, so it starts exactly at the global model; the server merges the aggregate of
           ``B_k A_k − B⁰_k A⁰_k`` into the base weights (``flora-warm``; ``flora/lora/warm.py``)
========== =======================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from flora.lora import aggregate as rules
from flora.lora.aggregate import AggregationResult
from flora.lora.factors import ClientUpdate, check_updates, normalize_weights

STARTS = ("fresh", "global", "truncated", "modules", "own", "warm")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # what the server computes, one line (README table, ``--help``)
    aggregate: Callable[..., AggregationResult] | None  # pure rule of ``aggregate.py``; None: no aggregation
    start: str  # how a client starts each round (module docstring)
    exact: bool  # the global update equals Σ p_k B_k A_k
    equal_ranks: bool = False  # every client must train the same rank
    shared_init: bool = False  # round 1: every client's adapter starts from the same seeded initialisation
    freeze_a: bool = False  # clients train B only (A stays at its shared initialisation)
    pooled: bool = False  # a run mode: one client holding every client's training data (rank = max rank)
    private: bool = False  # client-level differential privacy is implemented for it

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"method {self.name!r}: start = {self.start!r}, expected one of {STARTS}")

    @property
    def merges(self) -> bool:
        """The aggregate is merged into the base weights (clients restart or warm-start) rather than kept as an
        adapter."""
        return self.start in ("fresh", "warm")

    @property
    def warm_start(self) -> bool:
        """Clients start from warm factors cut from the global update (``warm_source``, ``warm_split``), their
        base weights minus those factors' product; the server aggregates ``B_k A_k − B⁰_k A⁰_k``."""
        return self.start == "warm"

    @property
    def truncates(self) -> bool:
        """Client ``k`` continues from the first ``r_k`` ranks of the global adapter."""
        return self.start == "truncated"

    @property
    def selects_modules(self) -> bool:
        """Client ``k`` trains ``r_k`` drawn rank-1 modules of the global adapter, the rest folded into its base."""
        return self.start == "modules"

    @property
    def fresh_adapters(self) -> bool:
        """Every round starts a fresh adapter (so adapters that change their own rank, AdaLoRA, fit)."""
        return self.start == "fresh"

    @property
    def per_client_models(self) -> bool:
        """Each client keeps its own model; there is no global adapter (``standalone``)."""
        return self.start == "own"

    @property
    def run_mode(self) -> bool:
        """A reference run (``centralized``, ``standalone``) rather than an aggregation method."""
        return self.pooled or self.aggregate is None


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


register(MethodSpec("flora", "stack A rows and p_k B_k columns: B A = Σ p_k B_k A_k; merge, restart",
                    rules.aggregate_flora, start="fresh", exact=True, private=True))
register(MethodSpec("fedit", "average A, average B (cross terms: inexact)",
                    rules.aggregate_fedit, start="global", exact=False, equal_ranks=True, shared_init=True))
register(MethodSpec("zeropad", "pad to r_max, average; client k keeps its first r_k ranks",
                    rules.aggregate_zeropad, start="truncated", exact=False, shared_init=True))
register(MethodSpec("flexlora", "ΔW = Σ p_k B_k A_k; client k gets its rank-r_k SVD",
                    rules.aggregate_flexlora, start="truncated", exact=True, shared_init=True))
register(MethodSpec("ffa", "A frozen and shared, average B",
                    rules.aggregate_ffa, start="global", exact=True, equal_ranks=True, shared_init=True,
                    freeze_a=True))
register(MethodSpec("fedex", "FedIT averages + residual Σ p_k B_k A_k − B̄ Ā merged into the base",
                    rules.aggregate_fedex, start="global", exact=True, equal_ranks=True, shared_init=True))
register(MethodSpec("flora-warm", "stack B_k A_k − B⁰_k A⁰_k: clients start from the global update's top-r_k SVD; "
                    "merge", rules.aggregate_flora_warm, start="warm", exact=True))
register(MethodSpec("raflora", "rank partitions averaged over the clients covering them; client k gets its "
                               "rank-r_k SVD (FlexLoRA without rank collapse)",
                    rules.aggregate_raflora, start="truncated", exact=False, shared_init=True))
register(MethodSpec("florana", "B̂ = Σ q_u B_u, Â = Σ p_u A_u with p, q minimising ‖B̂ Â − Σ p_k B_k A_k‖ "
                               "(alternating least squares)",
                    rules.aggregate_florana, start="global", exact=False, equal_ranks=True, shared_init=True))
register(MethodSpec("fedplora", "R rank-1 modules; client k trains r_k drawn ones (rest folded into its base); "
                                "each module averaged over the clients that trained it",
                    rules.aggregate_fedplora, start="modules", exact=False, shared_init=True))
register(MethodSpec("centralized", "one client with all training data, FLoRA rounds (upper reference)",
                    rules.aggregate_flora, start="fresh", exact=True, pooled=True))
register(MethodSpec("standalone", "no aggregation: each client trains alone (lower reference)",
                    None, start="own", exact=True))

METHODS: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)
AGGREGATION_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if not spec.run_mode)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; :class:`ValueError` naming the valid methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None


def aggregate(method: str, updates: Sequence[ClientUpdate], weights: Sequence[float],
              layer_shapes: Mapping[str, tuple[int, int]] | None = None, **options) -> AggregationResult:
    """Validate and aggregate client updates with ``method`` (one with an aggregation rule).

    ``updates[k] = {layer: (A_k (r_k, in), B_k (out, r_k))}`` with scaling folded into ``B_k``;
    ``weights`` are the ``p_k`` (non-negative, one per client; normalised to sum 1 here).
    ``layer_shapes`` (optional) gives each layer's ``(out, in)`` to check against.
    """
    spec = method_spec(method)
    if spec.aggregate is None:
        raise ValueError(f"method {method!r} does not aggregate; expected one of {', '.join(AGGREGATION_METHODS)}")
    check_updates(updates, layer_shapes)
    if spec.equal_ranks:
        _require_equal_ranks(method, updates)
    p = normalize_weights(weights, num_clients=len(updates))
    return spec.aggregate(updates, p, **options)


def _require_equal_ranks(method: str, updates: Sequence[ClientUpdate]) -> None:
    mixed = ", ".join(n for n, s in METHODS.items() if not s.equal_ranks and not s.run_mode)
    for name in updates[0]:
        ranks = [u[name][0].shape[0] for u in updates]
        if len(set(ranks)) > 1:
            raise ValueError(f"{method}: needs equal ranks on every client, but layer {name!r} has ranks {ranks}; "
                             f"use one of {mixed} for mixed ranks")
