"""Devices, precisions, activation checkpointing, learning-rate schedules, quantized bases, client resources.

Everything runs on CPU with the tiny model; tests marked ``cuda`` are skipped without a CUDA device
(``scripts/gpu_check.sh`` runs them on one). The numbers some tests print (``-s``) are the ones quoted in
the README and the closing notes.
"""

from __future__ import annotations

import math

import pytest
import torch

from flora.client import FederationClient
from flora.config import ConfigError, RunConfig, load_config
from flora.data.tokenize import encode_all
from flora.engines import run_in_process
from flora.hardware import check_quantize, model_options, resolve_device, resolve_dtype
from flora.precision import GlobalDelta, apply_merges, dense, global_delta, temporary_update
from flora.runtime import Runtime
from flora.train import LoraSpec, TrainSpec, lr_factor, make_scheduler, train_client
from test_federation import tiny_config  # the tiny federation every run here starts from

LORA = LoraSpec(rank=4, alpha=8, dropout=0.0)


@pytest.fixture
def examples(tiny_tokenizer, records):
    return encode_all(tiny_tokenizer, records, cutoff=64)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = model.get_output_embeddings().weight.device
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(input_ids=ids.to(device)).logits.float().cpu()
        model.train(was)
    return out


def caught_up_client(config, server) -> FederationClient:
    """A brand-new client process that applied the server's whole history: the model it starts a round from."""
    client = FederationClient(config, Runtime())
    first, updates = server.updates_for("node-new")
    client.state.apply(updates, first)
    return client


# --- keys and their errors ---------------------------------------------------------------------------

def test_defaults_are_todays_path():
    config = RunConfig()
    assert (config.device, config.dtype, config.quantize, config.lr_schedule, config.warmup_steps,
            config.gradient_checkpointing, config.client_cpus, config.client_gpus) == \
        ("cpu", "float32", "none", "constant", 0, False, 0, 0.0)
    assert model_options(config) == {"device": torch.device("cpu"), "dtype": torch.float32, "quantization": None}
    assert not TrainSpec().scheduled and make_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1.0), TrainSpec()) is None


@pytest.mark.parametrize("overrides, message", [
    (["device=gpu"], "device = 'gpu': expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["device=cuda:x"], "device = 'cuda:x'"),
    (["dtype=fp8"], "dtype = 'fp8': expected one of auto, float32, bfloat16, float16"),
    (["quantize=2bit"], "quantize = '2bit': expected one of none, 8bit, 4bit"),
    (["lr_schedule=step"], "lr_schedule = 'step': expected one of constant, cosine, linear"),
    (["warmup_steps=-1"], "warmup_steps = -1"),
    (["client_cpus=-2"], "client_cpus = -2"),
    (["client_gpus=0.5"], "client_gpus = 0.5 with device = 'cpu'"),
    (["gradient_checkpointing=maybe"], "gradient_checkpointing = 'maybe': expected bool"),
])
def test_hardware_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_keys_from_toml_and_set(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text('[run]\ndevice = "cuda:1"\ndtype = "bfloat16"\nquantize = "4bit"\ngradient_checkpointing = true\n'
                    'lr_schedule = "cosine"\nwarmup_steps = 3\nclient_gpus = 0.25\nclient_cpus = 2\n')
    config = load_config(path, ["lr_schedule=linear"])
    assert (config.device, config.dtype, config.quantize, config.gradient_checkpointing, config.lr_schedule,
            config.warmup_steps, config.client_gpus, config.client_cpus) == \
        ("cuda:1", "bfloat16", "4bit", True, "linear", 3, 0.25, 2)


def test_gpu_example_config_is_valid():
    from pathlib import Path
    config = load_config(Path(__file__).parents[1] / "configs" / "gpu_example.toml")
    assert config.device == "cuda" and config.quantize == "4bit" and config.client_gpus > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_absent_device_is_a_clear_error(assets_dir, tmp_path):
    assert resolve_device("auto") == torch.device("cpu") or resolve_device("auto").type == "mps"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match=r"device = 'cuda': CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"device = 'cuda:1'"):
        resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device = 'mps': Apple's MPS backend is not available"):
            resolve_device("mps")
    # through a run: refused before anything is loaded or written
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run_in_process(tiny_config(assets_dir, tmp_path, device="cuda"), progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_quantize_needs_bitsandbytes_and_a_supported_device(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(ConfigError, match="bitsandbytes runs quantized layers on cpu and cuda, not on device 'mps'"):
            check_quantize("4bit", torch.device("mps"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="quantize = '8bit': needs bitsandbytes, which is not installed"):
        check_quantize("8bit", torch.device("cpu"))
    check_quantize("none", torch.device("cpu"))  # nothing to check


def test_flower_client_resources():
    pytest.importorskip("flwr")
    from flora.simulation import federation_config

    default = federation_config(RunConfig())
    import os
    assert (default["client-resources-num-cpus"], default["client-resources-num-gpus"]) == (os.cpu_count(), 0.0)
    config = RunConfig(device="cuda", client_cpus=2, client_gpus=0.25)
    settings = federation_config(config)
    assert (settings["client-resources-num-cpus"], settings["client-resources-num-gpus"]) == (2, 0.25)
    with pytest.raises(ConfigError, match="set client_gpus > 0"):
        federation_config(RunConfig(device="cuda:0"))


def test_resume_accepts_resource_changes_and_older_checkpoints(tmp_path):
    from flora.checkpoint import CheckpointError, _check_same_run

    saved = RunConfig().to_dict()
    _check_same_run(tmp_path, saved, {**saved, "client_cpus": 4, "client_gpus": 0.0}, 1)
    older = {k: v for k, v in saved.items() if k not in ("device", "dtype", "quantize", "lr_schedule")}
    _check_same_run(tmp_path, older, saved, 1)  # written before the hardware keys existed: their defaults
    with pytest.raises(CheckpointError, match="dtype"):
        _check_same_run(tmp_path, older, {**saved, "dtype": "bfloat16"}, 1)


# --- learning-rate schedules ------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, hf_name, warmup", [
    ("constant", "constant_with_warmup", 3), ("linear", "linear", 0), ("linear", "linear", 4),
    ("cosine", "cosine", 0), ("cosine", "cosine", 5),
])
def test_lr_factor_matches_transformers_schedules(schedule, hf_name, warmup):
    from transformers import get_scheduler

    total = 20
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = get_scheduler(hf_name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [lr_factor(schedule, s, total, warmup) for s in range(total)] == pytest.approx(expected, abs=1e-12)


def test_schedule_runs_over_the_whole_run_across_rounds():
    """Round r's scheduler continues where round r-1 stopped: the rounds' learning rates, concatenated, are
    one schedule over rounds x steps (what the federation's clients get from their config)."""
    rounds, steps, lrs = 3, 4, []
    for round_ in range(1, rounds + 1):
        optimizer = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1e-2)
        scheduler = make_scheduler(optimizer, TrainSpec(steps=steps, lr=1e-2, lr_schedule="cosine", warmup_steps=2,
                                                        schedule_start=(round_ - 1) * steps,
                                                        schedule_steps=rounds * steps))
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert lrs == pytest.approx([1e-2 * lr_factor("cosine", s, rounds * steps, 2) for s in range(rounds * steps)])
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1e-2) and lrs[-1] < 1e-3


def test_client_passes_the_run_schedule(assets_dir, tmp_path, monkeypatch):
    import flora.client as client_module

    seen = []
    real = client_module.train_client
    monkeypatch.setattr(client_module, "train_client", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    config = tiny_config(assets_dir, tmp_path, lr_schedule="linear", warmup_steps=1, rounds=2, local_steps=3,
                         gradient_checkpointing=True)
    metrics = run_in_process(config, progress=lambda _: None).metrics
    assert [(t.schedule_start, t.schedule_steps, t.lr_schedule, t.warmup_steps, t.gradient_checkpointing)
            for t in seen] == [(0, 6, "linear", 1, True)] * 3 + [(3, 6, "linear", 1, True)] * 3
    assert all(math.isfinite(m["test_loss"]) for m in metrics) and metrics[-1]["aggregation_error"] < 1e-4


# --- activation checkpointing ---------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_losses(tiny_tokenizer, examples):
    from conftest import make_tiny_llama

    runs = {}
    for checkpointing in (False, True):
        model = make_tiny_llama(len(tiny_tokenizer))
        spec = TrainSpec(steps=4, batch_size=4, micro_batch_size=2, lr=5e-3, seed=3,
                         gradient_checkpointing=checkpointing)
        runs[checkpointing] = train_client(model, tiny_tokenizer, examples, LoraSpec(rank=4, alpha=8, dropout=0.1),
                                           spec)
        assert not model.model.gradient_checkpointing  # switched off again after the round
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-5, abs=0)
    for name, (A, B) in runs[False].factors.items():
        assert rel(runs[True].factors[name][0], A) <= 1e-5 and rel(runs[True].factors[name][1], B) <= 1e-5


def test_federated_run_with_checkpointing_matches(assets_dir, tmp_path):
    plain = run_in_process(tiny_config(assets_dir, tmp_path, out_dir=str(tmp_path / "a")),
                           progress=lambda _: None).metrics
    saving = run_in_process(tiny_config(assets_dir, tmp_path, out_dir=str(tmp_path / "b"), gradient_checkpointing=True),
                            progress=lambda _: None).metrics
    for a, b in zip(plain, saving):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


# --- half precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_run_is_finite_and_exact_within_its_precision(assets_dir, tmp_path, dtype):
    config = tiny_config(assets_dir, tmp_path, dtype=dtype, rounds=2)
    server = run_in_process(config, progress=lambda _: None)
    torch_dtype = getattr(torch, dtype)
    for m in server.metrics:
        assert math.isfinite(m["test_loss"]) and math.isfinite(m["train_loss"])
        assert m["aggregation_error"] < 1e-4  # the server aggregates float32 factors: as exact as in float32
    name = next(iter(server.assets.layer_shapes))
    layer = server.state.model.get_submodule(name)
    update = server.history[-1].merge
    assert all(t.dtype == torch.float32 for m in update.values() for t in ((m,) if torch.is_tensor(m) else m))
    # the base weights never change; the global update beside them is the float32 sum of the rounds' updates
    base = Runtime().assets(config).model.get_submodule(name)
    assert layer.weight.dtype == torch_dtype and torch.equal(layer.weight, base.weight)
    exact = sum(dense(u.merge[name]).float() for u in server.history)
    assert global_delta(layer).A is not None and rel(global_delta(layer).matrix(), exact) < 1e-6
    # a client rebuilt from the history starts its rounds from the server's global model
    client = caught_up_client(config, server)
    ids = torch.randint(0, len(server.assets.tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(client.state.model, ids), logits(server.state.model, ids))


def test_half_precision_adapters_and_factors_are_float32(assets_dir, tmp_path, tiny_tokenizer, examples):
    from conftest import make_tiny_llama
    from flora.train import attach_adapter, detach_adapter

    model = make_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    peft_model = attach_adapter(model, LORA, init_seed=0)
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    detach_adapter(peft_model)
    result = train_client(model, tiny_tokenizer, examples, LORA, TrainSpec(steps=2, batch_size=4, lr=5e-3))
    assert all(A.dtype == B.dtype == torch.float32 and A.device.type == "cpu" for A, B in result.factors.values())
    assert all(math.isfinite(x) for x in result.losses)


def test_half_precision_where_rounding_enters(tiny_tokenizer):
    """A bf16 base after 5 rounds of LoRA-sized updates (‖Δ_t‖ = 1e-3 ‖W‖ per layer), measured three ways
    against the float32 reference (the same bf16-rounded base + Σ Δ_t in float32): the update the model
    actually holds, relative to Σ Δ_t, and its logits computed in float32 (so only the update's rounding
    shows) and in bf16. FLoRA keeps the update beside the base (exact); the alternatives merge it into the
    bf16 weights, from a float32 master copy (one rounding of the weight per round) or in place (a rounding
    every round, accumulating)."""
    import copy

    from conftest import make_tiny_llama

    base = make_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "proj" in n]
    models = {label: copy.deepcopy(base) for label in ("beside", "master", "in_place")}
    reference = copy.deepcopy(base).float()
    generator = torch.Generator().manual_seed(0)
    total = {n: torch.zeros(base.get_submodule(n).weight.shape) for n in names}
    for _ in range(5):
        update = {}
        for n in names:
            W = reference.get_submodule(n).weight
            A, B = torch.randn(4, W.shape[1], generator=generator), torch.randn(W.shape[0], 4, generator=generator)
            update[n] = (A, B * 1e-3 * float(W.detach().norm()) / float((B @ A).norm()))
            total[n] += dense(update[n])
        apply_merges(models["beside"], update)
        with torch.no_grad():
            for n in names:
                exact = base.get_submodule(n).weight.float() + total[n]
                models["master"].get_submodule(n).weight.copy_(exact)
                models["in_place"].get_submodule(n).weight.add_(dense(update[n]).to(torch.bfloat16))
    apply_merges(reference, total)
    held = {"beside": max(rel(global_delta(models["beside"].get_submodule(n)).matrix(), total[n]) for n in names)}
    for label in ("master", "in_place"):
        held[label] = max(rel(models[label].get_submodule(n).weight.float() - base.get_submodule(n).weight.float(),
                              total[n]) for n in names)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24), generator=generator)
    ref = logits(reference, ids)
    in_bf16 = {label: rel(logits(model, ids), ref) for label, model in models.items()}
    in_fp32 = {label: rel(logits(copy.deepcopy(model).float(), ids), ref) for label, model in models.items()}
    print("\nbf16 base, 5 rounds of ‖Δ‖ = 1e-3 ‖W‖: relative error of the update held (worst layer), of the logits "
          "computed in float32 and in bf16, vs float32 base + Σ Δ:")
    for label in models:
        print(f"  {label:8s} update {held[label]:.2e}  logits fp32 {in_fp32[label]:.2e}  logits bf16 {in_bf16[label]:.2e}")
    assert held["beside"] < 1e-6 and in_fp32["beside"] < 1e-5
    assert held["master"] > 1e-2 and held["in_place"] > held["master"]  # merging into bf16 loses the update
    assert in_bf16["beside"] <= in_bf16["master"] * 1.5  # bf16 compute rounding dominates both


# --- quantized base ------------------------------------------------------------------------------------

def test_global_delta_accumulates_exactly_and_collapses_to_dense():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 12, bias=False).to(torch.bfloat16)
    delta = global_delta(layer, create=True)
    assert global_delta(layer) is delta and isinstance(delta, GlobalDelta)
    x = torch.randn(3, 16)
    parts = [(torch.randn(2, 16), torch.randn(12, 2)), (torch.randn(3, 16), torch.randn(12, 3))]
    for part in parts:
        delta.add(part)
    assert delta.A.shape == (5, 16) and delta.D is None  # 5 (12 + 16) < 12 x 16: stacked factors
    expected = sum(B @ A for A, B in parts)
    x16 = x.to(torch.bfloat16)
    expected_output = (layer.weight.float() @ x16.float().T).T.to(torch.bfloat16).float() + x16.float() @ expected.T
    torch.testing.assert_close(layer(x16).float(), expected_output.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    state = delta.state()
    with temporary_update(torch.nn.ModuleDict({"l": layer}), {"l": torch.ones(12, 16)}):
        torch.testing.assert_close(delta.matrix(), expected + 1, rtol=1e-6, atol=1e-6)
    assert delta.state() == state
    delta.add((torch.randn(4, 16), torch.randn(12, 4)))  # 9 (12 + 16) >= 12 x 16: dense is no larger
    assert delta.A is None and delta.D is not None
    with pytest.raises(ValueError, match="global delta"):
        delta.add(torch.zeros(3, 3))


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_run_on_cpu_clients_start_from_the_global_model(assets_dir, tmp_path, quantize):
    pytest.importorskip("bitsandbytes")
    config = tiny_config(assets_dir, tmp_path, quantize=quantize, rounds=2)
    server = run_in_process(config, progress=lambda _: None)
    for m in server.metrics:
        assert math.isfinite(m["test_loss"]) and m["aggregation_error"] < 1e-4
    names = list(server.assets.layer_shapes)
    layer = server.state.model.get_submodule(names[0])
    assert type(layer).__module__.startswith("bitsandbytes") and global_delta(layer).A is not None
    # the global update beside the base is the exact float32 sum of every round's update
    exact = sum(dense(u.merge[names[0]]).float() for u in server.history)
    assert rel(global_delta(layer).matrix(), exact) < 1e-6
    # the quantized base never changes; a client rebuilt from the history starts from the server's model
    fresh = Runtime().assets(config).model.get_submodule(names[0])
    assert torch.equal(fresh.weight.data, layer.weight.data)
    ids = torch.randint(0, len(server.assets.tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    client = caught_up_client(config, server)
    error = rel(logits(client.state.model, ids), logits(server.state.model, ids))
    print(f"\n{quantize}: client vs server logits after {config.rounds} rounds, relative {error:.1e}")
    assert error <= 1e-5


def test_4bit_global_model_equals_dequantized_base_plus_update(assets_dir, tmp_path):
    """The 4-bit layers compute x Wqᵀ with Wq their dequantized weight (activations are not quantized), so the
    quantized global model must equal a float32 model holding Wq + Σ_t Δ_t (+ the global adapter): the update
    is kept exactly. ``fedex`` exercises both a dense merge (its residual) and an evaluated adapter."""
    pytest.importorskip("bitsandbytes")
    import copy

    config = tiny_config(assets_dir, tmp_path, quantize="4bit", method="fedex", ranks=[2], rounds=2)
    server = run_in_process(config, progress=lambda _: None)
    quantized, adapter = server.state.model, server.state.adapter
    reference = copy.deepcopy(Runtime().assets(tiny_config(assets_dir, tmp_path)).model)  # the float32 model
    with torch.no_grad():
        for name in server.assets.layer_shapes:
            layer = quantized.get_submodule(name)
            dequantized = layer.forward(torch.eye(layer.in_features)).T  # forward(): without the delta hook
            merged = torch.zeros_like(dequantized)
            for round_update in server.history:
                merged += dense(round_update.merge[name]).float()
            assert rel(global_delta(layer).matrix(), merged) < 1e-6
            A, B = adapter[name]
            reference.get_submodule(name).weight.copy_(dequantized + merged + B @ A)
    ids = torch.randint(0, len(server.assets.tokenizer), (2, 20), generator=torch.Generator().manual_seed(2))
    before = {n: global_delta(quantized.get_submodule(n)).state() for n in server.assets.layer_shapes}
    with temporary_update(quantized, {name: B @ A for name, (A, B) in adapter.items()}):
        error = rel(logits(quantized, ids), logits(reference, ids))
    print(f"\n4bit fedex (residual merged + adapter) vs float32 dequantized base + update + adapter: logits "
          f"relative {error:.1e}")
    assert error <= 1e-5
    assert all(global_delta(quantized.get_submodule(n)).state() == before[n] for n in before)  # adapter gone again


# --- CUDA (skipped without a CUDA device; scripts/gpu_check.sh) -------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_run_matches_cpu_within_precision(assets_dir, tmp_path, dtype):
    config = tiny_config(assets_dir, tmp_path / "gpu", device="cuda", dtype=dtype)
    assert resolve_device("auto").type == "cuda" and resolve_dtype("auto", torch.device("cuda")) in (
        torch.bfloat16, torch.float32)
    gpu = run_in_process(config, progress=lambda _: None)
    cpu = run_in_process(tiny_config(assets_dir, tmp_path / "cpu"), progress=lambda _: None)
    assert next(gpu.state.model.parameters()).device.type == "cuda"
    for g, c in zip(gpu.metrics, cpu.metrics):
        assert math.isfinite(g["test_loss"]) and g["aggregation_error"] < 1e-4
        assert g["test_loss"] == pytest.approx(c["test_loss"], rel=1e-3 if dtype == "float32" else 5e-2)
    client = caught_up_client(config, gpu)
    for name, weight in gpu.state.model.state_dict().items():
        assert torch.equal(weight, client.state.model.state_dict()[name]), name


@pytest.mark.cuda
def test_cuda_gradient_checkpointing_same_losses_less_memory(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora.data.tokenize import Example

    generator = torch.Generator().manual_seed(0)
    batch = [Example(input_ids=ids, labels=ids) for ids in torch.randint(0, 1000, (8, 512), generator=generator).tolist()]
    results, peaks = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)).cuda()
        torch.cuda.reset_peak_memory_stats()
        results[checkpointing] = train_client(model, tiny_tokenizer, batch, LoraSpec(rank=8, alpha=16, dropout=0.0),
                                              TrainSpec(steps=2, batch_size=8, micro_batch_size=8, lr=1e-3,
                                                        gradient_checkpointing=checkpointing))
        peaks[checkpointing] = torch.cuda.max_memory_allocated()
        del model
    print(f"\ncuda fp32, 8 x 512 tokens: peak {peaks[False] / 2**20:.0f} MiB without, {peaks[True] / 2**20:.0f} MiB "
          f"with gradient checkpointing")
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-5)
    assert peaks[True] < 0.8 * peaks[False]


@pytest.mark.cuda
def test_cuda_4bit_run_clients_start_from_the_global_model(assets_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = tiny_config(assets_dir, tmp_path, device="cuda", dtype="float32", quantize="4bit")
    server = run_in_process(config, progress=lambda _: None)
    assert all(math.isfinite(m["test_loss"]) and m["aggregation_error"] < 1e-4 for m in server.metrics)
    ids = torch.randint(0, len(server.assets.tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    client = caught_up_client(config, server)
    assert rel(logits(client.state.model, ids), logits(server.state.model, ids)) <= 1e-5
