"""Flower skin, client side: decode the round's payload, call :class:`FederationClient`, encode the reply."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flora.client import FederationClient
from flora.codec import factors_to_tensors, updates_from_tensors
from flora.config import RunConfig
from flora.progress import step_printer
from flora.runtime import PROCESS_RUNTIME

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    meta = msg.content["config"]
    config = RunConfig.from_dict(json.loads(str(meta["flora-config"])), "message")
    partition_id = int(context.node_config["partition-id"])
    # Deployment: each SuperNode may set its own rank with --node-config "lora-rank=16".
    rank = int(context.node_config["lora-rank"]) if "lora-rank" in context.node_config else None
    first, count = int(meta["first-index"]), int(meta["num-updates"])
    arrays = msg.content["arrays"]
    updates = updates_from_tensors(arrays.to_torch_state_dict() if len(arrays) else {}, first, count)
    client = FederationClient(config, PROCESS_RUNTIME)  # the assets and global state this process keeps
    reply = client.train(partition_id, str(context.node_id), int(meta["server-round"]), first, updates, rank=rank,
                         on_step=None if config.dp_enabled else  # DP: no per-client statistic in shared logs
                         step_printer(int(meta["server-round"]), config.rounds, partition_id))
    used_rank = rank or config.client_rank(partition_id)
    content = RecordDict({
        "arrays": ArrayRecord(torch_state_dict=factors_to_tensors(reply.factors)) if reply.factors else ArrayRecord(),
        "metrics": MetricRecord({"num-examples": reply.num_examples, "train-loss": float(reply.train_loss),
                                 "tokens": reply.tokens, "seconds": reply.seconds, "applied": reply.applied}),
        "config": ConfigRecord({"partition-id": partition_id, "rank": used_rank, "error": reply.error or ""}),
    })
    return Message(content=content, reply_to=msg)
