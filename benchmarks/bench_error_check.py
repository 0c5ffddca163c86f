"""The server's aggregation step of ``benchmarks/bench_round.py``'s short round, with the aggregation-error check
dense (the float64 reference: every client's ``(out, in)`` product) and factored (``low_rank_norm``), alternating
in one process, on SmolLM2-135M's 210 projections with 4 clients at ranks 16, 8, 4, 4.

The step is what ``aggregate_seconds`` times: ``check_update`` of every reply, ``aggregate("flora")``, the
error check, the private broadcast (``refactorize`` of every layer) and the merge ``W += B A``. Its share of the
round follows from bench_round's measured share with the dense check (``round.json``):
``share_factored = share_dense × step_factored / step_dense`` (the rest of the round does not change).

    python benchmarks/bench_error_check.py [--repeats 3] [--threads 1]
Writes benchmarks/results/error_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

import torch

from flora.lora.aggregate import aggregation_error
from flora.lora.factors import check_update
from flora.lora.methods import aggregate
from flora.lora.refactor import refactorize
from flora.modeling import layer_shapes
from flora.models.loader import load_model
from flora.adapters import DEFAULT_TARGETS

RESULTS = Path(__file__).parent / "results"


def step(updates, weights, shapes, model, dense: bool) -> tuple[dict[str, float], float]:
    seconds = {}
    started = time.perf_counter()
    for k, update in enumerate(updates):
        check_update(update, k, layer_shapes=shapes)
    result = aggregate("flora", updates, weights, layer_shapes=shapes)
    seconds["screen_aggregate"] = time.perf_counter() - started
    started = time.perf_counter()
    error = aggregation_error(result, updates, weights, dense=dense)["overall"]
    seconds["error_check"] = time.perf_counter() - started
    started = time.perf_counter()
    merges = {name: refactorize(A, B) for name, (A, B) in result.global_factors.items()}
    with torch.no_grad():
        for name, private in merges.items():
            weight = model.get_submodule(name).weight
            delta = private.B @ private.A
            weight.add_(delta)
            weight.sub_(delta)  # leave the model as it was
    seconds["broadcast_merge"] = time.perf_counter() - started
    seconds["step"] = sum(seconds.values())
    return seconds, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a machine shared by many "
                        "processes, where two spinning threads can wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("embedded").model
    shapes = layer_shapes(model, DEFAULT_TARGETS)
    gen = torch.Generator().manual_seed(0)
    ranks, weights = [16, 8, 4, 4], [0.4, 0.3, 0.2, 0.1]
    # a trained LoRA's scale: A ~ kaiming-uniform rows (norm ~1/√3 per entry), B small after a few steps
    updates = [{name: (torch.randn(r, i, generator=gen) / 3 ** 0.5, torch.randn(o, r, generator=gen) * 1e-3)
                for name, (o, i) in shapes.items()} for r in ranks]
    runs = {"dense": [], "factored": []}
    errors = {}
    for repeat in range(args.repeats):
        for check in (("dense", "factored") if repeat % 2 == 0 else ("factored", "dense")):
            seconds, errors[check] = step(updates, weights, shapes, model, dense=check == "dense")
            runs[check].append(seconds)
            print(f"repeat {repeat} {check}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()), flush=True)
    med = {check: {k: median(s[k] for s in runs[check]) for k in runs[check][0]} for check in runs}
    ratio = median(f["step"] / d["step"] for d, f in zip(runs["dense"], runs["factored"]))
    round_summary = json.loads((RESULTS / "round.json").read_text())
    share_dense = round_summary["aggregation_broadcast_share"]
    result = {"layers": len(shapes), "ranks": ranks, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "seconds": runs, "median": med, "step_ratio_factored_over_dense": ratio,
              "error_check_speedup": median(d["error_check"] / f["error_check"]
                                            for d, f in zip(runs["dense"], runs["factored"])),
              "aggregation_error": errors,
              "bench_round_share_dense": share_dense, "estimated_share_factored": share_dense * ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "error_check.json").write_text(json.dumps(result, indent=2))
    lines = ["| error_check | screen + aggregate | error check | broadcast + merge | step | aggregation error |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c} | {m['screen_aggregate']:.2f} s | {m['error_check']:.2f} s | {m['broadcast_merge']:.2f} s | "
              f"{m['step']:.2f} s | {errors[c]:.3e} |" for c, m in med.items()]
    lines += ["", f"Error check {result['error_check_speedup']:.1f}x faster factored; the whole step "
              f"{ratio:.2f}x of its dense time (medians of {args.repeats} alternating repeats, {len(shapes)} layers, "
              f"ranks {ranks}, {result['threads']} threads). bench_round's aggregation + broadcast share with the dense "
              f"check, {share_dense:.2%} of its round (`round.json`), becomes **{share_dense * ratio:.2%}** "
              "(share × step ratio). `python benchmarks/bench_error_check.py`"]
    (RESULTS / "error_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
