"""Local-training throughput: ``flora.train.train_client`` vs a plain peft + transformers loop.

Same model (embedded SmolLM2-135M-Instruct, fp32), same examples, batch, micro-batch, cutoff and
LoRA settings, alternated in one run so machine noise hits both; reported as a ratio.

    .venv/bin/python benchmarks/bench_train.py [--steps 4] [--repeats 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from flora.data.sources import load_records
from flora.data.tokenize import collate, encode_all
from flora.models.loader import load_model
from flora.train import LoraSpec, TrainSpec, batch_schedule, train_client


def plain_peft_loop(model, tokenizer, examples, lora: LoraSpec, train: TrainSpec) -> tuple[float, int]:
    """The textbook loop: peft model, full logits, labels passed to the model, micro-batches in order."""
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none")
    torch.manual_seed(train.seed)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=train.lr)
    peft_model.train()
    tokens = 0
    start = time.perf_counter()
    for indices in batch_schedule(len(examples), train.steps, train.batch_size, train.seed):
        optimizer.zero_grad(set_to_none=True)
        batch = [examples[i] for i in indices]
        for i in range(0, len(batch), train.micro_batch_size):
            micro = batch[i:i + train.micro_batch_size]
            inputs = collate(micro, tokenizer.pad_token_id)
            loss = peft_model(**inputs).loss / (len(batch) // train.micro_batch_size)
            loss.backward()
            tokens += sum(len(e.input_ids) for e in micro)
        optimizer.step()
    seconds = time.perf_counter() - start
    peft_model.unload()
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    loaded = load_model("embedded")
    records, _ = load_records("embedded", limit=400)
    examples, _ = encode_all(loaded.tokenizer, records, args.cutoff)
    lora = LoraSpec(rank=16, alpha=32, dropout=0.05)
    train = TrainSpec(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=3e-4)
    ours, plain = [], []
    for repeat in range(args.repeats):
        result = train_client(loaded.model, loaded.tokenizer, examples, lora, train)
        ours.append(result.tokens / result.seconds)
        seconds, tokens = plain_peft_loop(loaded.model, loaded.tokenizer, examples, lora, train)
        plain.append(tokens / seconds)
        print(f"repeat {repeat}: flora {ours[-1]:.1f} tok/s, plain peft {plain[-1]:.1f} tok/s", flush=True)
    ratio = statistics.median(o / p for o, p in zip(ours, plain))
    report = {"benchmark": "train", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "model": "SmolLM2-135M-Instruct fp32", "lora_rank": 16,
              "targets": list(lora.targets), "steps": args.steps, "batch_size": args.batch_size,
              "micro_batch_size": args.micro_batch_size, "cutoff": args.cutoff,
              "flora_tokens_per_s": ours, "plain_peft_tokens_per_s": plain, "ratio_median": ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(report, indent=2))
    table = ("| loop | tokens/s (median) |\n|---|---:|\n"
             f"| flora.train.train_client | {statistics.median(ours):.1f} |\n"
             f"| plain peft + transformers | {statistics.median(plain):.1f} |\n\n"
             f"Ratio flora / plain: **{ratio:.2f}** (median over {args.repeats} alternating repeats, "
             f"{args.steps} steps x {args.batch_size} examples, cutoff {args.cutoff}, rank 16, 7 targets, "
             f"{torch.get_num_threads()} threads).\n")
    (args.out / "train.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
