"""Results table (markdown) and plots (PNG) from ``OUT/metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

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
            rows.append({k: (float("nan") if v is None else v) for k, v in row.items()})
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
    ax.plot(rounds, [m["test_loss"] for m in metrics], marker="o", label="global test loss")
    ax.plot(rounds, [m["train_loss"] for m in metrics], marker="s", label="client train loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{metrics[0]['method'] if metrics else ''}: loss per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    return table
