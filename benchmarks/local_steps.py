"""Does FLoRA's restart explain its gap to FedIT? (issue 20: "Test the explanation first")

    python benchmarks/local_steps.py                 # all runs, most informative first; resumable
    python benchmarks/local_steps.py --total-steps 8 --steps 2,8,4 --client-eval 0   # a quarter of the budget
    python benchmarks/local_steps.py --only ls2x16-flora-s0,ls2x16-fedit-s0
    python benchmarks/local_steps.py --report        # tables from what has finished

With equal ranks (16) FedIT ends below FLoRA in the ``full`` reproduction (3 rounds × 2 local steps).
FLoRA merges every round's update and restarts each client from a fresh adapter with ``B = 0``, so the
first local step gives ``A`` no gradient; FedIT continues from the averaged adapter. If the restart
explains the gap, it should shrink as the local steps per round grow while the total token budget stays
fixed (fewer rounds, fewer restarts). Runs (default budget): FLoRA, FedIT and (last) FLoRA-warm at 2, 32
and 8 local steps per round with rounds × local steps = 32 (16 × 2, 1 × 32, 4 × 8; FLoRA-warm not at
1 × 32, where its only round is FLoRA's), seeds 0, 1, 2; every other
setting is the ``full`` profile's (10 clients, Dirichlet(0.5), batch 2, cutoff 128, 2,000 examples,
lr 5e-4, 48 test conversations, 4 per client).

Run names are ``lSxR-METHOD-sSEED`` (S local steps × R rounds). Summaries go to
``benchmarks/results/local-steps/NAME.json`` (a run with a summary whose config matches
is skipped, so the plan can be finished over several sessions); ``--report`` writes
``benchmarks/results/local_steps.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import RESULTS, _row, base_config, run_one  # noqa: E402

from flora.config import RunConfig  # noqa: E402

SUMMARIES = RESULTS / "local-steps"
TOTAL_STEPS = 32  # local steps per client over the whole run (rounds × local_steps)
STEPS = (2, 32, 8)  # the two ends of the trend first
PAIR = ("flora", "fedit")
EXTRA = ("flora-warm",)
SEEDS = (0, 1, 2)
NAME = re.compile(r"ls(\d+)x(\d+)-(.+)-s(\d+)")


def plan(out: Path, total: int = TOTAL_STEPS, steps: tuple[int, ...] = STEPS, client_eval: int = 4,
         threads: int = 0) -> list[tuple[str, RunConfig]]:
    """``(name, config)`` of every run, in the order they are run: seed 0 of the pair at every step count,
    then seeds 1 and 2, then the extra methods. ``total``: local steps per client over the run (rounds × local
    steps); ``client_eval``: examples of each client's own test split scored every round (the profile's 4;
    0 saves evaluation time and changes no training); ``threads``: torch threads (0 = torch's default; 1 wastes
    least on a machine with more runnable processes than cores)."""
    if any(total % s for s in steps):
        raise ValueError(f"--steps {steps}: every value must divide --total-steps {total}")
    base = dataclasses.replace(base_config("full", out), client_eval_examples=client_eval, threads=threads)
    runs = []
    for methods, seeds in ((PAIR, SEEDS[:1]), (PAIR, SEEDS[1:]), (EXTRA, SEEDS)):
        for seed in seeds:
            for s in steps:
                for method in methods:
                    if method in EXTRA and s == total:
                        continue  # one round: a warm start has no global update to start from, FLoRA's run
                    name = f"ls{s}x{total // s}-{method}-s{seed}"
                    runs.append((name, dataclasses.replace(base, out_dir=str(out / name), method=method, seed=seed,
                                                           ranks=[16], local_steps=s, rounds=total // s)))
    return runs


def finished(name: str, config: RunConfig) -> bool:
    path = SUMMARIES / f"{name}.json"
    return path.is_file() and json.loads(path.read_text())["config"] == json.loads(json.dumps(config.to_dict()))


def report() -> str:
    """Tables of every finished run, grouped by budget (rounds × local steps) and step count."""
    rows = {}
    for path in sorted(SUMMARIES.glob("*.json")):
        if match := NAME.fullmatch(path.stem):
            steps, rounds, method, seed = int(match.group(1)), int(match.group(2)), match.group(3), int(match.group(4))
            rows[(steps * rounds, steps, method, seed)] = _row(json.loads(path.read_text()))
    lines = [f"# Local steps per round at a fixed budget ({len(rows)} runs done)\n",
             "Rank 16 for every client; otherwise the `full` profile (10 clients, Dirichlet(0.5), batch 2, cutoff 128, "
             "2,000 examples, lr 5e-4, 48 test conversations). Final global test loss.\n",
             "| budget | local steps × rounds | method | " + " | ".join(f"seed {s}" for s in SEEDS) +
             " | mean | wall s (mean) |", "|---|---|---|" + "---:|" * (len(SEEDS) + 2)]
    groups = sorted({(k[0], k[1]) for k in rows})
    methods = [m for m in PAIR + EXTRA if any(k[2] == m for k in rows)]
    for total, s in groups:
        for m in methods:
            got = {seed: rows[(total, s, m, seed)] for seed in SEEDS if (total, s, m, seed) in rows}
            if got:
                finals = [r["final_test_loss"] for r in got.values()]
                cells = " | ".join(f"{got[seed]['final_test_loss']:.4f}" if seed in got else "–" for seed in SEEDS)
                lines.append(f"| {total} | {s} × {total // s} | {m} | {cells} | {mean(finals):.4f} (n={len(finals)}) | "
                             f"{mean(r['wall_seconds'] for r in got.values()):.0f} |")
    paired = {}
    lines += ["", "## Paired by seed: final test loss of each method minus FedIT's (negative: the method ends lower)\n",
              "| budget | local steps × rounds | difference | " + " | ".join(f"seed {s}" for s in SEEDS) +
              " | mean ± std |", "|---|---|---|" + "---:|" * (len(SEEDS) + 1)]
    for total, s in groups:
        for m in methods:
            if m == "fedit":
                continue
            per_seed = {seed: rows[(total, s, m, seed)]["final_test_loss"] - rows[(total, s, "fedit", seed)]["final_test_loss"]
                        for seed in SEEDS if (total, s, m, seed) in rows and (total, s, "fedit", seed) in rows}
            if not per_seed:
                continue
            values = list(per_seed.values())
            spread = f" ± {stdev(values):.4f}" if len(values) > 1 else ""
            paired[f"ls{s}x{total // s}: {m} - fedit"] = {"total_steps": total, "local_steps": s, "method": m,
                                                          "per_seed": per_seed, "mean": mean(values),
                                                          "std": stdev(values) if len(values) > 1 else None}
            cells = " | ".join(f"{per_seed[seed]:+.4f}" if seed in per_seed else "–" for seed in SEEDS)
            lines.append(f"| {total} | {s} × {total // s} | {m} − fedit | {cells} | {mean(values):+.4f}{spread} |")
    lines += ["", "## Test loss per round (seed 0; first value: after round 1)\n",
              "| budget | local steps × rounds | method | test loss per round |", "|---|---|---|---|"]
    for total, s in groups:
        for m in methods:
            if (row := rows.get((total, s, m, 0))) is not None:
                lines.append(f"| {total} | {s} × {total // s} | {m} | "
                             f"{' → '.join(f'{x:.4f}' for x in row['loss_per_round'])} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "local_steps.md").write_text(text)
    (RESULTS / "local_steps.json").write_text(json.dumps(
        {"runs": {f"ls{k[1]}x{k[0] // k[1]}-{k[2]}-s{k[3]}": r for k, r in rows.items()}, "paired": paired}, indent=1))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/local-steps", help="run directories (checkpoints)")
    parser.add_argument("--total-steps", type=int, default=TOTAL_STEPS, help="rounds × local steps of every run")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="local steps per round, in run order")
    parser.add_argument("--client-eval", type=int, default=4, help="client_eval_examples (0: global test loss only)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--only", default="", help="comma list of run names (default: all)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not args.report:
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        steps = tuple(int(s) for s in args.steps.split(","))
        runs = [r for r in plan(Path(args.out), args.total_steps, steps, args.client_eval,
                                                 args.threads) if not only or r[0] in only]
        for index, (name, config) in enumerate(runs, start=1):
            if finished(name, config):
                print(f"[local-steps] {index}/{len(runs)} {name}: done earlier, skipped", flush=True)
                continue
            print(f"[local-steps] {index}/{len(runs)} {name}", flush=True)
            summary = run_one(name, config, 0, "full", args.quiet, summaries=SUMMARIES)
            print(f"[local-steps] {name}: final test loss {summary['metrics'][-1]['test_loss']:.4f}, "
                  f"{summary['wall_seconds']:.0f} s", flush=True)
            report()
    print(report())


if __name__ == "__main__":
    main()
