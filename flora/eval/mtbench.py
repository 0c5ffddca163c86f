"""MT-bench: greedy two-turn answers to a question file, and single-answer grading by an LLM judge
behind an OpenAI-compatible ``/chat/completions`` endpoint (FastChat's ``single-v1`` prompts and
``[[rating]]`` parsing). Without a configured judge the run stops after generation, saying so.

Question file (FastChat's ``question.jsonl``): one JSON object per line with ``question_id``,
``category`` and ``turns`` (a list of two user messages). Answers are written in FastChat's
``model_answer`` format: ``{"question_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}]}``.
Reference-guided grading (math/reasoning/coding with ``reference`` answers) is not implemented:
those questions are graded with the general prompt.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.data.formats import DataError
from flora.data.sources import json_lines
from flora.modeling import eval_mode

JUDGE_SYSTEM = "You are a helpful assistant."
SINGLE_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]")
SINGLE_V1_MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of the response. You evaluation should focus on the "
    "assistant's answer to the second user question. Begin your evaluation by providing a short explanation. Be "
    "as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
    "by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n")
SINGLE_V1_MULTI_TURN = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered something unusable; names URL and reason."""


@dataclass(frozen=True)
class MTQuestion:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path) -> list[MTQuestion]:
    questions = []
    for number, row in json_lines(path, "MT-bench question file"):
        turns = row.get("turns") if isinstance(row, dict) else None
        if "question_id" not in (row if isinstance(row, dict) else {}):
            raise DataError(f"MT-bench question file {path}: line {number}: missing field 'question_id'")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"MT-bench question file {path}: line {number}: 'turns' must be a non-empty list of "
                            f"strings, got {turns!r}")
        questions.append(MTQuestion(row["question_id"], str(row.get("category", "")), tuple(turns)))
    if not questions:
        raise DataError(f"MT-bench question file {path}: no questions")
    return questions


@torch.no_grad()
def generate_answers(model, tokenizer, questions: Sequence[MTQuestion], max_new_tokens: int = 512,
                     model_id: str = "flora", progress: Callable[[int], None] | None = None) -> list[dict]:
    """Greedy answers, turn by turn (each turn sees the previous turns and answers)."""
    answers = []
    with eval_mode(model):
        for question in questions:
            messages, outputs = [], []
            for turn in question.turns:
                messages.append({"role": "user", "content": turn})
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
                generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                text = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                messages.append({"role": "assistant", "content": text})
                outputs.append(text)
            answers.append({"question_id": question.question_id, "model_id": model_id,
                            "choices": [{"index": 0, "turns": outputs}]})
            if progress is not None:
                progress(1)
    return answers


def parse_rating(judgment: str) -> float:
    """FastChat's rule: ``[[x]]``, else ``[x]``; -1 when neither is there."""
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    return float(match.group(1)) if match else -1.0


def judge_prompts(question: MTQuestion, answer_turns: Sequence[str]) -> list[tuple[str, str]]:
    """(system, user) prompts: turn 1 with ``single-v1``, turn 2 with ``single-v1-multi-turn``."""
    prompts = [(JUDGE_SYSTEM, SINGLE_V1.format(question=question.turns[0], answer=answer_turns[0]))]
    if len(question.turns) > 1 and len(answer_turns) > 1:
        prompts.append((SINGLE_V1_MULTI_TURN_SYSTEM, SINGLE_V1_MULTI_TURN.format(
            question_1=question.turns[0], answer_1=answer_turns[0],
            question_2=question.turns[1], answer_2=answer_turns[1])))
    return prompts


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible chat endpoint: ``url`` is the API base (``.../v1``); the key is read from
    the environment variable ``key_env`` (may be unset for local servers)."""

    url: str
    model: str
    key_env: str = "FLORA_JUDGE_API_KEY"
    timeout: float = 120.0

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 2048,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        endpoint = self.url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise JudgeError(f"judge {endpoint}: HTTP {exc.code} ({exc.read()[:200]!r})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise JudgeError(f"judge {endpoint}: unreachable ({exc})") from None
        except json.JSONDecodeError:
            raise JudgeError(f"judge {endpoint}: the reply is not JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {endpoint}: no choices[0].message.content in the reply") from None


def judge_answers(judge: Judge, questions: Sequence[MTQuestion], answers: Sequence[dict]) -> dict:
    """Scores per question and turn, the mean per turn and overall (ratings of -1 are left out).

    A judgement that fails (the endpoint errs, see :class:`JudgeError`) is recorded for its question and
    turn with score -1 and the reason in ``error``; the others go on. ``unparsed`` counts every -1
    (failed or without a rating), ``failed`` the failures.
    """
    by_id = {a["question_id"]: a["choices"][0]["turns"] for a in answers}
    records, per_turn = [], {}
    for question in questions:
        for turn, (system, user) in enumerate(judge_prompts(question, by_id[question.question_id]), start=1):
            record = {"question_id": question.question_id, "category": question.category, "turn": turn}
            try:
                judgment = judge.complete(system, user)
            except JudgeError as exc:
                judgment, record["error"] = "", str(exc)
            score = parse_rating(judgment)
            records.append({**record, "score": score, "judgment": judgment})
            if score >= 0:
                per_turn.setdefault(turn, []).append(score)
    valid = [s for scores in per_turn.values() for s in scores]
    return {"judge_model": judge.model, "scores": records,
            "mean_per_turn": {t: sum(v) / len(v) for t, v in sorted(per_turn.items())},
            "mean": sum(valid) / len(valid) if valid else float("nan"),
            "unparsed": sum(1 for r in records if r["score"] < 0),
            "failed": sum(1 for r in records if "error" in r)}


def judgment_problems(result: dict) -> list[str]:
    """One line per judgement without a score: the question, turn and why (judge error or no rating)."""
    lines = []
    for record in result["scores"]:
        if record["score"] >= 0:
            continue
        why = (f"judge failed: {record['error']}" if "error" in record
               else f"no [[rating]] in the judgment {record['judgment'][:80]!r}")
        lines.append(f"question {record['question_id']} turn {record['turn']}: {why}")
    return lines
