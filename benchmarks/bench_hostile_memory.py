"""Peak memory of the server under the worst replies against an honest round (issue 17).

Each case runs in a fresh process: the server of a 4-client FLoRA run on the embedded SmolLM2-135M
(ranks 16, 8, 4, 4; known partitions, as in a simulation) gets one round of reply messages, built with
Flower's own record types by the hostile ClientApp's forging code (``flora/adversary.py``), and its
Flower strategy's ``aggregate_train`` decodes, screens, aggregates, applies and evaluates them. Measured
around that call only (the replies are already in memory, as Flower hands them to the ServerApp):

* peak RSS increase: ``VmHWM`` after the call minus ``VmRSS`` before it (the kernel's high-water mark,
  reset before the call through ``/proc/self/clear_refs``);
* tracemalloc peak: Python and numpy allocations during the call (FLoRA's decoding copies are numpy).

The ``pre-fix`` case measures what the old decoding did first with the giant extra array (Flower's
``ArrayRecord.to_torch_state_dict()``: every array, extra keys included, materialised before any check);
the rank-10^7 row's pre-fix cost (zero-padding the next round's adapter for zeropad/flexlora) is computed,
not run.

    .venv/bin/python benchmarks/bench_hostile_memory.py [--giant-mib 512] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's flora, whatever is installed

# case -> the kind of flora/adversary.py that replaces the 4th reply (None: honest); "giant extra array" is
# this benchmark's own: a valid .npy of --giant-mib MiB under an extra key
CASES = {
    "honest round (4 replies)": None,
    "rank claim 10^7 (1 of 4)": "rank 10^7",
    "declared shape 10^7 x 32 (1 of 4)": "declared shape 10^7 rows (metadata)",
    "giant bytes after a valid array (1 of 4)": "giant array (8 MiB)",
    "giant extra array, valid .npy (1 of 4)": "giant extra array",
    "pre-fix decoding of the giant extra array": "giant extra array",
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_case(case: str, giant_mib: int) -> dict:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from flora import adversary
    from flora.adversary import Situation, forge, valid_reply
    from flora.config import RunConfig
    from flora.runner import server_for
    from flora.runtime import Runtime
    from flora.strategy import FloraStrategy

    adversary.GIANT_BYTES = giant_mib * 2 ** 20
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as run_simulation sets them
    config = RunConfig(num_clients=4, ranks=[16, 8, 4, 4], max_examples=400, eval_examples=8, client_eval_examples=0,
                       cutoff=64, out_dir=tempfile.mkdtemp())
    server = server_for(config, Runtime(), known_partitions=True)
    sizes = {k: server.known_size(k) for k in range(4)}
    server.evaluate()  # tokenise the test examples now: the measured call only evaluates

    class Grid:
        def get_node_ids(self):
            return [101, 102, 103, 104]

    strategy = FloraStrategy(config, server, writer=None, progress=lambda _: None)
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    replies = []
    for k, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"message-{k}"  # the Grid stamps ids when it pushes
        situation = Situation(config=config, partition=k, round=1, applied_end=0,
                              layer_shapes=server.assets.layer_shapes, sizes=sizes)
        kind = CASES[case] if k == 3 else None
        if kind == "giant extra array":
            forged = valid_reply(situation)
            forged.arrays["evil.payload"] = Array(np.zeros(giant_mib * 2 ** 18, dtype=np.float32))
            content = forged.content()
        else:
            content = forge(kind, situation) if kind else valid_reply(situation).content()
        replies.append(Message(content=content, reply_to=message))
    held = sum(len(a.data) for m in replies for a in m.content["arrays"].values())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before = _status("VmRSS")
    tracemalloc.start()
    started = time.perf_counter()
    if case.startswith("pre-fix"):
        replies[3].content["arrays"].to_torch_state_dict()
        record = {}
    else:
        _, metrics = strategy.aggregate_train(1, replies)
        record = dict(metrics)
    seconds = time.perf_counter() - started
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"case": case, "reply_bytes_held_by_flower": held, "rss_before": before,
            "peak_rss_increase": _status("VmHWM") - before, "tracemalloc_peak": traced, "seconds": seconds,
            "clients_ok": record.get("clients_ok"), "clients_rejected": record.get("clients_rejected")}


def prefix_padding_bytes(rank: int) -> int:
    """Bytes the pre-fix server allocated to zero-pad one node's adapter (A (r, in), B (out, r), fp32, every
    SmolLM2 projection) to a claimed rank ``r`` (zeropad/flexlora truncate each node's adapter to its rank)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_aggregate import smollm2_layer_shapes

    return sum(rank * (o + i) * 4 for o, i in smollm2_layer_shapes().values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--giant-mib", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.giant_mib)))
        return
    rows = []
    for case in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", case, "--giant-mib", str(args.giant_mib)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"case {case!r} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    mib = lambda n: f"{n / 2 ** 20:,.1f}"  # noqa: E731
    lines = [f"Server peak memory per reply kind (SmolLM2-135M, 4 clients at ranks 16/8/4/4, giant array "
             f"{args.giant_mib} MiB; one fresh process per case, measured around `aggregate_train`).", "",
             "| case | reply bytes held by Flower (MiB) | peak RSS increase (MiB) | tracemalloc peak (MiB) | "
             "ok / rejected | s |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        verdict = "-" if r["clients_ok"] is None else f"{r['clients_ok']:.0f} / {r['clients_rejected']:.0f}"
        lines.append(f"| {r['case']} | {mib(r['reply_bytes_held_by_flower'])} | {mib(r['peak_rss_increase'])} | "
                     f"{mib(r['tracemalloc_peak'])} | {verdict} | {r['seconds']:.2f} |")
    padding = prefix_padding_bytes(10 ** 7)
    lines += ["", f"Pre-fix, computed: a rank claim of 10^7 made zeropad/flexlora zero-pad that node's next adapter "
                  f"to rank 10^7: {padding / 2 ** 30:,.0f} GiB (fp32, 210 projections)."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hostile_memory.json").write_text(json.dumps({"giant_mib": args.giant_mib, "rows": rows,
                                                         "prefix_rank_1e7_padding_bytes": padding}, indent=1))
    (out / "hostile_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
