"""``flora serve``: one model behind an OpenAI-compatible API (FastAPI + uvicorn).

* ``GET /v1/models``: the one served model.
* ``POST /v1/chat/completions``: ``model``, ``messages`` (roles ``system``/``user``/``assistant``, text
  content), optional ``temperature`` (0..2, default 1; 0 = greedy), ``top_p`` (0..1], ``max_tokens`` /
  ``max_completion_tokens`` (>= 1; capped by the server's ``--max-new-tokens``, which is also the
  default), ``seed``, ``n`` (1 only) and ``stream`` (server-sent events of ``chat.completion.chunk``
  objects ending with ``data: [DONE]``). Other OpenAI fields are ignored.

Bad requests get a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``: 400
for a malformed or invalid body (the message names the field), 404 for an unknown model id, 400 with
code ``context_length_exceeded`` for a conversation longer than the model's context. One model serves
every request, so its use is serialised by one lock: a whole reply, or for a stream each token's step
(a stream whose client leaves holds nothing).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flora.chat import ChatError, ChatModel, Reply, Sampling

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stream: bool = False

    def sampling(self, limit: int) -> Sampling:
        """OpenAI's defaults (temperature 1, top_p 1); at most ``limit`` new tokens."""
        asked = self.max_completion_tokens or self.max_tokens or limit
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p,
                        max_new_tokens=min(asked, limit), seed=self.seed)


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}})


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """``field.path: reason; ...`` for every error of a rejected body, and the first field's path."""
    parts, first = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        first = first or field
        parts.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", first


def create_app(chat: ChatModel, max_new_tokens: int = 512) -> FastAPI:
    """The API for ``chat`` (served as ``chat.name``); replies have at most ``max_new_tokens`` tokens."""
    app = FastAPI(title="flora serve", summary=f"OpenAI-compatible chat completions for {chat.name}")
    lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return APIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": chat.name, "object": "model", "created": created,
                                            "owned_by": "flora"}]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(body: ChatCompletionRequest) -> dict | StreamingResponse:
        if body.model != chat.name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {chat.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        messages = [m.model_dump() for m in body.messages]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        with lock:  # the tokenizer is shared too (fast tokenizers refuse concurrent use)
            try:
                reply = Reply(chat, messages, body.sampling(max_new_tokens))
            except ChatError as exc:
                raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
            if body.stream:
                return StreamingResponse(_events(reply, lock, completion_id, chat.name),
                                         media_type="text/event-stream")
            text = "".join(reply)
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": chat.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}}

    return app


def _events(reply: Reply, lock: threading.Lock, completion_id: str, model: str) -> Iterator[str]:
    """Server-sent events: the role, one chunk per text piece, the finish reason, then ``[DONE]``."""
    def event(delta: dict, finish_reason: str | None = None) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    for piece in _locked(iter(reply), lock):
        yield event({"content": piece})
    yield event({}, reply.finish_reason)
    yield "data: [DONE]\n\n"


def _locked(pieces: Iterator[str], lock: threading.Lock) -> Iterator[str]:
    """``pieces``, computing each under ``lock`` but holding it at no ``yield``: a client that goes away
    mid-stream leaves a suspended generator behind, never a held lock (concurrent streams interleave by token)."""
    while True:
        with lock:
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def serve(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int = 512,
          log_level: str = "info") -> None:
    """Serve ``chat`` with uvicorn until interrupted."""
    import sys

    import uvicorn

    if host not in LOOPBACK:
        print(f"flora serve: warning: listening on {host}, reachable from other machines, with no "
              "authentication", file=sys.stderr)
    print(f"flora serve: {chat.name!r} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(chat, max_new_tokens), host=host, port=port, log_level=log_level)
