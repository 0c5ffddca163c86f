"""Flower skin, server side: a Message-API Strategy that delegates to :class:`FederationServer`.

Wire format (``ArrayRecord`` key → tensor, keys of ``flora/codec.py``; ``ConfigRecord`` for the metadata):

* server → client: ``u{i}.m.{layer}.A|B`` (merge factors) or ``u{i}.m.{layer}.D`` (dense merge),
  ``u{i}.a.{layer}.A|B`` (adapter, truncated to the node's rank where the method truncates);
  config ``flora-config`` (run config JSON), ``first-index``, ``num-updates``, ``server-round``;
* client → server: ``{layer}.A|B`` factors; metrics ``num-examples``, ``train-loss``, ``tokens``,
  ``seconds``, ``applied``; config ``partition-id``, ``rank``, ``error`` (empty when fine).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flora.codec import factors_from_tensors, updates_to_tensors
from flora.config import RunConfig
from flora.rounds import ClientReply
from flora.runner import ResultsWriter, format_round
from flora.server import FederationServer, round_clients

log = logging.getLogger("flora")


# --- strategy ----------------------------------------------------------------------------------

class FloraStrategy(FedAvg):
    """FedAvg's round loop with FLoRA's sampling, catch-up payloads and aggregation."""

    def __init__(self, config: RunConfig, server: FederationServer, writer: ResultsWriter | None = None,
                 progress=print):
        super().__init__(fraction_train=config.sample_fraction, fraction_evaluate=0.0,
                         min_train_nodes=config.min_clients, min_available_nodes=config.min_clients)
        self.config = config
        self.server = server
        self.writer = writer
        self.progress = progress
        self.node_rank: dict[str, int] = {}  # learnt from replies; used to truncate adapters
        self.node_client: dict[str, int] = {}  # node -> partition id, learnt from replies (for logs)
        self._round_started = 0.0
        self._bytes_down = 0
        self._sent: list[Message] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Flower numbers this process's rounds from 1; a resumed run continues after its history.
        server_round = len(self.server.history) + 1
        self._round_started = time.perf_counter()
        node_ids = sorted(grid.get_node_ids())
        if self.config.spec.pooled:
            node_ids = node_ids[:1]  # one client holds all the training data
        chosen = [node_ids[i] for i in round_clients(self.config, len(node_ids), server_round)]
        messages, self._bytes_down = [], 0
        for node_id in chosen:
            node = str(node_id)
            first, updates = self.server.updates_for(node)
            rank = self.node_rank.get(node)
            payload = ArrayRecord(torch_state_dict=updates_to_tensors(updates, first, rank))
            self._bytes_down += payload.count_bytes()
            meta = ConfigRecord({"flora-config": self.config.to_json(), "first-index": first,
                                 "num-updates": len(updates), "server-round": server_round,
                                 "truncated-rank": rank or 0})
            message = Message(content=RecordDict({"arrays": payload, "config": meta}), dst_node_id=node_id,
                              message_type="train")
            messages.append(message)
        self._sent = messages  # the Grid stamps their message ids when it pushes them
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round = len(self.server.history) + 1
        parsed = []
        # An error reply made by the SuperLink (e.g. node unavailable) comes from the SuperLink's own id:
        # map it back to the node the message was sent to.
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        for message in replies:
            node = str(destination.get(message.metadata.reply_to_message_id, message.metadata.src_node_id))
            if message.has_error():
                error = message.error
                parsed.append(ClientReply(client=self.node_client.get(node, -1), node=node, factors=None,
                                          error=f"{error.code}: {error.reason}",
                                          applied=self.server.node_applied.get(node, 0)))
                continue
            meta, metrics = message.content["config"], message.content["metrics"]
            client, error = int(meta["partition-id"]), str(meta["error"]) or None
            self.node_rank[node] = int(meta["rank"])
            self.node_client[node] = client
            factors = None if error else factors_from_tensors(message.content["arrays"].to_torch_state_dict())
            parsed.append(ClientReply(client=client, node=node, factors=factors,
                                      num_examples=int(metrics["num-examples"]),
                                      train_loss=float(metrics["train-loss"]), tokens=int(metrics["tokens"]),
                                      seconds=float(metrics["seconds"]), error=error, applied=int(metrics["applied"]),
                                      rank=int(meta["rank"])))
            if not error:
                self.progress(f"  round {server_round} client {client} (rank {meta['rank']}): train loss "
                              f"{parsed[-1].train_loss:.4f}, {parsed[-1].tokens / max(parsed[-1].seconds, 1e-9):.0f} tok/s")
        record = self.server.aggregate_round(server_round, parsed, self._bytes_down, self._round_started)
        record["clients_failed"] += max(len(self._sent) - len(parsed), 0)  # nodes that never answered
        if self.writer is not None:
            self.writer.round_done(self.server)
        self.progress(format_round(record))
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and v == v}
        return ArrayRecord(), MetricRecord(numbers)


def config_from_run_config(run_config: dict) -> RunConfig:
    """RunConfig from Flower's run config: ``flora-config`` (JSON), or ``config-file`` plus overrides
    (``out-dir``, ``rounds``, ...; empty strings and zeros keep the file's value)."""
    from flora.config import load_config

    if run_config.get("flora-config"):
        return RunConfig.from_dict(json.loads(str(run_config["flora-config"])), "run config")
    overrides = [f"{k}={v}" for k, v in run_config.items()
                 if k not in ("config-file", "flora-config", "resume") and v not in ("", 0)]
    return load_config(run_config.get("config-file") or None, overrides)
