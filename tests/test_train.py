"""Local training, adapter extraction and merging on a tiny random Llama; one slow real-model test."""

from __future__ import annotations

import json

import pytest
import torch

from flora.data.tokenize import encode_all
from flora.models.loader import ModelLoadError, check_target_modules, load_model, resolve_model_dir
from flora.modeling import evaluate_loss, layer_shapes, merge_update
from flora.train import LoraSpec, TrainSpec, attach_adapter, detach_adapter, extract_factors, train_client

LORA = LoraSpec(rank=4, alpha=8, dropout=0.0)
TRAIN = TrainSpec(steps=6, batch_size=4, micro_batch_size=2, lr=5e-3, seed=1)


@pytest.fixture
def examples(tiny_tokenizer, records):
    return encode_all(tiny_tokenizer, records, cutoff=64)[0]


def test_training_returns_folded_factors_and_leaves_base_unchanged(tiny_model, tiny_tokenizer, examples):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = train_client(tiny_model, tiny_tokenizer, examples, LORA, TRAIN)
    after = tiny_model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    shapes = layer_shapes(tiny_model, LORA.targets)
    assert set(result.factors) == set(shapes) and len(shapes) == 2 * 7
    for name, (A, B) in result.factors.items():
        assert A.shape == (4, shapes[name][1]) and B.shape == (shapes[name][0], 4)
    assert result.num_examples == len(examples) and result.steps == 6 and result.tokens > 0


def test_training_lowers_loss_and_merge_applies_the_adapter(tiny_model, tiny_tokenizer, examples):
    base_loss = evaluate_loss(tiny_model, tiny_tokenizer, examples)
    result = train_client(tiny_model, tiny_tokenizer, examples, LORA, TrainSpec(steps=30, batch_size=8, lr=1e-2))
    # The merged model equals the peft model with the trained adapter: same loss.
    merge_update(tiny_model, {n: B @ A for n, (A, B) in result.factors.items()})
    merged_loss = evaluate_loss(tiny_model, tiny_tokenizer, examples)
    assert merged_loss < base_loss - 0.3, (base_loss, merged_loss)
    with_adapter = attach_adapter(tiny_model, LORA, init_seed=0, init_factors={
        n: (A, torch.zeros_like(B)) for n, (A, B) in result.factors.items()})
    assert evaluate_loss(with_adapter, tiny_tokenizer, examples) == pytest.approx(merged_loss, rel=1e-5)
    detach_adapter(with_adapter)


def test_init_factors_roundtrip_and_peft_equivalence(tiny_model, tiny_tokenizer, examples):
    result = train_client(tiny_model, tiny_tokenizer, examples, LORA, TRAIN)
    peft_model = attach_adapter(tiny_model, LORA, init_seed=5, init_factors=result.factors)
    loaded = extract_factors(peft_model)
    for name, (A, B) in result.factors.items():
        torch.testing.assert_close(loaded[name][0], A)
        torch.testing.assert_close(loaded[name][1], B)
    peft_loss = evaluate_loss(peft_model, tiny_tokenizer, examples)
    detach_adapter(peft_model)
    merge_update(tiny_model, {n: B @ A for n, (A, B) in result.factors.items()})
    assert evaluate_loss(tiny_model, tiny_tokenizer, examples) == pytest.approx(peft_loss, rel=1e-5)


def test_training_is_deterministic(tiny_tokenizer, examples):
    from conftest import make_tiny_llama
    runs = [train_client(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, examples,
                         LoraSpec(rank=4, alpha=8, dropout=0.1), TRAIN) for _ in range(2)]
    assert runs[0].losses == runs[1].losses
    for name in runs[0].factors:
        assert torch.equal(runs[0].factors[name][1], runs[1].factors[name][1])


def test_ffa_freezes_a(tiny_model, tiny_tokenizer, examples):
    spec = LoraSpec(rank=4, alpha=8, dropout=0.0, freeze_a=True)
    a = train_client(tiny_model, tiny_tokenizer, examples, spec, TRAIN, init_seed=42)
    b = train_client(tiny_model, tiny_tokenizer, examples[:8], spec, TrainSpec(steps=3, seed=9), init_seed=42)
    for name in a.factors:
        assert torch.equal(a.factors[name][0], b.factors[name][0])


def test_bad_targets_and_paths(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"match no linear layer.*available: \[.*q_proj"):
        check_target_modules(tiny_model, ["query_key_value"])
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        resolve_model_dir(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="must be a .gguf"):
        resolve_model_dir(tmp_path / "w.txt")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(tmp_path / "bad.gguf", cache_dir=tmp_path / "cache")


def test_hf_directory_roundtrip(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.tokenizer.chat_template
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])


@pytest.mark.slow
def test_real_model_and_data_train_and_loss_goes_down():
    from flora.data.sources import load_records

    records, report = load_records("embedded")
    assert report.rows > 17_000 and report.kept > 17_000 and report.truncated_tail_bytes > 0
    loaded = load_model("embedded")
    torch.set_num_threads(2)
    examples, _ = encode_all(loaded.tokenizer, records[:64], cutoff=96)
    train_set = examples[:8]
    before = evaluate_loss(loaded.model, loaded.tokenizer, train_set)
    result = train_client(loaded.model, loaded.tokenizer, train_set, LoraSpec(rank=8, alpha=16, dropout=0.0),
                          TrainSpec(steps=6, batch_size=8, micro_batch_size=8, lr=2e-3))
    merge_update(loaded.model, {n: B @ A for n, (A, B) in result.factors.items()})
    after = evaluate_loss(loaded.model, loaded.tokenizer, train_set)
    assert after < before - 0.1, (before, after)


def test_global_state_evaluate_restores_weights_when_merging_fails_half_way(tiny_model, tiny_tokenizer, examples):
    from flora.rounds import GlobalState

    state = GlobalState(tiny_model)
    shapes = layer_shapes(tiny_model, LORA.targets)
    names = sorted(shapes)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    good = {name: (torch.randn(2, shapes[name][1]), torch.randn(shapes[name][0], 2)) for name in names[:3]}
    bad = {names[3]: (torch.randn(2, shapes[names[3]][1] + 1), torch.randn(shapes[names[3]][0], 2))}
    with pytest.raises(ValueError, match="merge: update for"):
        state.evaluate(tiny_tokenizer, examples, {**good, **bad})  # the good layers are merged before the bad one
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert state.evaluate(tiny_tokenizer, examples, good) != evaluate_loss(tiny_model, tiny_tokenizer, examples)
    assert all(torch.equal(before[k], tiny_model.state_dict()[k]) for k in before)


def test_eval_mode_restores_the_previous_mode_on_error(tiny_model):
    from flora.modeling import eval_mode

    tiny_model.train()
    with pytest.raises(RuntimeError):
        with eval_mode(tiny_model):
            assert not tiny_model.training
            raise RuntimeError("boom")
    assert tiny_model.training
