"""AdaLoRA → plain factors: the converted (A, B) reproduce peft's own delta, pruned ranks removed."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import AdaLoraLayer

from flora.lora.adalora import effective_ranks, extract_adalora_factors
from flora.lora.methods import aggregate


def test_converted_factors_reproduce_peft_delta_after_pruning(tiny_model):
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           total_step=10, tinit=1, tfinal=1)
    model = get_peft_model(tiny_model, config)
    generator = torch.Generator().manual_seed(0)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)]
    with torch.no_grad():
        for i, (_, module) in enumerate(layers):
            for param in (module.lora_A["default"], module.lora_B["default"], module.lora_E["default"]):
                param.copy_(torch.randn(param.shape, generator=generator))
            module.lora_E["default"][: i % 4] = 0.0  # the rank allocator's pruning: zeroed singular values
    factors = extract_adalora_factors(model)
    assert len(factors) == len(layers)
    for i, (name, module) in enumerate(layers):
        layer = name.removeprefix("base_model.model.")
        A, B = factors[layer]
        expected = module.get_delta_weight("default").detach()
        assert A.shape[0] == 6 - i % 4  # effective rank: non-pruned entries only
        assert float((B @ A - expected).norm()) <= 1e-5 * float(expected.norm())
    assert sorted(set(effective_ranks(factors).values())) == sorted({6 - i % 4 for i in range(len(layers))})
    # two AdaLoRA clients with different effective ranks stack exactly
    other = {k: (A[:1], B[:, :1]) for k, (A, B) in factors.items()}
    result = aggregate("flora", [factors, other], [0.5, 0.5])
    for layer, (A, B) in factors.items():
        reference = 0.5 * B @ A + 0.5 * other[layer][1] @ other[layer][0]
        assert float((result.delta(layer) - reference).norm()) <= 1e-5 * float(reference.norm())


def test_adalora_client_trains_prunes_and_leaves_base_untouched(tiny_model, tiny_tokenizer, records):
    from flora.data.tokenize import encode_all
    from flora.train import LoraSpec, TrainSpec, train_client

    examples, _ = encode_all(tiny_tokenizer, records, 64)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    spec = LoraSpec(rank=6, alpha=12, dropout=0.0, targets=("q_proj", "v_proj"), adapter="adalora", target_rank=2)
    result = train_client(tiny_model, tiny_tokenizer, examples, spec, TrainSpec(steps=10, batch_size=4,
                                                                                  micro_batch_size=2, lr=1e-2))
    ranks = [A.shape[0] for A, _ in result.factors.values()]
    assert len(result.factors) == 4 and all(r <= 6 for r in ranks)
    assert sum(ranks) <= 2 * len(ranks)  # pruned to the target budget (average rank 2)
    assert all(torch.isfinite(B).all() for _, B in result.factors.values())
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in after)


def test_mixed_lora_and_adalora_federation_records_effective_ranks(tmp_path, tiny_tokenizer):
    from conftest import write_tiny_assets
    from flora.config import RunConfig
    from flora.engines import run_in_process

    write_tiny_assets(tmp_path, tiny_tokenizer)
    config = RunConfig.from_dict(dict(
        model=str(tmp_path / "model"), data=str(tmp_path / "data.jsonl"), num_clients=3, ranks=[6, 6, 6],
        adapters=["adalora", "adalora", "lora"], adalora_target_ratio=0.5, rounds=2, local_steps=6, batch_size=4,
        micro_batch_size=2, lr=5e-3, cutoff=64, max_examples=0, partition="iid", eval_examples=0, dropout=0.0,
        out_dir=str(tmp_path / "out")))
    metrics = run_in_process(config, progress=lambda _: None).metrics
    for record in metrics:
        ranks = record["client_ranks"]
        # LoRA keeps rank 6; AdaLoRA ends at its final budget: target rank 0.5 x 6 = 3 per layer on average
        assert ranks == {"0": 3.0, "1": 3.0, "2": 6.0}
        assert record["sum_local_ranks"] == 12.0
        assert record["bytes_saved_vs_initial_rank"] > 0
        assert record["aggregation_error"] < 1e-4  # stacking is exact for any mix of ranks


def test_orthonormal_rows_are_orthonormal_and_seeded():
    from flora.lora.adalora import orthonormal_rows

    torch.manual_seed(0)
    Q = orthonormal_rows(5, 12)
    assert Q.shape == (5, 12)
    assert float((Q @ Q.T - torch.eye(5)).abs().max()) < 1e-5
    torch.manual_seed(0)
    assert torch.equal(orthonormal_rows(5, 12), Q)
    with pytest.raises(ValueError, match="7 rows cannot be orthonormal in 4"):
        orthonormal_rows(7, 4)


def test_orthonormal_init_starts_at_the_svd_form_with_zero_update(tiny_model):
    """``init = orthonormal``: P's columns and Q's rows orthonormal (the regulariser's minimum), Λ = 0, so ΔW = 0."""
    from flora.adapters import LoraSpec
    from flora.lora.adalora import adalora_layers
    from flora.train import attach_adapter, detach_adapter

    spec = LoraSpec(rank=6, alpha=12, targets=("q_proj", "down_proj"), adapter="adalora", init="orthonormal")
    model = attach_adapter(tiny_model, spec, init_seed=0, total_steps=10)
    try:
        layers = list(adalora_layers(model))
        assert len(layers) == 4
        for _, module in layers:
            Q, P, E = (module.lora_A["default"].detach(), module.lora_B["default"].detach(),
                       module.lora_E["default"].detach())
            assert float((Q @ Q.T - torch.eye(6)).abs().max()) < 1e-5
            assert float((P.T @ P - torch.eye(6)).abs().max()) < 1e-5
            assert float(E.abs().max()) == 0.0
            assert float(module.get_delta_weight("default").abs().max()) == 0.0
        assert float(spec.kind.regulariser(model, spec)) < 1e-4
    finally:
        detach_adapter(model)


def _update_norm(model, tokenizer, examples, spec, steps=4, lr=5e-4) -> float:
    from flora.train import TrainSpec, train_client

    result = train_client(model, tokenizer, examples, spec, TrainSpec(steps=steps, batch_size=4, micro_batch_size=4,
                                                                      lr=lr, seed=1), init_seed=3)
    return float(torch.sqrt(sum(((B @ A) ** 2).sum() for A, B in result.factors.values())))


def test_adalora_keys_bring_its_update_to_loras_size(tiny_model, tiny_tokenizer, records):
    """peft's start (P, Q ~ N(0, 0.02²), Λ = 0) at the run's lr barely moves in a few steps (issue 20: ~300x smaller
    than LoRA's update); the orthonormal start and AdaLoRA's own learning rate bring it to LoRA's size."""
    from flora.adapters import LoraSpec
    from flora.data.tokenize import encode_all

    examples, _ = encode_all(tiny_tokenizer, records, 64)
    common = dict(rank=8, alpha=16, dropout=0.0)
    lora = _update_norm(tiny_model, tiny_tokenizer, examples, LoraSpec(**common))
    peft_start = _update_norm(tiny_model, tiny_tokenizer, examples, LoraSpec(**common, adapter="adalora"))
    orthonormal = _update_norm(tiny_model, tiny_tokenizer, examples,
                               LoraSpec(**common, adapter="adalora", init="orthonormal"))
    own_lr = _update_norm(tiny_model, tiny_tokenizer, examples,
                          LoraSpec(**common, adapter="adalora", init="orthonormal", lr_ratio=8.0,
                                   value_lr_ratio=8.0))
    assert lora / peft_start > 50  # the problem
    assert 2 < lora / orthonormal < 20  # the start alone: P Q of unit scale, Λ still moves at the run's lr
    assert 0.5 < lora / own_lr < 2  # with its own learning rate: within a factor 2 of LoRA's update


def test_singular_values_and_vectors_get_their_own_learning_rates(tiny_model):
    from flora.adapters import LoraSpec
    from flora.train import attach_adapter, detach_adapter

    spec = LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), adapter="adalora", lr_ratio=3.0, value_lr_ratio=50.0)
    model = attach_adapter(tiny_model, spec, init_seed=0, total_steps=4)
    try:
        groups = spec.kind.param_groups(model, spec, 1e-3)
        names = {id(p): n for n, p in model.named_parameters()}
        by_lr = {round(g["lr"], 9): sorted(names[id(p)].split(".")[-2] for p in g["params"]) for g in groups}
        assert by_lr == {3e-3: ["lora_A"] * 4 + ["lora_B"] * 4, 5e-2: ["lora_E"] * 4}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(trainable)  # each exactly once
    finally:
        detach_adapter(model)
    lora = LoraSpec(rank=4, alpha=8, targets=("q_proj",), lr_ratio=3.0, value_lr_ratio=50.0)  # plain LoRA: the run's lr
    model = attach_adapter(tiny_model, lora, init_seed=0)
    try:
        assert [g["lr"] for g in lora.kind.param_groups(model, lora, 1e-3)] == [1e-3]
    finally:
        detach_adapter(model)


@pytest.mark.parametrize("key, value, message", [
    ("adalora_init", "svd", "adalora_init = 'svd': expected one of gaussian, orthonormal"),
    ("adalora_lr_ratio", 0.0, "adalora_lr_ratio = 0.0: expected a finite multiple of lr > 0"),
    ("adalora_value_lr_ratio", float("inf"), "adalora_value_lr_ratio = inf: expected a finite"),
    ("adalora_orth_weight", -0.1, "adalora_orth_weight = -0.1: expected a finite weight >= 0"),
])
def test_adalora_keys_are_validated(key, value, message):
    from flora.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=message):
        RunConfig(**{key: value})


def test_client_passes_every_adalora_key_to_its_adapter():
    from flora.client import lora_spec
    from flora.config import RunConfig

    config = RunConfig(adapters=["adalora"], ranks=[16], adalora_init="orthonormal", adalora_lr_ratio=2.0,
                       adalora_value_lr_ratio=64.0, adalora_orth_weight=0.0, adalora_target_ratio=0.25)
    spec = lora_spec(config, 16, 0)
    assert (spec.adapter, spec.init, spec.lr_ratio, spec.value_lr_ratio, spec.orth_reg_weight, spec.target_rank) == \
        ("adalora", "orthonormal", 2.0, 64.0, 0.0, 4)
