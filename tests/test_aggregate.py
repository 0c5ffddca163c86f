"""Aggregation methods against plain reference math (DESIGN.md §1)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.lora.aggregate import aggregation_error, florana_mixing, rank_partition_weights, reference_delta
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


def assert_each_client_gets_its_best_rank_r(result, ranks, dense, name, dtype):
    """Client k holds the rank-r_k truncated SVD of ``dense`` (Eckart–Young: the best rank-r_k approximation),
    and its reported truncation error is the relative tail of the singular values."""
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    scale = max(float(dense.norm()), 1e-12)
    for k, r in enumerate(ranks):
        A_k, B_k = result.client_factors[k][name]
        assert A_k.shape[0] == r and B_k.shape[1] == r
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        tolerance = 1e-3 if dtype == torch.float32 else 1e-8
        assert float((B_k.double() @ A_k.double() - best).norm()) <= tolerance * scale
        assert result.truncation_error[k][name] == pytest.approx(math.sqrt(float(S[r:].pow(2).sum())) / scale,
                                                                 abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(federations())
def test_flexlora_is_exact_globally_and_eckart_young_per_client(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    result = aggregate("flexlora", updates, weights)
    assert aggregation_error(result, updates, weights)["overall"] <= TOL[dtype] * 10
    for name in layers:
        assert_each_client_gets_its_best_rank_r(result, ranks, reference_delta(updates, weights, name), name, dtype)


@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_registry_exactness_matches_the_measured_error(method):
    """What the registry claims (``exact``) is what the rule does, on random updates of equal ranks and, for
    methods that take them, mixed ranks (shared A where the method freezes it): exact ⇔
    ‖Δ − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖ ≤ 1e-10 in float64 on every rank mix the method accepts."""
    spec = METHODS[method]
    weights = [1.0, 2.0, 3.0]
    errors = []
    for ranks in [[3, 3, 3]] + ([] if spec.equal_ranks else [[3, 2, 1]]):
        updates = make_updates(ranks, LAYERS, shared_a=spec.freeze_a, seed=7)
        result = aggregate(method, updates, weights)
        for name, (o, i) in LAYERS.items():
            assert result.delta(name).shape == (o, i)
        errors.append(aggregation_error(result, updates, weights)["overall"])
    assert all(e <= 1e-10 for e in errors) == spec.exact, (method, errors)


def test_registry_is_consistent():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert (spec.aggregate is None) == spec.per_client_models  # only standalone skips aggregation
        if spec.truncates or spec.selects_modules:
            assert not spec.equal_ranks  # truncation and module selection exist to serve mixed ranks
        if spec.selects_modules:
            assert spec.shared_init and not spec.merges  # one global adapter, initialised once for all
    assert set(AGGREGATION_METHODS) == {"flora", "fedit", "zeropad", "flexlora", "ffa", "fedex", "flora-warm",
                                        "raflora", "florana", "fedplora"}


# --- raFLoRA -------------------------------------------------------------------------------------

def raflora_reference(updates, weights, layer):
    """raFLoRA by the rule as stated: partition the rank axis at the distinct ranks, average each partition over
    the clients whose rank covers it, weighted by their data among them, and sum (float64, plain loops)."""
    p = normalize_weights(weights)
    ranks = [u[layer][0].shape[0] for u in updates]
    bounds = [0] + sorted(set(ranks))
    total = 0
    for lo, hi in zip(bounds, bounds[1:]):
        covering = [k for k, r in enumerate(ranks) if r >= hi]
        mass = sum(p[k] for k in covering)
        for k in covering:
            A_k, B_k = updates[k][layer]
            total = total + (p[k] / mass) * (B_k[:, lo:hi].double() @ A_k[lo:hi].double())
    return total


@settings(max_examples=40, deadline=None)
@given(federations())
def test_raflora_equals_the_partition_reference_and_gives_each_client_its_best_rank_r(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    result = aggregate("raflora", updates, weights)
    for name in layers:
        expected = raflora_reference(updates, weights, name)
        scale = max(float(expected.norm()), 1e-12)
        assert float((result.delta(name).double() - expected).norm()) <= TOL[dtype] * 10 * scale
        assert_each_client_gets_its_best_rank_r(result, ranks, expected, name, dtype)


def test_raflora_with_equal_ranks_is_flexlora_and_weights_each_partition_to_one():
    updates = make_updates([3, 3, 3], LAYERS)
    for name in LAYERS:
        torch.testing.assert_close(aggregate("raflora", updates, [1, 2, 3]).delta(name),
                                   aggregate("flexlora", updates, [1, 2, 3]).delta(name))
    omegas = rank_partition_weights([4, 2, 1], [0.5, 0.3, 0.2])
    assert torch.allclose(omegas[0], torch.tensor([0.5, 0.5 / 0.8, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(omegas[1], torch.tensor([0.3, 0.3 / 0.8], dtype=torch.float64))
    assert torch.allclose(omegas[2], torch.tensor([0.2], dtype=torch.float64))
    # a partition whose covering clients hold no data contributes nothing (no division by zero)
    assert rank_partition_weights([2, 1], [0.0, 1.0])[0].tolist() == [0.0, 0.0]


def test_raflora_keeps_the_global_update_where_flexlora_collapses_it_to_the_smallest_rank():
    """Clients that upload their top-r_k part of the global update unchanged (no training): raFLoRA returns the
    global update exactly; FlexLoRA scales its i-th singular value by Σ_{k: r_k > i} p_k (rank collapse)."""
    gen = torch.Generator().manual_seed(3)
    ranks, p = [4, 2, 1, 1], [0.25, 0.25, 0.25, 0.25]
    G = torch.randn(12, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 10, generator=gen, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    updates = [{"q": (S[:r].sqrt()[:, None] * Vh[:r], U[:, :r] * S[:r].sqrt())} for r in ranks]
    torch.testing.assert_close(aggregate("raflora", updates, p).delta("q"), G)
    coverage = torch.tensor([1.0, 0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(aggregate("flexlora", updates, p).delta("q"), (U[:, :4] * (S[:4] * coverage)) @ Vh[:4])


# --- FLoRA-NA ------------------------------------------------------------------------------------

def _dense_objective(fs, w, p, q):
    A = sum(p_u * A_u.double() for (A_u, _), p_u in zip(fs, p))
    B = sum(q_u * B_u.double() for (_, B_u), q_u in zip(fs, q))
    T = sum(w_u * (B_u.double() @ A_u.double()) for (A_u, B_u), w_u in zip(fs, w))
    return (B @ A - T).pow(2).sum(), T


@settings(max_examples=30, deadline=None)
@given(federations(equal_ranks=True))
def test_florana_is_never_worse_than_fedit_and_reports_its_true_residual(fed):
    layers, ranks, weights, dtype, seed = fed
    updates = make_updates(ranks, layers, dtype, seed)
    w = normalize_weights(weights)
    result = aggregate("florana", updates, weights)
    fedit = aggregate("fedit", updates, weights)
    for name in layers:
        fs = [u[name] for u in updates]
        mixing = florana_mixing(fs, w)
        value, target = _dense_objective(fs, w, mixing.p, mixing.q)
        scale = max(float(target.norm()), 1e-12)
        assert math.sqrt(float(value)) / scale == pytest.approx(mixing.residual, rel=1e-4, abs=1e-6)
        assert mixing.residual <= mixing.fedit_residual * (1 + 1e-9) + 1e-12
        assert float(mixing.p.norm()) == pytest.approx(float(mixing.q.norm()), rel=1e-9)  # balanced
        B_hat_A_hat = result.delta(name).double()
        fedit_error = float((fedit.delta(name).double() - target).norm())
        assert float((B_hat_A_hat - target).norm()) <= fedit_error * (1 + 1e-4) + 1e-5 * scale
        assert float((B_hat_A_hat - target).norm()) / scale == pytest.approx(mixing.residual, rel=1e-3, abs=1e-5)


def test_florana_solves_a_case_fedit_cannot_and_stops_at_a_stationary_point():
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    scales = [1.0, -0.5, 2.0]
    fs = [(c * A, torch.randn(8, 3, generator=gen, dtype=torch.float64)) for c in scales]  # collinear A_u
    w = [0.2, 0.3, 0.5]
    mixing = florana_mixing(fs, w)
    value, target = _dense_objective(fs, w, mixing.p, mixing.q)
    assert mixing.fedit_residual > 0.1 and float(value.sqrt() / target.norm()) < 1e-12  # q_u ∝ w_u c_u: exact
    assert mixing.residual < 1e-7  # the Gram identity ‖X − T‖² = ‖X‖² − 2⟨X, T⟩ + ‖T‖² resolves ~1e-8
    # random factors: (p, q) is a stationary point of the dense objective
    fs = [(torch.randn(3, 9, generator=gen, dtype=torch.float64), torch.randn(8, 3, generator=gen, dtype=torch.float64))
          for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    mixing = florana_mixing(fs, w, max_iterations=2000, tol=1e-15)
    p, q = mixing.p.clone().requires_grad_(), mixing.q.clone().requires_grad_()
    value, target = _dense_objective(fs, w, p, q)
    value.backward()
    start_p = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    start_q = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    start_value, _ = _dense_objective(fs, w, start_p, start_q)
    start_value.backward()
    gradient = torch.cat([p.grad, q.grad]).norm()
    assert gradient <= 1e-4 * torch.cat([start_p.grad, start_q.grad]).norm()
    assert mixing.residual < mixing.fedit_residual - 0.05


# --- Fed-PLoRA -----------------------------------------------------------------------------------

def test_fedplora_averages_each_module_over_the_clients_that_trained_it():
    gen = torch.Generator().manual_seed(11)
    total, (o, i) = 5, (7, 6)
    previous = {"q": (torch.randn(total, i, generator=gen, dtype=torch.float64),
                      torch.randn(o, total, generator=gen, dtype=torch.float64))}
    modules = [[0, 3], [3], [1, 3, 0]]  # module 2 and 4: nobody; module 3: everyone
    updates = [{"q": (torch.randn(len(s), i, generator=gen, dtype=torch.float64),
                      torch.randn(o, len(s), generator=gen, dtype=torch.float64))} for s in modules]
    weights = [0.5, 0.3, 0.2]
    result = aggregate("fedplora", updates, weights, modules=modules, previous=previous)
    A, B = result.global_factors["q"]
    for j in range(total):
        trained = [(k, s.index(j)) for k, s in enumerate(modules) if j in s]
        if not trained:  # untrained modules keep their value
            torch.testing.assert_close(A[j], previous["q"][0][j])
            torch.testing.assert_close(B[:, j], previous["q"][1][:, j])
            continue
        mass = sum(weights[k] for k, _ in trained)
        torch.testing.assert_close(A[j], sum(weights[k] / mass * updates[k]["q"][0][pos] for k, pos in trained))
        torch.testing.assert_close(B[:, j], sum(weights[k] / mass * updates[k]["q"][1][:, pos] for k, pos in trained))
    # the error's reference: the average of the clients' whole models (previous modules + its trained ones)
    ideal = 0
    for k, s in enumerate(modules):
        A_k, B_k = previous["q"][0].clone(), previous["q"][1].clone()
        A_k[s], B_k[:, s] = updates[k]["q"]
        ideal = ideal + weights[k] * (B_k @ A_k)
    expected = float((B @ A - ideal).norm() / ideal.norm())
    assert aggregation_error(result, updates, weights)["overall"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="distinct indices"):
        aggregate("fedplora", updates, weights, modules=[[0, 0], [3], [1, 3, 0]], previous=previous)
    with pytest.raises(ValueError, match="distinct indices"):
        aggregate("fedplora", updates, weights, modules=[[0, 5], [3], [1, 3, 0]], previous=previous)


@pytest.mark.parametrize("modules", [[[0, 1, 2]] * 3, [[2, 0, 1], [0, 1, 2], [1, 2, 0]]], ids=["sorted", "permuted"])
def test_fedplora_with_equal_ranks_is_fedit(modules):
    """Every client trains all R modules: per-module averages are FedIT's averages (in any module order)."""
    updates = make_updates([3, 3, 3], LAYERS, seed=4)
    weights = [1.0, 2.0, 3.0]
    fedit = aggregate("fedit", updates, weights)
    uploaded = [{n: (A[s], B[:, s]) for n, (A, B) in u.items()} for u, s in zip(updates, modules)]  # row i = module s[i]
    result = aggregate("fedplora", uploaded, weights, modules=modules)
    for name in LAYERS:
        torch.testing.assert_close(result.global_factors[name][0], fedit.global_factors[name][0])
        torch.testing.assert_close(result.global_factors[name][1], fedit.global_factors[name][1])
    assert aggregation_error(result, uploaded, weights)["overall"] == pytest.approx(
        aggregation_error(fedit, updates, weights)["overall"], rel=1e-9)


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


# --- the factored aggregation error (no dense per-client products) ------------------------------

def test_low_rank_norm_resolves_a_nearly_cancelling_difference():
    """``B₁A₁ − B₂A₂`` where ``(A₂, B₂)`` are ``(A₁, B₁)`` rotated by an orthogonal ``Q`` plus ``ε C D``: the
    difference is ``−ε C D`` up to float64 rounding, so its norm is known without forming it; relative error
    1e-6 of that norm even at ε = 1e-7 and 1e-10 (where the Gram trace ``product_norm`` loses it)."""
    from flora.lora.aggregate import low_rank_norm

    gen = torch.Generator().manual_seed(3)
    out_dim, in_dim, r = 60, 45, 6
    A1 = torch.randn(r, in_dim, generator=gen, dtype=torch.float64)
    B1 = torch.randn(out_dim, r, generator=gen, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    C = torch.randn(out_dim, 2, generator=gen, dtype=torch.float64)
    D = torch.randn(2, in_dim, generator=gen, dtype=torch.float64)
    scale = float((B1 @ A1).norm() / (C @ D).norm())
    for eps in (1e-7, 1e-10):
        A = torch.cat([A1, Q.T @ A1, D])
        B = torch.cat([B1, -(B1 @ Q), -eps * scale * C], dim=1)
        expected = eps * scale * float((C @ D).norm())
        assert low_rank_norm(A, B) == pytest.approx(expected, rel=1e-6)
    assert low_rank_norm(A1, B1) == pytest.approx(float((B1 @ A1).norm()), rel=1e-12)
    A, B = (torch.randn(8, 5, generator=gen, dtype=torch.float64),  # rank 8 ≥ min(out, in): the dense branch
            torch.randn(7, 8, generator=gen, dtype=torch.float64))
    assert low_rank_norm(A, B) == pytest.approx(float((B @ A).norm()), rel=1e-12)


FACTORED_LAYERS = {"q": (40, 30), "down": (25, 60), "small": (6, 9)}  # small: rank ≥ min(out, in), dense branch


def _method_options(method, ranks, dtype, gen):
    spec = METHODS[method]
    if spec.warm_start:
        q = max(ranks)
        return {"start": {n: (torch.randn(q, i, generator=gen, dtype=dtype), torch.randn(o, q, generator=gen, dtype=dtype))
                          for n, (o, i) in FACTORED_LAYERS.items()}}
    if spec.selects_modules:
        total = max(ranks) + 1
        modules = [torch.randperm(total, generator=gen)[:r].tolist() for r in ranks]
        previous = {n: (torch.randn(total, i, generator=gen, dtype=dtype), torch.randn(o, total, generator=gen, dtype=dtype))
                    for n, (o, i) in FACTORED_LAYERS.items()}
        return {"modules": modules, "previous": previous}
    return {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_factored_aggregation_error_equals_the_dense_reference(method, dtype):
    """Every registered rule, equal and (where accepted) mixed ranks, fp32 and fp64 factors: the factored error
    equals the dense float64 reference per layer to 1e-6 relative, for exact rules (errors ~1e-8 in fp32,
    ~1e-16 in fp64: absolute 1e-13 floor) as for inexact ones, and for a result perturbed by 1e-7."""
    spec = METHODS[method]
    gen = torch.Generator().manual_seed(5)
    for ranks in [[4, 4, 4]] + ([] if spec.equal_ranks else [[5, 3, 1]]):
        updates = make_updates(ranks, FACTORED_LAYERS, dtype=dtype, shared_a=spec.freeze_a, seed=len(ranks) + sum(ranks))
        weights = [1.0, 2.0, 3.0]
        result = aggregate(method, updates, weights, **_method_options(method, ranks, dtype, gen))
        cases = [result]
        A, B = result.global_factors["q"]
        nudged = dict(result.global_factors)
        nudged["q"] = (A, B * (1 + 1e-7 * torch.randn(B.shape, generator=gen, dtype=B.dtype)))
        cases.append(dataclasses.replace(result, global_factors=nudged))
        for case in cases:
            fast = aggregation_error(case, updates, weights)
            dense = aggregation_error(case, updates, weights, dense=True)
            assert fast.keys() == dense.keys()
            for name in dense:
                assert fast[name] == pytest.approx(dense[name], rel=1e-6, abs=1e-13), (method, ranks, name)
        assert dense["q"] > 1e-8  # the nudged case (last): measured, not rounded away
