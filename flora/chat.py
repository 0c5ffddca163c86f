"""``flora chat``: talk to a run's global model (or any model directory) in the terminal, and the
token-by-token generation loop that ``flora serve`` shares.

A reply is generated one token at a time with the model's KV cache (greedy at temperature 0, else
temperature + nucleus sampling), stops at the model's end-of-turn/end-of-text tokens or the token
limit, and is decoded incrementally so text streams as it is produced. The conversation is rendered
with the tokenizer's chat template (``add_generation_prompt=True``) every turn, history included.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import torch

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


class ChatError(ValueError):
    """Generation settings out of range, or a conversation longer than the model's context."""


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy; ``top_p`` keeps the smallest set of tokens holding that probability."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def check(self) -> Sampling:
        if not self.temperature >= 0:
            raise ChatError(f"temperature {self.temperature}: expected a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p {self.top_p}: expected a number in (0, 1]")
        if self.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens {self.max_new_tokens}: expected an integer >= 1")
        return self


@dataclass
class ChatModel:
    """A causal LM in eval mode with its tokenizer, and the name it is served under."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    def context_window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def stop_ids(self) -> set[int]:
        """Token ids that end a reply: the generation config's and the tokenizer's end-of-sequence ids."""
        ids: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids


def open_model(model: str | None = None, checkpoint: str | None = None, round_: int | None = None,
               client: int | None = None) -> ChatModel:
    """``model`` ('embedded', a HF directory or a .gguf file), or a run's global model from its
    ``checkpoint`` dir (after round ``round_``; standalone runs: client ``client``'s model)."""
    from flora.models.loader import load_model

    if checkpoint is not None:
        from flora.export import load_selection, select_run

        loaded = load_selection(select_run(checkpoint, round_, client))
        name = str(checkpoint)
    else:
        if round_ is not None or client is not None:
            raise ChatError("--round and --client select a run's model: use them with --checkpoint RUN_DIR")
        loaded = load_model(model or "embedded")
        name = str(model or "embedded")
    loaded.model.eval()
    return ChatModel(model=loaded.model, tokenizer=loaded.tokenizer, name=name)


def prompt_ids(tokenizer, messages: Sequence[Message]) -> torch.Tensor:
    """The conversation rendered with the chat template plus the assistant's opening: ``(1, T)`` ids."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from the last position's ``logits (V,)``: argmax at temperature 0, else a sample from the
    tempered distribution restricted to its top-``top_p`` nucleus."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # mass before this token suffices
        probs = probs.clone()
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, input_ids: torch.Tensor, sampling: Sampling,
                    max_new_tokens: int) -> Iterator[int]:
    """Up to ``max_new_tokens`` token ids after ``input_ids (1, T)``, one forward pass each (KV cache).
    The caller decides where to stop (closing the generator stops the computation)."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # no head over the prompt
    past, ids = None, input_ids
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past}, **last_only)
        past = getattr(out, "cache", None)  # transformers >= 5.2x; earlier: ``past_key_values``
        past = out.past_key_values if past is None else past
        token = next_token(out.logits[0, -1], sampling, generator)
        yield token
        ids = torch.tensor([[token]], dtype=input_ids.dtype)


class IncrementalDecoder:
    """Text of a growing token list, handed out as the new part each time (held back while the last
    token ends inside a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int | None = None) -> str:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if token is not None and text.endswith("\ufffd"):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


class Reply:
    """One assistant reply to ``messages``: iterate it for text pieces; afterwards ``text``,
    ``completion_tokens`` and ``finish_reason`` (``stop``: an end token; ``length``: the token limit).

    Construction checks the conversation fits the model's context (:class:`ChatError` if not) and
    computes nothing else; the tokens are generated while iterating.
    """

    def __init__(self, chat: ChatModel, messages: Sequence[Message], sampling: Sampling):
        self.chat, self.sampling = chat, sampling.check()
        self.input_ids = prompt_ids(chat.tokenizer, messages)
        self.prompt_tokens = int(self.input_ids.shape[1])
        window = chat.context_window()
        if window is not None and self.prompt_tokens >= window:
            raise ChatError(f"the conversation is {self.prompt_tokens} tokens; the model's context window is "
                            f"{window}: shorten it")
        self.max_new_tokens = min(sampling.max_new_tokens, window - self.prompt_tokens if window else sys.maxsize)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        stop, decoder = self.chat.stop_ids(), IncrementalDecoder(self.chat.tokenizer)
        tokens = generate_tokens(self.chat.model, self.input_ids, self.sampling, self.max_new_tokens)
        try:
            self.finish_reason = "length"
            for token in tokens:
                if token in stop:
                    self.finish_reason = "stop"
                    break
                self.completion_tokens += 1
                piece = decoder.push(token)
                self.text += piece
                if piece:
                    yield piece
            rest = decoder.push()
            self.text += rest
            if rest:
                yield rest
        finally:
            tokens.close()


def stream(reply: Reply, out: TextIO) -> str:
    """Write ``reply``'s text to ``out`` as it is generated; returns the text."""
    for piece in reply:
        out.write(piece)
        out.flush()
    return reply.text


HELP = "Type a message; /reset clears the history; /exit or Ctrl-D quits."


def chat_loop(chat: ChatModel, sampling: Sampling, system: str | None = None,
              read: Callable[[str], str] | None = None, out: TextIO | None = None) -> list[Message]:
    """Interactive multi-turn chat: read a line (``input``), stream the answer, keep the history; returns it."""
    read, out = read or input, out or sys.stdout
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(f"flora chat: {chat.name}. {HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = list(start)
            out.write("(history cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = Reply(chat, history, sampling)
        except ChatError as exc:
            history.pop()
            out.write(f"(error: {exc}; /reset starts over)\n")
            continue
        out.write("assistant> ")
        try:
            stream(reply, out)
        except KeyboardInterrupt:
            out.write(" (interrupted)")
        out.write("\n")
        history.append({"role": "assistant", "content": reply.text.strip()})
