"""Aggregation methods against plain reference math (DESIGN.md §1)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.lora.aggregate import aggregation_error, reference_delta
from flora.lora.factors import InvalidUpdateError, client_weights, lora_scaling, normalize_weights
from flora.lora.methods import AGGREGATION_METHODS, METHODS, aggregate

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def make_updates(ranks, layers, dtype=torch.float64, seed=0, shared_a=False):
    """Random client updates ``{name: (A (r, in), B (out, r))}`` for layers ``{name: (out, in)}``."""
    gen = torch.Generator().manual_seed(seed)
    shared = {name: torch.randn(max(ranks), i, generator=gen, dtype=dtype) for name, (o, i) in layers.items()}
    updates = []
    for r in ranks:
        update = {}
        for name, (o, i) in layers.items():
            A = shared[name][:r].clone() if shared_a else torch.randn(r, i, generator=gen, dtype=dtype)
            B = torch.randn(o, r, generator=gen, dtype=dtype)
            update[name] = (A, B)
        updates.append(update)
    return updates


LAYERS = {"q": (12, 10), "down": (7, 15)}


@st.composite
def federations(draw, equal_ranks=False):
    n_clients = draw(st.integers(1, 5))
    n_layers = draw(st.integers(1, 3))
    layers = {f"l{j}": (draw(st.integers(1, 20)), draw(st.integers(1, 20))) for j in range(n_layers)}
    max_rank = min(min(o, i) for o, i in layers.values())
    if equal_ranks:
        ranks = [draw(st.integers(1, max_rank))] * n_clients
    else:
        ranks = [draw(st.integers(1, max_rank)) for _ in range(n_clients)]
    weights = [draw(st.floats(0.01, 10.0)) for _ in range(n_clients)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    return layers, ranks, weights, dtype, seed


@settings(max_examples=60, deadline=None)
@given(federations())
def test_stacking_equals_reference_sum_any_ranks(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    result = aggregate("flora", updates, weights)
    p = normalize_weights(weights)
    for name, (o, i) in layers.items():
        A, B = result.global_factors[name]
        assert A.shape == (sum(ranks), i) and B.shape == (o, sum(ranks))
        expected = sum(p_k * (u[name][1].double() @ u[name][0].double()) for u, p_k in zip(updates, p))
        got = result.delta(name).double()
        assert (got - expected).norm() <= TOL[dtype] * max(expected.norm(), 1e-12)
    assert aggregation_error(result, updates, weights)["overall"] <= TOL[dtype]


@settings(max_examples=40, deadline=None)
@given(federations(equal_ranks=True))
def test_fedex_and_ffa_are_exact(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    assert aggregation_error(aggregate("fedex", updates, weights), updates, weights)["overall"] <= TOL[dtype]
    shared = make_updates(ranks, layers, dtype, seed, shared_a=True)
    assert aggregation_error(aggregate("ffa", shared, weights), shared, weights)["overall"] <= TOL[dtype]


def test_fedit_matches_reference_and_is_inexact():
    updates = make_updates([4, 4, 4], LAYERS)
    weights = [1.0, 2.0, 3.0]
    result = aggregate("fedit", updates, weights)
    p = normalize_weights(weights)
    for name in LAYERS:
        A_ref = sum(p_k * u[name][0] for u, p_k in zip(updates, p))
        B_ref = sum(p_k * u[name][1] for u, p_k in zip(updates, p))
        torch.testing.assert_close(result.delta(name), B_ref @ A_ref)
    error = aggregation_error(result, updates, weights)
    assert error["overall"] > 0.1, error  # cross terms B_j A_k, j != k, do not cancel


def test_zeropad_follows_hetlora_rule_and_is_inexact():
    ranks = [6, 3, 1]
    updates = make_updates(ranks, LAYERS)
    weights = [0.5, 0.3, 0.2]
    result = aggregate("zeropad", updates, weights)
    for name, (o, i) in LAYERS.items():
        # Reference by the documented rule, entry by entry: row j of Ā sums p_k A_k[j] over clients with r_k > j.
        A_ref = torch.zeros(max(ranks), i, dtype=torch.float64)
        B_ref = torch.zeros(o, max(ranks), dtype=torch.float64)
        for u, p_k, r in zip(updates, weights, ranks):
            for j in range(r):
                A_ref[j] += p_k * u[name][0][j]
                B_ref[:, j] += p_k * u[name][1][:, j]
        torch.testing.assert_close(result.global_factors[name][0], A_ref)
        torch.testing.assert_close(result.global_factors[name][1], B_ref)
        for k, r in enumerate(ranks):  # client k truncates to its own rank
            A_k, B_k = result.client_factors[k][name]
            torch.testing.assert_close(A_k, A_ref[:r])
            torch.testing.assert_close(B_k, B_ref[:, :r])
    assert aggregation_error(result, updates, weights)["overall"] > 0.1


@settings(max_examples=40, deadline=None)
@given(federations())
def test_flexlora_is_exact_globally_and_eckart_young_per_client(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    result = aggregate("flexlora", updates, weights)
    assert aggregation_error(result, updates, weights)["overall"] <= TOL[dtype] * 10
    for name in layers:
        dense = reference_delta(updates, weights, name)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        for k, r in enumerate(ranks):
            A_k, B_k = result.client_factors[k][name]
            assert A_k.shape[0] == r and B_k.shape[1] == r
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart–Young: the best rank-r approximation
            scale = max(float(dense.norm()), 1e-12)
            assert float((B_k.double() @ A_k.double() - best).norm()) <= 1e-3 * scale if dtype == torch.float32 \
                else float((B_k @ A_k - best).norm()) <= 1e-8 * scale
            expected_tail = math.sqrt(float(S[r:].pow(2).sum())) / scale
            assert result.truncation_error[k][name] == pytest.approx(expected_tail, abs=1e-3)


@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_registry_exactness_matches_the_measured_error(method):
    """What the registry claims (``exact``) is what the rule does, on random equal-rank updates (shared A
    where the method freezes it): exact ⇔ ‖Δ − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖ ≤ 1e-10 in float64."""
    spec = METHODS[method]
    updates = make_updates([3, 3, 3], LAYERS, shared_a=spec.freeze_a, seed=7)
    weights = [1.0, 2.0, 3.0]
    result = aggregate(method, updates, weights)
    for name, (o, i) in LAYERS.items():
        assert result.delta(name).shape == (o, i)
    error = aggregation_error(result, updates, weights)["overall"]
    assert (error <= 1e-10) == spec.exact, (method, error)


def test_registry_is_consistent():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert (spec.aggregate is None) == spec.per_client_models  # only standalone skips aggregation
        if spec.truncates:
            assert not spec.equal_ranks  # truncation exists to serve mixed ranks
    assert set(AGGREGATION_METHODS) == {"flora", "fedit", "zeropad", "flexlora", "ffa", "fedex", "flora-warm"}


def test_weights_by_examples_and_uniform():
    assert client_weights([10, 30]) == [0.25, 0.75]
    assert client_weights(scheme="uniform", num_clients=4) == [0.25] * 4
    assert client_weights(scheme="given", given=[2, 2, 4]) == [0.25, 0.25, 0.5]
    assert lora_scaling(32, 16) == 2.0 and lora_scaling(16, 4, rslora=True) == 8.0


# --- bad input -----------------------------------------------------------------------------------

def test_rejects_mismatched_layer_sets():
    updates = make_updates([2, 2], LAYERS)
    del updates[1]["q"]
    with pytest.raises(InvalidUpdateError, match=r"client 1.*missing \['q'\]"):
        aggregate("flora", updates, [1, 1])


def test_rejects_shapes_disagreeing_between_clients_and_with_layer():
    updates = make_updates([2, 2], LAYERS)
    A, B = updates[1]["q"]
    updates[1]["q"] = (A[:, :-1], B)
    with pytest.raises(InvalidUpdateError, match=r"client 1, layer 'q'.*does not fit layer \(out=12, in=10\)"):
        aggregate("flora", updates, [1, 1])
    good = make_updates([2], LAYERS)
    with pytest.raises(InvalidUpdateError, match="does not fit layer"):
        aggregate("flora", good, [1], layer_shapes={"q": (12, 11), "down": (7, 15)})


def test_rejects_inner_rank_mismatch_rank_zero_and_rank_over_layer():
    updates = make_updates([2], LAYERS)
    A, B = updates[0]["q"]
    with pytest.raises(InvalidUpdateError, match="rank mismatch"):
        aggregate("flora", [{**updates[0], "q": (A, B[:, :1])}], [1])
    with pytest.raises(InvalidUpdateError, match="rank 0"):
        aggregate("flora", [{**updates[0], "q": (A[:0], B[:, :0])}], [1])
    big = make_updates([11], {"q": (12, 10)})
    with pytest.raises(InvalidUpdateError, match=r"rank 11 exceeds.*min\(out, in\) = 10"):
        aggregate("flora", big, [1], layer_shapes={"q": (12, 10)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite(bad):
    updates = make_updates([2, 2], LAYERS)
    updates[0]["down"][1][0, 0] = bad
    with pytest.raises(InvalidUpdateError, match="client 0, layer 'down': non-finite"):
        aggregate("flora", updates, [1, 1])


@pytest.mark.parametrize("weights, message", [
    ([1.0], "expected one per client"),
    ([0.0, 0.0], "all zero"),
    ([1.0, -1.0], r"weights\[1\] = -1.0"),
    ([1.0, float("nan")], r"weights\[1\] = nan"),
])
def test_rejects_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate("flora", make_updates([2, 2], LAYERS), weights)


@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_equal_rank_methods_reject_mixed_ranks_others_accept_them(method):
    updates = make_updates([4, 2], LAYERS)
    if METHODS[method].equal_ranks:
        with pytest.raises(ValueError, match=rf"{method}: needs equal ranks.*\[4, 2\]"):
            aggregate(method, updates, [1, 1])
    else:
        result = aggregate(method, updates, [1, 1])
        assert set(result.global_factors) == set(LAYERS)


def test_ffa_rejects_clients_with_different_a():
    with pytest.raises(ValueError, match="same frozen A"):
        aggregate("ffa", make_updates([2, 2], LAYERS), [1, 1])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'fedavg'.*flora"):
        aggregate("fedavg", make_updates([2], LAYERS), [1])
