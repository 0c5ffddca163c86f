"""``flora export``: take a run's global model out of its checkpoint.

* ``hf``: the global model after round ``K`` (default: the last) merged into the base weights and written
  with ``save_pretrained`` (safetensors, ``config.json``, ``generation_config.json``) beside the tokenizer
  and its chat template: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with nothing of this
  project installed, whatever the run's base was (the embedded GGUF, a ``.gguf`` path, a HF directory).
* ``peft``: the run's whole update as one LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(base, DIR)``. Per layer the update is

      ΔW = Σ_{rounds ≤ K} merge_t + B_g A_g          (merge_t: factor pairs or dense; (A_g, B_g) the
                                                        global adapter after round K, or a standalone
                                                        client's own adapter)

  built in factored form (factor pairs concatenated along the rank axis, a dense part ``D (out, in)``
  as ``D @ I`` or ``I @ D``) and re-factorised by :func:`flora.lora.refactor.refactorize` in float64:
  exact at the product's numerical rank, or the best rank-``R`` approximation with ``--rank R``
  (its relative Frobenius error per layer and overall is printed and stored). Every layer gets
  ``lora_alpha = r`` (``rank_pattern`` / ``alpha_pattern``), so PEFT's scaling is 1.

Nothing is written unless every input checks out: the checkpoint is read, the round, client and rank
validated and the out dir found absent or empty first; files go to a temporary directory beside the
target, renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.checkpoint import Checkpoint, check_round, checkpoint_dir, read_checkpoint
from flora.config import RunConfig
from flora.rounds import Merge
from flora.lora.refactor import refactorize, truncation_rank

FORMATS = ("hf", "peft")
# Singular values at or below RTOL · s_max are rounding noise of a float64 product of float32 factors.
RTOL = 1e-10
PEFT_PREFIX = "base_model.model."
EXPORT_INFO = "flora_export.json"


class ExportError(ValueError):
    """An export that cannot be done as asked (out dir not empty, bad rank or client); names what and why."""


@dataclass(frozen=True)
class RunSelection:
    """What to export: a run's checkpoint up to ``rounds``, and for standalone runs whose adapter."""

    run_dir: Path
    checkpoint: Checkpoint
    config: RunConfig
    rounds: int  # round updates applied, 1..checkpoint.rounds_done
    client: int | None  # standalone runs only

    def describe(self) -> dict:
        info = {"run_dir": str(self.run_dir), "method": self.config.method, "base_model": self.config.model,
                "round": self.rounds, "rounds_done": self.checkpoint.rounds_done}
        if self.client is not None:
            info["client"] = self.client
        return info


def select_run(run_dir: str | Path, round_: int | None = None, client: int | None = None) -> RunSelection:
    """Read and check ``run_dir``'s checkpoint, ``round_`` (None: the last) and ``client``.

    Raises :class:`~flora.checkpoint.CheckpointError` (no or bad checkpoint, no such round) or
    :class:`ExportError` (``client`` given for a federated run, or a client the standalone run lacks).
    """
    run_dir = Path(run_dir)
    checkpoint = read_checkpoint(run_dir)
    check_round(run_dir, checkpoint, round_)
    config = RunConfig.from_dict(checkpoint.config, f"{checkpoint_dir(run_dir) / 'state.json'}")
    rounds = checkpoint.rounds_done if round_ is None else round_
    if not config.spec.per_client_models:
        if client is not None:
            raise ExportError(f"--client {client}: run {run_dir} is a {config.method!r} run with one global model; "
                              "--client applies to runs where each client keeps its own model (standalone)")
    else:
        client = 0 if client is None else client
        clients = sorted({k for u in checkpoint.updates[:rounds] for k in (u.client_adapters or {})})
        if client not in clients:
            raise ExportError(f"--client {client}: {config.method} run {run_dir} has no adapter for it after round "
                              f"{rounds} (clients: {clients})")
    return RunSelection(run_dir=run_dir, checkpoint=checkpoint, config=config, rounds=rounds, client=client)


def load_selection(selection: RunSelection):
    """The selected global model (base + the selected rounds + the adapter, merged) as a ``LoadedModel``."""
    from flora.checkpoint import load_run_model

    return load_run_model(selection.run_dir, client=selection.client or 0, rounds=selection.rounds)[0]


def check_out_dir(out: str | Path) -> Path:
    """``out`` if it is absent or an empty directory; :class:`ExportError` otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory; expected a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out}: directory is not empty; expected a new or empty directory")
    return out


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` when the block ends without error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        _readable_by_all_as_umask_allows(staging)
        if out.is_dir():
            out.rmdir()  # empty (checked before anything was written)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _readable_by_all_as_umask_allows(directory: Path) -> None:
    """``mkdtemp`` (and safetensors) create owner-only modes: give the export the modes of a plain ``mkdir``."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# --- Hugging Face directory ----------------------------------------------------------------------

def export_hf(selection: RunSelection, out: str | Path) -> Path:
    """Write the selected global model, merged, with its tokenizer to ``out``; returns ``out``."""
    out = check_out_dir(out)
    loaded = load_selection(selection)
    model = loaded.model
    with staged_dir(out) as staging:
        model.config.tie_word_embeddings = _embeddings_tied(model)
        model.generation_config = generation_config(model)
        model.save_pretrained(staging)
        if not (staging / "generation_config.json").is_file():
            model.generation_config.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        _write_info(staging, {"format": "hf", **selection.describe()})
    return out


def _embeddings_tied(model: torch.nn.Module) -> bool:
    """Whether the output head shares the input embedding's storage (what ``tie_word_embeddings`` must say)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()


def generation_config(model: torch.nn.Module):
    """The model's generation config, or one built from its config's bos/eos/pad ids."""
    from transformers import GenerationConfig

    existing = getattr(model, "generation_config", None)
    if existing is not None and existing.eos_token_id is not None:
        return existing
    config = model.config
    return GenerationConfig(bos_token_id=getattr(config, "bos_token_id", None),
                            eos_token_id=getattr(config, "eos_token_id", None),
                            pad_token_id=getattr(config, "pad_token_id", None))


def _write_info(directory: Path, info: dict) -> None:
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")


# --- PEFT adapter --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerFactors:
    """One layer's accumulated update ``B @ A`` (``A (k, in)``, ``B (out, k)``, float64)."""

    A: torch.Tensor
    B: torch.Tensor
    exact_rank: int  # numerical rank of the accumulated update
    relative_error: float  # ‖BA − ΔW‖_F / ‖ΔW‖_F of the kept rank (0 when exact)
    energy: float  # ‖ΔW‖_F²
    dropped_energy: float  # ‖BA − ΔW‖_F²

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def layer_parts(selection: RunSelection) -> dict[str, list[Merge]]:
    """Per layer, the parts whose sum is the selection's whole update: every round's merge, then the
    global adapter after the last selected round (standalone: the client's own latest adapter)."""
    parts: dict[str, list[Merge]] = {}
    adapter = None
    for update in selection.checkpoint.updates[:selection.rounds]:
        for name, merge in update.merge.items():
            parts.setdefault(name, []).append(merge)
        if update.adapter is not None:
            adapter = update.adapter
        if selection.client is not None and selection.client in (update.client_adapters or {}):
            adapter = update.client_adapters[selection.client]
    for name, factors in (adapter or {}).items():
        parts.setdefault(name, []).append(factors)
    return parts


def stacked_factors(parts: list[Merge]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (R, in)``, ``B (out, R)`` (float64) with ``B @ A = Σ parts``: factor pairs are stacked as is,
    a dense ``D (out, in)`` as ``(I_in, D)`` or ``(D, I_out)``, whichever has the smaller rank."""
    As, Bs = [], []
    for part in parts:
        if isinstance(part, torch.Tensor):
            out_dim, in_dim = part.shape
            eye = torch.eye(min(out_dim, in_dim), dtype=torch.float64)
            A, B = (eye, part) if in_dim <= out_dim else (part, eye)
        else:
            A, B = part
        As.append(A.double())
        Bs.append(B.double())
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def layer_factors(parts: list[Merge], rank: int | None = None) -> LayerFactors:
    """The accumulated update of ``parts`` as balanced factors of its numerical rank, cut to ``rank``."""
    A, B = stacked_factors(parts)
    kept = refactorize(A, B, rank=rank, rtol=RTOL)
    energy = float(kept.singular_values.square().sum())
    return LayerFactors(A=kept.A, B=kept.B, exact_rank=truncation_rank(kept.singular_values, rtol=RTOL),
                        relative_error=kept.relative_error,
                        energy=energy, dropped_energy=energy * kept.relative_error ** 2)


def overall_error(layers: dict[str, LayerFactors]) -> float:
    """Relative Frobenius error over all layers: ``sqrt(Σ dropped energy / Σ energy)``."""
    total = sum(f.energy for f in layers.values())
    return math.sqrt(sum(f.dropped_energy for f in layers.values()) / total) if total > 0 else 0.0


@dataclass(frozen=True)
class PeftExport:
    out: Path
    layers: dict[str, LayerFactors]
    rank: int | None  # the --rank asked for (None: exact)

    @property
    def relative_error(self) -> float:
        return overall_error(self.layers)

    def summary(self) -> dict:
        return {"rank": self.rank, "relative_error": self.relative_error,
                "layers": {name: {"rank": f.rank, "exact_rank": f.exact_rank, "relative_error": f.relative_error}
                           for name, f in sorted(self.layers.items())}}


def export_peft(selection: RunSelection, out: str | Path, rank: int | None = None) -> PeftExport:
    """Write the selection's whole update as one LoRA adapter to ``out`` (exact, or cut to ``rank``)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from flora.models.loader import resolve_model_dir

    if rank is not None and rank < 1:
        raise ExportError(f"--rank {rank}: expected a rank >= 1 (or no --rank for the exact adapter)")
    out = check_out_dir(out)
    parts = layer_parts(selection)
    if not parts:
        raise ExportError(f"run {selection.run_dir}: rounds 1..{selection.rounds} changed no layer; nothing to export")
    base = resolve_model_dir(selection.config.model)
    layers = {name: layer_factors(layer, rank) for name, layer in sorted(parts.items())}
    ranks = {name: f.rank for name, f in layers.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(layers), rank_pattern=dict(ranks),
                        alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base))
    tensors = {}
    for name, factors in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = factors.A.float().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = factors.B.float().contiguous()
    result = PeftExport(out=out, layers=layers, rank=rank)
    with staged_dir(out) as staging:
        config.save_pretrained(staging)
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        _write_info(staging, {"format": "peft", **selection.describe(), **result.summary()})
    return result


def print_peft_summary(result: PeftExport, emit: Callable[[str], None] = print) -> None:
    """Per-layer ranks and, when truncated, each layer's relative error, then the overall one."""
    if result.rank is not None:
        width = max(len(name) for name in result.layers)
        for name, f in sorted(result.layers.items()):
            emit(f"  {name:<{width}}  rank {f.exact_rank:>4} -> {f.rank:<4} relative error {f.relative_error:.4g}")
    ranks = [f.rank for f in result.layers.values()]
    kind = f"truncated to rank <= {result.rank}" if result.rank is not None else "exact"
    emit(f"[export] peft adapter ({kind}): {len(ranks)} layers, rank {min(ranks)}..{max(ranks)}, "
         f"relative error {result.relative_error:.4g} overall -> {result.out}")
