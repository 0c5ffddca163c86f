"""MMLU cloze scoring speed: the shared-context path (one forward per question, its key/value cache
copied to the 4 answers) against scoring every (question, answer) pair on its own, same questions, same
model, alternating, in one run. Checks that both pick the same answers.

    python benchmarks/bench_mmlu.py --questions 100 --repeats 2
Writes benchmarks/results/mmlu_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

import torch

from flora.eval.loglik import score_continuations, score_shared_contexts
from flora.eval.mmlu import cloze_requests, load_mmlu, predict, stratified_subset
from flora.models.loader import load_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    loaded = load_model(args.model)
    questions = stratified_subset(load_mmlu()[0], args.questions, seed=0)
    groups = [(cloze_requests(q, [])[0][0], [c for _, c in cloze_requests(q, [])]) for q in questions]
    pairs = [(context, c) for context, conts in groups for c in conts]
    times: dict[str, list[float]] = {"pairs": [], "shared": []}
    picks: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name in ("pairs", "shared"):
            started = time.perf_counter()
            if name == "pairs":
                flat = score_continuations(loaded.model, loaded.tokenizer, pairs, batch_size=16)
                rows = [flat[4 * i:4 * i + 4] for i in range(len(groups))]
            else:
                rows = score_shared_contexts(loaded.model, loaded.tokenizer, groups)
            times[name].append(time.perf_counter() - started)
            picks[name] = [predict(row, conts, "cloze") for row, (_, conts) in zip(rows, groups)]
    result = {"questions": len(questions), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "seconds": times, "median_seconds": {k: median(v) for k, v in times.items()},
              "speedup": median(times["pairs"]) / median(times["shared"]),
              "same_predictions": picks["pairs"] == picks["shared"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mmlu_speed.json").write_text(json.dumps(result, indent=2))
    table = ("| path | median s | questions/s |\n|---|---:|---:|\n" + "".join(
        f"| {k} | {v:.1f} | {len(questions) / v:.2f} |\n" for k, v in result["median_seconds"].items()) +
        f"\nspeed-up {result['speedup']:.2f}x, same predictions: {result['same_predictions']} "
        f"({len(questions)} questions, {args.repeats} alternating repeats, {result['threads']} threads)\n")
    (RESULTS / "mmlu_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
