"""Where a process computes and in which precision: the ``device``, ``dtype`` and ``quantize`` keys resolved
against this machine, the loading options they imply, activation checkpointing, and peak-memory readings.

The config only checks spelling (a server and its clients may run on different machines); everything that
depends on the machine is checked here, when a process loads its model, and fails with a
:class:`~flora.config.ConfigError` naming the key. With the defaults (``device = "cpu"``, ``dtype =
"float32"``, ``quantize = "none"``) nothing here changes what a run computes.

Where rounding enters (the LoRA factors, the wire and the server's aggregation are float32 whatever these
keys say; see ``flora/precision.py`` for how the global update reaches a half-precision or quantized base):

* ``dtype = bfloat16 / float16``: the base weights are stored in that dtype (rounded once when loaded),
  activations are computed in it, and the adapters stay float32 (peft computes the LoRA branch in float32
  and casts its output back).
* ``quantize = 4bit / 8bit``: bitsandbytes stores every linear layer but the output head quantized
  (NF4 with double quantization, or LLM.int8()); ``dtype`` is then the compute dtype.
* In both cases the base weights cannot hold the global update exactly, so it is kept beside them in
  float32 and added to each layer's output (``flora/precision.py``); the base never changes after loading.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

from flora.config import ConfigError, RunConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_DEVICES = ("cpu", "cuda")  # where bitsandbytes (>= 0.50) runs 4-bit and 8-bit layers


def resolve_device(name: str) -> torch.device:
    """The ``device`` key on this machine: ``auto`` picks cuda, else mps, else cpu; an absent device is a
    :class:`ConfigError`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__} has no CUDA support" if torch.version.cuda is None else \
                "no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver)"
            raise ConfigError(f"device = {name!r}: CUDA is not available on this machine ({built}); "
                              f"use device = 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device = {name!r}: Apple's MPS backend is not available on this machine; "
                          f"use device = 'cpu' or 'auto'")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The ``dtype`` key on ``device``: ``auto`` is bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return TORCH_DTYPES[name]


def check_quantize(quantize: str, device: torch.device) -> None:
    """:class:`ConfigError` unless bitsandbytes is installed and runs ``quantize`` on ``device``."""
    if quantize == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantize = {quantize!r}: needs bitsandbytes, which is not installed; "
                          f"run `pip install --no-deps 'bitsandbytes>=0.50'` (scripts/setup.sh does) "
                          f"or set quantize = 'none'")
    if device.type not in QUANTIZED_DEVICES:
        raise ConfigError(f"quantize = {quantize!r}: bitsandbytes runs quantized layers on "
                          f"{' and '.join(QUANTIZED_DEVICES)}, not on device {str(device)!r}; "
                          f"use device = 'cpu' or 'cuda', or quantize = 'none'")
    version = importlib.metadata.version("bitsandbytes")
    if device.type == "cpu" and _version_tuple(version) < (0, 50):
        raise ConfigError(f"quantize = {quantize!r} on device 'cpu': bitsandbytes {version} has no CPU backend "
                          f"for it; install bitsandbytes >= 0.50 (tested: 0.50.2) or use a CUDA device")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (None for ``none``): 4bit is NF4 with double
    quantization and ``compute_dtype`` (QLoRA's recipe), 8bit is LLM.int8(). The output head stays unquantized."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def model_options(config: RunConfig) -> dict:
    """``load_model`` keywords for the config's ``device``, ``dtype`` and ``quantize`` on this machine;
    :class:`ConfigError` where it lacks them."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    check_quantize(config.quantize, device)
    return {"device": device, "dtype": dtype, "quantization": quantization_config(config.quantize, dtype)}


def prepare_quantized(model: torch.nn.Module) -> None:
    """Make every 4-bit layer compute with one kernel in training and evaluation: on CPUs with AVX512-BF16,
    bitsandbytes repacks a layer's weights for a faster inference-only kernel on its first no-grad forward
    in eval mode, which gives other logits than training sees (and needs in_features % 64 == 0)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing of the decoder layers on or off; non-reentrant, so a frozen
    base needs no input gradients. transformers >= 5.20 names it ``activation_checkpointing_*``."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``VmHWM``; see :func:`reset_peak_rss`)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``/proc/self/clear_refs``); False where that is refused."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
