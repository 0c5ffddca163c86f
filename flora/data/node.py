"""A node's own data: one file (or `datasets` directory) per node, split into its training and held-out parts.

In a deployment every SuperNode names its file in its node config (``data-path``, optional ``format``);
in a simulation the launcher deals the one dataset out with the seeded partitioner (``partition.py``) and
writes each partition to a shard file (:func:`write_shards`), which the simulated node then loads through
the same :func:`load_node_data` a deployed node uses. A node never sees another node's file.

The held-out split: rows that carry ``"split": "train"`` / ``"test"`` (every row, or none) keep it (the
shards do, so a simulated node holds exactly the partitioner's split); otherwise the node carves it from its
own rows with :func:`carve` (``test_fraction`` of them, seeded by the run's ``seed``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flora.data.formats import DataError, Record
from flora.data.partition import Partition, partition
from flora.data.sources import convert_rows, load_records, read_located_rows

SPLIT_KEY = "split"
SHARD_DIR = "shards"


@dataclass(frozen=True)
class NodeData:
    """The records a node trains on and its own held-out records, and the file they came from."""

    source: str
    train: tuple[Record, ...]
    test: tuple[Record, ...]
    stamp: tuple[int, int] = (0, 0)  # the file's (mtime_ns, size) when read: a rewritten file is read again


def shard_path(out_dir: str | Path, partition: int) -> Path:
    """Where a simulation keeps partition ``partition``'s shard: ``OUT/shards/partition-K.jsonl``."""
    return Path(out_dir) / SHARD_DIR / f"partition-{partition}.jsonl"


def carve(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, test)`` row indices of a node's ``count`` rows: a seeded ``round(test_fraction · count)`` of
    them held out (at least one row is kept for training), each list in file order."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = min(int(round(count * test_fraction)), count - 1) if count else 0
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


def load_node_data(path: str | Path, fmt: str = "auto", test_fraction: float = 0.1, seed: int = 0,
                   label: str = "node data") -> NodeData:
    """A node's records from ``path`` (JSON/JSONL in any supported format, or a `datasets` directory), split
    into training and held-out records; :class:`DataError` naming ``label``, the file and the line otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{label} {path}: no such file or directory")
    rows, locations, _ = read_located_rows(path)
    marks = [row.get(SPLIT_KEY) if isinstance(row, dict) else None for row in rows]
    marked = [m is not None for m in marks]
    if any(marked) and not all(marked):
        where = locations[marked.index(False)]
        raise DataError(f"{label} {path}: {where}: no {SPLIT_KEY!r} field; expected it on every row or on none")
    for where, mark in zip(locations, marks):
        if mark is not None and mark not in ("train", "test"):
            raise DataError(f"{label} {path}: {where}: {SPLIT_KEY} = {mark!r}; expected 'train' or 'test'")
    if all(marked) and rows:
        train_rows = [i for i, m in enumerate(marks) if m == "train"]
        test_rows = [i for i, m in enumerate(marks) if m == "test"]
    else:
        train_rows, test_rows = carve(len(rows), test_fraction, seed)
    parts = []
    for name, indices in (("train", train_rows), ("test", test_rows)):
        if not indices:
            parts.append(())
            continue
        records, _ = convert_rows([rows[i] for i in indices], fmt, str(path),
                                  locations=[locations[i] for i in indices])
        parts.append(tuple(records))
    if not parts[0]:
        raise DataError(f"{label} {path}: no training rows ({len(rows)} rows, {len(test_rows)} held out)")
    stat = path.stat()
    return NodeData(source=str(path), train=parts[0], test=parts[1], stamp=(stat.st_mtime_ns, stat.st_size))


def shard_rows(records: Sequence[Record], split: Partition, partition: int) -> list[dict]:
    """Partition ``partition``'s rows for its shard file: its training records, then its held-out ones, each in
    the partition's order and marked with ``split``."""
    return ([{**records[i].to_json(), SPLIT_KEY: "train"} for i in split.clients[partition]]
            + [{**records[i].to_json(), SPLIT_KEY: "test"} for i in split.client_tests[partition]])


def write_shards(records: Sequence[Record], split: Partition, directory: str | Path) -> list[Path]:
    """One JSONL file per partition in ``directory`` (canonical ``messages`` rows, mode 0600); a simulated node
    is handed the path of its own shard and nothing else."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(len(split.clients)):
        path = directory / f"partition-{k}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in shard_rows(records, split, k))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flora.data.node split CONFIG DIR N``: deal CONFIG's dataset into N node files DIR/partition-K.jsonl
    with the config's seeded partitioner (what ``scripts/deploy_local.sh`` does when no ``--node-data`` is given:
    a stand-in for N parties that each already hold their own data); prints the paths, comma-separated."""
    import argparse
    import dataclasses

    from flora.config import load_config

    parser = argparse.ArgumentParser(prog="python -m flora.data.node")
    parser.add_argument("command", choices=["split"])
    parser.add_argument("config")
    parser.add_argument("directory")
    parser.add_argument("nodes", type=int)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    config = dataclasses.replace(config, num_clients=args.nodes, ranks=[1], min_clients=1, adapters=config.adapters[:1])
    records, _ = load_records(config.data, fmt=config.format)
    split = partition(records, args.nodes, scheme=config.partition if args.nodes > 1 else "iid",
                      alpha=config.dirichlet_alpha, seed=config.seed, test_fraction=config.test_fraction,
                      max_examples=config.max_examples or None)  # as a simulation deals them (runtime.py)
    print(",".join(str(p) for p in write_shards(records, split, args.directory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
