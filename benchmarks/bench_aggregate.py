"""Aggregation speed and exactness on SmolLM2-135M's real layer shapes.

30 decoder layers x 7 projections (hidden 576, intermediate 1536, 9 query / 3 key-value heads
of 64), 10 clients. Heterogeneous ranks 64,32,16,16,8,8,4,4,4,4 for the methods that accept
them; homogeneous rank 16 for the equal-rank methods (FedIT, FFA, FedEx, FLoRA-NA). All methods are
timed in the same run, so ratios are comparable even on a noisy machine. Fed-PLoRA's clients hold
their seeded draw of modules of a random rank-64 global adapter (heterogeneous) or all 16 modules
(homogeneous, where it is FedIT); its error is measured against the average of the clients' whole
models (``AggregationResult.folded_delta``).

    .venv/bin/python benchmarks/bench_aggregate.py [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flora.lora.aggregate import aggregation_error, florana_mixing
from flora.lora.methods import aggregate
from flora.lora.factors import client_weights
from flora.lora.refactor import refactorize, smallest_exact_form

HIDDEN, INTERMEDIATE, HEAD_DIM, Q_HEADS, KV_HEADS, N_LAYERS = 576, 1536, 64, 9, 3, 30
HETERO_RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
HOMO_RANKS = [16] * 10


def smollm2_layer_shapes() -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` for every adapted linear projection of SmolLM2-135M."""
    proj = {
        "self_attn.q_proj": (Q_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, Q_HEADS * HEAD_DIM),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    return {f"model.layers.{i}.{p}": shape for i in range(N_LAYERS) for p, shape in proj.items()}


def random_updates(ranks, shapes, seed=0, shared_a=False):
    gen = torch.Generator().manual_seed(seed)
    shared = {n: torch.randn(max(ranks), i, generator=gen) * 0.02 for n, (o, i) in shapes.items()} if shared_a else {}
    return [
        {n: (shared[n][:r].clone() if shared_a else torch.randn(r, i, generator=gen) * 0.02,
             torch.randn(o, r, generator=gen) * 0.02) for n, (o, i) in shapes.items()}
        for r in ranks
    ]


def module_options(ranks, shapes, seed=0):
    """Fed-PLoRA's aggregation options: a random rank-``max(ranks)`` global adapter and each client's seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    total = max(ranks)
    previous = {n: (torch.randn(total, i, generator=gen) * 0.02, torch.randn(o, total, generator=gen) * 0.02)
                for n, (o, i) in shapes.items()}
    modules = [sorted(torch.randperm(total, generator=gen)[:r].tolist()) for r in ranks]
    return {"previous": previous, "modules": modules}


def timed(fn, repeats):
    fn()  # warm-up: first calls pay for allocator growth and lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--methods", default="", help="comma list (default: all; flora always runs: the baseline)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = smollm2_layer_shapes()
    hetero = random_updates(HETERO_RANKS, shapes, seed=1)
    homo = random_updates(HOMO_RANKS, shapes, seed=2)
    homo_shared_a = random_updates(HOMO_RANKS, shapes, seed=3, shared_a=True)
    num_examples = [120, 80, 100, 60, 90, 110, 70, 50, 130, 40]
    p = client_weights(num_examples)

    plora_hetero = module_options(HETERO_RANKS, shapes, seed=4)
    plora_homo = {"modules": [list(range(16))] * len(HOMO_RANKS)}
    cases = [
        ("flora", "hetero", hetero, {}), ("zeropad", "hetero", hetero, {}), ("flexlora", "hetero", hetero, {}),
        ("raflora", "hetero", hetero, {}), ("fedplora", "hetero", hetero, plora_hetero),
        ("flora", "homo", homo, {}), ("fedit", "homo", homo, {}), ("fedex", "homo", homo, {}),
        ("ffa", "homo", homo_shared_a, {}), ("flexlora", "homo", homo, {}), ("florana", "homo", homo, {}),
        ("fedplora", "homo", homo, plora_homo),
    ]
    only = {m.strip() for m in args.methods.split(",") if m.strip()}
    rows = []
    for method, setting, updates, options in cases:
        if only and method not in only and method != "flora":
            continue
        result, seconds = timed(lambda: aggregate(method, updates, p, layer_shapes=shapes, **options), args.repeats)
        error = aggregation_error(result, updates, p)
        rows.append({"case": f"{method} ({setting})", "method": method, "setting": setting,
                     "seconds": seconds, "aggregation_error": error["overall"],
                     "max_layer_error": max(v for k, v in error.items() if k != "overall")})
        print(f"{method:9s} {setting:6s} {seconds * 1e3:9.1f} ms  aggregation error {error['overall']:.2e}", flush=True)

    # Re-factorisation of the stacked heterogeneous update, every layer (the private broadcast).
    stacked = aggregate("flora", hetero, p, layer_shapes=shapes)
    refac, seconds = timed(lambda: {n: refactorize(*stacked.global_factors[n]) for n in shapes}, args.repeats)
    rel = max(float((f.B @ f.A - stacked.delta(n)).norm() / stacked.delta(n).norm()) for n, f in refac.items())
    rows.append({"case": "refactorize (hetero)", "method": "refactorize", "setting": "hetero",
                 "seconds": seconds, "aggregation_error": rel, "max_layer_error": rel})
    print(f"refactorize hetero {seconds * 1e3:9.1f} ms  max rel. error vs stacked {rel:.2e}", flush=True)

    if not only or "florana" in only:  # FLoRA-NA's solver per layer: iterations and residual against FedIT's
        mixings = [florana_mixing([u[n] for u in homo], p) for n in shapes]
        rows[[r["case"] for r in rows].index("florana (homo)")].update(
            als_iterations_mean=statistics.mean(m.iterations for m in mixings),
            als_iterations_max=max(m.iterations for m in mixings),
            residual_ratio_to_fedit_median=statistics.median(m.residual / m.fedit_residual for m in mixings))
    base = next(r["seconds"] for r in rows if r["case"] == "flora (hetero)")
    for r in rows:
        r["ratio_to_flora_hetero"] = r["seconds"] / base

    R = sum(HETERO_RANKS)
    forms = {}
    for n, (o, i) in shapes.items():
        choice = smallest_exact_form(R, refac[n].rank, o, i)
        forms.setdefault(choice.form, 0)
        forms[choice.form] += 1
    bytes_stacked = sum(R * (o + i) * 4 for o, i in shapes.values())
    bytes_dense = sum(o * i * 4 for o, i in shapes.values())

    report = {
        "benchmark": "aggregate", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or platform.platform(),
        "layers": len(shapes), "clients": len(HETERO_RANKS), "hetero_ranks": HETERO_RANKS, "homo_ranks": HOMO_RANKS,
        "repeats": args.repeats, "rows": rows,
        "broadcast": {"stacked_rank": R, "bytes_stacked": bytes_stacked, "bytes_dense": bytes_dense,
                      "forms_chosen": forms},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregate.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Aggregation on SmolLM2-135M shapes ({len(shapes)} layers, 10 clients), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}.",
        "",
        "| case | time (ms) | x flora (hetero) | aggregation error |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['seconds'] * 1e3:.1f} | {r['ratio_to_flora_hetero']:.2f} | {r['aggregation_error']:.2e} |"
              for r in rows]
    lines += [f"\nFLoRA-NA's alternating least squares per layer: {r['als_iterations_mean']:.1f} iterations on average "
              f"(max {r['als_iterations_max']}), residual / FedIT's residual: median {r['residual_ratio_to_fedit_median']:.3f}."
              for r in rows if "als_iterations_mean" in r]
    lines += ["", f"Stacked broadcast (R={R}): {bytes_stacked / 2**20:.1f} MiB; dense: {bytes_dense / 2**20:.1f} MiB; "
              f"smallest exact form per layer: {forms}."]
    (args.out / "aggregate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
