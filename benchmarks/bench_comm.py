"""Communication per round on SmolLM2-135M's real shapes, per method, as a fraction of full fine-tuning.

Analytic byte counts (fp32) from the layer shapes, using the same broadcast rules as the federation
(``flora.lora.refactor``); the federation measures the same quantities on real payloads per round
(``bytes_up`` / ``bytes_down`` in metrics.jsonl). Full fine-tuning exchanges every parameter of the
model (134.5 M, embeddings included) up and down per client per round.

    .venv/bin/python benchmarks/bench_comm.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_aggregate import HETERO_RANKS, HOMO_RANKS, smollm2_layer_shapes  # noqa: E402

from flora.lora.refactor import dense_break_even_rank, factors_bytes, smallest_exact_form  # noqa: E402

FULL_PARAMS = 134_515_008  # SmolLM2-135M (tied embeddings counted once)
BYTES = 4


def round_bytes(method: str, ranks: list[int], shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(bytes up from all clients, bytes down to all clients) in one round with every client taking part."""
    n, total_rank = len(ranks), sum(ranks)
    up = sum(factors_bytes(r, o, i) for r in ranks for o, i in shapes.values())
    down = 0
    for o, i in shapes.values():
        if method in ("flora-stacked", "flora-smallest", "flora-private"):
            if method == "flora-stacked":
                per_client = factors_bytes(total_rank, o, i)
            else:
                per_client = smallest_exact_form(total_rank, min(total_rank, o, i), o, i,
                                                 private=method == "flora-private").nbytes
            down += n * per_client
        elif method in ("fedit", "ffa", "florana"):  # FLoRA-NA: mixed factors, FedIT's shapes
            down += n * factors_bytes(ranks[0], o, i)
        elif method == "fedplora":  # every client downloads the whole rank-R global adapter, R = max rank
            down += n * factors_bytes(max(ranks), o, i)
        elif method == "fedex":  # averaged adapter + dense residual into the base
            down += n * (factors_bytes(ranks[0], o, i) + o * i * BYTES)
        elif method in ("zeropad", "flexlora", "raflora"):  # each client receives its own r_k
            down += sum(factors_bytes(r, o, i) for r in ranks)
    if method == "ffa":
        up = sum(r * o * BYTES for r in ranks for o, _ in shapes.values())  # only B travels
        down = n * sum(ranks[0] * o * BYTES for o, _ in shapes.values())
    return up, down


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    shapes = smollm2_layer_shapes()
    rows = []
    settings = {"homogeneous r=16": (HOMO_RANKS, ["fedit", "ffa", "fedex", "flora-stacked", "flora-smallest",
                                                  "flora-private", "flexlora", "florana", "fedplora", "raflora"]),
                "heterogeneous 64..4": (HETERO_RANKS, ["zeropad", "flexlora", "flora-stacked", "flora-smallest",
                                                       "flora-private", "raflora", "fedplora"])}
    for setting, (ranks, methods) in settings.items():
        full = 2 * len(ranks) * FULL_PARAMS * BYTES
        for method in methods:
            up, down = round_bytes(method, ranks, shapes)
            rows.append({"setting": setting, "method": method, "clients": len(ranks), "mib_up": up / 2**20,
                         "mib_down": down / 2**20, "fraction_of_full_ft": (up + down) / full})
    break_even = {}
    for name, (o, i) in {"q_proj/o_proj 576x576": (576, 576), "k/v_proj 192x576": (192, 576),
                         "gate/up/down 1536x576": (1536, 576)}.items():
        rank = dense_break_even_rank(o, i)
        break_even[name] = {"dense_beats_stacked_at_total_rank": rank,
                            **{f"clients_at_r{r}": -(-rank // r) for r in (4, 8, 16, 64)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm.json").write_text(json.dumps({"rows": rows, "break_even": break_even,
                                               "full_ft_params": FULL_PARAMS}, indent=2))
    lines = ["| setting | method | MiB up / round | MiB down / round | fraction of full FT |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['mib_up']:.1f} | {r['mib_down']:.1f} | "
              f"{r['fraction_of_full_ft']:.4f} |" for r in rows]
    lines += ["", "Break-even (dense smaller than stacked factors once the stacked rank reaches R):", "",
              "| layer | R | clients at r=4 | r=8 | r=16 | r=64 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['dense_beats_stacked_at_total_rank']} | {v['clients_at_r4']} | {v['clients_at_r8']} | "
              f"{v['clients_at_r16']} | {v['clients_at_r64']} |" for k, v in break_even.items()]
    (out / "comm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
