"""The sparse LoRA dropout: the same iid Bernoulli distribution as torch's (checked by statistics against the
plain definition), the same forward/backward arithmetic, and swapped into the adapters train_client builds."""

from __future__ import annotations

import math

import pytest
import torch

from flora.data.tokenize import encode_all
from flora.lora.dropout import SparseDropout, drop_positions
from flora.train import LoraSpec, TrainSpec, attach_adapter, detach_adapter, train_client


def drop_matrix(n: int, p: float, draws: int, chunk: int | None = None) -> torch.Tensor:
    """(draws, n) booleans: True where a draw dropped the element."""
    dropped = torch.zeros(draws, n, dtype=torch.bool)
    for d in range(draws):
        positions = drop_positions(n, p, chunk=chunk)
        assert positions.dtype == torch.int64
        assert torch.all(positions[1:] > positions[:-1]) and (positions.numel() == 0 or 0 <= positions[0] <= positions[-1] < n)
        dropped[d, positions] = True
    return dropped


@pytest.mark.parametrize("p, chunk", [(0.3, None), (0.05, None), (0.3, 3)])
def test_drop_positions_are_iid_bernoulli(p, chunk):
    """Every position (the first and last included) is dropped with probability p, neighbours independently,
    and the count per draw has the binomial variance; ``chunk = 3`` forces the refill path (many small draws)."""
    torch.manual_seed(0)
    n, draws = 40, 4000
    dropped = drop_matrix(n, p, draws, chunk).double()
    sd = math.sqrt(p * (1 - p) / draws)
    rates = dropped.mean(0)
    assert torch.all((rates - p).abs() < 4.5 * sd), rates  # off by one position would leave 0 or n-1 at rate 0
    pairs = (dropped[:, :-1] * dropped[:, 1:]).mean(0)  # P(i and i+1 dropped) = p²
    pair_sd = math.sqrt(p * p * (1 - p * p) / draws)
    assert torch.all((pairs - p * p).abs() < 4.5 * pair_sd), pairs
    counts = dropped.sum(1)
    assert counts.var().item() == pytest.approx(n * p * (1 - p), rel=0.12)


def test_drop_positions_edges():
    assert drop_positions(0, 0.1).numel() == 0
    generator = torch.Generator().manual_seed(3)
    again = torch.Generator().manual_seed(3)
    assert torch.equal(drop_positions(1000, 0.1, generator), drop_positions(1000, 0.1, again))
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="expected 0 < p < 1"):
            drop_positions(10, p)


def test_sparse_dropout_forward_backward_match_a_mask():
    """Kept elements are x / (1 - p), dropped ones 0, and the gradient is the same mask times 1 / (1 - p); on a
    non-contiguous input too."""
    torch.manual_seed(1)
    p = 0.2
    x = (torch.rand(64, 48) + 0.5).T.requires_grad_(True)  # strictly positive, transposed (non-contiguous)
    weights = torch.randn(48, 64)
    dropout = SparseDropout(p).train()
    y = dropout(x)
    kept = y != 0
    assert 0 < (~kept).double().mean().item() < 2 * p
    torch.testing.assert_close(y, torch.where(kept, x.detach() / (1 - p), torch.zeros(())))
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, weights / (1 - p), torch.zeros(())))
    # mean over draws is x (unbiased, as nn.Dropout)
    mean = torch.stack([dropout(x.detach()) for _ in range(400)]).mean(0)
    assert (mean - x.detach()).abs().max() < 0.25


def test_sparse_dropout_is_identity_in_eval_and_torch_above_its_range():
    x = torch.randn(8, 8)
    assert SparseDropout(0.1).eval()(x) is x
    torch.manual_seed(4)
    ours = SparseDropout(0.5).train()(x)
    torch.manual_seed(4)
    torch.testing.assert_close(ours, torch.nn.functional.dropout(x, 0.5, training=True))


def test_adapters_get_the_chosen_sampler_and_training_is_reproducible(tiny_model, tiny_tokenizer, records):
    examples = encode_all(tiny_tokenizer, records, cutoff=64)[0]
    for sampler, kind in (("sparse", SparseDropout), ("torch", torch.nn.Dropout)):
        peft_model = attach_adapter(tiny_model, LoraSpec(rank=4, alpha=8, dropout=0.1, dropout_sampler=sampler), 0)
        dropouts = [d for m in peft_model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                    for d in m.lora_dropout.values()]
        assert len(dropouts) == 14 and all(type(d) is kind for d in dropouts)
        detach_adapter(peft_model)
    train = TrainSpec(steps=3, batch_size=4, micro_batch_size=2, lr=5e-3, seed=1)
    runs = {s: [train_client(tiny_model, tiny_tokenizer, examples, LoraSpec(rank=4, alpha=8, dropout=0.1,
                                                                              dropout_sampler=s), train).losses
                for _ in range(2)] for s in ("sparse", "torch")}
    assert runs["sparse"][0] == runs["sparse"][1] and runs["torch"][0] == runs["torch"][1]
    assert runs["sparse"][0] != runs["torch"][0]  # a different random stream, not torch's dropout in disguise
    assert not any(isinstance(m, SparseDropout) for m in tiny_model.modules())  # nothing left on the base
