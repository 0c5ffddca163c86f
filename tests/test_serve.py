"""``flora serve``: the OpenAI-compatible app (validation, streaming, one generation at a time), and a real
``flora serve`` process judging MT-bench answers over HTTP through ``flora eval``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flora.chat import Reply, Sampling, open_model
from flora.serve import create_app
from tiny_chat import write_lively_model

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tiny_tokenizer):
    return write_lively_model(tmp_path_factory.mktemp("serve"), tiny_tokenizer, context=1024)


@pytest.fixture(scope="module")
def chat(lively_dir):
    model = open_model(str(lively_dir))
    model.name = "tiny"
    return model


@pytest.fixture(scope="module")
def client(chat):
    return TestClient(create_app(chat, max_new_tokens=8))


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]


def test_completion_is_the_greedy_reply(client, chat):
    expected = Reply(chat, MESSAGES, Sampling(max_new_tokens=6))
    text = "".join(expected)
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "temperature": 0,
                                                          "max_tokens": 6})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text} and text.strip()
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 6,
                             "total_tokens": expected.prompt_tokens + 6}


def test_max_tokens_is_capped_by_the_server(client):
    body = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 1000,
                                                     "seed": 1}).json()
    assert body["usage"]["completion_tokens"] <= 8


def test_streaming_sends_the_same_text_as_events(client):
    request = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_completion_tokens": 7}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 2


@pytest.mark.parametrize("change, status, param, message", [
    ({"messages": None}, 400, "messages", "messages: Field required"),
    ({"messages": []}, 400, "messages", "messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "Input should be 'system'"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content", "messages.0.content: Field required"),
    ({"temperature": 2.5}, 400, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"top_p": 0}, 400, "top_p", "top_p: Input should be greater than 0"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
    ({"n": 2}, 400, "n", "n: Input should be less than or equal to 1"),
    ({"stream": "maybe"}, 400, "stream", "stream: Input should be a valid boolean"),
    ({"model": None}, 400, "model", "model: Field required"),
    ({"model": "gpt-4"}, 404, "model", "model 'gpt-4' is not served here; this server serves 'tiny'"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages",
     "the model's context window is 1024"),
])
def test_bad_requests_get_a_clear_4xx(client, change, status, param, message):
    request = {"model": "tiny", "messages": MESSAGES}
    request.update(change)
    request = {k: v for k, v in request.items() if v is not None}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON decode error" in response.json()["error"]["message"]


def test_one_generation_at_a_time(chat):
    """Concurrent requests: the model never runs two forward passes at once."""
    active, peak, guard = [0], [0], threading.Lock()

    def enter(module, args):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.002)

    def leave(module, args, output):
        with guard:
            active[0] -= 1

    hooks = [chat.model.register_forward_pre_hook(enter), chat.model.register_forward_hook(leave)]
    try:
        client = TestClient(create_app(chat, max_new_tokens=6))
        results = []

        def ask(stream: bool):
            response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                                  "stream": stream})
            results.append(response.status_code)

        threads = [threading.Thread(target=ask, args=(k % 2 == 0,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for hook in hooks:
            hook.remove()
    assert results == [200] * 4 and peak[0] == 1


# --- a real `flora serve` process --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``flora serve ARGS`` on a free localhost port, once ``GET /v1/models`` answers; (process, API base)."""
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "flora.cli", "serve", *args, "--port", str(port)], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flora serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_server(process)
    raise AssertionError(f"flora serve did not answer on {base} within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        out, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out


def test_mtbench_judged_by_a_real_flora_serve(lively_dir, tmp_path, capsys):
    """``flora eval --mtbench`` with ``--judge-url`` pointing at ``flora serve``: real HTTP and judge prompts.
    The tiny model gives no ``[[rating]]`` (reported per question); a question too long for the served model's
    context gets the server's 400, reported for that question while the others are judged."""
    import httpx

    from flora.cli import main

    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku about the sea.", "Now about rain."]},
        {"question_id": 82, "category": "reasoning", "turns": ["Summarise: " + "word " * 300]},
    ]))
    process, base = start_server("--model", str(lively_dir), "--model-id", "tiny-judge", "--max-new-tokens", "12")
    try:
        rc = main(["eval", "--model", str(lively_dir), "--mmlu", "-1", "--mtbench", str(questions),
                   "--max-new-tokens", "4", "--judge-url", base, "--judge-model", "tiny-judge",
                   "--judge-timeout", "300", "--out", str(tmp_path / "eval.json"), "--quiet"])
        models = httpx.get(f"{base}/models", timeout=5).json()
        request = {"model": "tiny-judge", "messages": MESSAGES, "stream": True, "max_tokens": 3}
        with httpx.stream("POST", f"{base}/chat/completions", timeout=60, json=request) as response:
            events = [line for line in response.iter_lines() if line]
        with httpx.stream("POST", f"{base}/chat/completions", timeout=60,
                          json={**request, "max_tokens": 12}) as response:
            next(response.iter_lines())  # a client that leaves after the first event ...
        after = httpx.post(f"{base}/chat/completions", timeout=60,  # ... leaves the model free for the next
                           json={"model": "tiny-judge", "messages": MESSAGES, "max_tokens": 2})
    finally:
        log = stop_server(process)
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())["mtbench"]
    scores = {(r["question_id"], r["turn"]): r for r in result["scores"]}
    assert sorted(scores) == [(81, 1), (81, 2), (82, 1)]
    for turn in (1, 2):  # judged: the tiny judge's reply came back and has no rating
        record = scores[(81, turn)]
        assert record["score"] == -1 and record["judgment"] and "error" not in record
        assert f"question 81 turn {turn}: no [[rating]] in the judgment" in out
    failed = scores[(82, 1)]
    assert failed["score"] == -1 and "HTTP 400" in failed["error"] and "context_length_exceeded" in failed["error"]
    assert "question 82 turn 1: judge failed: judge http://127.0.0.1" in out
    assert (result["unparsed"], result["failed"], result["judged"]) == (3, 1, True)
    assert models["data"][0]["id"] == "tiny-judge" and events[-1] == "data: [DONE]"
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    assert "flora serve: 'tiny-judge' at http://127.0.0.1:" in log and "POST /v1/chat/completions" in log


@pytest.mark.slow
def test_embedded_model_judges_through_flora_serve(tmp_path):
    """The embedded SmolLM2 as a (weak) judge behind a real ``flora serve``: a judgement that carries a rating
    is parsed and scored end to end; one that does not is reported for its question."""
    from flora.eval.mtbench import Judge, MTQuestion, judge_answers, judgment_problems

    questions = [MTQuestion(1, "writing", ("Rate this answer from 1 to 10.",)),
                 MTQuestion(2, "writing", ("What is the capital of France?",))]
    answers = [{"question_id": 1, "choices": [{"turns": ["Rating: [[8]]"]}]},
               {"question_id": 2, "choices": [{"turns": ["The capital of France is Paris."]}]}]
    process, base = start_server("--model", "embedded", "--max-new-tokens", "8")
    try:
        result = judge_answers(Judge(base, "embedded", timeout=600), questions, answers)
    finally:
        stop_server(process)
    first, second = result["scores"]
    assert 1 <= first["score"] <= 10 and result["mean"] == first["score"], first
    assert second["score"] == -1 and "error" not in second and second["judgment"], second
    assert judgment_problems(result) == [f"question 2 turn 1: no [[rating]] in the judgment "
                                         f"{second['judgment'][:80]!r}"]
