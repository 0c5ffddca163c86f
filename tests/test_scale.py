"""Scale: collapsed catch-up (exact, no more bytes than the missed updates or one dense delta), the server's
bounded history (resume, clients behind it), and server state that does not grow with registered clients."""

from __future__ import annotations

import json

import pytest
import torch

from flora.checkpoint import read_checkpoint
from flora.catchup import (History, catch_up, collapse, collapse_merges, dense_model_bytes, node_history,
                           stored_bytes)
from flora.codec import updates_from_tensors, updates_to_tensors
from flora.config import RunConfig
from flora.engines import run_in_process
from flora.rounds import GlobalState, RoundUpdate, nbytes
from flora.runtime import Runtime

SHAPES = {"0": (24, 16), "1": (16, 24)}  # (out, in) of a two-layer toy model; dense break-even rank 9.6


def toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))


def random_update(round_: int, rank: int, dense_layer: str | None = None, adapter: bool = False) -> RoundUpdate:
    generator = torch.Generator().manual_seed(round_)
    update = RoundUpdate(round=round_)
    for name, (out_dim, in_dim) in SHAPES.items():
        A = torch.randn(rank, in_dim, generator=generator) * 0.1
        B = torch.randn(out_dim, rank, generator=generator) * 0.1
        update.merge[name] = B @ A if name == dense_layer else (A, B)
    if adapter:
        update.adapter = {name: (torch.randn(2, i, generator=generator), torch.randn(o, 2, generator=generator))
                          for name, (o, i) in SHAPES.items()}
    return update


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_close(ours: dict, reference: dict, tol: float = 1e-6) -> None:
    for name, ref in reference.items():
        assert float((ours[name] - ref).norm()) <= tol * max(float(ref.norm()), 1e-12), name


def sequential(updates: list[RoundUpdate]) -> dict[str, torch.Tensor]:
    """Reference: every round applied one by one, in float64 (plain sums of the products)."""
    model = toy_model()
    state = {name: p.detach().double().clone() for name, p in model.state_dict().items()}
    for update in updates:
        for name, merge in update.merge.items():
            state[f"{name}.weight"] += merge.double() if isinstance(merge, torch.Tensor) else \
                merge[1].double() @ merge[0].double()
    return state


def test_collapsed_merges_equal_the_updates_applied_one_by_one_and_cost_no_more():
    updates = [random_update(t, rank=2, dense_layer="1" if t == 3 else None) for t in range(1, 6)]
    reference = sequential(updates)
    one_by_one = GlobalState(toy_model())
    one_by_one.apply(updates, 0)
    collapsed = collapse(updates)
    assert collapsed.span == 5
    state = GlobalState(toy_model())
    state.apply([collapsed], 0)
    assert state.applied == 5
    assert_close(weights(state.model), reference)
    assert_close(weights(state.model), weights(one_by_one.model))
    for name, (out_dim, in_dim) in SHAPES.items():
        missed = sum(nbytes(u.merge[name]) for u in updates)
        assert nbytes(collapsed.merge[name]) <= min(missed, out_dim * in_dim * 4), name
    # layer "0": 5 × rank 2 = 10 > break-even 9.6: dense; rank 2 + 2 stays stacked (the same bytes as separately)
    assert isinstance(collapsed.merge["0"], torch.Tensor)
    form, pair = collapse_merges([updates[0].merge["0"], updates[1].merge["0"]])
    assert form == "stacked" and pair[0].shape == (4, 16)
    assert nbytes(pair) == sum(nbytes(u.merge["0"]) for u in updates[:2])


def test_collapse_keeps_the_last_adapter_only():
    updates = [random_update(t, rank=1, adapter=True) for t in range(1, 4)]
    collapsed = collapse(updates)
    assert collapsed.adapter is updates[-1].adapter
    assert collapsed.nbytes(rank=None) < sum(u.nbytes(rank=None) for u in updates)


def test_history_is_bounded_and_a_client_behind_it_ends_at_the_same_weights():
    history = History(dense_model_bytes(SHAPES))
    updates = [random_update(t, rank=1 + t % 3) for t in range(1, 41)]
    largest = max(stored_bytes(u) for u in updates)
    client = GlobalState(toy_model(), reload=None)
    for t, update in enumerate(updates, start=1):
        history.append(update)
        assert history.nbytes() <= 2 * history.dense_bytes + largest  # independent of the number of rounds
        if t == 5:
            client.apply(list(history), 0)  # a client that took part up to round 5, then left
    assert len(history) == 40 and history.base_span > 5 and len(history.entries) < 10
    reference = sequential(updates)
    # the client at 5 (inside the folded base) gets base + rest from index 0 and must start over from the base
    first, entries = catch_up(history, 5)
    assert first == 0 and sum(u.span for u in entries) == 40
    with pytest.raises(RuntimeError, match="out of sync"):  # no way back to the base weights: refused, unchanged
        client.apply(entries, first)
    base = weights(toy_model())
    returning = GlobalState(client.model, reload=lambda: client.model.load_state_dict(base))
    returning.applied = 5
    returning.apply(entries, first)
    assert returning.applied == 40
    assert_close(weights(returning.model), reference)
    # it missed at least one dense delta's worth, and downloads at most one dense delta
    missed = sum(u.nbytes(None) for u in updates[5:])
    assert len(entries) == 1 and missed >= history.dense_bytes >= entries[0].nbytes(None)
    # a process serving several nodes gets the newest round beside the rest: one dense delta plus that round
    shared = catch_up(history, 5, keep_newest=True)[1]
    assert [u.span for u in shared] == [39, 1]
    assert sum(u.nbytes(None) for u in shared) <= history.dense_bytes + updates[-1].nbytes(None)
    # a client inside the kept rounds gets exactly what it lacks, collapsed
    start = len(history) - 3
    first, entries = catch_up(history, start, keep_newest=True)
    assert first == start and [u.span for u in entries] == [2, 1]
    recent = GlobalState(toy_model())
    recent.apply(list(history)[:1], 0)
    for update in list(history)[1:]:
        if recent.applied < start:
            recent.apply([update], recent.applied)
    recent.apply(entries, first)
    assert_close(weights(recent.model), reference)


def test_history_entries_travel_with_their_spans():
    collapsed = collapse([random_update(t, rank=2) for t in (1, 2, 3)])
    tail = random_update(4, rank=2)
    empty = RoundUpdate(round=5)  # a round whose aggregate was dropped: no tensors, one index
    tensors = updates_to_tensors([collapsed, tail, empty], 2, rank=None)
    assert "u2.span" in tensors and "u5.m.0.A" in tensors
    decoded = updates_from_tensors(tensors, 2, 5)
    assert [u.span for u in decoded] == [3, 1, 1]
    assert torch.equal(decoded[0].merge["0"][0], collapsed.merge["0"][0])


def test_warm_methods_keep_every_round():
    history = History(dense_model_bytes(SHAPES), fold=False)
    for t in range(1, 8):
        history.append(random_update(t, rank=4))
    assert len(history.entries) == 7 and [u.span for u in catch_up(history, 2)[1]] == [1] * 5


def test_a_deployed_node_keeps_one_bounded_entry_and_rebuilds_the_global_weights_in_every_new_process():
    """A deployed node starts a new process for every message: it re-applies what it kept (encoded, as in
    Flower's context.state), then the message, then keeps ``node_history`` of both. It takes part in rounds
    1-5, misses 6-29 (the server folds them into its base, so the node's catch-up starts over from index 0 over
    part of what it holds), then every round to 40."""
    history = History(dense_model_bytes(SHAPES))
    updates = [random_update(t, rank=1 + t % 3, adapter=t % 4 == 0) for t in range(1, 41)]
    base = weights(toy_model())
    kept_tensors, kept_count, restarts = {}, 0, 0
    for t, update in enumerate(updates, start=1):
        history.append(update)
        if 5 < t < 30:
            continue
        first, entries = catch_up(history, kept_count)
        model = toy_model()
        process = GlobalState(model, reload=lambda: model.load_state_dict(base))
        held = updates_from_tensors(kept_tensors, 0, kept_count)
        process.apply(held, 0)
        restarts += first == 0 and kept_count > 0
        process.apply(entries, first)
        kept = node_history(held, first, entries)
        assert len(kept) == 1 and kept[0].span == process.applied == t
        kept_tensors, kept_count = updates_to_tensors(kept, 0, None), process.applied
        # bounded: one dense delta at most, plus the last adapter, whatever the number of rounds
        adapter = sum(nbytes(f) for f in (kept[0].adapter or {}).values())
        assert sum(v.numel() * v.element_size() for k, v in kept_tensors.items() if ".m." in k) <= history.dense_bytes
        assert kept[0].nbytes(None) <= history.dense_bytes + adapter
        # a new process rebuilds exactly what this one holds: the global weights and the latest adapter
        rebuilt = GlobalState(toy_model())
        rebuilt.apply(updates_from_tensors(kept_tensors, 0, kept_count), 0)
        assert_close(weights(rebuilt.model), weights(process.model))
        assert_close(weights(rebuilt.model), sequential(updates[:t]))
        latest = next(u.adapter for u in reversed(updates[:t]) if u.adapter is not None) if t >= 4 else None
        assert (rebuilt.adapter is None) == (latest is None)
        if latest is not None:
            assert all(torch.equal(rebuilt.adapter[n][0], latest[n][0]) for n in latest)
    assert restarts == 1  # the return after round 29 started over from the base
    # entries it already holds are skipped; one that cannot follow what it holds is refused (None)
    tail = random_update(41, rank=2)
    assert [u.span for u in node_history(kept, 38, [updates[38], updates[39], tail])] == [41]
    assert node_history(kept, 40, [tail]) is not None and node_history(kept, 41, [tail]) is None  # a gap
    assert node_history(kept, 20, [collapse(updates[20:40] + [tail])]) is None  # part of what it holds, not from 0
    assert node_history(kept, 20, [collapse(updates[20:40])]) == kept  # all of it held: skipped
    assert [u.span for u in node_history(kept, 40, [tail], fold=False)] == [40, 1]  # warm methods: kept whole


# --- a federation of many registered clients, a few sampled ---------------------------------------------

def scale_config(assets_dir, tmp_path, registered: int, **overrides) -> RunConfig:
    values = dict(model=str(assets_dir / "model"), data=str(assets_dir / "many.jsonl"), num_clients=registered,
                  ranks=[2], rounds=3, local_steps=1, batch_size=2, micro_batch_size=2, lr=5e-3, cutoff=48,
                  max_examples=0, partition="iid", test_fraction=0.02, eval_examples=4, client_eval_examples=2,
                  dropout=0.0, min_clients=3, sample_fraction=3 / registered,
                  out_dir=str(tmp_path / f"out{registered}"))
    values.update(overrides)
    return RunConfig.from_dict(values)


@pytest.fixture(scope="module")
def many_rows(assets_dir):
    rows = [{"instruction": f"Question {i}: what is {i} plus one?", "output": f"It is {i + 1}."} for i in range(1300)]
    (assets_dir / "many.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return assets_dir


def server_state_sizes(server) -> dict:
    return {"history_entries": len(server.history.entries), "history_bytes": server.history.nbytes(),
            "node_applied": len(server.node_applied), "node_rank": len(server.node_rank),
            "node_partition": len(server.node_partition), "sizes": len(server._sizes),
            "client_losses": max(len(m["client_test_losses"]) for m in server.metrics),
            "encoded_splits": sum(1 for key in server.assets.encoded if key[0][0] != "server test")}


def test_server_state_does_not_grow_with_registered_clients(many_rows, tmp_path):
    sizes = {}
    for registered in (50, 500):
        # each node carves its held-out split from its own few rows: half of them, so every node has one
        server = run_in_process(scale_config(many_rows, tmp_path, registered, test_fraction=0.2),
                                progress=lambda _: None)
        assert [m["clients_ok"] for m in server.metrics] == [3, 3, 3]
        sizes[registered] = server_state_sizes(server)
        # the round's clients evaluate, not all registered ones (at 500 a node's few rows may hold no test row)
        assert sizes[registered]["client_losses"] <= 3
        assert sizes[registered]["node_applied"] <= 3 * len(server.history.entries)
        # one number per partition that took part (at most rounds × sampled), none for the others
        assert max(sizes[registered][k] for k in ("node_partition", "sizes", "node_rank")) <= 3 * 3
    assert sizes[50]["client_losses"] == 3
    for key in ("history_entries", "history_bytes"):
        assert sizes[50][key] == sizes[500][key], sizes


def test_bounded_history_resumes_exactly_and_serves_a_client_behind_it(many_rows, tmp_path):
    config = scale_config(many_rows, tmp_path, 20, sample_fraction=0.2, min_clients=1, rounds=4, ranks=[8])
    reference = run_in_process(config, progress=lambda _: None)
    assert reference.history.base_span > 1  # the tiny model's rounds are dense: the history folds
    stopped = RunConfig.from_dict({**config.to_dict(), "rounds": 2, "out_dir": str(tmp_path / "stopped")})
    run_in_process(stopped, progress=lambda _: None)
    resumed_config = RunConfig.from_dict({**stopped.to_dict(), "rounds": 4})
    resumed = run_in_process(resumed_config, progress=lambda _: None, resume=True)
    assert [u.span for u in resumed.history] == [u.span for u in reference.history]
    for ours, theirs in zip(resumed.history, reference.history):
        for name, merge in theirs.merge.items():
            assert torch.equal(ours.merge[name], merge) if isinstance(merge, torch.Tensor) else \
                all(torch.equal(a, b) for a, b in zip(ours.merge[name], merge))
    assert_close(weights(resumed.state.model), weights(reference.state.model))
    assert [round(m["test_loss"], 6) for m in resumed.metrics] == [round(m["test_loss"], 6) for m in reference.metrics]
    # a client process that took part in round 1 only: behind the folded base, it reloads its base weights
    state = Runtime().client_state(config)
    state.apply(read_checkpoint(config.out_dir).updates[:1], 0)
    assert state.applied == 1 and reference.history.base_span > 1
    first, entries = catch_up(reference.history, 1)
    assert first == 0 and len(entries) == 1
    state.apply(entries, first)
    assert state.applied == 4
    assert_close(weights(state.model), weights(reference.state.model))


def test_client_sampling_is_uniform_without_replacement_and_needs_no_list_of_all_clients():
    from collections import Counter

    from flora.server import sample_clients

    assert sample_clients(7, 1.0, 1, 3, 0) == list(range(7))
    draws = [sample_clients(10, 0.3, 1, round_, 0) for round_ in range(6000)]
    assert all(len(d) == len(set(d)) == 3 for d in draws)
    counts = Counter(i for d in draws for i in d)
    assert sorted(counts) == list(range(10)) and max(abs(c - 1800) for c in counts.values()) < 150  # ~3.5 sigma
    assert len(sample_clients(10**12, 0.0, 5, 1, 0)) == 5  # a trillion registered: 5 draws, no list of them
