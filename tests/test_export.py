"""``flora export``: a tiny federation exported as a HF directory and as PEFT adapters, loaded in a fresh
Python process with only torch/transformers/peft, equal to the project's own global model; truncated
adapters' reported errors measured; bad input refused with nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora.checkpoint import load_run_model
from flora.cli import main
from flora.config import RunConfig
from flora.engines import run_in_process

IDS = [[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 33, 2]]

# Runs in a fresh interpreter: nothing of this project may be imported there.
FRESH = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from peft import AutoPeftModelForCausalLM, PeftModel

spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["ids"])
results = {}
for case in spec["cases"]:
    record = {}
    if case["kind"] == "hf":
        model = AutoModelForCausalLM.from_pretrained(case["dir"])
        tokenizer = AutoTokenizer.from_pretrained(case["dir"])
        record["chat"] = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                       add_generation_prompt=True)
        record["eos"] = GenerationConfig.from_pretrained(case["dir"]).eos_token_id
        record["tied"] = model.get_output_embeddings().weight.data_ptr() == \
            model.get_input_embeddings().weight.data_ptr()
        record["tie_config"] = model.config.tie_word_embeddings
    elif case["kind"] == "peft":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case["base"]), case["dir"])
    else:  # the base named in adapter_config.json
        model = AutoPeftModelForCausalLM.from_pretrained(case["dir"])
    model.eval()
    with torch.no_grad():
        record["logits"] = model(ids).logits
    if case["kind"] != "hf":
        record["ranks"] = {name[len("base_model.model."):-len(".lora_A.default")]: m.out_features
                           for name, m in model.named_modules() if name.endswith(".lora_A.default")}
        merged = model.merge_and_unload()
        record["weights"] = {n: p.detach().clone() for n, p in merged.named_parameters() if n in case["weights"]}
    results[case["name"]] = record
assert not [m for m in sys.modules if m == "flora" or m.startswith("flora.")], "flora was imported"
torch.save(results, spec["out"])
'''


def fresh_process(cases: list[dict], tmp: Path) -> dict:
    """Run :data:`FRESH` on ``cases`` in a new interpreter (cwd outside the repo); its results."""
    out = tmp / "fresh.pt"
    spec = {"ids": IDS, "cases": cases, "out": str(out)}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(spec)], cwd=tmp, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def cli(*args: str) -> tuple[int, str, str]:
    """``flora ARGS`` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(list(args))
    return rc, stdout.getvalue(), stderr.getvalue()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


RUNS = {"flora": [4, 2, 1], "fedex": [2], "zeropad": [4, 2, 1], "standalone": [4, 2, 1]}
# name: (run, extra export arguments, run model selection for load_run_model)
CASES = {
    "flora": ("flora", [], {}),
    "fedex": ("fedex", [], {}),  # dense residual merges
    "zeropad-round1": ("zeropad", ["--round", "1"], {"rounds": 1}),  # a truncating method's global adapter
    "standalone-client1": ("standalone", ["--client", "1"], {"client": 1}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, assets_dir):
    """Four tiny 2-round runs, each case exported as hf and peft (flora also at --rank 2) through the CLI,
    then loaded in one fresh process."""
    root = tmp_path_factory.mktemp("export")
    for method, ranks in RUNS.items():
        config = RunConfig.from_dict(dict(
            model=str(assets_dir / "model"), data=str(assets_dir / "data.jsonl"), method=method, num_clients=3,
            ranks=ranks, rounds=2, local_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, cutoff=64,
            max_examples=0, partition="iid", test_fraction=0.1, eval_examples=0, dropout=0.0,
            out_dir=str(root / method)))
        run_in_process(config, progress=lambda _: None)  # each run starts from the base weights
    printed, cases = {}, []
    layers = [f"model.layers.{i}.{part}.weight" for i in range(2)
              for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    for name, (run, extra, _) in CASES.items():
        for fmt, rank in (("hf", None), ("peft", None)) + ((("peft", 2),) if name == "flora" else ()):
            label = f"{name}-{fmt}" + (f"-r{rank}" if rank else "")
            rank_args = ["--rank", str(rank)] if rank else []
            rc, out, err = cli("export", str(root / run), "--format", fmt, "--out", str(root / label),
                               *extra, *rank_args)
            assert rc == 0, err
            printed[label] = out
            cases.append({"name": label, "kind": fmt, "dir": str(root / label), "base": str(assets_dir / "model"),
                          "weights": layers})
    cases.append({"name": "flora-peft-auto", "kind": "peft-auto", "dir": str(root / "flora-peft"), "weights": []})
    return {"root": root, "printed": printed, "fresh": fresh_process(cases, root), "base": assets_dir / "model"}


def base_model(exported) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(exported["base"]).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_exports_load_without_flora_and_equal_the_global_model(exported, case):
    run, _, selection = CASES[case]
    reference = load_run_model(exported["root"] / run, **selection)[0].model.eval()
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits
    with torch.no_grad():  # the test can fail: the global model is not the base
        assert relative(base_model(exported)(torch.tensor(IDS)).logits, expected) > 1e-3
    hf, peft = exported["fresh"][f"{case}-hf"], exported["fresh"][f"{case}-peft"]
    assert relative(hf["logits"], expected) <= 1e-5
    assert relative(peft["logits"], expected) <= 1e-5
    assert hf["tied"] and hf["tie_config"] is True  # the tiny Llama ties lm_head to the embedding
    assert hf["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert hf["eos"] is not None and hf["eos"] == reference.generation_config.eos_token_id
    info = json.loads((exported["root"] / f"{case}-hf" / "flora_export.json").read_text())
    assert info["method"] == run and info["round"] == selection.get("rounds", 2)


def test_peft_adapter_changes_the_base_and_names_its_base(exported):
    fresh = exported["fresh"]
    assert relative(fresh["flora-peft-auto"]["logits"], fresh["flora-peft"]["logits"]) <= 1e-6
    config = json.loads((exported["root"] / "flora-peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(exported["base"])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    # scaling alpha / r = 1 on every layer
    assert config["alpha_pattern"] == config["rank_pattern"] and len(config["rank_pattern"]) == 14


def test_exact_adapter_has_the_rank_of_the_accumulated_update(exported):
    """FLoRA, ranks 4+2+1 over 2 rounds: every layer's update has rank 14 (all layers are at least 16 wide)."""
    config = json.loads((exported["root"] / "flora-peft" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {14}
    assert set(exported["fresh"]["flora-peft"]["ranks"].values()) == {14}
    report = json.loads((exported["root"] / "flora-peft" / "flora_export.json").read_text())
    assert report["relative_error"] < 1e-6 and report["rank"] is None
    assert "exact" in exported["printed"]["flora-peft"]


def test_truncated_adapter_error_is_what_it_reports(exported):
    root, fresh = exported["root"], exported["fresh"]
    report = json.loads((root / "flora-peft-r2" / "flora_export.json").read_text())
    assert report["rank"] == 2 and set(fresh["flora-peft-r2"]["ranks"].values()) == {2}
    global_model = load_run_model(root / "flora")[0].model.state_dict()
    base_weights = base_model(exported).state_dict()
    dropped = total = 0.0
    for name, merged in fresh["flora-peft-r2"]["weights"].items():
        update = (global_model[name] - base_weights[name]).double()
        error = (merged.double() - global_model[name].double()).norm()
        layer = report["layers"][name[:-len(".weight")]]
        assert float(error / update.norm()) == pytest.approx(layer["relative_error"], abs=1e-6), name
        assert layer["rank"] == 2 and layer["exact_rank"] == 14
        dropped, total = dropped + float(error) ** 2, total + float(update.norm()) ** 2
    assert len(fresh["flora-peft-r2"]["weights"]) == 14
    assert (dropped / total) ** 0.5 == pytest.approx(report["relative_error"], abs=1e-6)
    assert 0.05 < report["relative_error"] < 1
    printed = exported["printed"]["flora-peft-r2"]
    assert f"relative error {report['relative_error']:.4g} overall" in printed
    assert printed.count("rank   14 -> 2") == 14  # one line per layer


@pytest.mark.parametrize("args, message", [
    (["--round", "3"], "no round 3; the checkpoint holds rounds 1..2"),
    (["--round", "0"], "no round 0"),
    (["--format", "peft", "--rank", "0"], "--rank 0: expected a rank >= 1"),
    (["--format", "peft", "--rank", "-2"], "--rank -2: expected a rank >= 1"),
    (["--rank", "4"], "--rank 4: applies to --format peft only"),
    (["--client", "1"], "--client applies to runs where each client keeps its own model"),
])
def test_bad_export_is_one_error_line_and_writes_nothing(exported, tmp_path, capsys, args, message):
    fmt = [] if "--format" in args else ["--format", "hf"]
    target = tmp_path / "out"
    assert main(["export", str(exported["root"] / "flora"), "--out", str(target), *fmt, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora: error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_missing_checkpoint_and_nonempty_out(exported, tmp_path, capsys):
    target = tmp_path / "out"
    assert main(["export", str(exported["base"]), "--format", "hf", "--out", str(target)]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not target.exists()
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for fmt in ("hf", "peft"):
        assert main(["export", str(exported["root"] / "flora"), "--format", fmt, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err == f"flora: error: --out {target}: directory is not empty; expected a new or empty directory\n"
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and sorted(tmp_path.iterdir()) == [target]
    assert main(["export", str(exported["root"] / "standalone"), "--format", "peft", "--out", str(tmp_path / "x"),
                 "--client", "7"]) == 2
    assert "--client 7: standalone run" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_into_an_empty_directory(exported, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert main(["export", str(exported["root"] / "flora"), "--format", "peft", "--out", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "flora_export.json"]
    assert sorted(tmp_path.iterdir()) == [target]  # no staging directory left behind


@pytest.mark.slow
@pytest.mark.parametrize("source", ["embedded", "gguf-path"])
def test_export_of_a_gguf_based_run(tmp_path, source):
    """A run on the GGUF model (by name and by path): the HF export loads with plain transformers (no
    gguf_file), ties lm_head as the base does, and the PEFT adapter loads on the base it names."""
    from flora.checkpoint import save_round
    from flora.rounds import RoundUpdate
    from flora.models.loader import embedded_gguf_path

    model = "embedded" if source == "embedded" else str(embedded_gguf_path())
    config = RunConfig.from_dict({"model": model, "out_dir": str(tmp_path / "run")})
    generator = torch.Generator().manual_seed(0)
    q = "model.layers.0.self_attn.q_proj"
    update = RoundUpdate(round=1, merge={
        q: (torch.randn(3, 576, generator=generator) * 0.05, torch.randn(576, 3, generator=generator) * 0.05),
        "model.layers.2.mlp.down_proj": torch.randn(576, 1536, generator=generator) * 1e-3,
    }, adapter={"model.layers.1.self_attn.v_proj": (torch.randn(4, 576, generator=generator) * 0.05,
                                                     torch.randn(192, 4, generator=generator) * 0.05)})
    save_round(tmp_path / "run", config, [update], [{"round": 1}])
    for fmt in ("hf", "peft"):
        rc, _, err = cli("export", str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / fmt))
        assert rc == 0, err
    assert "lm_head.weight" not in _safetensor_keys(tmp_path / "hf" / "model.safetensors")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    fresh = fresh_process([{"name": "hf", "kind": "hf", "dir": str(tmp_path / "hf")},
                           {"name": "peft", "kind": "peft-auto", "dir": str(tmp_path / "peft"), "weights": []}],
                          tmp_path)
    reference = load_run_model(tmp_path / "run")[0].model.eval()
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits
    assert relative(fresh["hf"]["logits"], expected) <= 1e-5
    assert relative(fresh["peft"]["logits"], expected) <= 1e-5
    assert fresh["hf"]["tied"] and fresh["hf"]["eos"] == 2 and "<|im_start|>assistant" in fresh["hf"]["chat"]
    assert fresh["peft"]["ranks"][q] == 3 and fresh["peft"]["ranks"]["model.layers.2.mlp.down_proj"] == 576


def _safetensor_keys(path: Path) -> set[str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        return set(handle.keys())


def test_run_output_ends_with_how_to_export_and_chat(assets_dir, tmp_path):
    """``flora run`` ends by printing the export and chat commands for its out dir; both work as printed."""
    import shlex

    import tomli_w

    out = tmp_path / "run"
    values = dict(model=str(assets_dir / "model"), data=str(assets_dir / "data.jsonl"), num_clients=2, ranks=[2, 1],
                  rounds=1, local_steps=1, batch_size=4, micro_batch_size=2, cutoff=64, max_examples=0,
                  partition="iid", test_fraction=0.1, eval_examples=0, client_eval_examples=0, out_dir=str(out))
    (tmp_path / "run.toml").write_text(tomli_w.dumps({"run": values}))
    rc, printed, err = cli("run", "--config", str(tmp_path / "run.toml"), "--engine", "local", "--quiet")
    assert rc == 0, err
    export_line, chat_line = printed.rstrip("\n").splitlines()[-2:]
    assert export_line == (f"Export it: flora export {out} --format hf --out {out}/export-hf   "
                           f"(or --format peft --out {out}/export-peft)")
    assert chat_line == f"Chat with it: flora chat --checkpoint {out}   (or serve it: flora serve --checkpoint {out})"
    export_args = shlex.split(export_line.removeprefix("Export it: ").split("   (")[0])
    assert export_args[0] == "flora" and cli(*export_args[1:])[0] == 0
    assert (out / "export-hf" / "config.json").is_file()
    chat_args = shlex.split(chat_line.removeprefix("Chat with it: ").split("   (")[0])
    assert cli(*chat_args[1:], "--prompt", "hi", "--max-new-tokens", "3")[0] == 0


def test_export_files_have_plain_modes(exported):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for directory in ("flora-hf", "flora-peft"):
        root = exported["root"] / directory
        assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask
        for path in root.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
