"""Exact re-factorisation, truncation and payload sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.lora.methods import aggregate
from flora.lora.factors import check_update, product_norm, InvalidUpdateError
from flora.lora.refactor import (
    dense_break_even_rank, dense_bytes, factors_bytes, refactorize, smallest_exact_form, truncation_rank,
)


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), inn=st.integers(1, 40), R=st.integers(1, 50),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_refactorization_equals_stacked_product(out, inn, R, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(R, inn, generator=gen, dtype=dtype)
    B = torch.randn(out, R, generator=gen, dtype=dtype)
    result = refactorize(A, B)
    k = min(out, inn, R)
    assert result.A.shape == (k, inn) and result.B.shape == (out, k)
    product = B.double() @ A.double()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = max(float(product.norm()), 1e-12)
    assert float((result.B.double() @ result.A.double() - product).norm()) <= tol * scale
    # balanced factors that reveal only the product: AAᵀ = BᵀB = diag(S), S = the product's singular values
    S = torch.linalg.svdvals(product)[:k]
    torch.testing.assert_close(result.singular_values.double()[:k], S, atol=tol * scale, rtol=tol)
    gram = torch.diag(result.singular_values.double()[:k])
    torch.testing.assert_close(result.A.double() @ result.A.double().T, gram, atol=10 * tol * scale, rtol=0)
    torch.testing.assert_close(result.B.double().T @ result.B.double(), gram, atol=10 * tol * scale, rtol=0)


def test_refactorized_factors_are_not_client_factors():
    """The broadcast reveals the sum only: no tensor equals or scales any client's factor."""
    gen = torch.Generator().manual_seed(3)
    updates = [{"w": (torch.randn(r, 30, generator=gen, dtype=torch.float64),
                      torch.randn(20, r, generator=gen, dtype=torch.float64))} for r in (4, 2, 3)]
    A_s, B_s = aggregate("flora", updates, [1, 1, 1]).global_factors["w"]
    private = refactorize(A_s, B_s)
    for client in updates:
        A_k, B_k = client["w"]
        for client_row in A_k:
            for row in private.A:  # |cos| == 1 would mean a scaled copy of a client's row
                cos = torch.dot(client_row, row) / (client_row.norm() * row.norm())
                assert abs(float(cos)) < 0.999
        for client_col in B_k.T:
            for col in private.B.T:
                cos = torch.dot(client_col, col) / (client_col.norm() * col.norm())
                assert abs(float(cos)) < 0.999


def test_truncation_by_rank_reports_eckart_young_error():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(10, 25, generator=gen, dtype=torch.float64)
    B = torch.randn(30, 10, generator=gen, dtype=torch.float64)
    product = B @ A
    result = refactorize(A, B, rank=4)
    assert result.rank == 4 and result.A.shape == (4, 25)
    S = torch.linalg.svdvals(product)
    expected = float(S[4:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
    measured = float((result.B @ result.A - product).norm() / product.norm())
    assert result.relative_error == pytest.approx(expected, rel=1e-9)
    assert measured == pytest.approx(expected, rel=1e-9)


def test_truncation_by_energy_and_numerical_rank():
    S = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # energies 16, 4, 1, 0 of 21
    assert truncation_rank(S, max_dropped_energy=0.0) == 3
    assert truncation_rank(S, max_dropped_energy=1 / 21 + 1e-12) == 2
    assert truncation_rank(S, max_dropped_energy=5 / 21 + 1e-12) == 1
    assert truncation_rank(S, rtol=1e-9) == 3
    assert truncation_rank(S) == 4
    with pytest.raises(ValueError, match="max_dropped_energy"):
        truncation_rank(S, max_dropped_energy=1.0)


def test_low_rank_product_has_numerical_rank_of_sum():
    gen = torch.Generator().manual_seed(1)
    # Two clients that learned the same rank-2 direction: stacked rank 4, product rank 2.
    A = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    B = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    A_s, B_s = torch.cat([A, A]), torch.cat([B, 2 * B], dim=1)
    result = refactorize(A_s, B_s, rtol=1e-10)
    assert result.rank == 2
    torch.testing.assert_close(result.B @ result.A, B_s @ A_s)


def test_payload_sizes_and_choice():
    assert factors_bytes(16, 576, 1536) == 16 * (576 + 1536) * 4
    assert dense_bytes(576, 576, itemsize=2) == 576 * 576 * 2
    # SmolLM2 q_proj 576x576: dense beats stacked once R > 288.
    assert dense_break_even_rank(576, 576) == 289
    assert smallest_exact_form(160, 160, 576, 576).form == "stacked"
    assert smallest_exact_form(400, 160, 576, 576).form == "refactorized"
    choice = smallest_exact_form(400, 400, 576, 576)
    assert choice.form == "dense" and choice.nbytes == 576 * 576 * 4
    for R in (288, 289):
        assert (factors_bytes(R, 576, 576) > dense_bytes(576, 576)) == (R >= dense_break_even_rank(576, 576))


def test_norm_bound_and_product_norm():
    gen = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 9, generator=gen), torch.randn(7, 3, generator=gen)
    assert product_norm(A, B) == pytest.approx(float((B @ A).norm()), rel=1e-5)
    check_update({"w": (A, B)}, max_norm=product_norm(A, B) * 1.01)
    with pytest.raises(InvalidUpdateError, match="exceeds the bound"):
        check_update({"w": (A, B)}, client="c7", max_norm=1e-3)
