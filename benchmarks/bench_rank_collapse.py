"""Rank collapse (raFLoRA, arXiv 2602.13486) on random factors: FlexLoRA vs raFLoRA over rounds.

A synthetic multi-round federation on one ``OUT × IN`` layer, no language model: 10 clients at the paper
setting's ranks 64,32,16,16,8,8,4,4,4,4 with data weights ``p_k``. Each round every client starts from its
top-``r_k`` part of the global adapter (the method's own redistribution, ``flora.lora.methods.aggregate``),
optionally trains it, uploads it, and the server aggregates with FlexLoRA or raFLoRA. Two scenarios:

* ``no-training``: clients upload their start factors unchanged, from a global update with a flat
  spectrum of rank 64. Any change is the aggregation's own doing: FlexLoRA multiplies the ``i``-th
  singular value by ``Σ_{k: r_k > i} p_k`` every round, raFLoRA keeps the update (its fixed point).
* ``training``: clients take ``--steps`` gradient steps on ``½‖B A − T_k‖²`` (``T_k`` = a shared rank-64
  target plus client noise), starting in round 1 from a shared initialisation (``A`` seeded, ``B = 0``).

Reported per round: the share of the global update's energy outside its top ``r_min`` singular values
(``Σ_{i > r_min} s_i² / Σ s_i²``; rank collapse drives it to 0), and in ``training`` the relative distance
``‖G − T‖ / ‖T‖`` to the shared target. Writes ``OUT/rank_collapse.{json,md}``.

    .venv/bin/python benchmarks/bench_rank_collapse.py [--rounds 30] [--steps 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flora.lora.factors import client_weights
from flora.lora.methods import aggregate

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
NUM_EXAMPLES = [120, 80, 100, 60, 90, 110, 70, 50, 130, 40]  # bench_aggregate's data sizes
METHODS = ("flexlora", "raflora")


def energy_outside(delta: torch.Tensor, keep: int) -> float:
    """Share of ``‖delta‖²`` outside its top ``keep`` singular values."""
    s2 = torch.linalg.svdvals(delta.double()).pow(2)
    total = float(s2.sum())
    return float(s2[keep:].sum()) / total if total > 0 else 0.0


def low_rank(out_dim: int, in_dim: int, rank: int, gen: torch.Generator, spectrum: torch.Tensor) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(out_dim, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_dim, rank, generator=gen, dtype=torch.float64))
    return (U * spectrum) @ V.T


def simulate(method: str, scenario: str, rounds: int, steps: int, lr: float, out_dim: int, in_dim: int,
             seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    p = client_weights(NUM_EXAMPLES)
    r_max, r_min = max(RANKS), min(RANKS)
    flat = torch.ones(r_max, dtype=torch.float64)
    target = low_rank(out_dim, in_dim, r_max, gen, flat / flat.norm())  # ‖T‖ = 1, flat spectrum of rank 64
    noise = [0.3 * low_rank(out_dim, in_dim, r_max, gen, flat / flat.norm()) for _ in RANKS]
    if scenario == "no-training":
        G = low_rank(out_dim, in_dim, r_max, gen, flat)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        starts = [(S[:r].sqrt()[:, None] * Vh[:r], U[:, :r] * S[:r].sqrt()) for r in RANKS]
    else:  # round 1: shared initialisation, A seeded (LoRA's scale), B = 0
        A0 = (torch.rand(r_max, in_dim, generator=gen, dtype=torch.float64) * 2 - 1) / in_dim ** 0.5
        starts = [(A0[:r].clone(), torch.zeros(out_dim, r, dtype=torch.float64)) for r in RANKS]
    history = []
    for round_ in range(1, rounds + 1):
        uploads = []
        for k, (A, B) in enumerate(starts):
            A, B = A.clone(), B.clone()
            if scenario == "training":
                goal = target + noise[k]
                for _ in range(steps):
                    residual = B @ A - goal
                    A, B = A - lr * (B.T @ residual), B - lr * (residual @ A.T)
            uploads.append({"layer": (A, B)})
        result = aggregate(method, uploads, p)
        G = result.delta("layer")
        starts = [result.client_factors[k]["layer"] for k in range(len(RANKS))]
        row = {"round": round_, "energy_outside_r_min": energy_outside(G, r_min), "norm": float(G.norm())}
        if scenario == "training":
            row["distance_to_target"] = float((G - target).norm() / target.norm())
        history.append(row)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20, help="local gradient steps per round (training scenario)")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--shape", default="160x128", help="OUTxIN of the layer")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    out_dim, in_dim = map(int, args.shape.split("x"))
    results = {scenario: {method: simulate(method, scenario, args.rounds, args.steps, args.lr, out_dim, in_dim)
                          for method in METHODS} for scenario in ("no-training", "training")}
    report = {"benchmark": "rank_collapse", "ranks": RANKS, "num_examples": NUM_EXAMPLES, "shape": [out_dim, in_dim],
              "rounds": args.rounds, "steps": args.steps, "lr": args.lr, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rank_collapse.json").write_text(json.dumps(report, indent=1))
    shown = sorted({1, 2, 3, 5, 10, 20, args.rounds} & set(range(1, args.rounds + 1)))
    lines = [f"Rank collapse on random factors: one {out_dim}x{in_dim} layer, ranks {','.join(map(str, RANKS))}, "
             f"p_k by data size; `training`: {args.steps} local gradient steps (lr {args.lr}) per round towards a "
             f"shared rank-64 target plus client noise. Energy share outside the top {min(RANKS)} singular values "
             f"of the global update (→ 0 is rank collapse); `training` also ‖G − T‖/‖T‖.", "",
             "| scenario | method | " + " | ".join(f"round {r}" for r in shown) + " |",
             "|---|---|" + "---:|" * len(shown)]
    for scenario, per_method in results.items():
        for method, history in per_method.items():
            cells = []
            for r in shown:
                row = history[r - 1]
                cell = f"{row['energy_outside_r_min']:.3f}"
                if "distance_to_target" in row:
                    cell += f" ({row['distance_to_target']:.3f})"
                cells.append(cell)
            lines.append(f"| {scenario} | {method} | " + " | ".join(cells) + " |")
    (args.out / "rank_collapse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
