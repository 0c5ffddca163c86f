"""Flower skin, client side: decode the round's payload, call :class:`FederationClient`, encode the reply.

A SuperNode's node config: ``partition-id`` (and ``num-partitions``), optionally ``lora-rank``, and in a
deployment ``data-path`` (its own data file or `datasets` directory) with an optional ``format``; without
``data-path`` the node reads its partition's shard of a simulation (``flora/data/node.py``).

A deployed SuperNode starts a new ClientApp process for every message, so the round updates the node holds
(what the server's catch-up counts on) live in Flower's ``context.state`` (``flora-history``), which the
SuperNode keeps for the run: a new process re-applies them before the message's own. They are kept collapsed
into one entry (``flora/catchup.py: node_history``; whole for warm-starting methods), so that state stays
bounded over a long run. A per-client method's node (standalone) also keeps there the adapter it trained
(``flora-own-adapter``), which never leaves it, so the next process continues and evaluates with it. A simulated node's
process lives for the whole run and keeps them in memory (``PROCESS_RUNTIME``).
"""

from __future__ import annotations

import json
import logging
import math
from typing import NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flora.audit import install_open_log
from flora.client import FederationClient
from flora.catchup import node_history
from flora.codec import factors_from_tensors, factors_to_tensors, updates_from_tensors, updates_to_tensors
from flora.config import RunConfig
from flora.progress import step_printer
from flora.runtime import PROCESS_RUNTIME

app = ClientApp()
log = logging.getLogger("flora")
install_open_log("client")


HISTORY, HISTORY_COUNT = "flora-history", "flora-history-count"
OWN_ADAPTER = "flora-own-adapter"  # a deployed node of a per-client method (standalone): the adapter it continues


class Payload(NamedTuple):
    config: RunConfig
    partition_id: int
    first: int  # history index of the first catch-up update
    updates: list
    source: dict  # FederationClient's data_path / data_format keywords
    held: list  # a deployed node: the entries its context.state held before this message (decoded once)


def _payload(msg: Message, context: Context) -> Payload:
    """The run config, partition, catch-up updates and data source of a message to this node (the round
    updates it held before, from ``context.state``, already re-applied in a new process)."""
    meta = msg.content["config"]
    config = RunConfig.from_dict(json.loads(str(meta["flora-config"])), "message")
    first, count = int(meta["first-index"]), int(meta["num-updates"])
    arrays = msg.content["arrays"]
    tensors = arrays.to_torch_state_dict() if len(arrays) else {}
    updates = updates_from_tensors(tensors, first, count)
    node = context.node_config
    held = []
    if node.get("data-path"):  # a deployed node: a new process for every message
        held = _restore_history(context, config, int(node["partition-id"]))
    source = {"data_path": str(node["data-path"]) if node.get("data-path") else None,
              "data_format": str(node.get("format") or "auto")}
    return Payload(config, int(node["partition-id"]), first, updates, source, held)


@app.train()
def train(msg: Message, context: Context) -> Message:
    payload = _payload(msg, context)
    config, partition_id, first, updates, source, _ = payload
    # Deployment: each SuperNode may set its own rank with --node-config "lora-rank=16".
    rank = int(context.node_config["lora-rank"]) if "lora-rank" in context.node_config else None
    client = FederationClient(config, PROCESS_RUNTIME)  # the assets and global state this process keeps
    server_round = int(msg.content["config"]["server-round"])
    reply = client.train(partition_id, str(context.node_id), server_round, first, updates, rank=rank, **source,
                         on_step=None if config.dp_enabled else  # DP: no per-client statistic in shared logs
                         step_printer(server_round, config.rounds, partition_id))
    _remember_history(payload, context)
    _remember_own_adapter(payload, context)
    used_rank = rank or config.client_rank(partition_id)
    content = RecordDict({
        "arrays": ArrayRecord(torch_state_dict=factors_to_tensors(reply.factors)) if reply.factors else ArrayRecord(),
        "metrics": MetricRecord({"num-examples": reply.num_examples, "train-loss": float(reply.train_loss),
                                 "tokens": reply.tokens, "seconds": reply.seconds, "applied": reply.applied}),
        "config": ConfigRecord({"partition-id": partition_id, "rank": used_rank, "error": reply.error or ""}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global model's loss on this node's own held-out split, and its token count."""
    payload = _payload(msg, context)
    config, partition_id, first, updates, source, _ = payload
    client = FederationClient(config, PROCESS_RUNTIME)
    reply = client.evaluate(partition_id, str(context.node_id), first, updates, **source)
    _remember_history(payload, context)
    content = RecordDict({
        "metrics": MetricRecord({"eval-loss": reply.loss if math.isfinite(reply.loss) else 0.0,
                                 "eval-tokens": reply.tokens, "eval-examples": reply.examples,
                                 "applied": reply.applied}),
        "config": ConfigRecord({"partition-id": partition_id, "error": reply.error or ""}),
    })
    return Message(content=content, reply_to=msg)


def _history_count(context: Context) -> int:
    """How many round updates ``context.state`` holds for this node."""
    return int(context.state[HISTORY_COUNT]["count"]) if HISTORY_COUNT in context.state else 0


def _restore_history(context: Context, config: RunConfig, partition_id: int) -> list:
    """Re-apply the round updates this node held after its last message (a new process holds none), and put
    back its own adapter (a per-client method's, which never leaves the node); returns the updates."""
    count = _history_count(context)
    held = updates_from_tensors(context.state[HISTORY].to_torch_state_dict(), 0, count) if count else []
    state = PROCESS_RUNTIME.client_state(config)
    if state.applied < count:
        state.apply(held, 0)
    if OWN_ADAPTER in context.state and partition_id not in state.client_adapters:
        state.client_adapters[partition_id] = factors_from_tensors(context.state[OWN_ADAPTER].to_torch_state_dict())
    return held


def _remember_own_adapter(payload: Payload, context: Context) -> None:
    """A deployed node of a per-client method keeps the adapter it trained in ``context.state``: the next
    message's process continues it (and evaluates with it) instead of starting a fresh one."""
    if not (context.node_config.get("data-path") and payload.config.spec.per_client_models):
        return
    own = PROCESS_RUNTIME.client_state(payload.config).client_adapters.get(payload.partition_id)
    if own is not None:
        context.state[OWN_ADAPTER] = ArrayRecord(torch_state_dict=factors_to_tensors(own))


def _remember_history(payload: Payload, context: Context) -> None:
    """Keep in ``context.state`` what this node now holds (a deployed node only): the entries it held and those
    of the message it did not, collapsed where the history folds (:func:`flora.catchup.node_history`), so the
    state stays within about one dense delta however many rounds run and a new process re-applies one entry."""
    if not context.node_config.get("data-path"):
        return
    config = payload.config
    applied = PROCESS_RUNTIME.client_state(config).applied
    count = _history_count(context)
    if applied <= count:
        return
    kept = node_history(payload.held, payload.first, payload.updates, fold=not config.spec.warm_start)
    if kept is None or sum(u.span for u in kept) != applied:  # the process could not take the message whole
        log.warning("node %s: the message's updates from %d do not follow the %d it held; its kept history is "
                    "left as it was", context.node_id, payload.first, count)
        return
    context.state[HISTORY] = ArrayRecord(torch_state_dict=updates_to_tensors(kept, 0, None))
    context.state[HISTORY_COUNT] = ConfigRecord({"count": applied})
