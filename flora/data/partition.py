"""Split records into a global test set and N clients (each with its own test split). Pure and seeded.

Schemes:

* ``iid``: a seeded shuffle dealt into N equal parts;
* ``dirichlet``: for every label ``c``, proportions ``q_c ~ Dir(alpha · 1_N)`` deal that label's
  examples to the clients (small ``alpha`` = strongly non-IID); redrawn until every client has
  ``min_per_client`` examples;
* ``quantity``: IID content with client sizes ``~ Dir(alpha · 1_N)`` (quantity skew).

Labels: a record's ``category`` (Dolly) when every record has one; otherwise a documented proxy,
:func:`proxy_label`: ``code`` when an assistant turn holds a fenced code block, else the
quartile of the first user message length (``short``, ``medium``, ``long``, ``very_long``, cut
at 100, 300, 1000 characters) — topic-like heterogeneity without a classifier.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flora.data.formats import DataError, Record

SCHEMES = ("iid", "dirichlet", "quantity")


def proxy_label(record: Record) -> str:
    if any(m["role"] == "assistant" and "```" in m["content"] for m in record.messages):
        return "code"
    first = next((m["content"] for m in record.messages if m["role"] == "user"), "")
    n = len(first)
    return "short" if n < 100 else "medium" if n < 300 else "long" if n < 1000 else "very_long"


def labels_of(records: list[Record]) -> list[str]:
    if records and all(r.category for r in records):
        return [str(r.category) for r in records]
    return [proxy_label(r) for r in records]


@dataclass
class Partition:
    """Indices into the record list: ``clients[k]`` / ``client_tests[k]`` and the global ``test``."""

    clients: list[list[int]]
    client_tests: list[list[int]]
    test: list[int]
    scheme: str
    seed: int
    labels: list[str] = field(repr=False)

    def report(self) -> dict:
        def histogram(indices):
            return dict(sorted(Counter(self.labels[i] for i in indices).items()))
        return {
            "scheme": self.scheme, "seed": self.seed, "num_clients": len(self.clients),
            "global_test": len(self.test),
            "clients": [{"client": k, "train": len(tr), "test": len(te), "labels": histogram(tr)}
                        for k, (tr, te) in enumerate(zip(self.clients, self.client_tests))],
            "labels_total": histogram([i for c in self.clients for i in c]),
        }

    def write_report(self, path: Path) -> None:
        path.write_text(json.dumps(self.report(), indent=2))


def partition(
    records: list[Record],
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.1,
    client_test_fraction: float = 0.1,
    min_per_client: int = 2,
    max_examples: int | None = None,
) -> Partition:
    """Seeded split: a global test set first, then the rest dealt to ``num_clients`` by ``scheme``.

    ``max_examples`` caps the records used (a seeded sample) before splitting, for short runs.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"partition scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if scheme != "iid" and not alpha > 0:
        raise ValueError(f"partition alpha must be > 0, got {alpha}")
    for name, frac in (("test_fraction", test_fraction), ("client_test_fraction", client_test_fraction)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    if max_examples is not None:
        order = order[:max_examples]
    n_test = int(round(len(order) * test_fraction))
    test, pool = order[:n_test].tolist(), order[n_test:]
    needed = num_clients * max(min_per_client, 1)
    if len(pool) < needed:
        raise DataError(f"partition: {len(pool)} training examples for {num_clients} clients; need at least "
                        f"{needed} ({max(min_per_client, 1)} per client). Use fewer clients or more data.")
    labels = labels_of(records)
    if scheme == "iid":
        shares = [part.tolist() for part in np.array_split(pool, num_clients)]
    elif scheme == "quantity":
        shares = _quantity_skew(pool, num_clients, alpha, rng, min_per_client)
    else:
        shares = _dirichlet(pool, [labels[i] for i in pool], num_clients, alpha, rng, min_per_client)
    clients, client_tests = [], []
    for share in shares:
        n_client_test = int(len(share) * client_test_fraction)
        if len(share) - n_client_test < 1:
            n_client_test = 0
        client_tests.append(sorted(share[:n_client_test]))
        clients.append(sorted(share[n_client_test:]))
    return Partition(clients=clients, client_tests=client_tests, test=sorted(test), scheme=scheme, seed=seed,
                     labels=labels)


def _quantity_skew(pool, num_clients, alpha, rng, min_per_client):
    spare = len(pool) - num_clients * min_per_client
    proportions = rng.dirichlet(alpha * np.ones(num_clients))
    sizes = min_per_client + np.floor(proportions * spare).astype(int)
    sizes[: spare - (sizes - min_per_client).sum()] += 1  # hand out the rounding remainder
    cuts = np.cumsum(sizes)[:-1]
    return [part.tolist() for part in np.split(pool, cuts)]


def _dirichlet(pool, pool_labels, num_clients, alpha, rng, min_per_client, max_tries=1000):
    by_label: dict[str, list[int]] = {}
    for index, label in zip(pool.tolist(), pool_labels):
        by_label.setdefault(label, []).append(index)
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for label in sorted(by_label):
            indices = by_label[label]
            q = rng.dirichlet(alpha * np.ones(num_clients))
            cuts = (np.cumsum(q)[:-1] * len(indices)).astype(int)
            for k, part in enumerate(np.split(np.array(indices), cuts)):
                shares[k].extend(part.tolist())
        if min(len(s) for s in shares) >= min_per_client:
            return [rng.permutation(s).tolist() for s in shares]
    raise DataError(f"partition: Dirichlet(alpha={alpha}) left a client with fewer than {min_per_client} examples "
                    f"in {max_tries} draws; raise alpha, lower min_per_client or use fewer clients")
