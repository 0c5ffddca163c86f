"""The issue-7 reproduction plan (benchmarks/reproduce.py): which runs, with which settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(reproduce)


@pytest.mark.parametrize("profile, count", [("quick", 17), ("full", 47)])
def test_plan_has_every_method_setting_and_extra(profile, count, tmp_path):
    runs = reproduce.plan(profile, tmp_path)
    names = [name for name, _, _ in runs]
    assert len(names) == len(set(names)) == count
    # MMLU for the seed-0 runs of every method but standalone (10 models per clients' own would be 10x)
    assert sorted(name for name, _, mmlu in runs if mmlu) == sorted(
        f"{setting}-{method}-s0" for setting, methods in (("homogeneous", reproduce.HOMOGENEOUS_METHODS),
                                                          ("heterogeneous", reproduce.HETEROGENEOUS_METHODS))
        for method in methods if method != "standalone")
    configs = {name: config for name, config, _ in runs}
    for method in reproduce.HOMOGENEOUS_METHODS:
        assert configs[f"homogeneous-{method}-s0"].ranks == [16]
    for method in reproduce.HETEROGENEOUS_METHODS:
        assert configs[f"heterogeneous-{method}-s0"].ranks == reproduce.HETEROGENEOUS
    assert configs["heterogeneous-centralized-s0"].client_rank(0) == 64
    # the same token budget for every run: rounds x clients x local steps x batch
    budgets = {(c.rounds * c.num_clients * c.local_steps * c.batch_size, c.cutoff) for c in configs.values()}
    assert len(budgets) == 1
    assert all(c.num_clients == 10 and Path(c.out_dir).parent == tmp_path for c in configs.values())
    if profile == "full":
        for setting, pair in reproduce.KEY_PAIRS.items():
            for method in pair:
                assert {configs[f"{setting}-{method}-s{s}"].seed for s in (0, 1, 2)} == {0, 1, 2}
        assert configs["heterogeneous-flora-uniform-s0"].weighting == "uniform"
        assert configs["homogeneous-flora-iid-s0"].partition == "iid"
        assert [configs[f"heterogeneous-flora-lr{s}-s0"].server_lr for s in (2, 4)] == [2.0, 4.0]
        assert configs["heterogeneous-flora-warm-lr4-s0"].method == "flora-warm"
        assert {configs[f"heterogeneous-flora-warm-lr4-s{s}"].seed for s in (0, 1, 2)} == {0, 1, 2}
        assert all(c.server_lr == 1 for n, c in configs.items() if "-lr" not in n)
        assert all(c.partition == "dirichlet" for n, c in configs.items() if "iid" not in n)


def test_paired_differences_match_by_seed_and_ignore_other_variants():
    def row(loss):
        return {"final_test_loss": loss}

    rows = {"homogeneous-flora-s0": row(2.0), "homogeneous-fedit-s0": row(2.5),
            "homogeneous-flora-s1": row(1.0), "homogeneous-fedit-s1": row(0.75),
            "homogeneous-flora-s2": row(9.0),  # no fedit partner: left out
            "homogeneous-flora-iid-s0": row(0.0), "heterogeneous-flora-s0": row(0.0)}
    diff = reproduce.paired_differences(rows, "homogeneous", ("flora", "fedit"))
    assert diff["per_seed"] == {0: -0.5, 1: 0.25}
    assert diff["mean"] == pytest.approx(-0.125)
    assert diff["std"] == pytest.approx(0.375 * 2 ** 0.5)  # sample std of -0.5 and 0.25
    assert reproduce.paired_differences(rows, "heterogeneous", ("flora", "zeropad")) is None


def test_key_comparisons_pair_flora_with_each_key_run_and_each_with_the_best_new_peer():
    def row(loss):
        return {"final_test_loss": loss}

    rows = {f"heterogeneous-{m}-s{s}": row(loss + s) for m, loss in
            (("flora", 2.0), ("zeropad", 2.3), ("raflora", 2.1), ("fedplora", 2.05)) for s in (0, 1)}
    rows["heterogeneous-fedplora-s2"] = row(0.0)  # raflora has no seed 2: not part of the best-of comparison
    assert reproduce.best_new_method(rows, "heterogeneous") == "fedplora"
    assert reproduce.best_new_method(rows, "homogeneous") is None
    assert reproduce.key_comparisons(rows) == [
        ("homogeneous", ("flora", "fedit")), ("homogeneous", ("flora", "fedex")),
        ("homogeneous", ("flora", "florana")), ("homogeneous", ("flora", "flora-warm")),
        ("homogeneous", ("flora-warm", "fedit")), ("homogeneous", ("flora-warm", "fedex")),
        ("homogeneous", ("flora-warm", "florana")),
        ("heterogeneous", ("flora", "zeropad")), ("heterogeneous", ("flora", "raflora")),
        ("heterogeneous", ("flora", "fedplora")), ("heterogeneous", ("flora", "flora-warm")),
        ("heterogeneous", ("flora-warm", "zeropad")), ("heterogeneous", ("flora-warm", "raflora")),
        ("heterogeneous", ("flora-warm", "fedplora")),
        ("heterogeneous", ("zeropad", "fedplora")), ("heterogeneous", ("raflora", "fedplora")),
        *(("heterogeneous", pair) for pair in reproduce.STEP_COMPARISONS)]
    diff = reproduce.paired_differences(rows, "heterogeneous", ("raflora", "fedplora"))
    assert diff["per_seed"] == {0: pytest.approx(0.05), 1: pytest.approx(0.05)}


def test_a_summary_from_before_a_key_existed_matches_only_at_that_keys_default(tmp_path):
    name, config, _ = reproduce.plan("quick", tmp_path)[0]
    recorded = config.to_dict()
    recorded.pop("warm_split")  # a key added after this run was recorded
    assert reproduce.same_config(recorded, config)
    assert not reproduce.same_config(recorded, reproduce.dataclasses.replace(config, warm_split="balanced"))
    assert not reproduce.same_config({**recorded, "lr": config.lr * 2}, config)
    assert not reproduce.same_config({**recorded, "retired_key": 1}, config)
    # a key whose default changed the behaviour: an older summary is the run at the key's earlier value
    recorded.pop("dropout_sampler")
    assert config.dropout_sampler == "torch" and reproduce.same_config(recorded, config)
    assert not reproduce.same_config(recorded, reproduce.dataclasses.replace(config, dropout_sampler="sparse"))


def test_local_steps_plan_keeps_the_budget_and_runs_the_pairs_first(tmp_path):
    spec = importlib.util.spec_from_file_location("local_steps", Path(__file__).parents[1] / "benchmarks" / "local_steps.py")
    local_steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local_steps)
    runs = local_steps.plan(tmp_path)
    names = [name for name, _ in runs]
    assert len(names) == len(set(names)) == 3 * 3 * 2 + 3 * 2  # pair x steps x seeds, FLoRA-warm not at 1 round
    assert names[:6] == ["ls2x16-flora-s0", "ls2x16-fedit-s0", "ls32x1-flora-s0", "ls32x1-fedit-s0",
                         "ls8x4-flora-s0", "ls8x4-fedit-s0"]
    assert all("flora-warm" in n for n in names[18:])
    for name, config in runs:
        assert config.rounds * config.local_steps == 32 and config.ranks == [16] and config.num_clients == 10
        assert (config.batch_size, config.cutoff, config.max_examples, config.lr) == (2, 128, 2000, 5e-4)
        assert name == f"ls{config.local_steps}x{config.rounds}-{config.method}-s{config.seed}"
    assert {c.client_eval_examples for _, c in local_steps.plan(tmp_path, 8, (2, 8, 4), 0)} == {0}
    with pytest.raises(ValueError, match="must divide"):
        local_steps.plan(tmp_path, 8, (3,))


def test_adalora_main_job_changes_only_the_adapter_keys_and_counts_seeds_within_the_goal(tmp_path):
    spec = importlib.util.spec_from_file_location("amj", Path(__file__).parents[1] / "benchmarks" / "adalora_main_job.py")
    amj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(amj)
    fix = {"adalora_init": "orthonormal", "adalora_value_lr_ratio": 256.0}
    runs = dict(amj.configs([0, 2], tmp_path, {"device": "cpu"}, fix, tag="v256"))
    assert list(runs) == ["lora-s0", "adalora-v256-s0", "lora-s2", "adalora-v256-s2"]
    main_job = amj.load_config(amj.QUICKSTART)
    for name, config in runs.items():
        lora = name.startswith("lora")
        assert config.adapters == (["lora"] if lora else ["adalora"]) and config.seed == int(name[-1])
        assert (config.adalora_init, config.adalora_value_lr_ratio) == (
            ("gaussian", 1.0) if lora else ("orthonormal", 256.0))
        assert (config.rounds, config.local_steps, config.ranks, config.cutoff, config.max_examples) == (
            main_job.rounds, main_job.local_steps, main_job.ranks, main_job.cutoff, main_job.max_examples)

    def result(adapter, seed, final, up):
        return {"adapter": adapter, "seed": seed, "test_loss": [2.0, final], "client_test_loss": [1.9, final - 0.1],
                "bytes_up": [up, up]}

    table = amj.markdown([result("lora", 0, 1.90, 100), result("adalora-v256", 0, 1.905, 46),
                          result("lora", 1, 1.80, 100), result("adalora-v256", 1, 1.8150, 46),
                          result("adalora", 0, 1.80, 46)], "cmd")
    assert "adalora-v256 − LoRA, final test loss: mean +0.0100; within 0.01 on 1/2 seeds." in table
    assert "adalora − LoRA, final test loss: mean -0.1000; within 0.01 on 1/1 seeds." in table
    assert "(0.46)" in table


def test_every_shipped_config_loads_and_adalora_toml_is_the_main_job_with_the_measured_adalora_keys():
    from flora.config import load_config

    configs = Path(__file__).parents[1] / "configs"
    loaded = {path.stem: load_config(path) for path in sorted(configs.glob("*.toml"))}
    assert {"quickstart", "adalora"} <= loaded.keys()
    main_job, adalora = loaded["quickstart"].to_dict(), loaded["adalora"].to_dict()
    changed = {key for key in main_job if main_job[key] != adalora[key]}
    assert changed == {"adapters", "adalora_init", "adalora_value_lr_ratio", "out_dir"}
    assert (adalora["adapters"], adalora["adalora_init"], adalora["adalora_value_lr_ratio"]) == (
        ["adalora"], "orthonormal", 256.0)
