"""Warm starts (``flora-warm``, flora/lora/warm.py): the start factors, exact aggregation, clients starting at
the global model, one client = centralized training, resume; against plain reference math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.client import FederationClient, lora_spec
from flora.config import ConfigError, RunConfig
from flora.engines import run_in_process
from flora.lora.aggregate import aggregation_error
from flora.lora.factors import normalize_weights
from flora.lora.methods import aggregate
from flora.precision import temporary_update
from flora.lora.warm import LORA_ROW_NORM, WarmSource
from flora.runner import server_for
from flora.runtime import Runtime
from flora.train import attach_adapter, detach_adapter
from test_aggregate import make_updates
from test_federation import tiny_config

TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def _random_parts(layers, ranks, seed, dense_every=0):
    """Merge parts per round: factors of the given ranks, a dense matrix every ``dense_every``-th round."""
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for t, r in enumerate(ranks, start=1):
        rounds.append({name: torch.randn(o, i, generator=gen, dtype=torch.float64) if dense_every and t % dense_every == 0
                       else (torch.randn(r, i, generator=gen, dtype=torch.float64),
                             torch.randn(o, r, generator=gen, dtype=torch.float64))
                       for name, (o, i) in layers.items()})
    return rounds


def _dense(part):
    return part if isinstance(part, torch.Tensor) else part[1] @ part[0]


@pytest.mark.parametrize("source", ["accumulated", "last"])
@pytest.mark.parametrize("split", ["lora", "balanced"])
def test_warm_factors_are_the_best_rank_r_approximation_of_g(source, split):
    layers = {"q": (12, 10), "down": (30, 9)}
    rounds = _random_parts(layers, [2, 3, 2, 4], seed=1, dense_every=3)  # round 3 dense: switches representation
    warm = WarmSource(source)
    for merge in rounds:
        warm.add(merge)
    for name in layers:
        G = _dense(rounds[-1][name]) if source == "last" else sum(_dense(m[name]) for m in rounds)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        for r in (1, 3, 7):
            A0, B0 = warm.factors(r, split, dtype=torch.float64)[name]
            q = min(r, int((S > 1e-6 * S[0]).sum()))  # G's rank may be below r: the other ranks start fresh
            assert A0.shape == (q, layers[name][1]) and B0.shape == (layers[name][0], q)
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart–Young
            assert float((B0 @ A0 - best).norm()) <= 1e-10 * float(G.norm())
            if split == "lora":  # a fresh LoRA A's row norm; B carries the magnitude
                torch.testing.assert_close(A0.norm(dim=1), torch.full((q,), LORA_ROW_NORM, dtype=torch.float64))
            else:
                torch.testing.assert_close(A0.norm(dim=1), B0.norm(dim=0))
    # a smaller rank's factors are the first ranks of a larger one's, bit for bit (the server relies on it)
    small, large = warm.factors(2, split), warm.factors(7, split)
    assert all(torch.equal(small[n][0], large[n][0][:2]) and torch.equal(small[n][1], large[n][1][:, :2])
               for n in layers)


def test_warm_source_keeps_factors_while_smaller_then_dense_and_drops_numerical_zeros():
    warm = WarmSource("accumulated")
    A, B = torch.randn(2, 10, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    warm.add({"q": (A, B)})
    warm.add({"q": (A, B)})  # same directions: G = 2 B A has rank 2
    assert isinstance(warm.parts["q"], tuple) and warm.parts["q"][0].shape == (4, 10)
    start = warm.factors(5)
    assert start["q"][0].shape == (2, 10)  # only 2 numerically non-zero components: the other 3 ranks start fresh
    torch.testing.assert_close(start["q"][1].double() @ start["q"][0].double(), 2 * B @ A, rtol=1e-6, atol=1e-6)
    warm.add({"q": (torch.randn(4, 10, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64))})
    assert isinstance(warm.parts["q"], torch.Tensor)  # 8 · (12 + 10) >= 12 · 10: dense is smaller
    empty = WarmSource("last")
    empty.add({"q": (torch.zeros(2, 10), torch.zeros(12, 2))})
    assert empty.factors(3) == {}  # G = 0 (or no merge yet): a fresh start


@st.composite
def warm_federations(draw, equal_ranks=False):
    n_clients = draw(st.integers(1, 5))
    layers = {f"l{j}": (draw(st.integers(2, 16)), draw(st.integers(2, 16))) for j in range(draw(st.integers(1, 3)))}
    max_rank = min(min(o, i) for o, i in layers.values())
    ranks = [draw(st.integers(1, max_rank))] * n_clients if equal_ranks else \
        [draw(st.integers(1, max_rank)) for _ in range(n_clients)]
    weights = [draw(st.floats(0.01, 10.0)) for _ in range(n_clients)]
    q = draw(st.integers(1, max(ranks)))  # ranks of G: fewer than a client's rank leaves it fresh ranks
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return layers, ranks, weights, q, dtype, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("equal_ranks", [False, True], ids=["mixed-ranks", "equal-ranks"])
def test_warm_aggregation_is_exact(equal_ranks):
    """``Δ = Σ p_k (B_k A_k − B⁰_k A⁰_k)`` with ``(A⁰_k, B⁰_k)`` client ``k``'s first ``min(r_k, q)`` warm ranks,
    against a plain loop (not the rule's own ``contributions``): relative error ≤ 1e-6 (fp32) / 1e-10 (fp64)."""
    @settings(max_examples=50, deadline=None)
    @given(warm_federations(equal_ranks=equal_ranks))
    def check(fed):
        layers, ranks, weights, q, dtype, seed = fed
        updates = make_updates(ranks, layers, dtype, seed)
        warm = WarmSource()
        warm.add({name: (A, B) for name, (A, B) in make_updates([q], layers, torch.float64, seed + 1)[0].items()})
        start = warm.factors(max(ranks), dtype=dtype)
        result = aggregate("flora-warm", updates, weights, start=start)
        p = normalize_weights(weights)
        squared_error = squared_norm = 0.0
        for name in layers:
            expected = torch.zeros(layers[name], dtype=torch.float64)
            for update, p_k, r in zip(updates, p, ranks):
                A_k, B_k = (t.double() for t in update[name])
                A0, B0 = (t.double() for t in warm.factors(r, dtype=dtype)[name])  # what client k started from
                expected += p_k * (B_k @ A_k - B0 @ A0)
            squared_error += float((result.delta(name).double() - expected).pow(2).sum())
            squared_norm += float(expected.pow(2).sum())
            A, _ = result.global_factors[name]
            assert A.shape[0] == sum(ranks) + min(q, max(ranks))  # the starts stack as one block
        assert math.sqrt(squared_error / squared_norm) <= TOL[dtype]
        assert aggregation_error(result, updates, weights)["overall"] <= TOL[dtype]

    check()


def test_without_a_start_warm_aggregation_is_flora():
    updates = make_updates([4, 2, 1], {"q": (12, 10)})
    warm, flora = aggregate("flora-warm", updates, [1, 2, 3]), aggregate("flora", updates, [1, 2, 3])
    assert torch.equal(warm.delta("q"), flora.delta("q"))


# --- federation on the tiny model ------------------------------------------------------------------------

def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return float((a - b).norm()) <= rel * max(float(b.norm()), 1e-12)


@pytest.mark.parametrize("ranks", [[4, 2, 1], [2]], ids=["mixed-ranks", "equal-ranks"])
def test_flora_warm_run_is_exact_every_round_and_uploads_what_flora_does(assets_dir, tmp_path, ranks):
    warm = run_in_process(tiny_config(assets_dir, tmp_path / "warm", method="flora-warm", ranks=ranks, rounds=3),
                          progress=lambda _: None).metrics
    flora = run_in_process(tiny_config(assets_dir, tmp_path / "flora", ranks=ranks, rounds=3),
                           progress=lambda _: None).metrics
    assert all(m["aggregation_error"] <= 1e-6 for m in warm), [m["aggregation_error"] for m in warm]
    assert [m["bytes_up"] for m in warm] == [m["bytes_up"] for m in flora]  # no extra upload
    assert all(set(m["broadcast_forms"]) <= {"refactorized", "dense"} for m in warm)  # private: only the sum
    assert warm[0]["test_loss"] == pytest.approx(flora[0]["test_loss"], rel=1e-6)  # round 1: nothing to warm from
    assert warm[1]["train_loss"] != pytest.approx(flora[1]["train_loss"], rel=1e-4)  # round 2 starts warm


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(input_ids=input_ids).logits
        model.train(was)
    return out


def test_every_client_starts_the_round_at_the_global_model(assets_dir, tmp_path, runtime):
    """After a round, each client's base − B⁰A⁰ + warm adapter equals the server's global model (weights and
    logits ≤ 1e-6), and its base weights come back bit for bit."""
    config = tiny_config(assets_dir, tmp_path, method="flora-warm", rounds=2)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
    server.aggregate_round(1, replies, 0, 0.0)
    client.state.apply(server.history, 0)  # the round-2 catch-up every client gets
    input_ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(server.state.model, input_ids)
    before = _weights(client.state.model)
    assert all(_close(before[n], w) for n, w in _weights(server.state.model).items())
    for k in range(3):
        rank = config.client_rank(k)
        start, shift = client.start(k, rank, 2)
        with temporary_update(client.state.model, shift):  # what FederationClient.train does around training
            assert start and all(A.shape[0] == min(rank, 4 + 2 + 1) for A, _ in start.values())
            peft_model = attach_adapter(client.state.model, lora_spec(config, rank, k), init_seed=k,
                                        init_factors=start, fill_fresh=True)
            assert _close(_logits(peft_model, input_ids), reference)
            merged = peft_model.merge_and_unload()  # base − B⁰A⁰ + scaling · B A of the adapter, as weights
            for name, weight in _weights(server.state.model).items():
                assert _close(merged.state_dict()[name], weight), name
            # the saved weights come back on exit, bit for bit
        assert all(torch.equal(before[n], w) for n, w in _weights(client.state.model).items())


def test_one_client_one_round_equals_centralized_training(assets_dir, tmp_path):
    options = dict(num_clients=1, ranks=[4], rounds=1, client_eval_examples=0)
    warm = run_in_process(tiny_config(assets_dir, tmp_path / "warm", method="flora-warm", **options),
                          progress=lambda _: None)
    central = run_in_process(tiny_config(assets_dir, tmp_path / "central", method="centralized", **options),
                             progress=lambda _: None)
    assert warm.metrics[0]["test_loss"] == pytest.approx(central.metrics[0]["test_loss"], rel=1e-6)
    for name, weight in _weights(central.state.model).items():
        assert _close(_weights(warm.state.model)[name], weight), name


def test_with_one_client_the_global_model_is_the_clients_trained_model_every_round(assets_dir, tmp_path, runtime):
    """One client, several rounds: the merged global model equals (base − B⁰A⁰) + B A of the client's trained
    adapter: the warm start continues the client's model, where FLoRA's restart keeps it too, but from B = 0."""
    config = tiny_config(assets_dir, tmp_path, method="flora-warm", num_clients=1, ranks=[4], rounds=3)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    for round_ in range(1, 4):
        reply = client.train(0, "node-0", round_, *server.updates_for("node-0"))
        start = client.state.warm.factors(4, config.warm_split)
        assert bool(start) == (round_ > 1)
        trained = {f"{name}.weight": B @ A - (start[name][1] @ start[name][0] if name in start else 0)
                   for name, (A, B) in reply.factors.items()}
        expected = {n: w + trained.get(n, 0) for n, w in _weights(client.state.model).items()}
        record = server.aggregate_round(round_, [reply], 0, 0.0)
        assert record["aggregation_error"] <= 1e-6
        for name, weight in _weights(server.state.model).items():
            assert _close(weight, expected[name]), (round_, name)


def test_reply_trained_on_another_global_model_is_rejected(assets_dir, tmp_path, runtime, caplog):
    config = tiny_config(assets_dir, tmp_path, method="flora-warm", rounds=1)
    server = server_for(config, runtime)
    client = FederationClient(config, runtime)
    replies = [client.train(k, f"node-{k}", 1, *server.updates_for(f"node-{k}")) for k in range(3)]
    replies[2].applied = 1  # as if cut from a global model with one more round than the server's
    record = server.aggregate_round(1, replies, 0, 0.0)
    assert record["clients_ok"] == 2 and record["clients_rejected"] == 1
    # the server's `applied` rule: a reply must hold exactly the rounds the server's message brought it to
    assert "client 2 (node node-2): metrics 'applied' = 1: expected 0" in caplog.text


@pytest.mark.parametrize("values, message", [
    (dict(warm_source="first"), "warm_source = 'first'"),
    (dict(warm_split="even"), "warm_split = 'even'"),
    (dict(method="flora-warm", outlier_mad=3.5), "outlier_mad: not implemented for method 'flora-warm'"),
    (dict(method="flora-warm", dp_noise_multiplier=0.5, dp_clip_norm=1.0, weighting="uniform"),
     "differential privacy is implemented for method 'flora'"),
    (dict(method="flora-warm", adapters=["adalora"]), "AdaLoRA clients need method"),
])
def test_warm_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)
