"""``flora eval``: MMLU and MT-bench for a base model, a run's checkpoint, or a merged model directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from flora.eval.mmlu import SCORINGS, evaluate_mmlu, load_mmlu, stratified_subset


def evaluate_command(args) -> dict:
    from flora.models.loader import load_model

    started = time.perf_counter()
    if args.checkpoint:
        from flora.checkpoint import load_run_model
        loaded, config, checkpoint = load_run_model(args.checkpoint, client=args.client)
        source = {"checkpoint": str(args.checkpoint), "method": config.method, "rounds": checkpoint.rounds_done}
        default_out = Path(args.checkpoint) / "eval.json"
    else:
        loaded = load_model(args.model or "embedded")
        source = {"model": args.model or "embedded"}
        default_out = Path("eval.json")
    out_path = Path(args.out) if args.out else default_out
    results: dict = {"source": source}
    scorings = [s.strip() for s in args.scoring.split(",") if s.strip()]
    for scoring in scorings:
        if scoring not in SCORINGS:
            from flora.config import ConfigError
            raise ConfigError(f"--scoring {scoring!r}: expected a comma list of {', '.join(SCORINGS)}")
    if args.mmlu >= 0:
        results["mmlu"] = run_mmlu(loaded.model, loaded.tokenizer, args.mmlu, scorings, args.shots, args.seed,
                                   args.batch_size, args.mmlu_file, quiet=args.quiet)
    if args.mtbench:
        results["mtbench"] = run_mtbench(loaded.model, loaded.tokenizer, args, out_path)
    results["seconds"] = time.perf_counter() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"[eval] wrote {out_path}")
    return results


def run_mmlu(model, tokenizer, n: int, scorings, shots: int, seed: int, batch_size: int, path=None,
             quiet: bool = False) -> dict:
    questions, skipped = load_mmlu(path)
    subset = stratified_subset(questions, n, seed)
    if skipped:
        print(f"[eval] MMLU: skipped rows {skipped}")
    out = {"num_questions": len(subset), "seed": seed, "skipped_rows": skipped}
    for scoring in scorings:
        units = len(subset) * (1 if scoring == "letter" else 4)
        with tqdm(total=units, desc=f"MMLU {scoring}", unit="seq", disable=quiet) as bar:
            result = evaluate_mmlu(model, tokenizer, subset, scoring=scoring, shots=shots, pool=questions,
                                   seed=seed, batch_size=batch_size, progress=bar.update)
        print(f"[eval] {result.summary()} in {result.seconds:.0f}s")
        out[scoring] = result.to_dict()
    return out


def run_mtbench(model, tokenizer, args, out_path: Path) -> dict:
    from flora.eval.mtbench import Judge, generate_answers, judge_answers, judgment_problems, load_questions

    questions = load_questions(args.mtbench)
    with tqdm(total=len(questions), desc="MT-bench answers", disable=args.quiet) as bar:
        answers = generate_answers(model, tokenizer, questions, max_new_tokens=args.max_new_tokens,
                                   progress=bar.update)
    answers_path = out_path.with_name(out_path.stem + "_mtbench_answers.jsonl")
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    answers_path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    print(f"[eval] MT-bench: {len(answers)} answers written to {answers_path}")
    if not args.judge_url:
        print("[eval] MT-bench: no judge configured (--judge-url or FLORA_JUDGE_URL): stopping after generation; "
              "grade later with any OpenAI-compatible endpoint")
        return {"answers": str(answers_path), "judged": False}
    judgment = judge_answers(Judge(args.judge_url, args.judge_model, args.judge_key_env,
                                   timeout=args.judge_timeout), questions, answers)
    for line in judgment_problems(judgment):
        print(f"[eval] MT-bench: {line}")
    print(f"[eval] MT-bench mean score {judgment['mean']:.2f} (judge {args.judge_model}, "
          f"{judgment['unparsed']} unparsed, {judgment['failed']} failed)")
    return {"answers": str(answers_path), "judged": True, **judgment}
