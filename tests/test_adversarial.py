"""A server no client can break: malformed and malicious replies, through Flower and in memory.

The hostile ClientApp (``flora/adversary.py``) forges one reply kind per attacker and round from a reply
the server would accept; every kind must be rejected with its reason logged next to the node, the round
must finish with the honest clients, and each round's global update must equal the aggregate of the
honest replies alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from flwr.app import Message, Metadata
from safetensors import safe_open
from safetensors.torch import load_file

from flora.adversary import KINDS, Situation, forge, record_dir, schedule, valid_reply
from flora.checkpoint import read_checkpoint
from flora.rounds import dense
from flora.runner import server_for
from flora.strategy import reply_view
from flora.wire_checks import decode_reply
from test_federation import tiny_config

HONEST, ATTACKERS = 2, 4


def hostile_config(assets_dir, tmp_path, **overrides):
    values = dict(num_clients=HONEST + ATTACKERS, ranks=[4, 2, 2, 2, 2, 2], rounds=len(schedule(ATTACKERS)),
                  local_steps=1, batch_size=2, micro_batch_size=2, cutoff=32, eval_examples=4, client_eval_examples=0,
                  max_update_norm=1.0)
    values.update(overrides)
    return tiny_config(assets_dir, tmp_path, **values)


def test_schedule_covers_every_kind_and_pairs_the_shared_partition():
    rounds = schedule(ATTACKERS)
    flat = [kind for kinds in rounds for kind in kinds]
    assert len(KINDS) >= 25 and set(flat) == set(KINDS)
    pair = [r for r, kinds in enumerate(rounds) if "one partition claimed twice (first)" in kinds]
    assert pair and "one partition claimed twice (second)" in rounds[pair[0]]
    stolen = [r for r, kinds in enumerate(rounds) if "partition of an honest node" in kinds]
    assert stolen[0] >= 1  # round 2 or later: the honest partitions are bound by then


def _situation(server, partition: int, round_: int, applied_end: int) -> Situation:
    config = server.config
    return Situation(config=config, partition=partition, round=round_, applied_end=applied_end,
                     layer_shapes=server.assets.layer_shapes,
                     sizes={k: server.known_size(k) if server.known_partitions else 12  # a deployment: any claim
                            for k in range(config.num_partitions)})


def _decoded(server, node: str, content) -> object:
    server.updates_for(node)  # what this round's message to the node said
    metadata = Metadata(run_id=1, message_id="", src_node_id=2, dst_node_id=1, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return decode_reply(reply_view(Message(metadata=metadata, content=content)), node, server.rules_for(node))


def test_every_hostile_kind_is_rejected_when_decoded_from_flower_records(assets_dir, tmp_path, caplog, runtime):
    """Each kind, as Flower records, through the skin's view, the decoder and the screening (no training)."""
    config = hostile_config(assets_dir, tmp_path)
    server = server_for(config, runtime)
    honest = [_decoded(server, f"node-{k}", valid_reply(_situation(server, k, 1, 0)).content()) for k in range(HONEST)]
    record = server.aggregate_round(1, honest, 0, 0.0)  # binds partitions 0 and 1 to their nodes
    assert (record["clients_ok"], record["clients_rejected"]) == (HONEST, 0)
    attacker = HONEST
    for kind, (_, fragment) in KINDS.items():
        caplog.clear()
        nodes = [f"evil-{kind}"] + ([f"evil-{kind}-twin"] if "claimed twice" in kind else [])
        replies = [_decoded(server, node, forge(kind, _situation(server, attacker, 2, len(server.history))))
                   for node in nodes]
        screening = server.screen(2, replies)
        assert not screening.accepted and len(screening.rejected) == len(nodes), kind
        line = next((x for x in caplog.text.splitlines() if f"(node {nodes[0]})" in x), "")
        assert "round 2: rejected update: client" in line and fragment in line, (kind, caplog.text)
    # control: the unmodified forged reply is accepted, so each rejection above is its one change's doing
    control = _decoded(server, "evil-control", valid_reply(_situation(server, attacker, 2, len(server.history))).content())
    assert control.rejection is None and len(server.screen(2, [control]).accepted) == 1


def test_rank_claims_never_size_anything(assets_dir, tmp_path, runtime):
    """zeropad truncates (pads) each node's adapter to its rank: a rejected 10^7 claim is never used."""
    config = hostile_config(assets_dir, tmp_path, method="zeropad")
    server = server_for(config, runtime)
    situation = _situation(server, 0, 1, 0)
    claim = _decoded(server, "node-0", forge("rank 10^7", situation))
    honest = _decoded(server, "node-1", valid_reply(_situation(server, 1, 1, 0)).content())
    server.aggregate_round(1, [claim, honest], 0, 0.0)
    assert server.sent_rank("node-0") is None and server.sent_rank("node-1") == 2
    A, B = next(iter(server.history[-1].adapter.values()))
    assert A.shape[0] == 2  # padded to the largest accepted rank only


def test_applied_zero_on_success_is_rejected_not_a_full_resend(assets_dir, tmp_path, runtime):
    config = hostile_config(assets_dir, tmp_path)
    server = server_for(config, runtime)
    for round_ in (1, 2, 3):
        replies = [_decoded(server, f"node-{k}", valid_reply(_situation(server, k, round_, len(server.history))).content())
                   for k in range(HONEST)]
        server.aggregate_round(round_, replies, 0, 0.0)
    assert server.updates_for("node-0")[0] == 2  # it holds rounds 1-2 (round 3's update is new)
    liar = _decoded(server, "node-0", forge("applied 0 (full-history resend)", _situation(server, 0, 4, 3)))
    record = server.aggregate_round(4, [liar], 0, 0.0)
    assert record["clients_rejected"] == 1
    first, updates = server.updates_for("node-0")
    assert first == 2 and len(updates) == 2  # what it was last known to lack, not the whole history


def test_weights_known_sizes_uniform_when_unverifiable_and_capped(assets_dir, tmp_path, runtime):
    from flora.lora.factors import cap_weights

    assert cap_weights([1e18, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])
    assert cap_weights([3, 1], 0.9) == pytest.approx([0.75, 0.25])
    assert cap_weights([5, 1, 1], 0.2) == pytest.approx([1 / 3] * 3)  # infeasible cap: uniform
    config = hostile_config(assets_dir, tmp_path, num_clients=3, ranks=[2], partition="quantity")

    def weights(known: bool, **overrides) -> list[float]:
        server = server_for(dataclasses.replace(config, **overrides), runtime, known_partitions=known)
        replies = []
        for k in range(3):
            reply = _decoded(server, f"node-{k}", valid_reply(_situation(server, k, 1, 0)).content())
            if k == 2 and not known:
                reply.num_examples = 10 ** 15  # a deployment cannot check this claim
            replies.append(reply)
        record = server.aggregate_round(1, replies, 0, 0.0)
        assert record["clients_ok"] == 3
        return [record["client_weights"][str(k)] for k in range(3)]

    sizes = [server_for(config, runtime).known_size(k) for k in range(3)]
    assert weights(True) == pytest.approx([n / sum(sizes) for n in sizes])
    assert weights(False) == pytest.approx([1 / 3] * 3)  # claims unverifiable: uniform by default
    capped = weights(False, max_client_weight=0.5)
    assert capped[2] == pytest.approx(0.5) and max(capped) <= 0.5 + 1e-12


def test_check_update_refuses_complex_integer_and_overflowing_factors():
    from flora.lora.factors import InvalidUpdateError, check_update

    shapes = {"l": (4, 6)}
    good = (torch.randn(2, 6), torch.randn(4, 2))
    check_update({"l": good}, layer_shapes=shapes, dtypes={torch.float32})
    for bad, reason in [((good[0].to(torch.complex64), good[1].to(torch.complex64)), "dtype torch.complex64"),
                        ((good[0].long(), good[1].long()), "dtype torch.int64"),
                        ((good[0].double(), good[1].double()), "dtype torch.float64"),
                        ((good[0] * 1e20, good[1]), "would overflow")]:
        with pytest.raises(InvalidUpdateError, match=reason):
            check_update({"l": bad}, layer_shapes=shapes, dtypes={torch.float32})
    with pytest.raises(InvalidUpdateError, match="exceeds the client's rank 1"):
        check_update({"l": good}, layer_shapes=shapes, max_rank=1)


def test_non_finite_aggregate_never_touches_the_global_model(assets_dir, tmp_path, runtime, caplog, monkeypatch):
    from flora.lora import methods

    config = hostile_config(assets_dir, tmp_path, num_clients=2, ranks=[2])
    server = server_for(config, runtime)
    before = {k: v.clone() for k, v in server.state.model.state_dict().items()}
    replies = [_decoded(server, f"node-{k}", valid_reply(_situation(server, k, 1, 0)).content()) for k in range(2)]
    spec = methods.METHODS["flora"]

    def overflowing(updates, weights):
        result = spec.aggregate(updates, weights)
        name = next(iter(result.global_factors))
        A, B = result.global_factors[name]
        result.global_factors[name] = (A, B * math.inf)
        return result

    monkeypatch.setitem(methods._REGISTRY, "flora", dataclasses.replace(spec, aggregate=overflowing))
    record = server.aggregate_round(1, replies, 0, 0.0)
    assert record["clients_ok"] == 2 and "is not finite; global model unchanged" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in server.state.model.state_dict().items())


@pytest.mark.slow
def test_hostile_clients_through_a_flower_simulation(assets_dir, tmp_path):
    """2 honest SuperNodes and 4 hostile ones for 12 rounds: every kind of :data:`KINDS` once through
    Flower's real message path (ClientApp → Ray → SuperLink state → ServerApp)."""
    from flora.adversary import EVAL_KINDS
    from flora.simulation import run_flower_simulation

    config = hostile_config(assets_dir, tmp_path, client_eval_examples=2)
    assert HONEST == 2  # flora.adversary:hostile_app's
    run_flower_simulation(config, progress=lambda _: None, client_app="flora.adversary:hostile_app")
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == list(range(1, config.rounds + 1))  # the server survived every round
    assert [(m["clients_ok"], m["clients_rejected"], m["clients_failed"]) for m in lines] == \
        [(HONEST, ATTACKERS, 0)] * config.rounds
    records = record_dir(config)
    seen = set()
    log_lines = (out / "flower.log").read_text().splitlines()  # the server ran in Flower's simulation process
    for path in sorted(records.glob("eval-*.json")):  # federated evaluation: every forged kind rejected
        entry = json.loads(path.read_text())
        round_ = int(re.match(r"eval-round(\d+)", path.name).group(1))
        matching = [x for x in log_lines if f"round {round_}: rejected evaluation:" in x and f"(node {entry['node']})" in x]
        assert matching and EVAL_KINDS[entry["kind"]][1] in matching[0], (entry, matching)
        seen.add(entry["kind"])
    assert seen == set(EVAL_KINDS)
    assert all(set(m["client_test_losses"]) == {str(k) for k in range(HONEST)} for m in lines)
    seen = set()
    for path in sorted(records.glob("round*.json")):
        entry = json.loads(path.read_text())
        round_ = int(re.match(r"round(\d+)", path.name).group(1))
        fragment = KINDS[entry["kind"]][1]
        matching = [x for x in log_lines if f"round {round_}: rejected update:" in x and f"(node {entry['node']})" in x]
        assert matching and fragment in matching[0], (entry, matching)
        seen.add(entry["kind"])
    assert seen == set(KINDS)
    # every round's global update is the honest-only aggregate
    checkpoint = read_checkpoint(out)
    for round_, update in enumerate(checkpoint.updates, start=1):
        honest = []
        for k in range(HONEST):
            path = records / f"round{round_}-partition{k}.safetensors"
            tensors = load_file(path)
            with safe_open(path, framework="pt") as handle:
                size = int(handle.metadata()["num_examples"])
            honest.append(({name[:-2]: (tensors[name], tensors[name[:-2] + ".B"]) for name in tensors
                            if name.endswith(".A")}, size))
        total = sum(n for _, n in honest)
        err_sq = ref_sq = 0.0
        for name, merge in update.merge.items():
            reference = sum((n / total) * (f[name][1].double() @ f[name][0].double()) for f, n in honest)
            err_sq += float((dense(merge).double() - reference).square().sum())
            ref_sq += float(reference.square().sum())
        assert math.sqrt(err_sq / ref_sq) <= 1e-6, round_


def strategy_messages(flower, round_: int, nodes=(11, 12, 13, 14)) -> list[Message]:
    """What ``flower`` (a FloraStrategy) sends in a round to ``nodes``, with the ids a Grid would stamp."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as run_simulation sets them

    class Grid:
        def get_node_ids(self):
            return list(nodes)

    sent = list(flower.configure_train(round_, ArrayRecord(), ConfigRecord(), Grid()))
    for k, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"round{round_}-message{k}"
    return sent


def answer(server, message: Message, partition: int) -> Message:
    """A valid reply of ``partition`` to ``message`` (what an honest client's reply looks like to the server)."""
    situation = _situation(server, partition, 1, server.sent[str(message.metadata.dst_node_id)])
    return Message(content=valid_reply(situation).content(), reply_to=message)


def test_strategy_rejects_duplicate_and_unsolicited_replies_and_survives_its_own_decoder(
        assets_dir, tmp_path, runtime, monkeypatch, caplog):
    """The skin's mapping of replies to nodes: two replies to one message, a reply to a message this round did
    not send, silence, and a decoder that raises (a last-resort catch): none of them ends the round."""
    from flora import strategy as skin

    config = hostile_config(assets_dir, tmp_path, num_clients=4, ranks=[2])
    server = server_for(config, runtime)
    flower = skin.FloraStrategy(config, server, progress=lambda _: None)
    sent = strategy_messages(flower, 1)
    stranger = Message(metadata=Metadata(run_id=1, message_id="never-sent", src_node_id=0, dst_node_id=13,
                                         reply_to_message_id="", group_id="", created_at=sent[0].metadata.created_at,
                                         ttl=3600.0, message_type="train"), content=sent[0].content)
    replies = [answer(server, sent[0], 0), answer(server, sent[1], 1), answer(server, sent[1], 1),
               answer(server, stranger, 2)]
    _, metrics = flower.aggregate_train(1, replies)
    assert (metrics["clients_ok"], metrics["clients_rejected"], metrics["clients_failed"]) == (1, 2, 2)
    assert "(node 12): replies = 2: expected one reply per message" in caplog.text
    assert "reply_to_message_id: expected a message sent this round" in caplog.text
    assert "client ? (node 14) failed: no reply within round_timeout" in caplog.text

    real_view = skin.reply_view

    def buggy(message):
        if message.metadata.src_node_id == 12:
            raise KeyError("a decoder bug")
        return real_view(message)

    monkeypatch.setattr(skin, "reply_view", buggy)
    sent = strategy_messages(flower, 2)
    _, metrics = flower.aggregate_train(2, [answer(server, m, k) for k, m in enumerate(sent)])
    assert (metrics["clients_ok"], metrics["clients_rejected"]) == (3, 1)
    assert "(node 12): undecodable reply (KeyError: 'a decoder bug')" in caplog.text


def test_a_clients_error_text_cannot_forge_log_lines():
    from flora.server import printable

    assert printable("boom\nround 3: rejected update: client 0") == "boom\\nround 3: rejected update: client 0"
    assert printable("\x1b[2Jcleared") == "\\x1b[2Jcleared"


def _decoded_eval(server, node: str, content):
    from flora.wire_checks import decode_eval_reply

    metadata = Metadata(run_id=1, message_id="", src_node_id=2, dst_node_id=1, reply_to_message_id="m",
                        group_id="", created_at=0.0, ttl=60.0, message_type="evaluate")
    return decode_eval_reply(reply_view(Message(metadata=metadata, content=content)), node, server.eval_rules_for(node))


def test_every_hostile_evaluation_kind_is_rejected_and_only_honest_losses_count(assets_dir, tmp_path, caplog, runtime):
    """Federated evaluation replies as Flower records: every kind of :data:`EVAL_KINDS` is rejected with its
    reason, and ``client_test_loss`` is the token-weighted mean of the honest replies alone."""
    from flora.adversary import EVAL_KINDS, forge_eval, valid_eval_reply

    config = hostile_config(assets_dir, tmp_path, client_eval_examples=4)
    server = server_for(config, runtime)
    honest = [_decoded(server, f"node-{k}", valid_reply(_situation(server, k, 1, 0)).content()) for k in range(HONEST)]
    server.aggregate_round(1, honest, 0, 0.0)  # binds partitions 0 and 1 to their nodes
    nodes = [f"node-{k}" for k in range(HONEST)] + [f"evil-{kind}" for kind in EVAL_KINDS]
    for node in nodes:
        server.updates_for(node)  # the evaluation message to each node
    end = len(server.history)
    replies = []
    for k, (tokens, loss) in enumerate([(10, 2.0), (30, 1.0)]):
        forged = valid_eval_reply(_situation(server, k, 1, end))
        forged.metrics.update({"eval-tokens": tokens, "eval-loss": loss})
        replies.append(_decoded_eval(server, f"node-{k}", forged.content()))
    for kind in EVAL_KINDS:
        replies.append(_decoded_eval(server, f"evil-{kind}", forge_eval(kind, _situation(server, HONEST, 1, end))))
    caplog.clear()
    record = server.record_evaluation(1, replies)
    for kind, (_, fragment) in EVAL_KINDS.items():
        line = next((x for x in caplog.text.splitlines() if f"(node evil-{kind})" in x), "")
        assert "round 1: rejected evaluation: client" in line and fragment in line, (kind, caplog.text)
    assert record["client_test_losses"] == {"0": 2.0, "1": 1.0}
    assert record["client_test_tokens"] == {"0": 10, "1": 30}
    assert record["client_test_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    # control: the unmodified forged evaluation of an attacker's own partition is accepted
    server.updates_for("evil-control")
    control = _decoded_eval(server, "evil-control", valid_eval_reply(_situation(server, HONEST, 1, end)).content())
    assert control.rejection is None and server.record_evaluation(1, [control])["client_test_losses"] == {str(HONEST): 2.0}
