"""Where a federated round's time goes: the same short real FLoRA run (embedded SmolLM2-135M-Instruct
and ShareGPT) with the in-process engine and with the Flower simulation engine, in one run.

    python benchmarks/bench_round.py [--clients 4] [--rounds 3] [--profile]

Per round from round 2 on (round 1 carries start-up: Ray, model loads in the ClientApp processes):
* Flower engine overhead = (Flower round seconds − in-process round seconds) / Flower round seconds
  (both engines do the same computation: same seeds, same losses);
* aggregation + broadcast share = ``aggregate_seconds / seconds`` (validation, stacking, the private
  re-factorisation) and evaluation share;
* training tokens/s and an estimate of achieved FLOP/s: 4 · Σ(out · in) of the adapted projections per
  token (forward 2N, backward to the activations 2N; frozen weights get no gradient; attention, the
  output head and the adapters are left out, so this is a lower bound), against the CPU's nominal fp32
  peak (cores × FMA lanes × 2 × clock, from lscpu/cpuinfo);
* ``--profile``: pyinstrument's heaviest frames of one in-process round.
Writes benchmarks/results/round.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from statistics import median

import torch

from flora.config import RunConfig

RESULTS = Path(__file__).parent / "results"


def cpu_peak_flops() -> tuple[float, str]:
    """Nominal fp32 peak: cores × FLOP/cycle (2 FMA pipes × lanes × 2) × clock."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    clock = float(mhz.group(1)) * 1e6 if mhz else 2.0e9
    cores = torch.get_num_threads()
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return cores * 2 * lanes * 2 * clock, (f"{name.group(1) if name else 'CPU'}, {cores} threads, "
                                          f"{'AVX-512' if lanes == 16 else 'AVX2' if lanes == 8 else 'SSE'} FMA, "
                                          f"{clock / 1e9:.2f} GHz")


def run(config: RunConfig, engine: str) -> tuple[list[dict], float]:
    from flora.engines import run as run_engine

    started = time.perf_counter()
    metrics = run_engine(config, engine, progress=lambda _: None)
    return metrics, time.perf_counter() - started


def profile_round(config: RunConfig) -> list[dict]:
    """pyinstrument over one in-process round: the frames with the most own time (top 12)."""
    from pyinstrument import Profiler

    from flora.engines import run_in_process

    profiler = Profiler(interval=0.005)
    profiler.start()
    run_in_process(RunConfig(**{**config.to_dict(), "rounds": 1, "out_dir": config.out_dir + "-profile"}),
                   progress=lambda _: None)
    profiler.stop()
    totals: dict[str, float] = {}

    def walk(frame) -> None:  # own time per function; pyinstrument keeps it in synthetic "[self]" children
        if frame.is_synthetic:
            return
        key = f"{frame.function} ({Path(frame.file_path or '?').name}:{frame.line_no})"
        totals[key] = totals.get(key, 0.0) + frame.total_self_time
        for child in frame.children:
            walk(child)

    session = profiler.last_session
    walk(profiler.last_session.root_frame())
    top = sorted(totals.items(), key=lambda item: -item[1])[:12]
    return [{"frame": key, "seconds": seconds, "share": seconds / session.duration} for key, seconds in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-only", action="store_true", help="only the profile, added to round.json/md")
    parser.add_argument("--out", default="runs/bench-round")
    parser.add_argument("--error-check", action="store_true",
                        help="only the in-process engine, error_check = dense then factored (then dense, factored "
                             "with --repeats 2): aggregation + broadcast share of the round for each, added to "
                             "round.json/md")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    ranks = [16, 8, 4, 4][:args.clients] if args.clients <= 4 else [16] * args.clients
    base = dict(model="embedded", data="embedded", num_clients=args.clients, ranks=ranks, rounds=args.rounds,
                local_steps=2, batch_size=4, micro_batch_size=4, cutoff=128, max_examples=600, eval_examples=16,
                client_eval_examples=0, lr=5e-4)
    if args.error_check:
        summary = json.loads((RESULTS / "round.json").read_text())
        summary["error_check"] = compare_error_checks(base, args.out, args.repeats)
    elif args.profile_only:
        summary = json.loads((RESULTS / "round.json").read_text())
    else:
        summary = measure(base, args.out, args.clients, ranks, args.rounds)
    if args.profile or args.profile_only:
        summary["profile_top_frames"] = profile_round(RunConfig(**base, out_dir=f"{args.out}/local"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "round.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "round.md").write_text(markdown(summary))
    print(markdown(summary))


def measure(base: dict, out: str, clients: int, ranks: list[int], rounds: int) -> dict:
    results = {}
    for engine in ("local", "flower"):
        config = RunConfig(**base, out_dir=f"{out}/{engine}")
        metrics, wall = run(config, engine)
        results[engine] = {"wall_seconds": wall, "rounds": [
            {k: m[k] for k in ("round", "seconds", "aggregate_seconds", "eval_seconds", "train_seconds", "train_tokens",
                               "test_loss")} for m in metrics]}
        print(f"{engine}: wall {wall:.1f} s, round seconds {[round(m['seconds'], 1) for m in metrics]}", flush=True)
    later = lambda engine, key: [r[key] for r in results[engine]["rounds"][1:]]  # noqa: E731
    local_s, flower_s = median(later("local", "seconds")), median(later("flower", "seconds"))
    from flora.models.loader import load_model
    from flora.modeling import layer_shapes
    loaded = load_model("embedded")
    linear_params = sum(o * i for o, i in layer_shapes(loaded.model, RunConfig().targets).values())
    tokens_per_s = sum(later("local", "train_tokens")) / sum(later("local", "train_seconds"))
    achieved = 4 * linear_params * tokens_per_s
    peak, cpu = cpu_peak_flops()
    return {
        "clients": clients, "ranks": ranks, "rounds": rounds, "threads": torch.get_num_threads(), "cpu": cpu,
        "engines": results,
        "median_round_seconds": {"local": local_s, "flower": flower_s},
        "flower_overhead_share": (flower_s - local_s) / flower_s,
        "aggregation_broadcast_share": median(a / s for a, s in zip(later("local", "aggregate_seconds"),
                                                                    later("local", "seconds"))),
        "evaluation_share": median(e / s for e, s in zip(later("local", "eval_seconds"), later("local", "seconds"))),
        "same_losses": [round(r["test_loss"], 4) for r in results["local"]["rounds"]] ==
                       [round(r["test_loss"], 4) for r in results["flower"]["rounds"]],
        "train_tokens_per_s": tokens_per_s, "adapted_linear_params": linear_params,
        "achieved_flops_lower_bound": achieved, "peak_flops_nominal": peak, "peak_share": achieved / peak,
    }


def compare_error_checks(base: dict, out: str, repeats: int) -> dict:
    """The in-process engine with the dense float64 aggregation-error reference and with the factored one,
    alternating in one process (the machine is shared: compare within a run). Per run: median over rounds ≥ 2
    of the aggregation + broadcast share and seconds, and of the round seconds."""
    runs = []
    for repeat in range(repeats):
        for check in ("dense", "factored"):
            config = RunConfig(**base, error_check=check, out_dir=f"{out}/error-{check}-{repeat}")
            metrics, wall = run(config, "local")
            later = metrics[1:]
            runs.append({"error_check": check, "repeat": repeat, "wall_seconds": wall,
                         "round_seconds": median(m["seconds"] for m in later),
                         "aggregate_seconds": median(m["aggregate_seconds"] for m in later),
                         "aggregation_broadcast_share": median(m["aggregate_seconds"] / m["seconds"] for m in later),
                         "aggregation_error": [m["aggregation_error"] for m in metrics],
                         "test_loss": [m["test_loss"] for m in metrics]})
            print(f"error_check={check}: aggregate {runs[-1]['aggregate_seconds']:.2f} s of "
                  f"{runs[-1]['round_seconds']:.1f} s ({runs[-1]['aggregation_broadcast_share']:.2%})", flush=True)
    return {"runs": runs, "same_test_losses": len({tuple(round(x, 6) for x in r["test_loss"]) for r in runs}) == 1}


def markdown(summary: dict) -> str:
    local_s, flower_s = summary["median_round_seconds"]["local"], summary["median_round_seconds"]["flower"]
    walls = {engine: summary["engines"][engine]["wall_seconds"] for engine in ("local", "flower")}
    lines = [f"Short real FLoRA run: {summary['clients']} clients (ranks {summary['ranks']}), {summary['rounds']} rounds "
             f"× 2 local steps × 4 examples (cutoff 128); {summary['cpu']}. Rounds ≥ 2, medians.\n",
             "| quantity | value |", "|---|---:|",
             f"| round, in-process engine | {local_s:.1f} s |", f"| round, Flower simulation engine | {flower_s:.1f} s |",
             f"| Flower engine overhead (share of its round) | {summary['flower_overhead_share']:.1%} |",
             f"| aggregation + broadcast (share of round) | {summary['aggregation_broadcast_share']:.2%} |",
             f"| evaluation (share of round) | {summary['evaluation_share']:.1%} |",
             f"| same test losses, both engines (4 decimals) | {summary['same_losses']} |",
             f"| training tokens/s | {summary['train_tokens_per_s']:.0f} |",
             f"| achieved FLOP/s (lower bound, 4·N per token) | {summary['achieved_flops_lower_bound'] / 1e9:.1f} G |",
             f"| nominal fp32 peak | {summary['peak_flops_nominal'] / 1e9:.0f} G ({summary['peak_share']:.0%} reached) |",
             f"| wall, in-process / Flower (incl. start-up) | {walls['local']:.0f} s / {walls['flower']:.0f} s |"]
    if summary.get("error_check"):
        runs = summary["error_check"]["runs"]
        lines += ["", f"Aggregation-error check, in-process engine, alternating in one process ({len(runs[0]['test_loss'])} "
                  "rounds each, rounds ≥ 2, medians; `python benchmarks/bench_round.py --error-check --repeats "
                  f"{max(r['repeat'] for r in runs) + 1} --rounds {len(runs[0]['test_loss'])}`):", "",
                  "| error_check | repeat | aggregation + broadcast | round | share | aggregation error (rounds) |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['error_check']} | {r['repeat']} | {r['aggregate_seconds']:.2f} s | {r['round_seconds']:.1f} s | "
                  f"{r['aggregation_broadcast_share']:.2%} | {', '.join(f'{e:.2e}' for e in r['aggregation_error'])} |"
                  for r in summary["error_check"]["runs"]]
        lines.append(f"\nSame test losses in every run (6 decimals): {summary['error_check']['same_test_losses']}")
    if summary.get("profile_top_frames"):
        lines += ["", "pyinstrument, one in-process round (model load included), functions by own time:", "",
                  "| function | s | share |", "|---|---:|---:|"]
        lines += [f"| `{f['frame']}` | {f['seconds']:.1f} | {f['share']:.1%} |" for f in summary["profile_top_frames"]]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
