"""Client-level differential privacy: clipping, noise scale, truncation, accounting, and the federated run."""

from __future__ import annotations

import math

import pytest
import torch

from flora.config import ConfigError
from flora.lora.dp import (KEY_BYTES, ChaChaStream, DPRandom, DPSpec, SeededStream, clip_updates, noisy_layer_mean,
                           privacy_spent, truncate_dense)
from flora.lora.robust import update_norm
from flora.engines import run_in_process
from test_federation import tiny_config



def _update(seed: int, shapes: dict[str, tuple[int, int]], rank: int, scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(rank, i, generator=generator), scale * torch.randn(o, rank, generator=generator))
            for name, (o, i) in shapes.items()}


SHAPES = {"a": (12, 10), "b": (6, 9)}


def test_clipping_bounds_whole_model_norm_and_keeps_small_updates():
    big, small = _update(0, SHAPES, 2, scale=5.0), _update(1, SHAPES, 3, scale=1e-3)
    clipped, factors = clip_updates([big, small], clip_norm=1.0)
    assert update_norm(clipped[0]) == pytest.approx(1.0, rel=1e-5) and factors[0] < 1
    assert factors[1] == 1.0 and all(torch.equal(clipped[1][n][1], small[n][1]) for n in SHAPES)


def test_noiseless_mean_is_the_clipped_sum_over_expected_participants():
    updates = [_update(k, SHAPES, r) for k, r in enumerate((3, 2, 1))]
    spec = DPSpec(noise_multiplier=0.5, clip_norm=1e6, sample_rate=0.5, num_clients=6)
    clipped, _ = clip_updates(updates, spec.clip_norm)
    clean, noisy = noisy_layer_mean(clipped, "a", SHAPES["a"], spec, SeededStream(0))
    reference = sum(B @ A for A, B in (u["a"] for u in updates)) / 3.0  # q N = 3
    torch.testing.assert_close(clean, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(noisy, clean)


def test_noise_has_the_promised_standard_deviation():
    spec = DPSpec(noise_multiplier=1.3, clip_norm=0.7, sample_rate=0.25, num_clients=8)  # std = 1.3·0.7/2
    zero = {"w": (torch.zeros(1, 400), torch.zeros(500, 1))}
    for source in (SeededStream(1), ChaChaStream()):
        clean, noisy = noisy_layer_mean([zero], "w", (500, 400), spec, source)
        assert torch.count_nonzero(clean) == 0
        assert float(noisy.std()) == pytest.approx(spec.noise_std, rel=0.01) and spec.noise_std == pytest.approx(0.455)
        assert abs(float(noisy.mean())) < 0.01


def test_noise_seed_reproducible_and_default_not():
    draw = lambda seed: DPRandom(seed).noise(round_=3).normal((5,))  # noqa: E731
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
    assert not torch.equal(draw(-1), draw(-1))  # OS randomness
    assert DPRandom(7).guarantee_void and not DPRandom(-1).guarantee_void


def test_secure_randomness_has_256_bit_keys_and_nothing_public_reproduces_it(monkeypatch):
    """Default DP randomness: a fresh key of >= 128 bits (here 256) from the OS per round and purpose;
    seeding torch, numpy or Python's random (what a config seed drives) changes nothing."""
    import random
    import secrets

    import numpy as np

    requested = []
    real = secrets.token_bytes
    monkeypatch.setattr(secrets, "token_bytes", lambda n: (requested.append(n), real(n))[1])
    draws = []
    for _ in range(2):
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        source = DPRandom(-1)
        draws.append((source.participants(64, 0.5, round_=1), source.noise(round_=1).normal((4, 4))))
    assert requested and all(8 * n >= 128 for n in requested) and KEY_BYTES * 8 == 256
    assert draws[0][0] != draws[1][0] and not torch.equal(draws[0][1], draws[1][1])
    # the Gaussians and uniforms are right: moments and a Kolmogorov-Smirnov distance
    z = ChaChaStream().normal((200_000,)).double()
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, rel=0.01)
    u = np.sort(ChaChaStream().uniform(100_000))
    assert u.min() > 0 and u.max() <= 1 and np.abs(u - np.arange(1, u.size + 1) / u.size).max() < 0.01


def test_truncation_is_exact_on_low_rank_and_dense_when_cheaper():
    A, B = torch.randn(3, 40), torch.randn(30, 3)
    (A2, B2), error = truncate_dense(B @ A, rank=3)
    assert A2.shape == (3, 40) and B2.shape == (30, 3) and error < 1e-6
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-4, atol=1e-4)
    noisy = B @ A + 0.1 * torch.randn(30, 40)
    (A3, B3), error = truncate_dense(noisy, rank=3)
    best = torch.linalg.svdvals(noisy)
    assert error == pytest.approx(float(best[3:].square().sum().sqrt() / best.square().sum().sqrt()), rel=1e-4)
    dense, error = truncate_dense(noisy, rank=20)  # 20 · 70 > 30 · 40
    assert isinstance(dense, torch.Tensor) and error == 0.0


@pytest.mark.parametrize("seed", [-1, 2])
def test_poisson_sampling_is_at_the_rate(seed):
    source = DPRandom(seed)
    assert source.participants(10, 1.0, 1) == list(range(10))
    counts = [len(source.participants(50, 0.3, r)) for r in range(200)]
    assert sum(counts) / len(counts) == pytest.approx(15, rel=0.05)
    if seed >= 0:
        assert source.participants(10, 0.3, 4) == DPRandom(seed).participants(10, 0.3, 4)


def _classic_rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Reference: Gaussian RDP α/(2σ²) per round, composed, converted with ε = RDP + log(1/δ)/(α−1)
    (Mironov 2017), minimised over a fine grid of orders; the library's conversion is tighter."""
    orders = [1 + x / 100 for x in range(1, 100_000)]
    return min(rounds * a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in orders)


@pytest.mark.parametrize("sigma, rounds", [(1.0, 1), (1.0, 10), (4.0, 50)])
def test_accountant_matches_reference_math_without_sampling(sigma, rounds):
    spec = DPSpec(noise_multiplier=sigma, clip_norm=1.0, sample_rate=1.0, num_clients=4)
    epsilon, reference = privacy_spent(spec, rounds, 1e-5), _classic_rdp_epsilon(sigma, rounds, 1e-5)
    assert 0.75 * reference < epsilon <= reference + 1e-9


def test_accountant_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    spec = DPSpec(noise_multiplier=1.0, clip_norm=1.0, sample_rate=1.0, num_clients=10)
    eps = [privacy_spent(spec, t, 1e-5) for t in (1, 2, 5)]
    assert eps[0] < eps[1] < eps[2]
    assert privacy_spent(DPSpec(2.0, 1.0, 1.0, 10), 5, 1e-5) < eps[2]
    assert privacy_spent(DPSpec(1.0, 1.0, 0.1, 10), 5, 1e-5) < eps[2]
    assert privacy_spent(spec, 0, 1e-5) == 0.0 and math.isinf(privacy_spent(DPSpec(0.0, 1.0, 1.0, 10), 1, 1e-5))


# --- federated runs on the tiny model ------------------------------------------------------------



def _run(assets_dir, tmp_path, name, **overrides):
    config = tiny_config(assets_dir, tmp_path, out_dir=str(tmp_path / name), weighting="uniform", **overrides)
    return run_in_process(config, progress=lambda _: None).metrics


def test_vanishing_noise_equals_non_private_flora(assets_dir, tmp_path):
    """σ → 0 with a loose clip and q = 1: the DP path (dense sum, truncation to Σ r_k) is FLoRA's exact sum."""
    plain = _run(assets_dir, tmp_path, "plain")
    private = _run(assets_dir, tmp_path, "dp", dp_noise_multiplier=1e-12, dp_clip_norm=1e3, dp_noise_seed=0)
    for a, b in zip(plain, private):
        assert b["test_loss"] == pytest.approx(a["test_loss"], abs=1e-4)
        assert b["aggregation_error"] < 1e-4 and b["dp_clipped"] == 0 and b["dp_participants"] == 3
    assert private[0]["broadcast_forms"] == {"truncated": 14}  # 7 targets x 2 layers, Σ r_k = 7 < dense


def test_private_run_reports_epsilon_and_is_reproducible_with_a_seed(assets_dir, tmp_path):
    options = dict(dp_noise_multiplier=0.8, dp_clip_norm=0.05, dp_noise_seed=3, rounds=3)
    first = _run(assets_dir, tmp_path, "a", **options)
    again = _run(assets_dir, tmp_path, "b", **options)
    assert [m["test_loss"] for m in first] == [m["test_loss"] for m in again]
    epsilons = [m["dp_epsilon"] for m in first]
    spec = DPSpec(0.8, 0.05, 1.0, 3)
    assert epsilons == pytest.approx([privacy_spent(spec, t, 1e-5) for t in (1, 2, 3)])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert all(m["aggregation_error"] > 0.01 and m["dp_noise_std"] == pytest.approx(0.8 * 0.05 / 3) for m in first)
    assert all(m["dp_clipped"] == 3 for m in first)  # a tight bound clips every client


EMPTY_ROUND_SEED = 3  # dp_noise_seed whose Poisson sample (3 clients, q = 0.3) leaves round 4 empty


def test_private_run_with_poisson_sampling_survives_empty_rounds(assets_dir, tmp_path):
    expected = [len(DPRandom(EMPTY_ROUND_SEED).participants(3, 0.3, r)) for r in range(1, 5)]
    assert 0 in expected and any(expected)  # the seed gives an empty round and a non-empty one
    metrics = _run(assets_dir, tmp_path, "poisson", dp_noise_multiplier=1.0, dp_clip_norm=0.1,
                   dp_noise_seed=EMPTY_ROUND_SEED, sample_fraction=0.3, rounds=4, seed=1)
    participants = [m["dp_participants"] for m in metrics]
    assert participants == expected and len(metrics) == 4
    empty = participants.index(0)
    assert metrics[empty]["clients_ok"] == 0 and metrics[empty]["broadcast_forms"]  # noise alone still goes out
    assert all(math.isfinite(m["test_loss"]) for m in metrics) and all(m["dp_guarantee_void"] for m in metrics)


def test_private_run_hands_only_privatised_numbers_to_flower_and_logs(assets_dir, tmp_path, caplog):
    """With DP, progress lines and Flower's metric record carry the test loss and the privacy spent only;
    participants, clipped counts, norms and losses of clients stay in the operator's metrics.jsonl."""
    from flora.server import DP_PUBLIC, public_record

    lines = []
    config = tiny_config(assets_dir, tmp_path, out_dir=str(tmp_path / "dp"), weighting="uniform", rounds=1,
                         dp_noise_multiplier=1.0, dp_clip_norm=0.1)
    metrics = run_in_process(config, progress=lines.append).metrics
    assert metrics[0]["dp_participants"] == 3 and not metrics[0]["dp_guarantee_void"]  # the operator's file has all
    public = public_record(config, metrics[0])
    assert set(public) <= set(DP_PUBLIC) and "train_loss" not in public and "dp_participants" not in public
    shown = "\n".join(lines[1:]) + caplog.text  # after the header line: what a round prints and logs
    assert "train loss" not in shown and "clients" not in shown and "epsilon" in shown
    assert "OS CSPRNG" in metrics[0]["dp_random_source"]


def test_private_round_gives_flower_only_privatised_metrics(assets_dir, tmp_path, runtime):
    """The Flower strategy's metric record (Flower logs it and keeps it in its history) with DP on."""
    from flora.runner import server_for
    from flora.server import DP_PUBLIC
    from flora.strategy import FloraStrategy
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from flora.adversary import valid_eval_reply
    from test_adversarial import _situation, answer, strategy_messages

    config = tiny_config(assets_dir, tmp_path, num_clients=4, ranks=[2], weighting="uniform", dp_noise_multiplier=1.0,
                         dp_clip_norm=0.1, eval_examples=4, client_eval_examples=4)
    server = server_for(config, runtime)
    lines = []
    flower = FloraStrategy(config, server, progress=lines.append)
    sent = strategy_messages(flower, 1)
    _, metrics = flower.aggregate_train(1, [answer(server, m, k) for k, m in enumerate(sent)])
    assert metrics is None and not lines  # the round's record waits for its federated evaluation

    class Grid:
        def get_node_ids(self):
            return [int(m.metadata.dst_node_id) for m in sent]

    evaluations = list(flower.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid()))
    for k, message in enumerate(evaluations):
        message.metadata.__dict__["_message_id"] = f"evaluate-{k}"
    replies = [Message(content=valid_eval_reply(_situation(server, k, 1, server.sent[str(m.metadata.dst_node_id)]))
                       .content(), reply_to=m) for k, m in enumerate(evaluations)]
    metrics = flower.aggregate_evaluate(1, replies)
    assert set(metrics) <= set(DP_PUBLIC) and {"dp_epsilon", "test_loss"} <= set(metrics)
    assert server.metrics[-1]["dp_participants"] == len(sent)  # the operator's record still has it
    assert len(server.metrics[-1]["client_test_losses"]) == len(sent)  # and the clients' losses
    assert len(lines) == 1 and "epsilon" in lines[0] and "train loss" not in lines[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(dp_noise_multiplier=1.0), "dp_clip_norm = 0.0"),
    (dict(dp_noise_multiplier=1.0, dp_clip_norm=1.0, weighting="num_examples"), "weighting = 'num_examples'"),
    (dict(dp_noise_multiplier=1.0, dp_clip_norm=1.0, weighting="uniform", method="fedit", ranks=[2]),
     "implemented for method 'flora'"),
    (dict(dp_noise_multiplier=1.0, dp_clip_norm=1.0, weighting="uniform", outlier_mad=3.5), "outlier_mad = 3.5"),
    (dict(dp_noise_multiplier=1.0, dp_clip_norm=1.0, weighting="uniform", dp_delta=1.5), "dp_delta = 1.5"),
    (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier = -1.0"),
])
def test_dp_config_errors_name_the_key(assets_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(assets_dir, tmp_path, **overrides)
