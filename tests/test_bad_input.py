"""Bad input, end to end: what a user sees for each kind, and that nothing already written is lost.

Run-level inputs go through ``flora run`` (the CLI) into an out dir holding a finished run; every one
must exit with status 2, print ``flora: error: ...`` naming the file/key/value and what was expected,
and leave the out dir byte for byte as it was. Update-level inputs (a client's factors) go through the
server: the update is rejected and logged, and the round goes on with the others. The catalogue with
the messages is in docs/BAD_INPUT.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora.cli import main
from flora.data.formats import DataError
from flora.data.sources import convert_rows, load_records, recover_json_array
from flora.eval.mmlu import load_mmlu
from flora.client import FederationClient
from flora.runner import server_for
from test_federation import tiny_config




def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(assets_dir, tmp_path_factory):
    """A config file and an out dir holding one finished round (metrics, checkpoint)."""
    root = tmp_path_factory.mktemp("finished")
    values = dict(model=str(assets_dir / "model"), data=str(assets_dir / "data.jsonl"), num_clients=3,
                  ranks=[4, 2, 1], rounds=1, local_steps=1, batch_size=4, micro_batch_size=2, cutoff=64,
                  max_examples=0, partition="iid", test_fraction=0.1, eval_examples=0, client_eval_examples=0,
                  dropout=0.0, out_dir=str(root / "out"))
    config = root / "run.toml"
    config.write_text(tomli_w.dumps({"run": values}))
    assert main(["run", "--config", str(config), "--engine", "local", "--quiet"]) == 0
    return config, root / "out"


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


ALPACA = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(6)]
LATIN1 = '[{"instruction": "café", "output": "x"}]'.encode("latin-1")


# kind -> (extra `flora run` arguments built from tmp_path, expected message fragment)
RUN_LEVEL = {
    "truncated JSON data": (lambda t: ["--set", f"data={_write(t, 'cut.json', json.dumps(ALPACA)[:-30])}"],
                            "the file looks truncated"),
    "missing field in a row": (lambda t: ["--set", "data=" + _write(t, "nofield.jsonl", "\n".join(
        json.dumps(r) for r in ALPACA[:3] + [{"instruction": "no output"}]))], "line 4 (alpaca): missing field 'output'"),
    "data file not UTF-8": (lambda t: ["--set", "data=" + _write(t, "latin1.json", LATIN1)],
                            "not UTF-8 text (byte 0xe9"),
    "empty data file": (lambda t: ["--set", f"data={_write(t, 'empty.json', '')}"], "the file is empty"),
    "missing data file": (lambda t: ["--set", f"data={t / 'nope.jsonl'}"], "no such file or directory"),
    "empty partition (more clients than examples)": (
        lambda t: ["--set", "data=" + _write(t, "three.jsonl", "\n".join(json.dumps(r) for r in ALPACA[:3])),
                   "--set", "num_clients=3", "--set", "ranks=1"], "training examples for 3 clients"),
    "unknown model path": (lambda t: ["--set", f"model={t / 'no-model'}"], "no-model"),
    "rank 0": (lambda t: ["--set", "ranks=4,0,1"], "ranks = [4, 0, 1]: expected ranks >= 1"),
    "rank larger than the layer": (lambda t: ["--set", "ranks=64,2,1"], "rank 64 exceeds min(out, in) = 16"),
    "malformed config value": (lambda t: ["--set", "lr=fast"], "lr = 'fast': expected float"),
    "unknown config key": (lambda t: ["--set", "learning_rate=0.1"], "unknown key(s) ['learning_rate']"),
    "unknown data format": (lambda t: ["--set", "format=csv"], "unknown format 'csv'"),
    "resume with a changed config": (lambda t: ["--resume", "--set", "rounds=2", "--set", "lr=0.1"],
                                     "the config differs from the checkpoint's (lr: 0.0003 -> 0.1)"),
}


@pytest.mark.parametrize("kind", list(RUN_LEVEL))
def test_run_level_bad_input_is_a_clear_error_and_loses_nothing(kind, finished_run, tmp_path, capsys):
    config, out = finished_run
    before = _snapshot(out)
    arguments, expected = RUN_LEVEL[kind]
    status = main(["run", "--config", str(config), "--engine", "local", "--quiet", *arguments(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the last line: above it, model-loading bars
    assert status == 2 and error.startswith("flora: error: "), error
    assert expected in error, error
    assert _snapshot(out) == before


def test_malformed_toml_and_missing_config_file(tmp_path, capsys):
    bad = _write(tmp_path, "bad.toml", "[run]\nrounds = \n")
    assert main(["run", "--config", bad]) == 2
    assert f"config file {bad}: invalid TOML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: not found" in capsys.readouterr().err


@pytest.mark.parametrize("damage, expected", [
    ("truncate state", "unreadable checkpoint state"),
    ("truncate round file", "00001.safetensors: unreadable round file"),
    ("delete round file", "00001.safetensors: missing round file"),
])
def test_unreadable_checkpoint_is_a_clear_error_and_loses_nothing(finished_run, tmp_path, capsys, damage, expected):
    import shutil

    config, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    state, round_file = copy / "checkpoint" / "state.json", copy / "checkpoint" / "rounds" / "00001.safetensors"
    if damage == "truncate state":
        state.write_text(state.read_text()[:40])
    elif damage == "truncate round file":
        round_file.write_bytes(round_file.read_bytes()[:64])
    else:
        round_file.unlink()
    before = _snapshot(copy)
    status = main(["run", "--config", str(config), "--engine", "local", "--quiet", "--resume", "--set", "rounds=2",
                   "--set", f"out_dir={copy}"])
    error = capsys.readouterr().err
    assert status == 2 and expected in error, error
    assert _snapshot(copy) == before


# --- update level: rejected, logged, the round goes on ----------------------------------------

def _corrupt(factors: dict, kind: str) -> None:
    name = sorted(factors)[0]
    A, B = factors[name]
    if kind == "NaN":
        B[0, 0] = math.nan
    elif kind == "Inf":
        A[0, 0] = math.inf
    elif kind == "wrong shape":
        factors[name] = (A[:, :-1], B)
    elif kind == "rank above the layer":
        factors[name] = (torch.ones(40, A.shape[1]), torch.ones(B.shape[0], 40))
    elif kind == "missing layer":
        del factors[name]
    elif kind == "huge norm":
        factors[name] = (A, B * 1e6)


@pytest.mark.parametrize("kind, expected", [
    ("NaN", "non-finite values"), ("Inf", "non-finite values"), ("wrong shape", "does not fit layer"),
    ("rank above the layer", "rank 40 exceeds"), ("missing layer", "layer set differs"),
    ("huge norm", "exceeds the bound"),
])
def test_bad_update_is_rejected_logged_and_round_goes_on(assets_dir, tmp_path, caplog, runtime, kind, expected):
    config = tiny_config(assets_dir, tmp_path, rounds=1, max_update_norm=50.0)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
    _corrupt(replies[1].factors, kind)
    record = server.aggregate_round(1, replies, 0, 0.0)
    assert (record["clients_ok"], record["clients_rejected"]) == (2, 1)
    assert math.isfinite(record["test_loss"]) and record["aggregation_error"] < 1e-4
    assert "rejected update: client 1" in caplog.text and expected in caplog.text, caplog.text


# --- fuzzing the loaders: only DataError, never a crash ----------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4) |
                           st.dictionaries(st.sampled_from(["instruction", "input", "output", "context", "response",
                                                            "conversations", "messages", "from", "value", "role",
                                                            "content", "category", "id", "x"]), children, max_size=5),
                           max_leaves=20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(rows=st.lists(json_values, min_size=1, max_size=5), fmt=st.sampled_from(
    ["auto", "sharegpt", "alpaca", "dolly", "wizard", "messages"]))
def test_fuzz_row_conversion_raises_only_data_errors(rows, fmt):
    try:
        records, report = convert_rows(rows, fmt, "fuzz")
    except DataError:
        return
    assert records and all(r.messages for r in records) and report.rows == len(rows)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".txt"]))
def test_fuzz_file_bytes_raise_only_data_errors(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"f{suffix}"
    path.write_bytes(data)
    try:
        load_records(path)
    except DataError:
        pass
    try:
        load_mmlu(path)
    except DataError:
        pass


@FUZZ
@given(rows=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3), min_size=1, max_size=6),
       cut=st.integers(min_value=0, max_value=400))
def test_fuzz_truncated_array_recovers_exactly_the_complete_rows(rows, cut):
    text = json.dumps(rows, indent=1)
    cut = min(cut, len(text))
    try:
        recovered, tail = recover_json_array(text[:cut], "fuzz")
    except DataError:
        assert not text[:cut].lstrip().startswith("[")  # only a text without the opening bracket is refused
        return
    assert recovered == rows[:len(recovered)]
    if cut == len(text):
        assert recovered == rows and tail == 0
