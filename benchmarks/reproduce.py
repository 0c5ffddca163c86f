"""The paper's comparisons at SmolLM2-135M scale (issue 7), with this system's own run code.

    python benchmarks/reproduce.py --profile quick          # ~22 min on 2 cores for the first 12 runs (17 now),
                                                            #   1 seed, no MMLU
    python benchmarks/reproduce.py --profile full           # ~3.1 h measured for the first 23 runs (38 now):
                                                            #   + 3 seeds of the key pairs, ablation,
                                                            #   IID control, MMLU cloze (1,000 questions)
    python benchmarks/reproduce.py --profile full --report  # tables + plot from what has finished

Embedded SmolLM2-135M-Instruct and ShareGPT, 10 clients, Dirichlet(0.5) partition; every method gets
the same token budget (rounds × clients × local steps × batch; ``centralized`` trains one model for
clients × local steps per round). Runs:

* homogeneous, every client rank 16: flora, fedit, ffa, fedex, flexlora, florana (FLoRA-NA), centralized,
  standalone (raflora and fedplora are left out here: with equal ranks they are flexlora and fedit);
* heterogeneous, ranks 64,32,16,16,8,8,4,4,4,4: flora, zeropad, flexlora, raflora, fedplora (Fed-PLoRA),
  centralized (rank 64), standalone (each client at its rank; loss = mean over the clients' own models);
* both settings: flora-warm (issue 20: FLoRA's exactness with a warm start instead of a fresh adapter);
* ``full`` only: seeds 1 and 2 of the key runs (flora, fedit, florana, flora-warm homogeneous; flora, zeropad,
  raflora, fedplora, flora-warm heterogeneous), p_k uniform instead of by data size (flora heterogeneous), and an IID
  partition of the FLoRA key runs against their Dirichlet ones.

The report pairs the key runs by seed: FLoRA minus each other, and each minus the best of the newest
peers (``NEW_METHODS``: lowest mean final test loss over the seeds both finished).

Each finished run's summary (per-round metrics, wall time, MMLU) is written to
``benchmarks/results/reproduce-PROFILE/NAME.json``: a run with a summary is not run again, so a profile
can be finished over several sessions. The heavy run directories (checkpoints) go under ``--out``.
``--report`` (also done after the runs) writes ``benchmarks/results/reproduce_PROFILE.{json,md}`` and
``docs/reproduce_PROFILE_loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from statistics import mean, stdev

from flora.config import RunConfig

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parents[1] / "docs"
HETEROGENEOUS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
HOMOGENEOUS_METHODS = ["flora", "fedit", "ffa", "fedex", "flexlora", "florana", "flora-warm", "centralized",
                       "standalone"]
HETEROGENEOUS_METHODS = ["flora", "zeropad", "flexlora", "raflora", "fedplora", "flora-warm", "centralized",
                         "standalone"]
# The runs every seed gets, per setting; FLoRA (first) is paired with each of the others.
KEY_PAIRS = {"homogeneous": ("flora", "fedit", "fedex", "florana", "flora-warm"),
             "heterogeneous": ("flora", "zeropad", "raflora", "fedplora", "flora-warm")}
NEW_METHODS = ("florana", "raflora", "fedplora")  # issue 22's peers: each setting's best of them is a reference too
# the step-size control (mixed ranks): (method, server_lr, seeds); flora-warm at 4 asks whether the warm start
# still helps once the step is as large as the peers'
SERVER_STEP_RUNS = (("flora", 2.0, (0,)), ("flora", 4.0, (0, 1, 2)), ("flora-warm", 4.0, (0, 1, 2)))
# paired differences of the control (heterogeneous; names as in SETTING-NAME-sSEED)
STEP_COMPARISONS = (("flora-lr4", "fedplora"), ("flora-lr4", "raflora"), ("flora-warm-lr4", "flora-lr4"),
                    ("flora-warm-lr4", "fedplora"), ("flora-warm-lr4", "raflora"))
WARM = "flora-warm"  # issue 20's exact warm restart: paired with every other key run too

PROFILES = {
    "quick": dict(settings=dict(rounds=2, local_steps=1, batch_size=2, micro_batch_size=2, cutoff=128,
                                max_examples=1000, eval_examples=16, client_eval_examples=2),
                  seeds=[0], extras=False, mmlu=0),
    "full": dict(settings=dict(rounds=3, local_steps=2, batch_size=2, micro_batch_size=2, cutoff=128,
                               max_examples=2000, eval_examples=48, client_eval_examples=4),
                 seeds=[0, 1, 2], extras=True, mmlu=1000),
}


def base_config(profile: str, out: Path) -> RunConfig:
    # torch's dropout sampler: the profiles' published runs were made with it, so re-runs repeat them exactly
    return RunConfig(model="embedded", data="embedded", num_clients=10, ranks=[16], lr=5e-4, partition="dirichlet",
                     dirichlet_alpha=0.5, dropout_sampler="torch", out_dir=str(out), **PROFILES[profile]["settings"])


def plan(profile: str, out: Path) -> list[tuple[str, RunConfig, bool]]:
    """``(name, config, score_mmlu)`` for every run of ``profile``."""
    base, spec = base_config(profile, out), PROFILES[profile]
    runs = []

    def add(name: str, mmlu: bool, **changes) -> None:
        runs.append((name, dataclasses.replace(base, out_dir=str(out / name), **changes), mmlu))

    for method in HOMOGENEOUS_METHODS:
        add(f"homogeneous-{method}-s0", method != "standalone", method=method, ranks=[16])
    for method in HETEROGENEOUS_METHODS:
        add(f"heterogeneous-{method}-s0", method != "standalone", method=method, ranks=list(HETEROGENEOUS))
    if not spec["extras"]:
        return runs
    for seed in spec["seeds"][1:]:
        for setting, pair in KEY_PAIRS.items():
            ranks = [16] if setting == "homogeneous" else list(HETEROGENEOUS)
            for method in pair:
                add(f"{setting}-{method}-s{seed}", False, method=method, ranks=ranks, seed=seed)
    add("heterogeneous-flora-uniform-s0", False, method="flora", ranks=list(HETEROGENEOUS), weighting="uniform")
    for setting in KEY_PAIRS:
        add(f"{setting}-flora-iid-s0", False, method="flora", partition="iid",
            ranks=[16] if setting == "homogeneous" else list(HETEROGENEOUS))
    for method, step, seeds in SERVER_STEP_RUNS:  # the step-size control for the peers that end below FLoRA
        for seed in seeds:
            add(f"heterogeneous-{method}-lr{step:g}-s{seed}", False, method=method, ranks=list(HETEROGENEOUS),
                server_lr=step, seed=seed)
    return runs


def same_config(summary_config: dict, config: RunConfig) -> bool:
    """Whether a finished run's recorded config is ``config``. A key the summary lacks was added to
    RunConfig after the run; it matches when ``config`` holds the value that reproduces the earlier behaviour
    (``RunConfig.recorded``: the key's default, or its entry in ``VALUES_BEFORE_KEY``)."""
    current = json.loads(json.dumps(config.to_dict()))
    recorded = json.loads(json.dumps(RunConfig.recorded(summary_config)))
    return all(recorded[key] == value for key, value in current.items()) and summary_config.keys() <= current.keys()


def summary_dir(profile: str) -> Path:
    return RESULTS / f"reproduce-{profile}"


def run_one(name: str, config: RunConfig, mmlu: int, profile: str, quiet: bool, summaries: Path | None = None) -> dict:
    """Run ``config`` in process and write its summary to ``summaries`` (default: the profile's directory)."""
    from flora.engines import run
    from flora.report import read_metrics

    started = time.perf_counter()
    run(config, "local", progress=(lambda _: None) if quiet else print)  # each run starts from the base weights
    wall = time.perf_counter() - started
    summary = {"name": name, "config": config.to_dict(), "wall_seconds": wall,
               "metrics": read_metrics(Path(config.out_dir))}
    if mmlu:
        score_mmlu(summary, config, mmlu)
    path = (summaries or summary_dir(profile)) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(summary), indent=1))
    return summary


def score_mmlu(summary: dict, config: RunConfig, questions: int) -> None:
    """Adds the MMLU cloze score of the run's final global model (read from its checkpoint) to ``summary``."""
    from flora.compare import evaluate_final_mmlu

    started = time.perf_counter()
    summary["mmlu_cloze"] = evaluate_final_mmlu(config, questions, quiet=True)["cloze"]
    summary["mmlu_seconds"] = time.perf_counter() - started


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "per_subject"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- report ------------------------------------------------------------------------------------

def _row(summary: dict) -> dict:
    metrics = summary["metrics"]
    losses = [m["test_loss"] for m in metrics if m["test_loss"] is not None]
    errors = [m["aggregation_error"] for m in metrics if m.get("aggregation_error") is not None]
    mmlu = summary.get("mmlu_cloze") or {}
    return {"name": summary["name"], "method": summary["config"]["method"], "seed": summary["config"]["seed"],
            "loss_per_round": losses, "final_test_loss": losses[-1] if losses else None,
            "best_test_loss": min(losses) if losses else None,
            "client_test_loss_final": _client_test_loss(metrics[-1]),
            "max_aggregation_error": max(errors) if errors else None,
            "mmlu_cloze": mmlu.get("accuracy"), "mmlu_ci95": mmlu.get("ci95"), "mmlu_n": mmlu.get("num_questions"),
            "wall_seconds": summary["wall_seconds"], "mmlu_seconds": summary.get("mmlu_seconds", 0.0),
            "mib_up_per_round": mean(m["bytes_up"] for m in metrics) / 2 ** 20,
            "mib_down_per_round": mean(m["bytes_down"] for m in metrics) / 2 ** 20}


def seed_finals(rows: dict[str, dict], setting: str, method: str) -> dict[int, float]:
    """``{seed: final test loss}`` of the finished ``SETTING-METHOD-sSEED`` runs (not the ablation variants)."""
    pattern = re.compile(rf"{re.escape(setting)}-{re.escape(method)}-s(\d+)")
    return {int(m.group(1)): r["final_test_loss"] for n, r in rows.items()
            if (m := pattern.fullmatch(n)) and r["final_test_loss"] is not None}


def paired_differences(rows: dict[str, dict], setting: str, pair: tuple[str, str]) -> dict | None:
    """Final test loss of ``pair[0]`` minus ``pair[1]`` on every seed both finished (None if none).

    Seeds move the test set as well as the partition, so absolute losses differ between seeds far more
    than methods differ on one seed; the per-seed difference is the comparison that can show a method
    effect.
    """
    first, second = seed_finals(rows, setting, pair[0]), seed_finals(rows, setting, pair[1])
    per_seed = {s: first[s] - second[s] for s in sorted(first.keys() & second.keys())}
    if not per_seed:
        return None
    values = list(per_seed.values())
    return {"per_seed": per_seed, "mean": mean(values), "std": stdev(values) if len(values) > 1 else None}


def best_new_method(rows: dict[str, dict], setting: str) -> str | None:
    """The key run among ``NEW_METHODS`` with the lowest mean final test loss over the seeds all of them
    finished (a seed moves the test set: means over different seeds do not compare). None: no common seed."""
    finals = {m: seed_finals(rows, setting, m) for m in KEY_PAIRS[setting] if m in NEW_METHODS}
    finals = {m: f for m, f in finals.items() if f}
    common = set.intersection(*(set(f) for f in finals.values())) if finals else set()
    if not common:
        return None
    return min(finals, key=lambda m: mean(finals[m][s] for s in common))


def key_comparisons(rows: dict[str, dict]) -> list[tuple[str, tuple[str, str]]]:
    """``(setting, (first, second))`` for every paired difference the report shows: FLoRA minus each other key
    run, FLoRA-warm (issue 20) minus each key run but FLoRA, every other key run minus the best of the new
    peers, then the server-step control's pairs."""
    comparisons = []
    for setting, methods in KEY_PAIRS.items():
        comparisons += [(setting, (methods[0], other)) for other in methods[1:]]
        comparisons += [(setting, (WARM, other)) for other in methods[1:] if other != WARM]
        best = best_new_method(rows, setting)
        if best is not None:
            comparisons += [(setting, (other, best)) for other in methods if other not in (best, methods[0], WARM)]
    comparisons += [("heterogeneous", pair) for pair in STEP_COMPARISONS]  # shown where both have finished seeds
    return comparisons


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _method_table(rows: list[dict]) -> str:
    lines = ["| method | test loss per round | final | best | clients' own test loss | MMLU cloze (95 % CI) | "
             "max agg. error | MiB up / down per round | wall s |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        mmlu = "–" if r["mmlu_cloze"] is None else \
            f"{r['mmlu_cloze']:.3f} ({r['mmlu_ci95'][0]:.3f}–{r['mmlu_ci95'][1]:.3f}), n={r['mmlu_n']}"
        lines.append(f"| {r['method']} | {' → '.join(f'{x:.4f}' for x in r['loss_per_round'])} | "
                     f"{_fmt(r['final_test_loss'])} | {_fmt(r['best_test_loss'])} | "
                     f"{_fmt(r['client_test_loss_final'])} | {mmlu} | {_fmt(r['max_aggregation_error'], '.2e')} | "
                     f"{r['mib_up_per_round']:.1f} / {r['mib_down_per_round']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def report(profile: str) -> str:
    summaries = {p.stem: json.loads(p.read_text()) for p in sorted(summary_dir(profile).glob("*.json"))}
    rows = {name: _row(s) for name, s in summaries.items()}
    parts = [f"# Reproduction, profile `{profile}` ({len(rows)} of {len(plan(profile, Path('runs')))} runs done)\n"]
    settings = PROFILES[profile]["settings"]
    parts.append(f"10 clients, Dirichlet(0.5) over ShareGPT (embedded), SmolLM2-135M-Instruct, {settings['rounds']} "
                 f"rounds × {settings['local_steps']} local steps × {settings['batch_size']} examples (cutoff "
                 f"{settings['cutoff']}), lr 5e-4; test loss on {settings['eval_examples']} held-out conversations. "
                 f"Measured time of the finished runs: {sum(r['wall_seconds'] for r in rows.values()) / 60:.0f} min "
                 f"training + evaluation, {sum(r['mmlu_seconds'] for r in rows.values()) / 60:.0f} min MMLU.\n")
    for setting, methods in (("homogeneous", HOMOGENEOUS_METHODS), ("heterogeneous", HETEROGENEOUS_METHODS)):
        chosen = [rows[f"{setting}-{m}-s0"] for m in methods if f"{setting}-{m}-s0" in rows]
        if chosen:
            title = "every client rank 16" if setting == "homogeneous" else "ranks " + ",".join(map(str, HETEROGENEOUS))
            parts += [f"## {setting.capitalize()} ({title}), seed 0\n", _method_table(chosen), ""]
    seeds = {}
    for setting, pair in KEY_PAIRS.items():
        for method in pair:
            finals = list(seed_finals(rows, setting, method).values())
            if len(finals) > 1:
                seeds[f"{setting}-{method}"] = {"n": len(finals), "mean": mean(finals), "std": stdev(finals),
                                                "finals": finals}
    if seeds:
        parts += ["## Key pairs over seeds (final test loss, mean ± std)\n", "| run | seeds | mean ± std | finals |",
                  "|---|---:|---|---|"]
        parts += [f"| {k} | {v['n']} | {v['mean']:.4f} ± {v['std']:.4f} | {', '.join(f'{x:.4f}' for x in v['finals'])} |"
                  for k, v in seeds.items()]
        parts.append("")
    paired = {f"{setting}: {first} − {second}": diff for setting, (first, second) in key_comparisons(rows)
              if (diff := paired_differences(rows, setting, (first, second)))}
    if paired:
        best = {setting: best_new_method(rows, setting) for setting in KEY_PAIRS}
        parts += ["## Key pairs, paired by seed (final test loss difference; a seed fixes data sample, partition "
                  "and test set)\n", "Best of the new peers (lowest mean final test loss over their common seeds): "
                  + (", ".join(f"{k} {v}" for k, v in best.items() if v) or "none finished") + ".\n",
                  "| difference | seeds | per seed | mean ± std | negative (first better) |", "|---|---:|---|---|---:|"]
        for k, v in paired.items():
            spread = "" if v["std"] is None else f" ± {v['std']:.4f}"
            per_seed = ", ".join(f"s{s}: {d:+.4f}" for s, d in v["per_seed"].items())
            wins = sum(d < 0 for d in v["per_seed"].values())
            parts.append(f"| {k} | {len(v['per_seed'])} | {per_seed} | {v['mean']:+.4f}{spread} | "
                         f"{wins}/{len(v['per_seed'])} |")
        parts.append("")
    extras = [rows[n] for n in ("heterogeneous-flora-s0", "heterogeneous-flora-uniform-s0", "homogeneous-flora-s0",
                                "homogeneous-flora-iid-s0", "heterogeneous-flora-iid-s0",
                                "heterogeneous-flora-warm-s0",
                                *(f"heterogeneous-{m}-lr{step:g}-s0" for m, step, _ in SERVER_STEP_RUNS)) if n in rows]
    if any("uniform" in r["name"] or "iid" in r["name"] or "-lr" in r["name"] for r in extras):
        parts += ["## Ablation (p_k), IID control and server step (`server_lr`)\n", "| run | final | best | max agg. error |", "|---|---:|---:|---:|"]
        parts += [f"| {r['name']} | {_fmt(r['final_test_loss'])} | {_fmt(r['best_test_loss'])} | "
                  f"{_fmt(r['max_aggregation_error'], '.2e')} |" for r in extras]
        parts.append("")
    text = "\n".join(parts)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"reproduce_{profile}.md").write_text(text)
    (RESULTS / f"reproduce_{profile}.json").write_text(json.dumps({"profile": profile, "runs": rows, "seeds": seeds,
                                                                   "paired": paired},
                                                                   indent=1))
    _plot(profile, rows)
    return text


def _plot(profile: str, rows: dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    methods = list(dict.fromkeys(HOMOGENEOUS_METHODS + HETEROGENEOUS_METHODS))
    colours = {m: plt.get_cmap("tab20")(i) for i, m in enumerate(methods)}  # one colour per method in both panels
    for ax, (setting, methods) in zip(axes, (("homogeneous", HOMOGENEOUS_METHODS),
                                             ("heterogeneous", HETEROGENEOUS_METHODS))):
        for method in methods:
            row = rows.get(f"{setting}-{method}-s0")
            if row and row["loss_per_round"]:
                rounds = range(1, len(row["loss_per_round"]) + 1)
                ax.plot(rounds, row["loss_per_round"], marker="o", label=method, color=colours[method])
                ax.set_xticks(list(rounds))
        ax.set_title(setting)
        ax.set_xlabel("round")
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("global test loss")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / f"reproduce_{profile}_loss.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", default=None, help="run directories (default runs/reproduce-PROFILE)")
    parser.add_argument("--only", default="", help="comma list of run names (default: all)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--mmlu", type=int, default=None,
                        help="MMLU questions for the runs the profile scores (default: the profile's; 0 = train now, "
                             "score in a later call: a finished run without its score is scored then)")
    args = parser.parse_args()
    mmlu_questions = PROFILES[args.profile]["mmlu"] if args.mmlu is None else args.mmlu
    if not args.report:
        out = Path(args.out or f"runs/reproduce-{args.profile}")
        only = {n.strip() for n in args.only.split(",") if n.strip()}
        runs = [r for r in plan(args.profile, out) if not only or r[0] in only]
        for index, (name, config, score) in enumerate(runs, start=1):
            done = summary_dir(args.profile) / f"{name}.json"
            if done.is_file():
                finished = json.loads(done.read_text())
                if same_config(finished["config"], config):
                    if score and mmlu_questions and "mmlu_cloze" not in finished:
                        print(f"[reproduce] {index}/{len(runs)} {name}: trained earlier, scoring MMLU", flush=True)
                        score_mmlu(finished, config, mmlu_questions)
                        done.write_text(json.dumps(_jsonable(finished), indent=1))
                    else:
                        print(f"[reproduce] {index}/{len(runs)} {name}: done earlier, skipped")
                    continue
                print(f"[reproduce] {index}/{len(runs)} {name}: the summary's config differs from the profile's; "
                      f"running it again")
            print(f"[reproduce] {index}/{len(runs)} {name}", flush=True)
            summary = run_one(name, config, mmlu_questions if score else 0, args.profile, args.quiet)
            print(f"[reproduce] {name}: final test loss {summary['metrics'][-1]['test_loss']:.4f}, "
                  f"{summary['wall_seconds']:.0f} s", flush=True)
    print(report(args.profile))


def _client_test_loss(record: dict):
    """The clients' test loss of a round: the token-weighted federated mean (a number); runs from before
    federated evaluation kept a per-client list and its plain mean (``client_test_loss_mean``)."""
    value = record.get("client_test_loss")
    return value if isinstance(value, (int, float)) or value is None and "client_test_loss_mean" not in record \
        else record.get("client_test_loss_mean")


if __name__ == "__main__":
    main()

