"""Tokenisation: :func:`flora.data.tokenize.encode` (head of the text only) vs the whole-text definition.

Embedded SmolLM2 tokenizer and ShareGPT conversations; both functions on the same records,
alternated over repeats so machine noise hits both; checks they return the same examples and
reports the ratio per cutoff.

    .venv/bin/python benchmarks/bench_tokenize.py [--records 500] [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from flora.data.sources import load_records
from flora.data.tokenize import encode, encode_whole_text
from flora.models.loader import load_tokenizer, resolve_model_dir


def seconds_to_encode(function, tokenizer, records, cutoff: int) -> tuple[float, list]:
    start = time.perf_counter()
    examples = [function(tokenizer, record, cutoff) for record in records]
    return time.perf_counter() - start, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cutoffs", default="128,512")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_dir("embedded"))
    all_records, _ = load_records("embedded")
    records = all_records[:: max(1, len(all_records) // args.records)][:args.records]
    chars = statistics.mean(len(tokenizer.apply_chat_template([dict(m) for m in r.messages], tokenize=False))
                            for r in records)
    for function in (encode, encode_whole_text):  # warm-up: template compilation, tokenizer caches
        seconds_to_encode(function, tokenizer, records[:10], 128)
    rows = []
    for cutoff in (int(c) for c in args.cutoffs.split(",")):
        head, whole = [], []
        for _ in range(args.repeats):
            seconds, fast = seconds_to_encode(encode, tokenizer, records, cutoff)
            head.append(seconds)
            seconds, reference = seconds_to_encode(encode_whole_text, tokenizer, records, cutoff)
            whole.append(seconds)
            if fast != reference:
                raise SystemExit(f"cutoff {cutoff}: encode differs from encode_whole_text")
        rows.append({"cutoff": cutoff, "records": len(records), "whole_text_s": statistics.median(whole),
                     "head_only_s": statistics.median(head),
                     "speedup": statistics.median(whole) / statistics.median(head)})
        print(f"cutoff {cutoff}: whole text {rows[-1]['whole_text_s']:.2f} s, head only {rows[-1]['head_only_s']:.2f} s, "
              f"{rows[-1]['speedup']:.1f}x (median of {args.repeats}; same examples)")
    report = {"machine": platform.machine(), "python": platform.python_version(), "mean_chars": chars, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenize.json").write_text(json.dumps(report, indent=2))
    table = [f"# Tokenisation: head of the text vs whole text ({len(records)} embedded ShareGPT conversations, "
             f"mean {chars:.0f} characters rendered)\n", "| cutoff | whole text s | head only s | speedup |",
             "|---:|---:|---:|---:|"]
    table += [f"| {r['cutoff']} | {r['whole_text_s']:.2f} | {r['head_only_s']:.2f} | {r['speedup']:.1f}× |" for r in rows]
    (args.out / "tokenize.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
