"""Peak memory and time of one client's local training step on a randomly initialised 1.1B Llama.

The model has TinyLlama-1.1B's shapes (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads,
vocabulary 32000), built here with random weights (no download) and saved once (bf16 safetensors) to
``--model-dir``. Every variant runs in its own subprocess, loads that directory through FLoRA's loader with
the variant's ``dtype`` / ``quantize`` keys, resets its peak RSS (``/proc/self/clear_refs``), and trains
one client's LoRA (rank 16 on the 7 projections, AdamW) with ``flora.train.train_client`` on batch 1 x
``--tokens`` random tokens for ``--steps`` optimizer steps. Reported: weights in memory, peak RSS while
loading, RSS before the step, peak RSS during the steps (the step's own overhead is the difference), and
seconds per step. ``fed-*`` variants run a whole 2-client federation in one process (engine ``local``:
the clients' shared model plus the server's own copy, one round of one step each, evaluation included)
and report that process's peak RSS: what a machine must hold to federate this model.

    .venv/bin/python benchmarks/bench_memory.py [--variants fp32,fp32-gc,bf16,4bit,8bit,fed-fp32]
        [--tokens 128] [--steps 2] [--timeout 300] [--layers 22] [--model-dir /tmp/flora-tinyllama-1.1b]

Writes ``benchmarks/results/memory.json`` and ``memory.md``. A variant that runs past ``--timeout`` is
stopped and reported with what it measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINYLLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)
VARIANTS = {  # name: (RunConfig keys, train keys)
    "fp32": ({"dtype": "float32"}, {}),
    "fp32-gc": ({"dtype": "float32"}, {"gradient_checkpointing": True}),
    "bf16": ({"dtype": "bfloat16"}, {}),
    "bf16-gc": ({"dtype": "bfloat16"}, {"gradient_checkpointing": True}),
    "4bit": ({"dtype": "float32", "quantize": "4bit"}, {}),
    "4bit-gc": ({"dtype": "float32", "quantize": "4bit"}, {"gradient_checkpointing": True}),
    "8bit": ({"dtype": "float32", "quantize": "8bit"}, {}),
    "fed-fp32": ({"dtype": "float32"}, {}),
    "fed-bf16": ({"dtype": "bfloat16"}, {}),
    "fed-4bit": ({"dtype": "float32", "quantize": "4bit"}, {}),
}
GIB = 2 ** 30


def llama_config(layers: int | None = None, **overrides):
    from transformers import LlamaConfig

    values = {**TINYLLAMA_1B, **overrides}
    if layers:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values)


def word_tokenizer():
    """A word-level tokenizer (every word is the unknown token): the benchmark needs ids, not language."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "<|im_end|>": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")


def random_examples(count: int, tokens: int, vocab: int, seed: int = 0):
    """``count`` examples of ``tokens`` random ids, every position a target."""
    import torch

    from flora.data.tokenize import Example

    ids = torch.randint(3, vocab, (count, tokens), generator=torch.Generator().manual_seed(seed)).tolist()
    return [Example(input_ids=row, labels=row) for row in ids]


def prepare(model_dir: Path, layers: int) -> None:
    """Build the random model in bf16 (2.2 GB for 1.1B parameters), save it with a tokenizer and a data file."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(llama_config(layers))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    words = " ".join(f"w{i}" for i in range(400))
    rows = [{"instruction": f"question {i} " + words[:200], "output": words} for i in range(24)]
    (model_dir / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


class Partial:
    """The child's result, rewritten after every stage so that a timed-out child still reports."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.save()

    def update(self, **values) -> None:
        self.record.update(values)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.record))


def child(variant: str, args) -> None:
    import torch

    from flora.config import RunConfig
    from flora.hardware import model_options, peak_rss_bytes, prepare_quantized, reset_peak_rss, rss_bytes

    torch.set_num_threads(args.threads)
    keys, train_keys = VARIANTS[variant]
    result = Partial(args.result, {"variant": variant, **keys, **train_keys, "tokens": args.tokens,
                                   "steps": args.steps, "threads": args.threads})
    if variant.startswith("fed-"):
        return federation(args, keys, result)
    from flora.adapters import LoraSpec
    from flora.models.loader import load_model
    from flora.train import TrainSpec, train_client

    started = time.perf_counter()
    loaded = load_model(args.model_dir, **model_options(RunConfig(device="cpu", **keys)))
    if keys.get("quantize", "none") != "none":
        prepare_quantized(loaded.model)
    model = loaded.model
    result.update(load_seconds=time.perf_counter() - started, load_peak_gib=peak_rss_bytes() / GIB,
                  weights_gib=model.get_memory_footprint() / GIB,
                  parameters=sum(p.numel() for p in model.parameters()))
    del loaded
    reset_peak_rss()
    result.update(rss_before_step_gib=rss_bytes() / GIB)
    examples = random_examples(args.steps, args.tokens, model.config.vocab_size)
    times, losses, last = [], [], [time.perf_counter()]

    def progress(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        losses.append(loss)
        last[0] = now
        result.update(step_seconds=times, losses=losses, step_peak_gib=peak_rss_bytes() / GIB)

    train_client(model, type("Tok", (), {"pad_token_id": 0})(), examples, LoraSpec(rank=16, alpha=32, dropout=0.0),
                 TrainSpec(steps=args.steps, batch_size=1, micro_batch_size=1, lr=1e-4, **train_keys),
                 progress=progress)
    result.update(done=True)


def federation(args, keys: dict, result: Partial) -> None:
    """Two clients, one round of one step each, in one process (engine local), evaluation included."""
    from flora.config import RunConfig
    from flora.engines import run_in_process
    from flora.hardware import peak_rss_bytes

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig(model=str(args.model_dir), data=str(args.model_dir / "data.jsonl"), num_clients=2,
                           ranks=[16, 8], rounds=1, local_steps=1, batch_size=1, micro_batch_size=1, lr=1e-4,
                           cutoff=args.tokens, max_examples=0, partition="iid", test_fraction=0.1, eval_examples=2,
                           client_eval_examples=0, dropout=0.0, out_dir=out, threads=args.threads, **keys)
        started = time.perf_counter()
        server = run_in_process(config, progress=lambda line: print(line, flush=True))
        metrics = server.metrics[-1]
        result.update(seconds=time.perf_counter() - started, peak_gib=peak_rss_bytes() / GIB,
                      test_loss=metrics["test_loss"], aggregation_error=metrics["aggregation_error"], done=True)


def run_variant(variant: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = Path(handle.name)
    command = [sys.executable, __file__, "--child", variant, "--result", str(path), "--model-dir", str(args.model_dir),
               "--tokens", str(args.tokens), "--steps", str(1 if variant.startswith("bf16") else args.steps),
               "--threads", str(args.threads)]
    started = time.perf_counter()
    try:
        process = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
        failed = process.returncode != 0
        tail = process.stderr.strip().splitlines()[-3:] if failed else []
    except subprocess.TimeoutExpired:
        failed, tail = False, [f"stopped after {args.timeout} s"]
    record = json.loads(path.read_text()) if path.stat().st_size else {"variant": variant}
    path.unlink()
    record["wall_seconds"] = time.perf_counter() - started
    if failed or not record.get("done"):
        record["note"] = " / ".join(tail) or "did not finish"
    print(json.dumps(record), flush=True)
    return record


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(records: list[dict], args) -> str:
    steps = [r for r in records if not r["variant"].startswith("fed-")]
    feds = [r for r in records if r["variant"].startswith("fed-")]
    lines = [f"One client's local training on a randomly initialised Llama with TinyLlama-1.1B's shapes "
             f"({args.layers} layers, {fmt(max((r.get('parameters', 0) for r in records), default=0) / 1e9)} B "
             f"parameters), LoRA rank 16 on the 7 projections, AdamW, batch 1 x {args.tokens} tokens, "
             f"{args.threads} threads, CPU ({platform.processor() or platform.machine()}), torch "
             f"{__import__('torch').__version__}. GiB; peak RSS per stage of a fresh process (`VmHWM`, reset "
             f"after loading).", "",
             "| variant | weights | load peak | RSS before step | step peak | step overhead | s / step | note |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in steps:
        overhead = r["step_peak_gib"] - r["rss_before_step_gib"] if "step_peak_gib" in r else None
        seconds = ", ".join(f"{s:.1f}" for s in r.get("step_seconds", [])) or "–"
        lines.append(f"| {r['variant']} | {fmt(r.get('weights_gib'))} | {fmt(r.get('load_peak_gib'))} | "
                     f"{fmt(r.get('rss_before_step_gib'))} | {fmt(r.get('step_peak_gib'))} | {fmt(overhead)} | "
                     f"{seconds} | {r.get('note', '')} |")
    if feds:
        lines += ["", f"A whole federation in one process (engine `local`): 2 clients (ranks 16, 8), 1 round of 1 "
                      f"step each, server evaluation on 2 examples, checkpoint written.", "",
                  "| variant | process peak RSS | seconds | test loss | aggregation error | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in feds:
            lines.append(f"| {r['variant']} | {fmt(r.get('peak_gib'))} | {fmt(r.get('seconds'), 0)} | "
                         f"{fmt(r.get('test_loss'), 4)} | {r.get('aggregation_error', float('nan')):.1e} | "
                         f"{r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fp32,fp32-gc,bf16,4bit,8bit,fed-fp32")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "flora-tinyllama-1.1b")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    if args.prepare:
        return prepare(args.model_dir, args.layers)
    if args.layers != 22:
        args.model_dir = args.model_dir.with_name(f"{args.model_dir.name}-{args.layers}l")
    if not (args.model_dir / "config.json").is_file():
        print(f"[bench] building the random model in {args.model_dir}", flush=True)
        subprocess.run([sys.executable, __file__, "--prepare", "--layers", str(args.layers), "--model-dir",
                        str(args.model_dir)], check=True)  # a process of its own: its memory goes back
    records = [run_variant(v.strip(), args) for v in args.variants.split(",") if v.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layers == 22 else f"_{args.layers}l"
    (args.out / f"memory{suffix}.json").write_text(json.dumps(records, indent=1))
    (args.out / f"memory{suffix}.md").write_text(table(records, args))
    print(table(records, args))


if __name__ == "__main__":
    main()
