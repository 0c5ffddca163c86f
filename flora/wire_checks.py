"""Defensive decoding of a client's reply: every field is checked before anything is materialised.

The server trusts no client (DESIGN.md §2). The Flower skin (``strategy.py``) hands this module a
:class:`ReplyView` of a reply message: the names and kinds of its records, the scalars of its config
and metrics records, and for every array only Flower's metadata (dtype string, shape, serialisation
type) and a reference to the bytes Flower already holds. :func:`decode_reply` then checks, in this order
and failing on the first problem with a :class:`RejectedReply` that names the field, the value and
what was expected:

1. the records: exactly ``arrays`` (ArrayRecord), ``metrics`` (MetricRecord), ``config`` (ConfigRecord);
2. config and metrics: exactly the expected keys, each of its type (``int`` is never a ``bool`` or a
   ``float``, a float is finite) and range (:func:`check_reply_fields`): partition id, claimed rank (at
   most the node's configured rank and every layer's ``min(out, in)``), example count (the partition's
   known size where the server knows it), ``applied`` (exactly what the server's message brought the
   node to);
3. the arrays, from metadata only: exactly ``{layer}.A`` and ``{layer}.B`` for every adapted layer,
   the run's float dtype, ``numpy.ndarray`` serialisation, shapes ``(r, in)`` / ``(out, r)`` with
   ``1 <= r <=`` the claimed rank, and a byte length of at most a ``.npy`` header plus that shape;
4. only then each array is read: its ``.npy`` header must repeat the metadata (dtype, shape, C order)
   and the data must have exactly the promised length; the one allocation is a copy of that size.

A federated-evaluation reply (:func:`decode_eval_reply`) has exactly the records ``metrics`` and ``config``
(:data:`EVAL_METRIC_KEYS`, :data:`EVAL_CONFIG_KEYS`), no arrays, and :func:`check_eval_fields` bounds what it
claims: at most ``client_eval_examples`` examples, at most ``cutoff`` target tokens per example, a finite loss
>= 0 (ignored where it scored no tokens; the wire carries 0.0), ``applied`` exactly what the evaluation
message brought the node to.

Values (finiteness, norms in float64, the representable range) are checked on the tensors by
:func:`flora.lora.factors.check_update` in the server's screening, which every engine shares.
This module does not import ``flwr``: it works on plain values, and the tests drive it directly too.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from flora.rounds import ClientReply, EvalReply

RECORDS = {"arrays": "ArrayRecord", "metrics": "MetricRecord", "config": "ConfigRecord"}
CONFIG_KEYS = ("partition-id", "rank", "error")
METRIC_KEYS = ("num-examples", "train-loss", "tokens", "seconds", "applied")
EVAL_RECORDS = {"metrics": "MetricRecord", "config": "ConfigRecord"}
EVAL_CONFIG_KEYS = ("partition-id", "error")
EVAL_METRIC_KEYS = ("eval-loss", "eval-tokens", "eval-examples", "applied")
NUMPY_STYPE = "numpy.ndarray"  # Flower's serialisation type for np.save bytes
MAX_COUNT = 2 ** 53  # counts (examples, tokens) above this are not exact in float64: never a real value
MAX_ERROR_CHARS = 2000  # a client's error message is logged; longer ones are not a real error report
NPY_HEADER_MAX = 4096  # bytes of a .npy preamble (magic, version, header); np.save writes 128 for 2-D arrays


class RejectedReply(ValueError):
    """A reply the server does not use; ``str()`` names the field, the value and what was expected."""

    def __init__(self, field: str, value, expected: str, literal: bool = False):
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{field} = {value if literal else _short(value)}: expected {expected}")


def _short(value) -> str:
    """A bounded repr (a client may send a huge string or list: never copy all of it into a log line)."""
    if isinstance(value, (str, bytes)) and len(value) > 80:
        return repr(value[:77]) + "..."
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ArrayMeta:
    """What Flower's ``Array`` says about itself, and its bytes (a reference: nothing is copied)."""

    dtype: object  # claimed numpy dtype name, e.g. "float32" (type unchecked: it came from a client)
    shape: object  # claimed shape (a tuple of ints, if honest)
    stype: object  # serialisation type, "numpy.ndarray" for np.save bytes
    data: object  # the bytes Flower received


@dataclass(frozen=True)
class ReplyView:
    """A reply message as the skin sees it, nothing materialised: record name -> record kind, the config
    and metrics scalars, and the array metadata of the ``arrays`` record."""

    records: Mapping[str, str]
    config: Mapping[str, object]
    metrics: Mapping[str, object]
    arrays: Mapping[str, ArrayMeta]


@dataclass(frozen=True)
class ReplyRules:
    """What the server accepts from one node in one round."""

    layer_shapes: Mapping[str, tuple[int, int]]  # layer -> (out, in)
    dtypes: frozenset[str]  # numpy dtype names the run's factors travel in, e.g. {"float32"}
    num_partitions: int
    rank_bound: Callable[[int], int]  # partition -> the largest rank it may claim (configured, and layer dims)
    known_size: Callable[[int], int] | None  # partition -> its training examples; None: the server cannot know
    applied_end: int | None  # history entries the server's message brought the node to (None: nothing sent)


@dataclass(frozen=True)
class EvalRules:
    """What the server accepts from one node's federated-evaluation reply in one round."""

    num_partitions: int
    max_examples: int  # client_eval_examples: the most held-out examples a node scores
    max_tokens_per_example: int  # cutoff: no example has more target tokens
    applied_end: int | None  # history entries the evaluation message brought the node to (None: nothing sent)


def _checked_error_reply(reply: ClientReply | EvalReply, applied_end: int | None, num_partitions: int,
                         message: str) -> bool:
    """The checks every reply shares: it answers a message sent this round, and its partition id. An error
    reply only needs a possible ``applied`` (a restarted client holds fewer updates than it was sent, never
    more) and any int as partition (a misconfigured client reports its wrong one): True when it is one and
    passed; False for a successful reply with a valid partition (its other fields are the caller's)."""
    if applied_end is None:
        raise RejectedReply("node", reply.node, f"a node the server sent {message} to this round")
    if reply.error is not None:
        _in_range("config 'partition-id'", reply.client, -1, 2 ** 31, "a partition id (an int)")
        _in_range("metrics 'applied'", reply.applied, 0, applied_end,
                  f"at most {applied_end}, the round updates the server's message brought this node to")
        return True
    _in_range("config 'partition-id'", reply.client, 0, num_partitions - 1,
              f"the partition id of one of this run's {num_partitions} partitions")
    return False


def check_eval_fields(reply: EvalReply, rules: EvalRules) -> None:
    """Ranges of an evaluation reply's fields; :class:`RejectedReply` on the first violation (both engines)."""
    if _checked_error_reply(reply, rules.applied_end, rules.num_partitions, "an evaluation message"):
        return
    _in_range("metrics 'applied'", reply.applied, rules.applied_end, rules.applied_end,
              f"{rules.applied_end}, the round updates the server's message brought this node to")
    _in_range("metrics 'eval-examples'", reply.examples, 0, rules.max_examples,
              f"an example count in 0..{rules.max_examples} (client_eval_examples)")
    most = reply.examples * rules.max_tokens_per_example
    _in_range("metrics 'eval-tokens'", reply.tokens, 1 if reply.examples else 0, most,
              f"a token count in {1 if reply.examples else 0}..{most} (eval-examples x cutoff)")
    if not isinstance(reply.loss, float) or (reply.tokens and not (math.isfinite(reply.loss) and reply.loss >= 0)):
        raise RejectedReply("metrics 'eval-loss'", reply.loss, "a finite float >= 0 (any float with 0 eval-tokens)")


# --- typed fields (both engines) -----------------------------------------------------------------

def check_reply_fields(reply: ClientReply, rules: ReplyRules) -> None:
    """Ranges of a reply's typed fields; :class:`RejectedReply` on the first violation.

    Shared by every engine (``screen`` calls it for in-process replies too). An error reply only needs a
    valid partition and a possible ``applied`` (a restarted client holds fewer updates than it was sent,
    never more); a successful one must hold exactly what it was sent.
    """
    if _checked_error_reply(reply, rules.applied_end, rules.num_partitions, "a message"):
        return
    bound = rules.rank_bound(reply.client)
    _in_range("config 'rank'", reply.rank, 1, bound, f"1..{bound} (the partition's configured rank and layer sizes)")
    _in_range("metrics 'applied'", reply.applied, rules.applied_end, rules.applied_end,
              f"{rules.applied_end}, the round updates the server's message brought this node to")
    if rules.known_size is not None:
        size = rules.known_size(reply.client)
        if reply.num_examples != size:
            raise RejectedReply("metrics 'num-examples'", reply.num_examples,
                                f"{size}, the training examples of partition {reply.client}")
    _in_range("metrics 'num-examples'", reply.num_examples, 1, MAX_COUNT, f"an example count in 1..2**53")
    _in_range("metrics 'tokens'", reply.tokens, 0, MAX_COUNT, "a token count in 0..2**53")
    for name, value in (("metrics 'train-loss'", reply.train_loss), ("metrics 'seconds'", reply.seconds)):
        if not (isinstance(value, float) and math.isfinite(value) and value >= 0):
            raise RejectedReply(name, value, "a finite float >= 0")


def _in_range(field: str, value, low: int, high: int, expected: str) -> None:
    if not (_is_int(value) and low <= value <= high):
        raise RejectedReply(field, value, expected)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- the wire --------------------------------------------------------------------------------------

def decode_reply(view: ReplyView, node: str, rules: ReplyRules) -> ClientReply:
    """The :class:`ClientReply` of a reply message; a rejected one carries the reason in ``rejection`` (the
    module docstring lists the checks). Allocates nothing before every check on metadata passed, and then
    only the factors' own size."""
    try:
        return _decode(view, node, rules)
    except RejectedReply as exc:
        claimed = view.config.get("partition-id") if isinstance(view.config, Mapping) else None
        client = claimed if _is_int(claimed) and 0 <= claimed < rules.num_partitions else -1
        return ClientReply(client=client, node=node, factors=None, rejection=str(exc))


def _decode(view: ReplyView, node: str, rules: ReplyRules) -> ClientReply:
    _expect_keys("records", view.records, tuple(RECORDS))
    for name, kind in RECORDS.items():
        if view.records[name] != kind:
            raise RejectedReply(f"record {name!r}", view.records[name], f"a {kind}")
    config, metrics = view.config, view.metrics
    _expect_keys("config record", config, CONFIG_KEYS)
    _expect_keys("metrics record", metrics, METRIC_KEYS)
    error = config["error"]
    if not isinstance(error, str) or len(error) > MAX_ERROR_CHARS:
        raise RejectedReply("config 'error'", error, f"a string of at most {MAX_ERROR_CHARS} characters ('' = fine)")
    reply = ClientReply(client=config["partition-id"], node=node, factors=None, error=error or None,
                        num_examples=metrics["num-examples"], train_loss=_float(metrics["train-loss"]),
                        tokens=metrics["tokens"], seconds=_float(metrics["seconds"]), applied=metrics["applied"],
                        rank=config["rank"])
    check_reply_fields(reply, rules)
    if reply.error is not None:
        if view.arrays:
            raise RejectedReply("arrays", sorted(view.arrays)[:3], "no arrays in an error reply")
        return reply
    shapes = check_array_metas(view.arrays, rules.layer_shapes, rules.dtypes, reply.rank)
    tensors = {key: tensor_from_npy(key, view.arrays[key], shape) for key, shape in shapes.items()}
    reply.factors = {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in rules.layer_shapes}
    return reply


def decode_eval_reply(view: ReplyView, node: str, rules: EvalRules) -> EvalReply:
    """The :class:`EvalReply` of a federated-evaluation reply; a rejected one carries the reason in ``rejection``."""
    try:
        _expect_keys("records", view.records, tuple(EVAL_RECORDS))
        for name, kind in EVAL_RECORDS.items():
            if view.records[name] != kind:
                raise RejectedReply(f"record {name!r}", view.records[name], f"a {kind}")
        _expect_keys("config record", view.config, EVAL_CONFIG_KEYS)
        _expect_keys("metrics record", view.metrics, EVAL_METRIC_KEYS)
        error = view.config["error"]
        if not isinstance(error, str) or len(error) > MAX_ERROR_CHARS:
            raise RejectedReply("config 'error'", error, f"a string of at most {MAX_ERROR_CHARS} characters ('' = fine)")
        metrics = view.metrics
        reply = EvalReply(client=view.config["partition-id"], node=node, loss=_float(metrics["eval-loss"]),
                          tokens=metrics["eval-tokens"], examples=metrics["eval-examples"], applied=metrics["applied"],
                          error=error or None)
        check_eval_fields(reply, rules)
        if reply.error is None and not reply.tokens:
            reply.loss = math.nan  # nothing scored: 0.0 on the wire
        return reply
    except RejectedReply as exc:
        claimed = view.config.get("partition-id") if isinstance(view.config, Mapping) else None
        client = claimed if _is_int(claimed) and 0 <= claimed < rules.num_partitions else -1
        return EvalReply(client=client, node=node, rejection=str(exc))


def _float(value):
    """An int metric (MetricRecord keeps ``3`` as an int) as the float it stands for; anything else as is."""
    return float(value) if _is_int(value) else value


def _expect_keys(what: str, mapping: Mapping, expected: tuple[str, ...]) -> None:
    keys = set(mapping)
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys)[:5], sorted(str(k)[:60] for k in keys - set(expected))[:5]
        shown = list(expected) if len(expected) <= 5 else f"{{layer}}.A and {{layer}}.B of {len(expected) // 2} layers"
        raise RejectedReply(what, f"missing {missing}, unexpected {extra}", f"exactly the keys {shown}", literal=True)


def check_array_metas(arrays: Mapping[str, ArrayMeta], layer_shapes: Mapping[str, tuple[int, int]],
                      dtypes: frozenset[str], max_rank: int) -> dict[str, tuple[int, int]]:
    """Check the arrays' keys and metadata against the layers; returns each key's checked 2-D shape.

    Keys must be exactly ``{layer}.A`` and ``{layer}.B`` of every layer; ``A (r, in)``, ``B (out, r)`` with
    ``1 <= r <= max_rank``, one dtype of ``dtypes`` for all, and no more bytes than a ``.npy`` of that shape.
    """
    expected = [f"{name}.{part}" for name in layer_shapes for part in "AB"]
    _expect_keys("arrays", arrays, tuple(expected))
    shapes: dict[str, tuple[int, int]] = {}
    seen_dtypes = set()
    for name, (out_dim, in_dim) in layer_shapes.items():
        a_key, b_key = f"{name}.A", f"{name}.B"
        A, B = _meta_shape(a_key, arrays[a_key]), _meta_shape(b_key, arrays[b_key])
        rank = A[0]
        _in_range(f"array {a_key!r} rank (rows)", rank, 1, max_rank,
                  f"1..{max_rank} (the rank the reply claims, bounded by the node's configured rank)")
        if A != (rank, in_dim) or B != (out_dim, rank):
            raise RejectedReply(f"arrays {name!r} shapes", f"A{A} B{B}", f"A({rank}, {in_dim}) B({out_dim}, {rank})")
        for key, shape in ((a_key, A), (b_key, B)):
            meta = arrays[key]
            if meta.stype != NUMPY_STYPE:
                raise RejectedReply(f"array {key!r} stype", meta.stype, repr(NUMPY_STYPE))
            if not isinstance(meta.dtype, str) or meta.dtype not in dtypes:
                raise RejectedReply(f"array {key!r} dtype", meta.dtype, f"one of the run's dtypes {sorted(dtypes)}")
            seen_dtypes.add(meta.dtype)
            limit = NPY_HEADER_MAX + shape[0] * shape[1] * np.dtype(meta.dtype).itemsize
            if not isinstance(meta.data, bytes) or len(meta.data) > limit:
                size = len(meta.data) if isinstance(meta.data, bytes) else type(meta.data).__name__
                raise RejectedReply(f"array {key!r} bytes", size, f"at most {limit} (a .npy of shape {shape})")
            shapes[key] = shape
    if len(seen_dtypes) > 1:
        raise RejectedReply("arrays dtype", sorted(seen_dtypes), "one dtype for every factor")
    return shapes


def _meta_shape(key: str, meta: ArrayMeta) -> tuple[int, int]:
    shape = meta.shape
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(_is_int(d) and d >= 1 for d in shape)):
        raise RejectedReply(f"array {key!r} shape", shape, "two positive integers")
    return int(shape[0]), int(shape[1])


def tensor_from_npy(key: str, meta: ArrayMeta, shape: tuple[int, int]) -> torch.Tensor:
    """The tensor in ``meta.data`` (``.npy`` bytes, never unpickled) after checking its header repeats the
    checked metadata and its length is exact; one copy of the array's own size."""
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    preamble = io.BytesIO(meta.data[:NPY_HEADER_MAX])
    try:
        version = np.lib.format.read_magic(preamble)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header_shape, fortran, header_dtype = read_header(preamble, max_header_size=NPY_HEADER_MAX)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise RejectedReply(f"array {key!r} data", f"{len(meta.data)} bytes", f"a .npy file ({exc})") from None
    if tuple(header_shape) != shape or fortran or header_dtype != dtype:
        raise RejectedReply(f"array {key!r} .npy header", f"shape {header_shape}, dtype {header_dtype}, "
                            f"fortran_order {fortran}", f"shape {shape}, dtype {dtype}, C order (as its metadata)")
    offset = preamble.tell()
    count = shape[0] * shape[1]
    if len(meta.data) != offset + count * dtype.itemsize:
        raise RejectedReply(f"array {key!r} bytes", len(meta.data), f"{offset + count * dtype.itemsize} "
                            f"(header + {count} values of {dtype})")
    values = np.frombuffer(meta.data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))
