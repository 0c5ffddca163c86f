"""AdaLoRA clients against LoRA clients at the README main job's budget, over seeds (issue 20's goal).

    python benchmarks/adalora_main_job.py                          # 3 seeds x (lora, adalora), this machine
    python benchmarks/adalora_main_job.py --device cuda --model M.gguf --data rows.jsonl --out DIR
    python benchmarks/adalora_main_job.py --export-data rows.jsonl # the main job's 1,000 records as a file

Every run is ``configs/quickstart.toml`` (FLoRA, 4 clients at ranks 16/8/4/4, 3 rounds x 4 local steps of 4
examples, cutoff 192, 1,000 ShareGPT conversations) with the in-process engine, changed only by
``adapters`` and the AdaLoRA keys of ``--adalora`` (default: the start and learning rate that moved on one
client, ``adalora_init = orthonormal``, ``adalora_value_lr_ratio = 128``), and ``seed``. Per run: global test
loss per round, the clients' own test loss, bytes up per round (AdaLoRA uploads only the ranks it kept) and the
largest aggregation error. The goal: AdaLoRA's final test loss within 0.01 of LoRA's on every seed at about
half LoRA's upload. ``--export-data`` writes the records the main job draws at seed 0 (one JSON row each) so
that a machine without the ShareGPT package can run the same budget on the same conversations (``--data``);
the seeds then differ only in partition and order. Results (one JSON, rewritten after every run, and a
markdown table) go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from statistics import mean

import numpy as np

from flora.config import RunConfig, load_config

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.toml"
ADALORA_FIX = {"adalora_init": "orthonormal", "adalora_value_lr_ratio": 128.0}


def export_main_job_records(path: Path) -> int:
    """The ``max_examples`` records the main job samples at its seed, as JSONL (canonical ``messages`` rows)."""
    from flora.data.sources import load_records

    config = load_config(QUICKSTART)
    records, _ = load_records(config.data, fmt=config.format)
    order = np.random.default_rng(config.seed).permutation(len(records))[:config.max_examples]  # as partition()
    path.write_text("".join(json.dumps(records[i].to_json()) + "\n" for i in order))
    return len(order)


def configs(seeds: list[int], out: Path, overrides: dict, adalora: dict, tag: str = "") -> list[tuple[str, RunConfig]]:
    """LoRA and AdaLoRA runs per seed; ``tag`` names an AdaLoRA variant (``adalora-TAG-sN``)."""
    base = dataclasses.replace(load_config(QUICKSTART), **overrides)
    runs = []
    for seed in seeds:
        for kind in ("lora", "adalora"):
            extra = adalora if kind == "adalora" else {}
            name = f"{kind}-{tag}-s{seed}" if tag and kind == "adalora" else f"{kind}-s{seed}"
            runs.append((name, dataclasses.replace(base, adapters=[kind], seed=seed, out_dir=str(out / name),
                                                   **extra)))
    return runs


def summarize(name: str, config: RunConfig, metrics: list[dict], seconds: float) -> dict:
    return {"name": name, "adapter": name.rsplit("-s", 1)[0], "seed": config.seed, "seconds": seconds,
            "test_loss": [m["test_loss"] for m in metrics],
            "client_test_loss": [m.get("client_test_loss") for m in metrics],
            "bytes_up": [m["bytes_up"] for m in metrics],
            "max_aggregation_error": max(m["aggregation_error"] for m in metrics),
            "config": json.loads(json.dumps(config.to_dict()))}


def markdown(results: list[dict], command: str) -> str:
    by = {(r["adapter"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    variants = sorted({r["adapter"] for r in results} - {"lora"})
    lines = [f"`{command}`", "",
             "| AdaLoRA run | seed | LoRA test loss per round | AdaLoRA test loss per round | AdaLoRA − LoRA (final) | "
             "clients' own, AdaLoRA − LoRA | MiB up / round, LoRA → AdaLoRA (ratio) |",
             "|---|---:|---|---|---:|---:|---|"]
    summary = []
    for variant in variants:
        diffs = []
        for seed in seeds:
            lora, ada = by.get(("lora", seed)), by.get((variant, seed))
            if lora and ada:
                diffs.append(_row(lines, variant, seed, lora, ada))
        if diffs:
            summary.append(f"{variant} − LoRA, final test loss: mean {mean(diffs):+.4f}; within 0.01 on "
                           f"{sum(d <= 0.01 for d in diffs)}/{len(diffs)} seeds.")
    return "\n".join(lines + [""] + summary) + "\n"


def _row(lines: list[str], variant: str, seed: int, lora: dict, ada: dict) -> float:
    diff = ada["test_loss"][-1] - lora["test_loss"][-1]
    own = ada["client_test_loss"][-1] - lora["client_test_loss"][-1]
    up_lora, up_ada = mean(lora["bytes_up"]) / 2**20, mean(ada["bytes_up"]) / 2**20
    lines.append(f"| {variant} | {seed} | {' → '.join(f'{x:.4f}' for x in lora['test_loss'])} | "
                 f"{' → '.join(f'{x:.4f}' for x in ada['test_loss'])} | {diff:+.4f} | {own:+.4f} | "
                 f"{up_lora:.1f} → {up_ada:.1f} ({up_ada / up_lora:.2f}) |")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default=None, help="config key device (default: the config's)")
    parser.add_argument("--model", default=None, help="config key model (default: the config's, 'embedded')")
    parser.add_argument("--data", default=None, help="config key data (default: the config's, 'embedded')")
    parser.add_argument("--dtype", default=None, help="config key dtype (default: the config's, auto)")
    parser.add_argument("--adalora", default=json.dumps(ADALORA_FIX), help="AdaLoRA keys, JSON")
    parser.add_argument("--tag", default="", help="names an AdaLoRA variant (--adalora): runs adalora-TAG-sN")
    parser.add_argument("--out", type=Path, default=Path("runs/adalora-main-job"), help="run directories")
    parser.add_argument("--results", type=Path, default=None, help="adalora_main_job.{json,md} (default: --out)")
    parser.add_argument("--export-data", type=Path, default=None, help="only write the main job's records there")
    args = parser.parse_args()
    if args.export_data:
        print(f"wrote {export_main_job_records(args.export_data)} records to {args.export_data}")
        return
    from flora.engines import run_in_process

    overrides = {k: v for k, v in (("device", args.device), ("model", args.model), ("data", args.data),
                                                  ("dtype", args.dtype)) if v}
    results_dir = args.results or args.out
    results_dir.mkdir(parents=True, exist_ok=True)
    results_path = results_dir / "adalora_main_job.json"
    results = json.loads(results_path.read_text())["runs"] if results_path.is_file() else []
    done = {r["name"] for r in results}
    command = "python benchmarks/adalora_main_job.py " + " ".join(
        f"--{k} {v}" for k, v in (("seeds", args.seeds), *overrides.items()) if v) + (
        f" --adalora '{args.adalora}' --tag {args.tag}" if args.tag else "")
    for name, config in configs([int(s) for s in args.seeds.split(",")], args.out, overrides,
                                json.loads(args.adalora), args.tag):
        if name in done:
            continue
        started = time.perf_counter()
        server = run_in_process(config, progress=lambda _: None)
        results.append(summarize(name, config, server.metrics, time.perf_counter() - started))
        print(f"{name}: test loss {[round(x, 4) for x in results[-1]['test_loss']]}, "
              f"{results[-1]['seconds']:.0f} s", flush=True)
        results_path.write_text(json.dumps({"command": command, "runs": results}, indent=1))
        (results_dir / "adalora_main_job.md").write_text(markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
