"""A tiny random Llama whose greedy replies vary token to token (weights scaled up), saved as a model
directory for ``flora chat`` / ``flora serve`` tests."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import make_tiny_llama


def write_lively_model(root: Path, tokenizer, context: int = 256) -> Path:
    """``root/lively``: the tiny Llama with its matrices ×10 (so argmax is not one repeated token) and a
    context window of ``context`` tokens, plus ``tokenizer``."""
    model = make_tiny_llama(len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(10)
    model.config.max_position_embeddings = context
    model.save_pretrained(root / "lively")
    tokenizer.save_pretrained(root / "lively")
    return root / "lively"
