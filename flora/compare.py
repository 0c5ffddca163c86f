"""``flora compare``: one config, a matrix of methods × rank settings, one table and two plots.

Every run writes its own ``OUT/<setting>-<method>/`` (metrics.jsonl, checkpoint, eval.json when MMLU
is asked for); the table and plots are derived from those files only, so ``flora report OUT``
rebuilds them at any time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from flora.config import RunConfig, load_config
from flora.lora.methods import METHODS


def plan_runs(base: RunConfig, methods: list[str], settings: list[str], homogeneous_rank: int
              ) -> list[tuple[str, RunConfig]]:
    """``(name, config)`` per run; equal-rank methods only in the homogeneous setting."""
    runs = []
    for setting in settings:
        if setting not in ("homogeneous", "heterogeneous"):
            from flora.config import ConfigError
            raise ConfigError(f"--settings {setting!r}: expected homogeneous and/or heterogeneous")
        ranks = [homogeneous_rank] if setting == "homogeneous" else list(base.ranks)
        if setting == "heterogeneous" and len(set(ranks)) == 1:
            continue  # identical to the homogeneous setting
        for method in methods:
            if setting == "heterogeneous" and method in METHODS and METHODS[method].equal_ranks:
                continue
            name = f"{setting}-{method}"
            runs.append((name, dataclasses.replace(base, method=method, ranks=ranks,
                                                   out_dir=str(Path(base.out_dir) / name))))
    return runs


def compare_command(args) -> list[dict]:
    from flora.engines import run
    from flora.report import write_compare_report

    out = Path(args.out)
    base = load_config(args.config, args.set + [f"out_dir={out}"])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = plan_runs(base, methods, [s.strip() for s in args.settings.split(",") if s.strip()],
                     args.homogeneous_rank)
    progress = (lambda _: None) if args.quiet else print
    for index, (name, config) in enumerate(runs, start=1):
        print(f"[compare] {index}/{len(runs)} {name}: ranks {config.ranks}")
        started = time.perf_counter()
        run(config, args.engine, progress=progress)  # each run starts from the base weights
        wall = time.perf_counter() - started
        (Path(config.out_dir) / "wall.json").write_text(json.dumps({"wall_seconds": wall}))
        if args.mmlu:
            evaluate_final_mmlu(config, args.mmlu, quiet=args.quiet)
    table = write_compare_report(out)
    print(table)
    return runs


def evaluate_final_mmlu(config: RunConfig, n: int, quiet: bool = False) -> dict:
    """MMLU cloze of a finished run's final global model (standalone: the mean over clients' models)."""
    from flora.checkpoint import load_run_model
    from flora.eval.runner import run_mmlu

    clients = range(config.num_clients) if config.spec.per_client_models else [0]
    results = []
    for client in clients:
        loaded, _, _ = load_run_model(config.out_dir, client=client)
        results.append(run_mmlu(loaded.model, loaded.tokenizer, n, ["cloze"], 0, 0, 16, quiet=quiet)["cloze"])
    accuracy = sum(r["accuracy"] for r in results) / len(results)
    summary = {"cloze": {**results[0], "accuracy": accuracy}} if len(results) == 1 else \
        {"cloze": {"accuracy": accuracy, "num_questions": results[0]["num_questions"], "ci95": [math.nan, math.nan],
                   "per_client": [r["accuracy"] for r in results]}}
    (Path(config.out_dir) / "eval.json").write_text(json.dumps({"mmlu": summary}, indent=2))
    return summary
