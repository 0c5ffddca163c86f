"""Node-local data (issue 16): a node reads its own file only; simulated nodes get their shard through the
same loader; the deployment server loads no data; federated evaluation in process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flora.client import FederationClient
from flora.data.formats import DataError
from flora.data.node import carve, load_node_data, shard_path, write_shards
from flora.data.partition import partition
from flora.runner import server_for, start_run
from test_federation import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_carve_holds_out_a_seeded_fraction_in_file_order():
    train, test = carve(20, 0.25, seed=3)
    order = np.random.default_rng(3).permutation(20)  # the reference: the first 5 of the seeded permutation
    assert test == sorted(order[:5].tolist()) and train == sorted(order[5:].tolist())
    assert carve(20, 0.25, seed=3) == (train, test) and carve(20, 0.25, seed=4) != (train, test)
    assert carve(1, 0.5, seed=0) == ([0], [])  # a node keeps at least one training row


def test_shards_hold_exactly_the_partitioners_split(records, tmp_path):
    split = partition(records, 3, scheme="dirichlet", alpha=0.5, seed=1, test_fraction=0.1)
    paths = write_shards(records, split, tmp_path / "shards")
    assert [p.name for p in paths] == [f"partition-{k}.jsonl" for k in range(3)]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in paths)
    for k, path in enumerate(paths):
        data = load_node_data(path, test_fraction=0.9, seed=99)  # marked rows: the fraction does not apply
        assert list(data.train) == [records[i] for i in split.clients[k]]
        assert list(data.test) == [records[i] for i in split.client_tests[k]]


def test_node_file_errors_name_the_file_and_the_line_as_an_editor_counts(tmp_path):
    jsonl = tmp_path / "node.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"node\.jsonl: line 3 \(alpaca\): missing field 'output'"):
        load_node_data(jsonl, test_fraction=0.0)
    array = tmp_path / "node.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}]))
    with pytest.raises(DataError, match=r"node\.json: item 2 \(alpaca\): field 'output' must be a string"):
        load_node_data(array, test_fraction=0.0)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"instruction": "a", "output": "b", "split": "train"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl: line 2: no 'split' field"):
        load_node_data(mixed)
    with pytest.raises(DataError, match=r"node data .*absent\.jsonl: no such file"):
        load_node_data(tmp_path / "absent.jsonl")


def test_a_simulated_client_opens_its_own_shard_only(assets_dir, tmp_path, runtime, monkeypatch):
    """After the launcher wrote the shards, client 0 trains and evaluates with the dataset and the other
    shards gone, and the only data file it reads is its own shard."""
    import shutil

    data = tmp_path / "data.jsonl"
    shutil.copy(assets_dir / "data.jsonl", data)
    config = tiny_config(assets_dir, tmp_path, data=str(data), client_eval_examples=4)
    server, _ = start_run(config, runtime, progress=lambda _: None, known_partitions=True)
    data.unlink()
    for k in (1, 2):
        shard_path(config.out_dir, k).unlink()
    read = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (read.append(str(self)), original(self))[1])
    client = FederationClient(config, runtime)
    reply = client.train(0, "node-0", 1, 0, [])
    assert reply.error is None and reply.num_examples == server.known_size(0)
    evaluation = client.evaluate(0, "node-0", 0, [])
    assert evaluation.error is None and evaluation.tokens > 0 and math.isfinite(evaluation.loss)
    assert [p for p in read if p.endswith((".jsonl", ".json"))] == [str(shard_path(config.out_dir, 0))]
    missing = client.train(1, "node-1", 1, 0, [])  # its shard is gone: a clear error naming the node and file
    assert missing.factors is None and "node node-1 (partition-id 1)" in missing.error
    assert str(shard_path(config.out_dir, 1)) in missing.error and "data-path" in missing.error
    assert "node node-2 (partition-id 2)" in client.evaluate(2, "node-2", 0, []).error


def test_a_deployment_server_loads_no_data(assets_dir, tmp_path, runtime):
    config = tiny_config(assets_dir, tmp_path, data=str(tmp_path / "never" / "there.jsonl"))
    server = server_for(config, runtime, known_partitions=False)  # would raise if it opened the dataset
    record = server.evaluate_round()
    assert math.isnan(record["test_loss"]) and "federated evaluation only" in record["test_set"]
    own = server_for(tiny_config(assets_dir, tmp_path, data=str(tmp_path / "never" / "there.jsonl"),
                                 server_test_data=str(assets_dir / "data.jsonl"), eval_examples=8),
                     runtime, known_partitions=False)
    record = own.evaluate_round()
    assert math.isfinite(record["test_loss"]) and record["test_set"].startswith("server_test_data ")


def test_federated_evaluation_in_process_is_the_token_weighted_mean(assets_dir, tmp_path):
    """Every client reports its own split's loss and tokens; the record's mean is their token-weighted mean and
    each client's loss is the global model's loss on its shard's held-out rows, computed here directly."""
    from flora.engines import run_in_process
    from flora.runtime import Runtime

    config = tiny_config(assets_dir, tmp_path, partition="dirichlet", client_eval_examples=3)
    runtime = Runtime()
    server = run_in_process(config, runtime=runtime, progress=lambda _: None)
    last = server.metrics[-1]
    losses, tokens = last["client_test_losses"], last["client_test_tokens"]
    assert set(losses) == {"0", "1", "2"}
    assert last["client_test_loss"] == pytest.approx(sum(losses[k] * tokens[k] for k in losses) / sum(tokens.values()))
    assets = runtime.assets(config)
    for k in range(3):
        held_out = list(load_node_data(shard_path(config.out_dir, k)).test)[:3]
        examples = assets.encode(("check", k), held_out, config.cutoff)
        loss = server.state.evaluate(assets.tokenizer, examples, server.state.adapter)
        assert losses[str(k)] == pytest.approx(loss, rel=1e-6)
        assert tokens[str(k)] == sum(e.num_target_tokens for e in examples)


def test_deploy_script_refuses_a_node_data_count_that_does_not_match(tmp_path, assets_dir):
    config = tmp_path / "c.toml"
    config.write_text(f'[run]\nmodel = "{assets_dir / "model"}"\ndata = "{assets_dir / "data.jsonl"}"\n'
                      f'num_clients = 3\nranks = [4, 2, 1]\n')
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(REPO / "scripts" / "deploy_local.sh"), "--config", str(config), "--work",
                           str(work), "--node-data", f"{assets_dir / 'data.jsonl'},{assets_dir / 'data.jsonl'}"],
                          cwd=REPO, env=dict(os.environ, FLORA_PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--node-data names 2 files for 3 SuperNodes" in done.stderr
    assert not list((work / "pids").glob("*.pid")) and not (work / "logs" / "superlink.log").exists()


def test_a_node_reads_a_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")  # the `data` extra (scripts/setup.sh installs it)
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "category": "qa"} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "mine"))
    data = load_node_data(tmp_path / "mine", test_fraction=0.2, seed=5)
    train, test = carve(10, 0.2, seed=5)
    assert [r.messages[0]["content"] for r in data.test] == [f"q{i}" for i in test]
    assert [r.messages[0]["content"] for r in data.train] == [f"q{i}" for i in train]
