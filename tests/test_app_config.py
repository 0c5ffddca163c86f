"""Flower's run config is RunConfig: every key, type and check through Flower's own parser; node waits;
progress lines; bad input stops ``flora run`` before anything is submitted to Flower."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from flwr.common.config import fuse_dicts, parse_config_args

from flora.app_config import app_config_table, config_from_flower, pyproject_table, run_config_overrides
from flora.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def through_flower(config_string: str) -> tuple[dict, dict]:
    """What a ServerApp gets for ``flwr run . --run-config CONFIG_STRING``: the fused run config (the app's
    declared defaults with the overrides) and the overrides, parsed by Flower's own code."""
    overrides = parse_config_args([config_string])
    return fuse_dicts(app_config_table(), overrides), overrides


def test_pyproject_declares_every_config_key_at_its_default():
    table = pyproject_table((REPO / "pyproject.toml").read_text())
    assert table == app_config_table()  # regenerate with `python -m flora.app_config`
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    assert list(table) == fields + ["config-file", "resume", "simulation"]
    assert table["ranks"] == "16,8,4,4" and table["lr"] == 3e-4 and table["gradient_checkpointing"] is False


def test_every_field_round_trips_through_flowers_run_config_parser():
    # non-defaults of every kind: zeros, lists, bools, floats, a path with a space and a quote
    config = RunConfig(method="zeropad", num_clients=3, ranks=[8, 2, 1], rounds=5, lr=0.001, max_examples=0,
                       eval_examples=0, client_eval_examples=0, dropout=0.0, alpha_per_rank=1.5, max_client_weight=0.0,
                       dirichlet_alpha=0.05, targets=["q_proj", "o_proj"], adapters=["lora"], seed=0, threads=0,
                       gradient_checkpointing=True, dp_noise_seed=0, round_timeout=12.5, min_clients_wait=0.25,
                       min_clients=2, sample_fraction=0.5, out_dir="my runs/it's here", data="/d/x.jsonl",
                       lr_schedule="cosine", warmup_steps=0, client_cpus=1, report_to="none")
    fused, overrides = through_flower(run_config_overrides(config))
    assert set(overrides) == {f.name for f in dataclasses.fields(RunConfig)}  # every key, by its own name
    again, resume = config_from_flower(fused, overrides)
    assert again == config and resume is False
    assert config_from_flower(*through_flower(run_config_overrides(RunConfig())))[0] == RunConfig()
    # what a Flower user types
    typed, _ = config_from_flower(*through_flower("lr=0.002 method='fedit' ranks='4' rounds=0.5e1 "
                                                  "gradient_checkpointing=true max_examples=0 resume=true"))
    assert (typed.lr, typed.method, typed.ranks, typed.rounds, typed.gradient_checkpointing, typed.max_examples) == \
        (0.002, "fedit", [4], 5, True, 0)


def test_config_file_first_then_only_the_given_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nmethod = "zeropad"\nranks = [8, 4]\nnum_clients = 2\nlr = 1e-3\nrounds = 7\n')
    # lr given at its default value still overrides the file's (only given keys count, not changed values)
    config, resume = config_from_flower(*through_flower(f"config-file='{path}' lr=0.0003 rounds=2 resume=true"))
    assert (config.method, config.ranks, config.lr, config.rounds, resume) == ("zeropad", [8, 4], 3e-4, 2, True)
    assert config == load_config(path, ["lr=0.0003", "rounds=2"])


@pytest.mark.parametrize("flower, set_", [
    ("rounds='two'", "rounds=two"), ("rounds=0", "rounds=0"), ("ranks='4,x'", "ranks=4,x"),
    ("method='fedavg'", "method=fedavg"), ("round_timeout=inf", "round_timeout=inf"),
    ("min_clients_wait=0", "min_clients_wait=0"), ("report_to='wandb'", "report_to=wandb"),
    ("gradient_checkpointing='maybe'", "gradient_checkpointing=maybe"),
])
def test_a_bad_value_fails_as_it_does_with_set(flower, set_):
    with pytest.raises(ConfigError) as from_set:
        load_config(None, [set_])
    with pytest.raises(ConfigError) as from_flower:
        config_from_flower(*through_flower(flower))
    # same message after the source prefix ("defaults: " / "run config: ")
    assert str(from_flower.value).split(": ", 1)[-1] == str(from_set.value).split(": ", 1)[-1]


def test_round_timeout_and_node_wait_must_be_finite_and_positive():
    for key in ("round_timeout", "min_clients_wait"):
        for bad in (0, -1, float("inf"), float("nan")):
            with pytest.raises(ConfigError, match=f"{key} = .*finite number of seconds > 0"):
                RunConfig(**{key: bad})


class FakeGrid:
    """``get_node_ids`` answers from a list of connection counts, one per call (the last repeats)."""

    def __init__(self, counts):
        self.counts, self.calls = list(counts), 0

    def get_node_ids(self):
        count = self.counts[min(self.calls, len(self.counts) - 1)]
        self.calls += 1
        return list(range(100, 100 + count))


def test_rounds_wait_for_min_clients_then_fail_clearly():
    from flora.strategy import NotEnoughNodes, wait_for_nodes

    started = time.monotonic()
    with pytest.raises(NotEnoughNodes, match=r"round 3: 1 of min_clients = 2 nodes connected after waiting "
                                             r"min_clients_wait = 0.3 s"):
        wait_for_nodes(FakeGrid([1]), 2, 0.3, 3, poll=0.05)
    assert 0.3 <= time.monotonic() - started < 3
    grid = FakeGrid([0, 1, 3])  # nodes arrive while the round waits
    assert wait_for_nodes(grid, 2, 5.0, 1, poll=0.01) == [100, 101, 102] and grid.calls == 3


def test_strategy_round_fails_when_too_few_nodes_connect(assets_dir, tmp_path, runtime):
    from flwr.app import ArrayRecord, ConfigRecord

    from flora.runner import server_for
    from flora.strategy import FloraStrategy, NotEnoughNodes
    from test_federation import tiny_config

    config = tiny_config(assets_dir, tmp_path, min_clients=3, min_clients_wait=0.2)
    strategy = FloraStrategy(config, server_for(config, runtime), progress=lambda _: None)
    with pytest.raises(NotEnoughNodes, match="2 of min_clients = 3 nodes connected"):
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([2])))


def test_client_resources_reach_flowers_simulation_config():
    from flwr.supercore.utils import simulation_config_from_json

    from flora.simulation import federation_config

    config = RunConfig(num_clients=4, ranks=[4], client_cpus=2, client_gpus=0.5, device="cuda")
    settings = federation_config(config)
    proto = simulation_config_from_json({k.replace("-", "_"): v for k, v in settings.items()})  # as `flwr run` does
    assert (proto.num_supernodes, proto.client_resources_num_cpus, proto.client_resources_num_gpus) == (4, 2, 0.5)
    with pytest.raises(ConfigError, match="client_gpus > 0"):
        federation_config(RunConfig(device="cuda"))


def test_step_lines_become_progress(capsys):
    from flora.progress import ProgressView, step_line, step_printer

    line = step_line(2, 5, 1, 3, 4, 1.23456, 6.0)
    assert line == "[flora] round 2/5 client 1: step 3/4, loss 1.2346, 6.0 s (ETA 2 s)"
    shown = []
    view = ProgressView(shown.append, bars=False)
    for text in ("(ClientAppActor pid=7) " + line, "[round 2] test loss 1.0"):
        view.line(text)
    assert shown == [line, "[round 2] test loss 1.0"]
    quiet = []
    ProgressView(quiet.append, quiet=True).line(line)
    assert quiet == []
    bars = ProgressView(print, bars=True)
    printer = step_printer(1, 2, 0, bars.line)
    for step in (1, 2, 3):
        printer(step, 3, 0.5)
    assert bars._bars[0].n == 3
    bars.close()
    assert "round 1/2 client 0" in capsys.readouterr().err


def test_flower_engine_refuses_bad_input_before_submitting(assets_dir, tmp_path, capsys):
    from flora.cli import main

    out = tmp_path / "out"
    status = main(["run", "--set", f"model={assets_dir / 'model'}", "--set", f"data={tmp_path / 'missing.jsonl'}",
                   "--set", f"out_dir={out}", "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and error.startswith("flora: error: data ") and "missing.jsonl" in error, error
    assert not (out / "flower.log").exists()  # nothing was submitted


def test_tensorboard_tracking_and_loss_plot_start_at_round_zero(assets_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flora.engines import run_in_process
    from flora.report import initial_point, round_ticks, write_report
    from test_federation import tiny_config

    config = tiny_config(assets_dir, tmp_path, report_to="tensorboard", client_eval_examples=2)
    lines = []
    metrics = run_in_process(config, progress=lines.append).metrics
    out = Path(config.out_dir)
    base = initial_point(out)
    assert len(base) == 1 and f"initial test loss {base[0]:.4f}" in lines[0]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    test = [(e.step, e.value) for e in events.Scalars("test_loss")]
    assert [s for s, _ in test] == [0, 1, 2]
    assert [v for _, v in test] == pytest.approx(base + [m["test_loss"] for m in metrics], rel=1e-6)
    for m in metrics:
        for k, loss in m["client_train_loss"].items():  # every client's own loss, per round
            assert [e.value for e in events.Scalars(f"client_train_loss/{k}") if e.step == m["round"]] == \
                pytest.approx([loss], rel=1e-6)
        assert [e.value for e in events.Scalars("client_test_loss/1") if e.step == m["round"]] == \
            pytest.approx([m["client_test_losses"]["1"]], rel=1e-6)
    assert any(x.startswith("[flora] round 1/2: training clients 0, 1, 2") for x in lines)
    assert sum(x.startswith("[flora] round 2/2 client 1: step ") for x in lines) == config.local_steps
    write_report(out)
    assert (out / "loss.png").stat().st_size > 0
    assert round_ticks(0, 2) == [0, 1, 2] and round_ticks(0, 50) == list(range(0, 51, 5))


def test_a_missing_tracker_library_is_a_config_error(monkeypatch):
    import sys

    from flora.tracking import check_tracking

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ConfigError, match=r"report_to = 'mlflow': the mlflow package is not installed.*"
                                          r"flora-llm\[mlflow\]"):
        check_tracking(RunConfig(report_to="mlflow"))
