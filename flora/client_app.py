"""Flower skin, client side: decode the round's payload, call :class:`FederationClient`, encode the reply.

A SuperNode's node config: ``partition-id`` (and ``num-partitions``), optionally ``lora-rank``, and in a
deployment ``data-path`` (its own data file or `datasets` directory) with an optional ``format``; without
``data-path`` the node reads its partition's shard of a simulation (``flora/data/node.py``).
"""

from __future__ import annotations

import json
import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flora.audit import install_open_log
from flora.client import FederationClient
from flora.codec import factors_to_tensors, updates_from_tensors
from flora.config import RunConfig
from flora.runtime import PROCESS_RUNTIME

app = ClientApp()
install_open_log("client")


def _payload(msg: Message, context: Context) -> tuple[RunConfig, int, int, list, dict]:
    """The run config, partition, catch-up updates and data source of a message to this node."""
    meta = msg.content["config"]
    config = RunConfig.from_dict(json.loads(str(meta["flora-config"])), "message")
    first, count = int(meta["first-index"]), int(meta["num-updates"])
    arrays = msg.content["arrays"]
    updates = updates_from_tensors(arrays.to_torch_state_dict() if len(arrays) else {}, first, count)
    node = context.node_config
    source = {"data_path": str(node["data-path"]) if node.get("data-path") else None,
              "data_format": str(node.get("format") or "auto")}
    return config, int(node["partition-id"]), first, updates, source


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, partition_id, first, updates, source = _payload(msg, context)
    # Deployment: each SuperNode may set its own rank with --node-config "lora-rank=16".
    rank = int(context.node_config["lora-rank"]) if "lora-rank" in context.node_config else None
    client = FederationClient(config, PROCESS_RUNTIME)  # the assets and global state this process keeps
    reply = client.train(partition_id, str(context.node_id), int(msg.content["config"]["server-round"]), first, updates,
                         rank=rank, **source)
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
    config, partition_id, first, updates, source = _payload(msg, context)
    client = FederationClient(config, PROCESS_RUNTIME)
    reply = client.evaluate(partition_id, str(context.node_id), first, updates, **source)
    content = RecordDict({
        "metrics": MetricRecord({"eval-loss": reply.loss if math.isfinite(reply.loss) else 0.0,
                                 "eval-tokens": reply.tokens, "eval-examples": reply.examples,
                                 "applied": reply.applied}),
        "config": ConfigRecord({"partition-id": partition_id, "error": reply.error or ""}),
    })
    return Message(content=content, reply_to=msg)

