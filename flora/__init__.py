"""FLoRA: federated fine-tuning of LLMs with heterogeneous LoRA ranks, aggregated exactly by stacking."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import on CPUs with AVX512-BF16 that it could not fetch a
# 4-bit kernel from the Hub's `kernels` package and suggests installing it. Its fallback is correct, and
# this project never downloads code or weights at run time, so the hint only misleads; its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
