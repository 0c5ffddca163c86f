"""How a federation's cost grows with its clients: registered (10 … 10,000, 10 sampled per round) and sampled
(10, 50, 200 of 1,000), on the tiny test model (or the embedded SmolLM2-135M-Instruct with ``--model embedded``).

    python benchmarks/bench_scale.py [--model tiny|embedded] [--rounds 4] [--points 10:10,100:10,...]

Every point runs in its own subprocess (the in-process engine's server and client code, rounds driven here so
that each part is timed) on one synthetic instruction data set big enough for 10,000 clients (2 examples each),
the same for every point. Per round (medians over rounds ≥ 2; round 1 carries start-up): training (the sampled
clients' ``train`` calls), broadcast (each sampled node's catch-up, :meth:`FederationServer.updates_for`, encoded
to the wire's tensors as the Flower skin does), aggregation (``aggregate_seconds``: screening, the method's rule,
the broadcast form, history and global state), evaluation (``eval_seconds``: the global test split and the sampled
clients' own), checkpoint (the round's file), engine (the rest of the round: sampling, bookkeeping). Per point: the
child's peak resident memory (``ru_maxrss``: server and clients share the process; the clients' part is the same
per sampled client), what the server holds (history bytes, per-node map entries), bytes down per sampled client
(its catch-up on the wire) and up, and the catch-up of a node that took part in round 1 only against its missed
updates and one dense delta. Writes benchmarks/results/scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POINTS = "10:10,100:10,1000:10,10000:10,1000:50,1000:200"
ROWS = 110_000  # ~11 examples for each of 10,000 clients: one of them is its own test split


def prepare(root: Path, model: str) -> dict:
    """The data file (and the tiny model) every point shares."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"data-{ROWS}.jsonl"
    if not data.is_file():
        rows = [{"instruction": f"Question {i}: what comes after {i}?", "output": f"{i + 1} comes after {i}."}
                for i in range(ROWS)]
        data.write_text("\n".join(json.dumps(r) for r in rows))
    if model != "tiny":
        return {"model": model, "data": str(data)}
    model_dir = root / "tiny-model"
    if not (model_dir / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from tests.conftest import make_tiny_llama, make_tokenizer  # the test suite's tiny Llama and tokenizer

        tokenizer = make_tokenizer()
        make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir), "data": str(data)}


def point_config(paths: dict, registered: int, sampled: int, rounds: int, out: str, model: str):
    from flora.config import RunConfig

    small = model == "tiny"
    return RunConfig.from_dict(dict(
        model=paths["model"], data=paths["data"], num_clients=registered, ranks=[4 if small else 8], rounds=rounds,
        local_steps=1, batch_size=2, micro_batch_size=2, cutoff=48 if small else 96, partition="iid",
        test_fraction=0.01, max_examples=0, eval_examples=8, client_eval_examples=1, dropout=0.0,
        min_clients=sampled, sample_fraction=sampled / registered, out_dir=out, seed=0))


def child(args) -> None:
    """One point: drive the rounds of the in-process engine with every part timed; one JSON line on stdout."""
    import torch

    from flora.catchup import catch_up
    from flora.client import FederationClient
    from flora.codec import updates_to_tensors
    from flora.rounds import nbytes
    from flora.runner import start_run
    from flora.runtime import Runtime
    from flora.server import round_clients

    torch.set_num_threads(1)
    registered, sampled = (int(x) for x in args.point.split(":"))
    paths = json.loads(args.paths)
    config = point_config(paths, registered, sampled, args.rounds, f"{args.out}/{registered}-{sampled}", args.model)
    started = time.perf_counter()
    runtime = Runtime()
    server, writer = start_run(config, runtime, False, progress=lambda _: None, known_partitions=True)
    client = FederationClient(config, runtime)
    setup_seconds = time.perf_counter() - started
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rounds, round_bytes = [], []
    clock = time.process_time  # CPU seconds of this process (one thread): robust to a shared machine's load
    for round_ in range(1, config.rounds + 1):
        begun, begun_cpu = time.perf_counter(), clock()
        parts = dict.fromkeys(("training", "broadcast", "aggregation", "evaluation", "checkpoint"), 0.0)
        down, up, replies = [], [], []
        for k in round_clients(config, config.num_partitions, round_):
            node = f"node-{k}"
            t = clock()
            first, updates = server.updates_for(node)
            wire = updates_to_tensors(updates, first, server.sent_rank(node))
            parts["broadcast"] += clock() - t
            down.append(sum(v.numel() * v.element_size() for v in wire.values()))
            t = clock()
            reply = client.train(k, node, round_, first, updates)
            parts["training"] += clock() - t
            up.append(sum(nbytes(f) for f in reply.factors.values()) if reply.factors else 0)
            replies.append(reply)
        t = clock()
        record = server.aggregate_round(round_, replies, sum(down), begun)
        after = clock()
        # aggregate_round's own split is wall time: share its CPU time between aggregation and evaluation by it
        share = record["eval_seconds"] / max(record["aggregate_seconds"] + record["eval_seconds"], 1e-12)
        parts["evaluation"], parts["aggregation"] = (after - t) * share, (after - t) * (1 - share)
        t = clock()
        writer.round_done(server)
        parts["checkpoint"] = clock() - t
        wall = time.perf_counter() - begun
        parts["engine"] = clock() - begun_cpu - sum(parts.values())
        round_bytes.append(server.history[-1].nbytes(None))
        rounds.append({"round": round_, "wall": wall, "cpu": clock() - begun_cpu, **parts,
                       "clients_ok": record["clients_ok"],
                       "down_per_client": sum(down) / len(down), "down_max": max(down),
                       "up_per_client": sum(up) / len(up), "test_loss": record["test_loss"],
                       "forms": record["broadcast_forms"]})
    # a node that took part in round 1 only, back now
    first, entries = catch_up(server.history, 1)  # its own process (a deployment)
    returning = sum(u.nbytes(None) for u in entries)
    shared = sum(u.nbytes(None) for u in catch_up(server.history, 1, keep_newest=True)[1])  # a shared process
    state = {
        "history_entries": len(server.history.entries), "history_rounds": len(server.history),
        "history_bytes": server.history.nbytes(), "dense_delta_bytes": server.history.dense_bytes,
        "node_applied": len(server.node_applied), "node_rank": len(server.node_rank),
        "node_partition": len(server.node_partition), "known_sizes": len(server._sizes),
        "encoded_splits": len(server.assets.encoded),
    }
    print(json.dumps({
        "registered": registered, "sampled": sampled, "model": args.model, "rounds": rounds,
        "setup_seconds": setup_seconds, "rss_after_setup": rss_setup,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "server_state": state,
        "returning_node": {"missed_rounds": len(server.history) - 1, "downloads": returning,
                           "downloads_shared_process": shared,
                           "missed_updates": sum(round_bytes[1:]), "first_index": first,
                           "entries": [u.span for u in entries]},
    }))


def summarise(point: dict) -> dict:
    later = point["rounds"][1:] or point["rounds"]
    keys = ("wall", "cpu", "training", "broadcast", "aggregation", "evaluation", "checkpoint", "engine")
    row = {k: median(r[k] for r in later) for k in keys}
    row["server"] = row["broadcast"] + row["aggregation"] + row["evaluation"]
    row["down_per_client"] = median(r["down_per_client"] for r in later)
    row["down_max"] = max(r["down_max"] for r in point["rounds"])
    row["up_per_client"] = median(r["up_per_client"] for r in later)
    return row


def run_point(point: str, args, paths: dict) -> dict:
    command = [sys.executable, __file__, "--child", "--point", point, "--paths", json.dumps(paths), "--rounds",
               str(args.rounds), "--out", args.out, "--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if process.returncode:
        raise SystemExit(f"point {point} failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result["summary"] = summarise(result)
    s = result["summary"]
    print(f"{point}: round {s['wall']:.3f} s wall, {s['cpu']:.3f} s CPU (server {s['server'] * 1e3:.1f} ms), "
          f"peak RSS "
          f"{result['rss_peak'] / 2**20:.0f} MiB, down/client {s['down_per_client'] / 1024:.1f} KiB", flush=True)
    return result


def fit_growth(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (0: constant, 1: linear)."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def growth_laws(points: list[dict]) -> dict:
    by_registered = sorted((p for p in points if p["sampled"] == 10), key=lambda p: p["registered"])
    by_sampled = sorted((p for p in points if p["registered"] == 1000), key=lambda p: p["sampled"])
    laws = {}
    for name, series, axis in (("registered", by_registered, "registered"), ("sampled", by_sampled, "sampled")):
        if len(series) < 2:
            continue
        xs = [p[axis] for p in series]
        laws[name] = {key: fit_growth(xs, [p["summary"][key] for p in series])
                      for key in ("training", "broadcast", "aggregation", "evaluation", "server", "down_per_client",
                                  "up_per_client")}
        laws[name]["rss_peak"] = fit_growth(xs, [p["rss_peak"] for p in series])
        laws[name]["setup_seconds"] = fit_growth(xs, [p["setup_seconds"] for p in series])
        laws[name]["history_bytes"] = fit_growth(xs, [p["server_state"]["history_bytes"] for p in series])
    return laws


def law(slope: float) -> str:
    return "constant" if abs(slope) < 0.15 else "linear" if abs(slope - 1) < 0.2 else f"∝ n^{slope:.2f}"


def markdown(summary: dict) -> str:
    points = summary["points"]
    lines = [f"Model: {summary['model']}; {summary['rounds']} rounds; medians over rounds ≥ 2; "
             f"{summary['cpu']}; load average {summary['load'][0]:.1f} at the start, {summary['load'][1]:.1f} at the "
             f"end; command: `{summary['command']}` ({summary['date']}). The parts are CPU seconds of the point's "
             "process (one torch thread), so other work on the machine does not inflate them; round wall time "
             "beside them.\n",
             "| registered | sampled | round s wall | round s CPU | training s | broadcast ms | aggregation ms | "
             "evaluation ms | "
             "checkpoint ms | engine ms | server ms | peak RSS MiB | setup s | down/client KiB | down max KiB | "
             "up/client KiB | history KiB (entries) | node maps |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        s, st = p["summary"], p["server_state"]
        lines.append(
            f"| {p['registered']:,} | {p['sampled']} | {s['wall']:.2f} | {s['cpu']:.2f} | {s['training']:.2f} | "
            f"{s['broadcast'] * 1e3:.1f} | {s['aggregation'] * 1e3:.1f} | {s['evaluation'] * 1e3:.1f} | "
            f"{s['checkpoint'] * 1e3:.1f} | {s['engine'] * 1e3:.1f} | {s['server'] * 1e3:.1f} | "
            f"{p['rss_peak'] / 2**20:.0f} | {p['setup_seconds']:.1f} | {s['down_per_client'] / 1024:.1f} | "
            f"{s['down_max'] / 1024:.1f} | {s['up_per_client'] / 1024:.1f} | {st['history_bytes'] / 1024:.1f} "
            f"({st['history_entries']}) | applied {st['node_applied']}, rank {st['node_rank']}, "
            f"partition {st['node_partition']} |")
    lines += ["", "A node that took part in round 1 only, back in the last round (catch-up on the wire):", "",
              "| registered | sampled | missed rounds | its missed updates KiB | one dense delta KiB | downloads KiB, "
              "own process | downloads KiB, shared process (newest round apart) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        r = p["returning_node"]
        lines.append(f"| {p['registered']:,} | {p['sampled']} | {r['missed_rounds']} | "
                     f"{r['missed_updates'] / 1024:.1f} | "
                     f"{p['server_state']['dense_delta_bytes'] / 1024:.1f} | {r['downloads'] / 1024:.1f} | "
                     f"{r['downloads_shared_process'] / 1024:.1f} |")
    lines += ["", "Growth (slope of log cost against log clients; 0 = constant, 1 = linear):", "",
              "| cost | vs registered (10 sampled) | vs sampled (1,000 registered) |", "|---|---|---|"]
    laws = summary["growth"]
    for key in ("server", "broadcast", "aggregation", "evaluation", "training", "rss_peak", "setup_seconds",
                "history_bytes", "down_per_client", "up_per_client"):
        cells = [f"{law(laws[a][key])} ({laws[a][key]:+.2f})" if a in laws else "–"
                 for a in ("registered", "sampled")]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    lines += ["", NOTES if summary["model"] == "tiny" else EMBEDDED_NOTES]
    return "\n".join(lines) + "\n"


NOTES = """How to read it. *Registered clients* (10 sampled): every per-round server part (broadcast, aggregation,
evaluation) and the server's history are constant; per-node maps hold the nodes of the kept rounds (`applied`,
`rank`: the sampled ones) and one entry per partition that ever took part (`partition`: at most the registered
clients, one int each); nothing exists for a client that never took part (partitions are index lists made once at
start-up; client sampling draws only the sampled ids). *Sampled clients*: training, aggregation, evaluation
(the global test split plus each sampled client's own) and broadcast grow linearly. Training differs between the
registered points because the data set is fixed: a client sampled for the first time tokenises its partition
(data / registered examples: 1,100 at 100 registered clients, 11 at 10,000), and at 10 registered clients
every client is cached after round 1. The peak RSS is the point's whole process (server and the in-process
clients); it is highest at 10 registered clients, where every partition gets tokenised and cached. Bytes down:
a client that was in the previous round gets one round (72 KiB here: the tiny model's rounds are dense, 10
clients × rank 4 > its layers' break-even ranks); a new or returning one gets the collapsed catch-up, one dense
delta in its own process (a deployment) or one dense delta plus the newest round where one process serves many
nodes (this in-process engine, 144 KiB)."""


EMBEDDED_NOTES = """SmolLM2-135M-Instruct at rank 8 (10 sampled: stacked rank 80, broadcast in the private
re-factorised form per layer). Every per-round server part, the history and the memory are the same at 1,000 and
10,000 registered clients. A new client gets the rounds it lacks collapsed: per layer the stacked factors while
they are smaller than dense, else dense (rank 160 passes the k/v projections' break-even 145), so it downloads
less than the missed rounds' sum; one dense delta of all 210 projections is 405 MiB."""


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, axis, fixed, key in ((axes[0], "registered", ("sampled", 10), "registered clients (10 sampled)"),
                                 (axes[1], "sampled", ("registered", 1000), "sampled clients (1,000 registered)")):
        series = sorted((p for p in points if p[fixed[0]] == fixed[1]), key=lambda p: p[axis])
        xs = [p[axis] for p in series]
        for part in ("training", "broadcast", "aggregation", "evaluation", "engine"):
            ax.plot(xs, [max(p["summary"][part], 1e-5) for p in series], marker="o", label=part)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("CPU seconds per round (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    series = sorted((p for p in points if p["sampled"] == 10), key=lambda p: p["registered"])
    xs = [p["registered"] for p in series]
    ax = axes[2]
    ax.plot(xs, [p["rss_peak"] / 2**20 for p in series], marker="o", label="peak RSS (MiB)")
    ax.plot(xs, [p["summary"]["down_per_client"] / 1024 for p in series], marker="s",
            label="down / sampled client (KiB)")
    ax.plot(xs, [p["server_state"]["history_bytes"] / 1024 for p in series], marker="^", label="server history (KiB)")
    ax.set_xscale("log")
    ax.set_xlabel("registered clients (10 sampled)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"FLoRA federation cost vs clients ({summary['model']} model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (the test model) or embedded (SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--points", default=DEFAULT_POINTS, help="registered:sampled,...")
    parser.add_argument("--out", default="runs/bench-scale")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json")
    args = parser.parse_args()
    if args.report_only:
        suffix = "" if args.model == "tiny" else f"_{args.model}"
        summary = json.loads((RESULTS / f"scale{suffix}.json").read_text())
        (RESULTS / f"scale{suffix}.md").write_text(markdown(summary))
        return
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = prepare(Path(args.out) / "assets", args.model)
    load_start = os.getloadavg()[0]
    points = [run_point(point, args, paths) for point in args.points.split(",")]
    from bench_round import cpu_peak_flops

    suffix = "" if args.model == "tiny" else f"_{args.model}"
    summary = {"model": args.model, "rounds": args.rounds, "cpu": cpu_peak_flops()[1], "points": points,
               "date": time.strftime("%Y-%m-%d"), "load": [load_start, os.getloadavg()[0]],
               "command": " ".join(["python benchmarks/bench_scale.py", *sys.argv[1:]]), "growth": growth_laws(points)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"scale{suffix}.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / f"scale{suffix}.md").write_text(markdown(summary))
    plot(summary, RESULTS / f"scale{suffix}.png")
    print(markdown(summary))


if __name__ == "__main__":
    main()
