"""Why AdaLoRA clients do not move, and what its own start and learning rate change (issue 20).

    python benchmarks/bench_adalora.py                      # the test suite's tiny Llama (~1 min on 2 free cores)
    python benchmarks/bench_adalora.py --model embedded     # one client of the README main job, real model

One client trains one fresh adapter (as every FLoRA round does) for ``--steps`` optimizer steps at ``--lr``:
plain LoRA, then AdaLoRA for every ``adalora_init`` × ``adalora_lr_ratio`` in the grid. Reported: the
update's norm ``‖ΔW‖_F`` over all adapted layers (LoRA's divided by AdaLoRA's), the loss after the update
minus before (tiny model: on its training examples; ``embedded``: on 16 held-out conversations of the main
job's test split) and AdaLoRA's mean effective rank (target: half the initial rank). Writes
``benchmarks/results/adalora_{tiny,embedded}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flora.adapters import LoraSpec
from flora.modeling import evaluate_loss
from flora.precision import temporary_update
from flora.train import TrainSpec, train_client

RESULTS = Path(__file__).parent / "results"


def tiny_setup():
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import make_tiny_llama, make_tokenizer, sample_records

    from flora.data.tokenize import encode_all

    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    examples, _ = encode_all(tokenizer, sample_records(24), 64)
    return model, tokenizer, examples, examples, dict(rank=8, alpha=16.0, dropout=0.0), 4, 4


def embedded_setup(client: int):
    from flora.client import lora_spec
    from flora.config import load_config
    from flora.runtime import Runtime

    config = load_config(Path(__file__).parents[1] / "configs" / "quickstart.toml")
    assets = Runtime().assets(config)
    spec = lora_spec(config, config.client_rank(client), client)
    common = dict(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets,
                  target_rank=spec.target_rank)
    return (assets.model, assets.tokenizer, assets.examples(f"train:{client}", config.cutoff),
            assets.examples("test", config.cutoff)[:16], common, config.batch_size, config.micro_batch_size)


def measure(model, tokenizer, train, test, spec: LoraSpec, steps: int, lr: float, batch: int, micro: int) -> dict:
    started = time.perf_counter()
    result = train_client(model, tokenizer, train, spec, TrainSpec(steps=steps, batch_size=batch, micro_batch_size=micro,
                                                                   lr=lr, seed=1), init_seed=3)
    deltas = {name: B @ A for name, (A, B) in result.factors.items()}
    with temporary_update(model, deltas):
        loss = evaluate_loss(model, tokenizer, test)
    return {"update_norm": float(torch.sqrt(sum((d ** 2).sum() for d in deltas.values()))), "loss": loss,
            "mean_rank": sum(A.shape[0] for A, _ in result.factors.values()) / len(result.factors),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--client", type=int, default=0, help="embedded: the main job's client (rank 16 for 0)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (the main job's local steps: 4)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--inits", default="gaussian,orthonormal")
    parser.add_argument("--ratios", default="1,4,8,16,32,64", help="adalora_lr_ratio (P, Q)")
    parser.add_argument("--value-ratios", default="same", help="adalora_value_lr_ratio (Λ); same = adalora_lr_ratio")
    parser.add_argument("--orth", type=float, default=0.5, help="AdaLoRA's orthogonality weight (peft's default 0.5)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, train, test, common, batch, micro = tiny_setup() if args.model == "tiny" else \
        embedded_setup(args.client)
    before = evaluate_loss(model, tokenizer, test)
    run = dict(steps=args.steps, lr=args.lr, batch=batch, micro=micro)
    lora = measure(model, tokenizer, train, test, LoraSpec(**common), **run)
    rows = []
    for init in args.inits.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            values = [ratio if r == "same" else float(r) for r in args.value_ratios.split(",")]
            for value in values:
                row = measure(model, tokenizer, train, test, LoraSpec(**common, adapter="adalora", init=init,
                                                                       lr_ratio=ratio, value_lr_ratio=value,
                                                                       orth_reg_weight=args.orth), **run)
                rows.append({"init": init, "lr_ratio": ratio, "value_lr_ratio": value, **row,
                             "norm_ratio": lora["update_norm"] / row["update_norm"]})
                print(rows[-1], flush=True)
    lines = [f"# AdaLoRA's start and learning rate, one client, {args.model} model\n",
             f"{args.steps} optimizer steps at lr {args.lr:g}, batch {batch}, rank {common['rank']} (AdaLoRA: target "
             f"rank {common.get('target_rank') or common['rank'] // 2}, orthogonality weight {args.orth:g}); loss before {before:.4f}, after LoRA "
             f"{lora['loss']:.4f} (change {lora['loss'] - before:+.4f}), LoRA ‖ΔW‖ = {lora['update_norm']:.4f}.\n",
             "| adalora_init | adalora_lr_ratio (P, Q) | adalora_value_lr_ratio (Λ) | ‖ΔW‖ | LoRA's ‖ΔW‖ / this | "
             "loss change | vs LoRA's change | mean rank |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        change = r["loss"] - before
        lines.append(f"| {r['init']} | {r['lr_ratio']:g} | {r['value_lr_ratio']:g} | {r['update_norm']:.4f} | {r['norm_ratio']:.3g} | "
                     f"{change:+.4f} | {change / (lora['loss'] - before):.2f} | {r['mean_rank']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"adalora_{args.model}{args.tag}.md").write_text(text)
    (RESULTS / f"adalora_{args.model}{args.tag}.json").write_text(json.dumps(
        {"args": vars(args), "loss_before": before, "lora": lora, "adalora": rows}, indent=1))


if __name__ == "__main__":
    main()
