"""Checkpoints written after every round, so that ``--resume`` continues a stopped run exactly.

Layout (``OUT/checkpoint/``)::

    state.json                  format, rounds done, the run config, every round's metrics, torch RNG state
    rounds/00001.safetensors    round 1's update (the global weights delta of that round: merge factors or
    rounds/00002.safetensors    dense deltas, the global adapter, standalone adapters; see RoundUpdate)

The global model after round ``t`` is the base model plus rounds ``1..t`` applied in order, so the
round files are the global weights delta; each round writes only its own file (no rewriting of a
growing blob), then ``state.json`` is replaced atomically. Each file is fsynced before its rename and its
directory after it, so ``state.json`` never names a round file that is not on disk. A crash while writing
leaves the previous checkpoint valid: a round file beyond ``state.json``'s count is ignored and overwritten.
A fresh run replaces an earlier checkpoint only if the directory holds nothing but these files
(:func:`remove_checkpoint`).

All randomness of a round (client sampling, adapter initialisation, batch order, dropout) is seeded
from ``(seed, round, client)``, so a resumed run draws exactly what the uninterrupted run drew; the
process-wide torch RNG state is stored and restored as well.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from flora.codec import update_from_tensors, update_to_tensors
from flora.config import RunConfig
from flora.rounds import GlobalState, RoundUpdate

FORMAT_VERSION = 1
# Keys that may change between a stopped run and its resumption; any other change is refused.
RESUMABLE_CHANGES = ("rounds", "threads", "out_dir", "client_cpus", "client_gpus", "min_clients_wait", "report_to")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or belongs to a different config; names the file."""


@dataclass
class Checkpoint:
    rounds_done: int
    updates: list[RoundUpdate]
    metrics: list[dict]
    config: dict


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoint"


def save_round(out_dir: str | Path, config: RunConfig, updates: list[RoundUpdate], metrics: list[dict]) -> None:
    """Persist the latest round: its update file, then ``state.json`` (atomic replace)."""
    root = checkpoint_dir(out_dir)
    (root / "rounds").mkdir(parents=True, exist_ok=True)
    index = len(updates)
    update = updates[-1]
    metadata = {"round": str(update.round), "truncate": str(int(update.truncate)), "forms": json.dumps(update.forms)}
    round_path = root / "rounds" / f"{index:05d}.safetensors"
    _atomic(round_path, lambda tmp: save_file(update_to_tensors(update), tmp, metadata=metadata))
    state = {"format": FORMAT_VERSION, "rounds_done": index, "config": config.to_dict(),
             "metrics": [record_to_json(m) for m in metrics], "torch_rng": torch.get_rng_state().numpy().tobytes().hex()}
    _atomic(root / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1)))


def load_checkpoint(out_dir: str | Path, config: RunConfig) -> Checkpoint:
    """Read the checkpoint in ``out_dir``, check it belongs to ``config``, restore the torch RNG state."""
    checkpoint, rng = _read(out_dir, expected=config)
    torch.set_rng_state(rng)
    return checkpoint


def read_checkpoint(out_dir: str | Path) -> Checkpoint:
    """The checkpoint in ``out_dir`` as it is (for evaluation); :class:`CheckpointError` if unusable."""
    return _read(out_dir, expected=None)[0]


def _read(out_dir: str | Path, expected: RunConfig | None) -> tuple[Checkpoint, torch.Tensor]:
    root = checkpoint_dir(out_dir)
    state_path = root / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: no checkpoint (run `flora run` with out_dir={out_dir} first, "
                              f"or without --resume to start fresh)")
    try:
        state = json.loads(state_path.read_text())
        rounds_done, saved_config, metrics = int(state["rounds_done"]), state["config"], state["metrics"]
        rng = bytes.fromhex(state["torch_rng"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable checkpoint state ({exc})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{state_path}: malformed checkpoint state (missing or bad field {exc})") from exc
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
    if expected is not None:
        _check_same_run(state_path, saved_config, expected.to_dict(), rounds_done)
    updates = []
    for index in range(1, rounds_done + 1):
        path = root / "rounds" / f"{index:05d}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing round file ({state_path} records {rounds_done} rounds)")
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable round file ({exc})") from exc
        updates.append(update_from_tensors(tensors, round_=int(metadata.get("round", index)),
                                           truncate=metadata.get("truncate") == "1",
                                           forms=json.loads(metadata.get("forms", "{}"))))
    metrics = [record_from_json(m) for m in metrics]
    checkpoint = Checkpoint(rounds_done=rounds_done, updates=updates, metrics=metrics, config=saved_config)
    return checkpoint, torch.frombuffer(bytearray(rng), dtype=torch.uint8)


def load_run_model(out_dir: str | Path, client: int = 0, rounds: int | None = None):
    """The global model of a run after its last checkpointed round (or after round ``rounds``): base
    weights + every round's merge + the final global adapter merged in (standalone: client ``client``'s
    own adapter).

    Returns ``(LoadedModel, RunConfig, Checkpoint)``.
    """
    from flora.models.loader import load_model
    from flora.modeling import merge_update

    checkpoint = read_checkpoint(out_dir)
    check_round(out_dir, checkpoint, rounds)
    config = RunConfig.from_dict(RunConfig.recorded(checkpoint.config), f"{checkpoint_dir(out_dir) / 'state.json'}")
    loaded = load_model(config.model)
    state = GlobalState(loaded.model)
    state.apply(checkpoint.updates[:rounds], 0)
    per_client = config.spec.per_client_models
    adapter = state.adapter_of(client, per_client)
    if per_client and adapter is None:
        raise CheckpointError(f"{out_dir}: {config.method} run has no adapter for client {client} "
                              f"(clients: {sorted(state.client_adapters)})")
    if adapter:
        merge_update(loaded.model, {name: B @ A for name, (A, B) in adapter.items()})
    return loaded, config, checkpoint


def check_round(out_dir: str | Path, checkpoint: Checkpoint, rounds: int | None) -> None:
    """:class:`CheckpointError` unless ``rounds`` is None (the last) or a round the checkpoint holds."""
    if rounds is not None and not 1 <= rounds <= checkpoint.rounds_done:
        raise CheckpointError(f"{checkpoint_dir(out_dir) / 'state.json'}: no round {rounds}; the checkpoint holds "
                              f"rounds 1..{checkpoint.rounds_done}")


def _check_same_run(path: Path, saved: dict, current: dict, rounds_done: int) -> None:
    saved = RunConfig.recorded(saved)  # keys added since the checkpoint was written
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CheckpointError(f"{path}: the config differs from the checkpoint's ({details}); only "
                              f"{', '.join(RESUMABLE_CHANGES)} may change on --resume (or use a new out_dir)")
    if current["rounds"] < rounds_done:
        raise CheckpointError(f"{path}: rounds = {current['rounds']} but {rounds_done} rounds are already done")


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary file: its bytes are fsynced before the rename, and the directory
    after it, so a file that ``state.json`` names is on disk before ``state.json`` is."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ROUND_FILE = re.compile(r"\d{5}\.safetensors(\.tmp)?")


def remove_checkpoint(root: Path) -> None:
    """Delete the FLoRA checkpoint at ``root`` (a fresh run replaces an earlier one), file by file: only
    ``state.json`` (with a ``format`` field), ``rounds/NNNNN.safetensors`` and their ``.tmp`` files. Anything
    else there — or ``root`` being a link or a file — means it is not a checkpoint FLoRA wrote:
    :class:`CheckpointError`, and nothing is deleted."""
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{root}: {why}, so it is not a FLoRA checkpoint and a fresh run will not delete "
                               f"it; choose another out_dir or move it away")

    if root.is_symlink() or not root.is_dir():
        raise refuse("not a directory (a link or a file)")
    rounds = root / "rounds"
    files = []
    for entry in root.iterdir():
        if entry.name in ("state.json", "state.json.tmp") and entry.is_file() and not entry.is_symlink():
            files.append(entry)
        elif entry == rounds and rounds.is_dir() and not rounds.is_symlink():
            for item in rounds.iterdir():
                if not (ROUND_FILE.fullmatch(item.name) and item.is_file() and not item.is_symlink()):
                    raise refuse(f"it holds {item}")
                files.append(item)
        else:
            raise refuse(f"it holds {entry}")
    state = root / "state.json"
    if state.is_file():
        try:
            data = json.loads(state.read_text())
            if not isinstance(data, dict) or "format" not in data:
                raise ValueError("no format field")
        except (ValueError, UnicodeDecodeError) as exc:
            raise refuse(f"{state} is not a checkpoint state ({exc})") from None
    for path in files:
        path.unlink()
    if rounds.is_dir():
        rounds.rmdir()
    root.rmdir()


def record_to_json(record: dict) -> dict:
    """A metrics record with NaN as ``None`` (JSON has no NaN); see :func:`record_from_json`."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def record_from_json(row: dict) -> dict:
    return {k: (math.nan if v is None else v) for k, v in row.items()}
