"""MMLU cloze scoring speed, same questions, same model, alternating in one run (the machine is shared):

* ``loop``: what a user writes first: per question, one forward pass of its 4 (question + answer) texts
  (right-padded), ``log_softmax`` of the logits, the answer tokens' log-probabilities summed;
* ``pairs``: every (question, answer) pair scored on its own, 16 per batch, sorted by length, the output head
  only at answer positions (``score_continuations``);
* ``shared``: one forward per batch of questions, each one's key/value cache copied to its 4 answers, which
  run in a second forward, contexts sorted by length (``score_shared_contexts``);
* ``packed``: FLoRA's path (``evaluate_mmlu``): a question and its 4 answers in one row, a 4-D attention mask
  keeping the answers apart, rows sorted by length, one forward per batch (``score_packed_contexts``).

Checks that all pick the same answers, and reports the padding left: the share of positions run through the
decoder that are padding, per path.

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

from flora.eval.loglik import (Scored, encode_request, score_continuations, score_packed_contexts,
                               score_shared_contexts)
from flora.eval.mmlu import cloze_requests, load_mmlu, predict, stratified_subset
from flora.models.loader import load_model

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def user_loop(model, tokenizer, groups) -> list[list[Scored]]:
    """Per question one forward of its 4 answers, full logits: the straightforward loop."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for context, continuations in groups:
        encoded = [encode_request(tokenizer, context, c, 1024) for c in continuations]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encoded])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded])
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        row = []
        for j, e in enumerate(encoded):
            positions = [t for t, label in enumerate(e.labels) if label != -100]
            row.append(Scored(sum(float(logprobs[j, t - 1, e.input_ids[t]]) for t in positions), len(positions)))
        rows.append(row)
    return rows


def padding(tokenizer, groups, shared_batch: int) -> dict[str, float]:
    """Share of the positions each path runs through the decoder that are padding."""
    encoded = [[encode_request(tokenizer, ctx, c, 1024) for c in conts] for ctx, conts in groups]
    lengths = [[len(e.input_ids) for e in row] for row in encoded]
    loop_real = sum(sum(r) for r in lengths)
    loop_total = sum(len(r) * max(r) for r in lengths)
    flat = sorted(n for r in lengths for n in r)
    pairs_total = sum(len(flat[i:i + 16]) * max(flat[i:i + 16]) for i in range(0, len(flat), 16))
    ctx = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c, _ in groups]
    conts = [[len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in xs] for _, xs in groups]
    order = sorted(range(len(groups)), key=lambda i: ctx[i])
    shared_real = sum(ctx) + sum(sum(c) for c in conts)
    shared_total = 0
    for start in range(0, len(order), shared_batch):
        chunk = order[start:start + shared_batch]
        shared_total += len(chunk) * max(ctx[i] for i in chunk)
        shared_total += sum(len(conts[i]) for i in chunk) * max(max(conts[i]) for i in chunk)
    totals = sorted(c + sum(xs) for c, xs in zip(ctx, conts))
    packed_total = sum(len(totals[i:i + shared_batch]) * max(totals[i:i + shared_batch])
                       for i in range(0, len(totals), shared_batch))
    return {"loop": 1 - loop_real / loop_total, "pairs": 1 - loop_real / pairs_total,
            "shared": 1 - shared_real / shared_total, "packed": 1 - shared_real / packed_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--shared-batch", type=int, default=4, help="questions per batch of the shared path "
                        "(evaluate_mmlu's default batch_size 16 // 4)")
    parser.add_argument("--block", type=int, default=16, help="questions per block: the paths alternate block by "
                        "block (in the order of context length), so the shared machine's load hits all of them")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 is steadier on "
                        "a machine shared by many processes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    questions = stratified_subset(load_mmlu()[0], args.questions, seed=0)
    groups = [(cloze_requests(q, [])[0][0], [c for _, c in cloze_requests(q, [])]) for q in questions]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c, _ in groups]
    order = sorted(range(len(groups)), key=lambda i: lengths[i])  # what the sorting paths do over the whole set
    paths = {
        "loop": lambda gs: user_loop(model, tokenizer, gs),
        "pairs": lambda gs: _rows(score_continuations(model, tokenizer, [(c, x) for c, xs in gs for x in xs],
                                                      batch_size=16)),
        "shared": lambda gs: score_shared_contexts(model, tokenizer, gs, batch_size=args.shared_batch),
        "packed": lambda gs: score_packed_contexts(model, tokenizer, gs, batch_size=args.shared_batch),
    }
    times = {name: [0.0] * args.repeats for name in paths}
    rows: dict[str, dict[int, list[Scored]]] = {name: {} for name in paths}
    for repeat in range(args.repeats):
        for b, start in enumerate(range(0, len(order), args.block)):
            block = order[start:start + args.block]
            names = list(paths)[b % len(paths):] + list(paths)[:b % len(paths)]  # rotate who goes first
            for name in names:
                started = time.perf_counter()
                scored = paths[name]([groups[i] for i in block])
                times[name][repeat] += time.perf_counter() - started
                rows[name].update(zip(block, scored))
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[repeat]:.1f} s" for k, v in times.items()), flush=True)
    picks = {name: [predict(rows[name][i], groups[i][1], "cloze") for i in range(len(groups))] for name in paths}
    best = "packed"
    result = {"questions": len(questions), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "block": args.block, "shared_batch": args.shared_batch,
              "seconds": times, "median_seconds": {k: median(v) for k, v in times.items()},
              "speedup_vs_loop": {k: median(times["loop"]) / median(v) for k, v in times.items()},
              "same_predictions": all(picks[k] == picks["loop"] for k in paths),
              "max_logprob_difference_vs_loop": {
                  k: max(abs(a.logprob - b.logprob) for i in range(len(groups))
                         for a, b in zip(rows[k][i], rows["loop"][i])) for k in paths},
              "padding_share": padding(tokenizer, groups, args.shared_batch)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mmlu_speed.json").write_text(json.dumps(result, indent=2))
    table = ("| path | s (median) | questions/s | vs loop | padding | max abs. log-lik. difference vs loop |\n"
             "|---|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {k} | {v:.1f} | {len(questions) / v:.2f} | {result['speedup_vs_loop'][k]:.2f}x | "
                 f"{result['padding_share'][k]:.1%} | {result['max_logprob_difference_vs_loop'][k]:.1e} |\n"
                 for k, v in result["median_seconds"].items()) +
             f"\n{best} vs loop **{result['speedup_vs_loop'][best]:.2f}x**; same predictions (all paths): "
             f"{result['same_predictions']} ({len(questions)} questions 0-shot, the paths alternating in blocks of "
             f"{args.block} questions, {args.repeats} repeat(s), {result['threads']} threads, shared and packed "
             f"{args.shared_batch} questions per forward). `python benchmarks/bench_mmlu.py --questions "
             f"{args.questions} --repeats {args.repeats} --shared-batch {args.shared_batch} --block {args.block}"
             f"{f' --threads {args.threads}' if args.threads else ''}`\n")
    (RESULTS / "mmlu_speed.md").write_text(table)
    print(table)


def _rows(flat: list[Scored]) -> list[list[Scored]]:
    return [flat[i:i + 4] for i in range(0, len(flat), 4)]


if __name__ == "__main__":
    main()
