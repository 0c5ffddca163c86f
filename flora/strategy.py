"""Flower skin, server side: a Message-API Strategy that delegates to :class:`FederationServer`.

Wire format (``ArrayRecord`` key → tensor, keys of ``flora/codec.py``; ``ConfigRecord`` for the metadata):

* server → client: ``u{i}.m.{layer}.A|B`` (merge factors) or ``u{i}.m.{layer}.D`` (dense merge),
  ``u{i}.a.{layer}.A|B`` (adapter, truncated to the node's rank where the method truncates);
  ``u{i}.span`` (rounds a collapsed catch-up entry stands for); config ``flora-config`` (run config JSON),
  ``first-index``, ``num-updates`` (history indices covered), ``server-round``;
* client → server: ``{layer}.A|B`` factors; metrics ``num-examples``, ``train-loss``, ``tokens``,
  ``seconds``, ``applied``; config ``partition-id``, ``rank``, ``error`` (empty when fine). Exactly these
  keys and records, checked before anything is materialised (``flora/wire_checks.py``).
* federated evaluation, after every round's aggregation (``client_eval_examples > 0``): an ``evaluate``
  message to every connected node, with the same arrays and config as a train message (it brings the node
  up to the new global model); the reply holds metrics ``eval-loss``, ``eval-tokens``, ``eval-examples``,
  ``applied`` and config ``partition-id``, ``error``, and no arrays. The round's line in ``metrics.jsonl``
  is written once these replies are in. The server's own evaluation (``test_loss``) runs in a thread while
  the nodes evaluate, so a round waits for the longer of the two, not their sum: ``eval_seconds`` is the
  server's evaluation, ``federated_eval_seconds`` the whole phase's wall time (which contains it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flora.codec import updates_to_tensors
from flora.config import RunConfig
from flora.rounds import ClientReply, EvalReply
from flora.runner import ResultsWriter, client_line, format_round, round_line
from flora.server import FederationServer, public_record, round_clients
from flora.wire_checks import ArrayMeta, ReplyView, decode_eval_reply, decode_reply

log = logging.getLogger("flora")


# --- strategy ----------------------------------------------------------------------------------

class FloraStrategy(FedAvg):
    """FedAvg's round loop with FLoRA's sampling, catch-up payloads and aggregation.

    Replies are decoded defensively by ``flora/wire_checks.py`` from the metadata of Flower's records
    (:func:`reply_view`); nothing a client sends can make this ServerApp raise.
    """

    def __init__(self, config: RunConfig, server: FederationServer, writer: ResultsWriter | None = None,
                 progress=print):
        super().__init__(fraction_train=config.sample_fraction, fraction_evaluate=0.0,
                         min_train_nodes=config.min_clients, min_available_nodes=config.min_clients)
        self.config = config
        self.server = server
        self.writer = writer
        self.progress = progress
        self._round_started = self._eval_started = 0.0
        self._bytes_down = self._eval_bytes = 0
        self._sent: list[Message] = []  # this phase's (train or evaluate) messages
        self._chosen: list[int] = []  # the nodes asked to train this round
        # the server's evaluation of a round whose nodes also evaluate: run while they do (one at a time)
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flora-server-eval")
        self._server_eval: Future | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Flower numbers this process's rounds from 1; a resumed run continues after its history.
        server_round = len(self.server.history) + 1
        self._round_started = time.perf_counter()
        node_ids = wait_for_nodes(grid, self.config.min_clients, self.config.min_clients_wait, server_round)
        if self.config.spec.pooled:
            node_ids = node_ids[:1]  # one client holds all the training data
        chosen = [node_ids[i] for i in round_clients(self.config, len(node_ids), server_round)]
        if not self.config.dp_enabled:  # with DP how many take part is an unprivatised statistic
            self.progress(round_line(server_round, self.config.rounds,
                                     f"{len(chosen)} of {len(node_ids)} connected nodes"))
        self._chosen = chosen  # federated evaluation asks the same nodes
        self._sent, self._bytes_down = self._messages(chosen, server_round, "train")
        return self._sent  # the Grid stamps their message ids when it pushes them

    def _messages(self, node_ids: Sequence[int], server_round: int, message_type: str) -> tuple[list[Message], int]:
        """A message to each node bringing it up to the global model (the history entries it lacks), and
        their payload bytes."""
        messages, size = [], 0
        for node_id in node_ids:
            node = str(node_id)
            first, updates = self.server.updates_for(node)
            rank = self.server.sent_rank(node)  # a bounded rank of an accepted reply, never a bare claim
            payload = ArrayRecord(torch_state_dict=updates_to_tensors(updates, first, rank))
            size += payload.count_bytes()
            meta = ConfigRecord({"flora-config": self.config.to_json(), "first-index": first,
                                 "num-updates": sum(u.span for u in updates), "server-round": server_round,
                                 "truncated-rank": rank or 0})
            messages.append(Message(content=RecordDict({"arrays": payload, "config": meta}), dst_node_id=node_id,
                                    message_type=message_type))
        return messages, size

    def _by_node(self, replies: Iterable[Message]) -> tuple[dict[str, list[Message]], list[str], list[Message]]:
        """Replies grouped by the node their message was sent to, the nodes that never answered, and replies
        to no message of this phase. An error reply made by the SuperLink (e.g. node unavailable) comes from the
        SuperLink's own id: every reply maps to its message's destination."""
        destination = {m.metadata.message_id: str(m.metadata.dst_node_id) for m in self._sent}
        by_node: dict[str, list[Message]] = {}
        unsolicited = []
        for message in replies:
            node = destination.get(message.metadata.reply_to_message_id)
            if node is None:
                unsolicited.append(message)
            else:
                by_node.setdefault(node, []).append(message)
        return by_node, sorted(set(destination.values()) - set(by_node)), unsolicited

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round = len(self.server.history) + 1
        parsed = self._screen(replies, lambda **rejected: ClientReply(factors=None, **rejected), self._decode,
                              self._failed)
        if not self.config.dp_enabled:  # with DP a client's loss is an unprivatised statistic
            for reply in parsed:
                if reply.rejection is None and reply.error is None:
                    self.progress(client_line(server_round, reply))
        nodes_evaluate = self.server.evaluates_clients(server_round)
        record = self.server.aggregate_round(server_round, parsed, self._bytes_down, self._round_started,
                                             evaluate=not nodes_evaluate)
        if nodes_evaluate:
            return ArrayRecord(), None  # the round's record is complete after aggregate_evaluate
        return ArrayRecord(), self._round_done(record)

    def _round_done(self, record: dict) -> MetricRecord:
        if self.writer is not None:
            self.writer.round_done(self.server)
        public = public_record(self.config, record)
        self.progress(format_round(public))
        return MetricRecord({k: float(v) for k, v in public.items() if isinstance(v, (int, float)) and v == v})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the round's global model on the held-out split of every node asked to train in
        it (the cost grows with the sampled nodes, not with the connected ones)."""
        if not self.server.evaluates_clients(len(self.server.history)):
            return []
        self._eval_started = time.perf_counter()
        self._sent, self._eval_bytes = self._messages(self._chosen, len(self.server.history), "evaluate")
        # the messages are built (they read the history); the model is the server's alone until the phase ends
        self._server_eval = self._evaluator.submit(self.server.evaluate_round)
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.server.evaluates_clients(len(self.server.history)):
            return None
        server_eval, self._server_eval = self._server_eval, None
        self.server.metrics[-1].update(server_eval.result())  # its error, if any, is raised here
        parsed = self._screen(replies, EvalReply, self._decode_eval, self._eval_failed)
        record = self.server.record_evaluation(len(self.server.history), parsed, self._eval_bytes,
                                               time.perf_counter() - self._eval_started)
        return self._round_done(record)

    def _screen(self, replies: Iterable[Message], rejected: Callable[..., ClientReply | EvalReply],
                decode: Callable[[str, Message], ClientReply | EvalReply],
                failed: Callable[[str, str], ClientReply | EvalReply]) -> list[ClientReply | EvalReply]:
        """A phase's replies (train or evaluate), one per node asked: ``decode(node, message)`` for a node's one
        reply; ``rejected(client=-1, node=..., rejection=...)`` for a reply to no message of this phase and for a
        node that answered more than once; ``failed(node, error)`` for a node that never answered."""
        by_node, silent, unsolicited = self._by_node(replies)
        parsed = [rejected(client=-1, node=str(m.metadata.src_node_id),
                           rejection="reply_to_message_id: expected a message sent this round") for m in unsolicited]
        for node, messages in by_node.items():
            parsed.append(decode(node, messages[0]) if len(messages) == 1 else
                          rejected(client=-1, node=node,
                                   rejection=f"replies = {len(messages)}: expected one reply per message"))
        parsed += [failed(node, f"no reply within round_timeout = {self.config.round_timeout:g} s") for node in silent]
        return parsed

    def _decode_eval(self, node: str, message: Message) -> EvalReply:
        if message.has_error():
            return self._eval_failed(node, f"{message.error.code}: {message.error.reason}"[:300])
        try:
            return decode_eval_reply(reply_view(message), node, self.server.eval_rules_for(node))
        except Exception as exc:  # noqa: BLE001 -- no reply may end the run
            log.exception("round %d: node %s: decoding its evaluation failed", len(self.server.history), node)
            return EvalReply(client=-1, node=node, rejection=f"undecodable reply ({type(exc).__name__})")

    def _eval_failed(self, node: str, error: str) -> EvalReply:
        return EvalReply(client=self.server.node_partition.get(node, -1), node=node, error=error,
                         applied=self.server.node_applied.get(node, 0))

    def _decode(self, node: str, message: Message) -> ClientReply:
        if message.has_error():
            error = message.error
            return self._failed(node, f"{error.code}: {error.reason}"[:300])
        try:
            return decode_reply(reply_view(message), node, self.server.rules_for(node))
        except Exception as exc:  # noqa: BLE001 -- the last line of defence: no reply may end the run
            log.exception("round %d: node %s: decoding its reply failed", len(self.server.history) + 1, node)
            return ClientReply(client=-1, node=node, factors=None,
                               rejection=f"undecodable reply ({type(exc).__name__}: {str(exc)[:200]})")

    def _failed(self, node: str, error: str) -> ClientReply:
        """A failure Flower reported for ``node`` (no client content: its partition as the server knows it)."""
        return ClientReply(client=self.server.node_partition.get(node, -1), node=node, factors=None, error=error,
                           applied=self.server.node_applied.get(node, 0))


class NotEnoughNodes(RuntimeError):
    """Fewer than ``min_clients`` nodes connected within ``min_clients_wait``."""


def wait_for_nodes(grid: Grid, min_clients: int, wait: float, server_round: int, poll: float = 1.0) -> list[int]:
    """The connected node ids once at least ``min_clients`` are connected; :class:`NotEnoughNodes` after
    ``wait`` seconds with fewer (Flower's own sampling would wait forever)."""
    deadline = time.monotonic() + wait
    logged = False
    while len(node_ids := sorted(grid.get_node_ids())) < min_clients:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotEnoughNodes(f"round {server_round}: {len(node_ids)} of min_clients = {min_clients} nodes "
                                 f"connected after waiting min_clients_wait = {wait:g} s; start more SuperNodes "
                                 f"or lower min_clients")
        if not logged:
            log.warning("round %d: %d of min_clients = %d nodes connected; waiting up to %g s", server_round,
                        len(node_ids), min_clients, wait)
            logged = True
        time.sleep(min(poll, left))
    return node_ids


def reply_view(message: Message) -> ReplyView:
    """What :func:`~flora.wire_checks.decode_reply` needs of a reply, nothing materialised: record kinds,
    config and metrics scalars, and each array's metadata with a reference to its bytes."""
    content = message.content
    records = {name: type(record).__name__ for name, record in content.items()}

    def scalars(name: str, kind: str) -> dict:
        return dict(content[name]) if records.get(name) == kind else {}

    arrays = {}
    if records.get("arrays") == "ArrayRecord":
        for key, array in content["arrays"].items():
            arrays[key] = ArrayMeta(dtype=getattr(array, "dtype", None), shape=getattr(array, "shape", None),
                                    stype=getattr(array, "stype", None), data=getattr(array, "data", None))
    return ReplyView(records=records, config=scalars("config", "ConfigRecord"),
                     metrics=scalars("metrics", "MetricRecord"), arrays=arrays)
