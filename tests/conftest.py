"""Shared fixtures: a tiny random Llama and a small byte-level BPE tokenizer trained in the test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest
import torch

from flora.models.loader import FALLBACK_CHAT_TEMPLATE

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write a haiku about the sea? Waves fold into foam, the tide keeps its slow promise.",
    "Explain recursion? A function that calls itself on a smaller input until a base case.",
    "List three colors: red, green and blue. Numbers: one two three four five six.",
    "def add(a, b): return a + b  # code blocks ``` appear in answers too",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped where torch sees none (CI), run by scripts/gpu_check.sh."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


def sample_records(n: int = 24):
    from flora.data.formats import Record

    records = []
    for i in range(n):
        question, _, answer = CORPUS[i % 5].partition("? ") if "?" in CORPUS[i % 5] else CORPUS[i % 5].partition(": ")
        records.append(Record(messages=({"role": "user", "content": question + f" ({i})"},
                                         {"role": "assistant", "content": answer}),
                              category=["qa", "poem", "code"][i % 3]))
    return records


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory, tiny_tokenizer):
    """A directory with the tiny model and data of :func:`write_tiny_assets` (one per test module)."""
    root = tmp_path_factory.mktemp("assets")
    write_tiny_assets(root, tiny_tokenizer)
    return root


@pytest.fixture
def runtime():
    """A fresh runtime (loaded assets + client global states) for one test: it starts from the base weights."""
    from flora.runtime import Runtime

    return Runtime()


@pytest.fixture
def records():
    return sample_records()


def write_tiny_assets(root, tokenizer) -> None:
    """A tiny model directory (``root/model``) and an Alpaca-style ``root/data.jsonl`` of 80 rows."""
    import json

    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"instruction": f"{CORPUS[i % 5][:30]} #{i}", "output": CORPUS[i % 5][30:]} for i in range(80)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
