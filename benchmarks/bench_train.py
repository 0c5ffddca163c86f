"""Local-training throughput: ``flora.train.train_client`` vs a plain peft + transformers loop.

Same model (embedded SmolLM2-135M-Instruct, fp32), same examples, batch, micro-batch, cutoff and
LoRA settings, alternated in one run so machine noise hits both; reported as a ratio. Also, in the same run:

* padding: share of the positions run through the model that are padding (flora's length-sorted
  micro-batches, the plain loop's in-order ones, and packing: none);
* LoRA dropout: ``train_client`` at dropout 0.05 with its sparse sampler (the default) and with torch's
  ``nn.Dropout`` (``dropout_sampler = "torch"``), vs dropout 0 (the differences are the time each costs);
* packing: ``train_client`` with each micro-batch packed into one row (position ids restart per example,
  no attention across examples: transformers' packed-sequence mask; exact: the loss of a packed micro-batch
  is checked against the padded one);
* ``--compile``: the plain loop on ``torch.compile(model)`` (inductor, CPU), first step (compilation) apart;
* the machine's limit: useful FLOP/s (per real token 4·N of the adapted linear layers: forward and the backward
  to the activations, frozen weights get no weight gradient; the output head 4·V·h only at target tokens;
  causal attention 6·T²·h per layer and sequence; the adapter's own products 6·r·(in + out) per token and
  adapted layer: x·Aᵀ, h·Bᵀ and the backward's gradients of B, h, A and x, counted in every layer although
  layer 0 needs no gradient of its input) against the fp32 rate of a 2048² product and of products at
  the model's own layer shapes (tokens of a micro-batch × in by in × out, and the backward's × out by out × in),
  measured in the same process.

    .venv/bin/python benchmarks/bench_train.py [--steps 4] [--repeats 2] [--compile] [--out benchmarks/results]
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
import flora.train
from flora.data.tokenize import IGNORE_INDEX, collate, encode_all
from flora.modeling import causal_lm_parts, layer_shapes, micro_batches, target_loss_sum
from flora.models.loader import load_model
from flora.train import LoraSpec, TrainSpec, batch_schedule, train_client


def packed_collate(examples, pad_id):
    """One row: the examples back to back, positions restarting at 0 for each (no padding); an example's first
    label is never a target (unpacked, nothing predicts it; packed, the previous example would)."""
    ids, positions, labels = [], [], []
    for e in examples:
        ids += e.input_ids
        positions += range(len(e.input_ids))
        labels += [IGNORE_INDEX] + e.labels[1:]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels])}


def packed_loss_sum(model, batch):
    """``target_loss_sum`` of a packed row: no attention mask, so transformers builds the block-causal mask
    from the restarting position ids (no cache: it only does so without one)."""
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(head(hidden[:, :-1][mask]).float(), targets[mask], reduction="none")
    return losses.sum(), int(losses.numel())


def train_packed(model, tokenizer, examples, lora, train):
    """``train_client`` with packed micro-batches (its collate and loss swapped for the packed ones)."""
    original = flora.train.collate, flora.train.target_loss_sum
    flora.train.collate, flora.train.target_loss_sum = packed_collate, packed_loss_sum
    try:
        return train_client(model, tokenizer, examples, lora, train)
    finally:
        flora.train.collate, flora.train.target_loss_sum = original


def padding_shares(examples, train: TrainSpec) -> dict[str, float]:
    real = padded_sorted = padded_order = 0
    for indices in batch_schedule(len(examples), train.steps, train.batch_size, train.seed):
        batch = [examples[i] for i in indices]
        real += sum(len(e.input_ids) for e in batch)
        padded_sorted += sum(len(m) * max(len(e.input_ids) for e in m) for m in micro_batches(batch, train.micro_batch_size))
        for i in range(0, len(batch), train.micro_batch_size):
            m = batch[i:i + train.micro_batch_size]
            padded_order += len(m) * max(len(e.input_ids) for e in m)
    return {"flora_sorted": 1 - real / padded_sorted, "plain_in_order": 1 - real / padded_order, "packed": 0.0}


def useful_flops(model, examples, train: TrainSpec, targets, rank: int) -> dict[str, float]:
    """Useful FLOPs of ``train``'s batches (see the module docstring): ``model`` (frozen linear layers, head at
    targets, causal attention) and ``adapter`` (the rank-``rank`` LoRA products, forward and backward)."""
    config = model.config
    shapes = layer_shapes(model, targets).values()
    linear = sum(o * i for o, i in shapes)
    adapter = sum(rank * (o + i) for o, i in shapes)
    head = config.vocab_size * config.hidden_size
    flops = {"model": 0.0, "adapter": 0.0}
    for indices in batch_schedule(len(examples), train.steps, train.batch_size, train.seed):
        for i in indices:
            e = examples[i]
            n = len(e.input_ids)
            flops["model"] += 4 * linear * n + 4 * head * sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)
            flops["model"] += 6 * n * n * config.hidden_size * config.num_hidden_layers
            flops["adapter"] += 6 * adapter * n
    return flops


def matmul_rates(model, targets, tokens: int, repeats: int = 3) -> dict[str, float]:
    """fp32 FLOP/s of a 2048² product, and of the forward and backward products at the model's layer shapes."""
    def rate(pairs) -> float:
        for a, b in pairs:  # warm-up
            a @ b
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for a, b in pairs:
                a @ b
            best = min(best, time.perf_counter() - started)
        return sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs) / best

    square = torch.randn(2048, 2048)
    shapes = sorted(set(layer_shapes(model, targets).values()))
    pairs = []
    for out_dim, in_dim in shapes:
        pairs.append((torch.randn(tokens, in_dim), torch.randn(in_dim, out_dim)))  # forward
        pairs.append((torch.randn(tokens, out_dim), torch.randn(out_dim, in_dim)))  # backward to the activations
    return {"square_2048": rate([(square, square)]), "layer_shapes": rate(pairs), "layer_shapes_list": shapes,
            "tokens": tokens}


def plain_peft_loop(model, tokenizer, examples, lora: LoraSpec, train: TrainSpec, compile: bool = False,
                    skip_first: bool = False) -> tuple[float, int]:
    """The textbook loop: peft model, full logits, labels passed to the model, micro-batches in order.
    ``compile``: the peft model under ``torch.compile``; ``skip_first``: the first step (compilation) is not
    timed (its seconds are returned apart, as a third value)."""
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), bias="none")
    torch.manual_seed(train.seed)
    peft_model = get_peft_model(model, config)
    runner = torch.compile(peft_model) if compile else peft_model
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=train.lr)
    peft_model.train()
    tokens = 0
    first = 0.0
    start = time.perf_counter()
    try:
        for step, indices in enumerate(batch_schedule(len(examples), train.steps, train.batch_size, train.seed)):
            optimizer.zero_grad(set_to_none=True)
            batch = [examples[i] for i in indices]
            for i in range(0, len(batch), train.micro_batch_size):
                micro = batch[i:i + train.micro_batch_size]
                inputs = collate(micro, tokenizer.pad_token_id)
                loss = runner(**inputs).loss / (len(batch) // train.micro_batch_size)
                loss.backward()
                if not (skip_first and step == 0):
                    tokens += sum(len(e.input_ids) for e in micro)
            optimizer.step()
            if skip_first and step == 0:
                first = time.perf_counter() - start
                start = time.perf_counter()
        seconds = time.perf_counter() - start
    finally:
        peft_model.unload()
    return (seconds, tokens, first) if skip_first else (seconds, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--compile", action="store_true", help="also the plain loop under torch.compile")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("embedded")
    records, _ = load_records("embedded", limit=400)
    examples, _ = encode_all(loaded.tokenizer, records, args.cutoff)
    lora = LoraSpec(rank=16, alpha=32, dropout=0.05)
    no_dropout = LoraSpec(rank=16, alpha=32, dropout=0.0)
    torch_dropout = LoraSpec(rank=16, alpha=32, dropout=0.05, dropout_sampler="torch")
    specs = {"flora": lora, "flora_torch_dropout": torch_dropout, "flora_no_dropout": no_dropout, "flora_packed": lora}
    train = TrainSpec(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=3e-4)
    model, tokenizer = loaded.model, loaded.tokenizer
    exactness = packed_exactness(model, tokenizer, examples, train)
    print(f"packed vs padded loss of one micro-batch: {exactness}", flush=True)
    runs: dict[str, list[float]] = {"plain": [], "flora": [], "flora_torch_dropout": [], "flora_no_dropout": [],
                                    "flora_packed": []}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for repeat in range(args.repeats):
        for name in runs:
            if name == "plain":
                took, tokens = plain_peft_loop(model, tokenizer, examples, lora, train)
            else:
                trainer = train_packed if name == "flora_packed" else train_client
                result = trainer(model, tokenizer, examples, specs[name], train)
                took, tokens = result.seconds, result.tokens
            runs[name].append(tokens / took)
            seconds[name].append(took)
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in runs.items()), flush=True)
    compiled = measure_compile(model, tokenizer, examples, lora, train) if args.compile else None
    tokens_per_micro = statistics.mean(len(e.input_ids) for e in examples) * args.micro_batch_size
    rates = matmul_rates(model, lora.targets, int(tokens_per_micro))
    counted = useful_flops(model, examples, train, lora.targets, lora.rank)
    flops = counted["model"] + counted["adapter"]
    median = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = statistics.median(p / f for f, p in zip(seconds["flora"], seconds["plain"]))
    report = {"benchmark": "train", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "model": "SmolLM2-135M-Instruct fp32", "lora_rank": 16,
              "targets": list(lora.targets), "steps": args.steps, "batch_size": args.batch_size,
              "micro_batch_size": args.micro_batch_size, "cutoff": args.cutoff,
              "tokens_per_s": runs, "seconds": seconds,
              "flora_tokens_per_s": runs["flora"], "plain_peft_tokens_per_s": runs["plain"], "ratio_median": ratio,
              "ratio_vs_plain": {k: statistics.median(p / f for f, p in zip(seconds[k], seconds["plain"]))
                                 for k in seconds},
              "dropout_share": {k: statistics.median(1 - n / d for d, n in zip(seconds[k], seconds["flora_no_dropout"]))
                                for k in ("flora", "flora_torch_dropout")},
              "padding_share": padding_shares(examples, train), "packed_exactness": exactness,
              "useful_flops": flops, "useful_flops_parts": counted,
              "useful_flops_per_s": {k: flops / v for k, v in median.items()},
              "matmul_rates": rates, "compile": compiled}
    report["share_of_square_2048"] = {k: v / rates["square_2048"] for k, v in report["useful_flops_per_s"].items()}
    report["share_of_layer_shapes"] = {k: v / rates["layer_shapes"] for k, v in report["useful_flops_per_s"].items()}
    report["share_of_layer_shapes_without_adapter"] = {k: counted["model"] / v / rates["layer_shapes"]
                                                       for k, v in median.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(report, indent=2))
    table = markdown(report, args)
    (args.out / "train.md").write_text(table)
    print(table)


def packed_exactness(model, tokenizer, examples, train: TrainSpec) -> dict[str, float]:
    """Loss sum of the first micro-batch, padded vs packed (eval mode, no adapter)."""
    micro = micro_batches(examples[:train.micro_batch_size], train.micro_batch_size)[0]
    was = model.training
    model.eval()
    with torch.no_grad():
        padded, n_padded = target_loss_sum(model, collate(micro, tokenizer.pad_token_id))
        packed, n_packed = packed_loss_sum(model, packed_collate(micro, tokenizer.pad_token_id))
    model.train(was)
    return {"padded_mean": float(padded) / n_padded, "packed_mean": float(packed) / n_packed,
            "relative_difference": abs(float(packed) - float(padded)) / abs(float(padded)),
            "same_target_count": n_padded == n_packed}


def measure_compile(model, tokenizer, examples, lora: LoraSpec, train: TrainSpec) -> dict:
    """The plain loop under ``torch.compile`` (inductor, CPU) against the eager one right after, each over
    ``train.steps + 1`` steps with the first (compilation, warm-up) not timed; or the error, if compiling fails."""
    longer = TrainSpec(steps=train.steps + 1, batch_size=train.batch_size, micro_batch_size=train.micro_batch_size,
                       lr=train.lr)
    try:
        took, tokens, first = plain_peft_loop(model, tokenizer, examples, lora, longer, compile=True, skip_first=True)
    except Exception as error:  # noqa: BLE001 -- reported, not hidden
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        torch._dynamo.reset()
    eager, eager_tokens, _ = plain_peft_loop(model, tokenizer, examples, lora, longer, skip_first=True)
    return {"ok": True, "first_step_seconds": first, "tokens_per_s": tokens / took,
            "eager_tokens_per_s": eager_tokens / eager, "speedup": (tokens / took) / (eager_tokens / eager)}


def markdown(report: dict, args) -> str:
    names = {"plain": "plain peft + transformers", "flora": "flora.train.train_client",
             "flora_torch_dropout": "train_client, torch's dropout (`dropout_sampler = \"torch\"`)",
             "flora_no_dropout": "train_client, LoRA dropout 0", "flora_packed": "train_client, packed micro-batches"}
    lines = ["| loop | tokens/s (median) | vs plain | useful GFLOP/s | of 2048² rate | of layer-shape rate |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, name in names.items():
        lines.append(f"| {name} | {statistics.median(report['tokens_per_s'][k]):.1f} | {report['ratio_vs_plain'][k]:.2f} | "
                     f"{report['useful_flops_per_s'][k] / 1e9:.1f} | {report['share_of_square_2048'][k]:.0%} | "
                     f"{report['share_of_layer_shapes'][k]:.0%} |")
    rates, pad, ex = report["matmul_rates"], report["padding_share"], report["packed_exactness"]
    lines += ["", f"Ratio flora / plain: **{report['ratio_median']:.2f}** (median over {args.repeats} alternating repeats, "
              f"{args.steps} steps x {args.batch_size} examples, micro-batches of {args.micro_batch_size}, cutoff "
              f"{args.cutoff}, rank 16, 7 targets, {report['threads']} threads).",
              f"fp32 matmul rates in this process: 2048² {rates['square_2048'] / 1e9:.1f} GFLOP/s; the model's layer shapes "
              f"({rates['tokens']} tokens × in by in × out, forward and backward) {rates['layer_shapes'] / 1e9:.1f} GFLOP/s.",
              f"Useful FLOPs: {report['useful_flops'] / 1e12:.2f} T, of which the adapter's own products "
              f"{report['useful_flops_parts']['adapter'] / report['useful_flops']:.1%}; without them train_client reaches "
              f"{report['share_of_layer_shapes_without_adapter']['flora']:.0%} of the layer-shape rate.",
              f"Padding: {pad['flora_sorted']:.1%} of positions (flora, length-sorted micro-batches), "
              f"{pad['plain_in_order']:.1%} (plain loop, in order), 0 packed.",
              f"LoRA dropout (0.05 vs 0): {report['dropout_share']['flora']:.1%} of train_client's time with the sparse "
              f"sampler, {report['dropout_share']['flora_torch_dropout']:.1%} with torch's.",
              f"Packing: loss of a packed micro-batch vs padded: relative difference {ex['relative_difference']:.1e} "
              f"(same target tokens: {ex['same_target_count']})."]
    compiled = report.get("compile")
    if compiled is not None:
        lines.append("torch.compile (inductor, CPU), plain loop: " + (
            f"{compiled['tokens_per_s']:.1f} tok/s vs eager {compiled['eager_tokens_per_s']:.1f} "
            f"({compiled['speedup']:.2f}x), first step (compilation) {compiled['first_step_seconds']:.0f} s"
            if compiled["ok"] else f"failed: {compiled['error']}"))
    lines.append(f"\n`python benchmarks/bench_train.py --steps {args.steps} --repeats {args.repeats}"
                 f"{' --compile' if args.compile else ''}{f' --threads {args.threads}' if args.threads else ''}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
