"""Results table (markdown) and plots (PNG) from ``OUT/metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flora.checkpoint import record_from_json
from flora.runner import results_table


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; run `flora run` with out_dir={out} first")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number}: invalid JSON ({exc.msg})") from exc
            rows.append(record_from_json(row))
    return rows


def write_report(out: Path) -> str:
    """Write ``results.md`` and ``loss.png`` into ``out``; return the markdown table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(out)
    table = results_table(metrics)
    (out / "results.md").write_text(table + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [m["round"] for m in metrics]
    start = initial_point(out)  # the base model's test loss: the curve starts at round 0
    # NaN: no server test set, or a round eval_every skipped (left out of the curve)
    points = ([(0, start[0])] if start else []) + [(m["round"], m["test_loss"]) for m in metrics]
    points = [(r, loss) for r, loss in points if loss == loss]
    ax.plot([r for r, _ in points], [loss for _, loss in points], marker="o", label="global test loss")
    if any("client_test_loss" in m for m in metrics):
        ax.plot(rounds, [m.get("client_test_loss", float("nan")) for m in metrics], marker="^",
                label="clients' test loss (federated)")
    ax.plot(rounds, [m["train_loss"] for m in metrics], marker="s", label="client train loss")
    ax.set_xticks(round_ticks((0 if start else 1), max(rounds, default=1)))
    ax.set_xlabel("round")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{metrics[0]['method'] if metrics else ''}: loss per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return table


def initial_point(out: Path) -> list[float]:
    """``[test loss of the base model]`` from ``OUT/round0.json``, or ``[]`` (runs written before it existed)."""
    path = out / "round0.json"
    if not path.is_file():
        return []
    loss = json.loads(path.read_text())["test_loss"]
    return [math.nan if loss is None else float(loss)]  # None: no server test set


def round_ticks(first: int, last: int, most: int = 12) -> list[int]:
    """Whole-round x ticks from ``first`` to ``last``, at most about ``most`` of them."""
    step = max(1, -(-(last - first) // most))
    return list(range(first, last + 1, step))


def compare_rows(out: Path) -> list[dict]:
    """One summary row per run directory under ``out`` (those holding a metrics.jsonl)."""
    rows = []
    for run_dir in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
        metrics = read_metrics(run_dir)
        if not metrics:
            continue
        losses = [m["test_loss"] for m in metrics if m["test_loss"] == m["test_loss"]]
        errors = [m["aggregation_error"] for m in metrics if m["aggregation_error"] == m["aggregation_error"]]
        row = {"run": run_dir.name, "method": metrics[0]["method"], "rounds": len(metrics),
               "final_test_loss": metrics[-1]["test_loss"], "best_test_loss": min(losses) if losses else float("nan"),
               "max_aggregation_error": max(errors) if errors else float("nan"),
               "mib_up": sum(m["bytes_up"] for m in metrics) / 2**20,
               "mib_down": sum(m["bytes_down"] for m in metrics) / 2**20,
               "round_seconds": sum(m["seconds"] for m in metrics),
               "test_loss_per_round": [m["test_loss"] for m in metrics],
               "test_loss_round0": (initial_point(run_dir) or [None])[0]}  # the base model's, if recorded
        wall = run_dir / "wall.json"
        row["wall_seconds"] = json.loads(wall.read_text())["wall_seconds"] if wall.is_file() else row["round_seconds"]
        evaluation = run_dir / "eval.json"
        if evaluation.is_file():
            cloze = json.loads(evaluation.read_text()).get("mmlu", {}).get("cloze", {})
            row["mmlu_cloze"] = cloze.get("accuracy")
            row["mmlu_ci95"] = cloze.get("ci95")
        rows.append(row)
    return rows


def compare_table(rows: list[dict]) -> str:
    lines = ["| run | final test loss | best test loss | MMLU cloze (95% CI) | max agg. error | MiB up | MiB down | wall s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        mmlu = "–"
        if r.get("mmlu_cloze") is not None:
            ci = r.get("mmlu_ci95") or [float("nan")] * 2
            mmlu = f"{r['mmlu_cloze']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci[0] == ci[0] else "")
        lines.append(f"| {r['run']} | {r['final_test_loss']:.4f} | {r['best_test_loss']:.4f} | {mmlu} | "
                     f"{r['max_aggregation_error']:.2e} | {r['mib_up']:.1f} | {r['mib_down']:.1f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def write_compare_report(out: Path) -> str:
    """``compare.md``, ``compare.json``, ``test_loss.png`` and ``bytes.png`` from the run dirs in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = compare_rows(out)
    if not rows:
        raise FileNotFoundError(f"{out}: no run directories with metrics.jsonl")
    table = compare_table(rows)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors
    methods = sorted({r["method"] for r in rows})
    for r in rows:  # colour per method, dashed for the heterogeneous setting
        start = [r["test_loss_round0"]] if r.get("test_loss_round0") is not None else []  # the plot starts at round 0
        evaluated = [(k, x) for k, x in enumerate(start + r["test_loss_per_round"], start=1 - len(start))
                     if x == x]  # eval_every: NaN
        ax.plot([k for k, _ in evaluated], [x for _, x in evaluated], marker="o", label=r["run"],
                color=colours[2 * methods.index(r["method"]) % len(colours)],
                linestyle="--" if r["run"].startswith("heterogeneous") else "-")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("global test loss (assistant tokens)")
    ax.set_title("test loss per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "test_loss.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["mib_up"] for r in rows], width=0.4, label="up")
    ax.bar([i + 0.2 for i in x], [r["mib_down"] for r in rows], width=0.4, label="down")
    ax.set_xticks(list(x), [r["run"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("MiB (all rounds, all clients)")
    ax.set_title("communication per run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=100)
    plt.close(fig)
    return table
