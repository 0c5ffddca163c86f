"""Evaluation: log-likelihood scoring vs a hand computation, MMLU loading/subsets/intervals, MT-bench
generation and judging against a local HTTP server, compare/report files, CLI errors."""

from __future__ import annotations

import http.server
import json
import math
import threading

import pytest
import torch

from flora.data.formats import DataError
from flora.eval.loglik import next_token_logprobs, score_continuations, score_shared_contexts
from flora.eval.mmlu import (Question, cloze_requests, evaluate_mmlu, letter_requests, load_mmlu, predict,
                             stratified_subset, wilson_interval)


def reference_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens): one full forward, log-softmax, pick the tokens by hand."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, token]) for i, token in enumerate(cont))


def test_continuation_scores_match_hand_computed_loglikelihoods(tiny_model, tiny_tokenizer):
    requests = [("Explain recursion?", " A function that calls itself"), ("List three colors:", " red"),
                ("def add(a, b):", " return a + b"), ("The quick brown", " fox jumps over the lazy dog")]
    scored = score_continuations(tiny_model, tiny_tokenizer, requests, batch_size=3)  # padding mixes lengths
    for (context, continuation), result in zip(requests, scored):
        expected = reference_logprob(tiny_model, tiny_tokenizer, context, continuation)
        assert result.logprob == pytest.approx(expected, rel=1e-5)
        assert result.num_tokens == len(tiny_tokenizer(continuation, add_special_tokens=False)["input_ids"])


def test_shared_context_scores_equal_separate_scoring_and_reference(tiny_model, tiny_tokenizer):
    groups = [("Explain recursion?", [" A function that calls itself", " red", " x"]),
              ("List three colors:", [" red, green and blue", " one"])]
    shared = score_shared_contexts(tiny_model, tiny_tokenizer, groups, batch_size=2)  # two context lengths, 3 + 2
    one_by_one = score_shared_contexts(tiny_model, tiny_tokenizer, groups, batch_size=1)
    assert [x.logprob for row in one_by_one for x in row] == \
        pytest.approx([x.logprob for row in shared for x in row], rel=1e-5, abs=1e-5)
    for (context, continuations), row in zip(groups, shared):
        separate = score_continuations(tiny_model, tiny_tokenizer, [(context, c) for c in continuations], batch_size=2)
        for continuation, got, want in zip(continuations, row, separate):
            assert got.logprob == pytest.approx(want.logprob, rel=1e-5, abs=1e-5)
            assert got.num_tokens == want.num_tokens
            assert got.logprob == pytest.approx(reference_logprob(tiny_model, tiny_tokenizer, context, continuation),
                                                rel=1e-5, abs=1e-5)
    # a context longer than max_length is cut from the left: the same as scoring the kept tail alone
    ids = tiny_tokenizer("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)["input_ids"]
    red = tiny_tokenizer(" red", add_special_tokens=False)["input_ids"]
    longest = max(len(red), len(tiny_tokenizer(" blue", add_special_tokens=False)["input_ids"]))
    long_context = tiny_tokenizer.decode(ids)
    cut = score_shared_contexts(tiny_model, tiny_tokenizer, [(long_context, [" red", " blue"])], max_length=40)[0]
    tail = tiny_tokenizer.decode(ids[-(40 - longest):])
    if tiny_tokenizer(tail, add_special_tokens=False)["input_ids"] == ids[-(40 - longest):]:
        assert cut[0].logprob == pytest.approx(reference_logprob(tiny_model, tiny_tokenizer, tail, " red"), rel=1e-5)
    assert math.isfinite(cut[0].logprob) and cut[0].num_tokens == len(red)


def test_next_token_logprobs_match_full_forward(tiny_model, tiny_tokenizer):
    contexts = ["Answer:", "List three colors: red, green and", "x"]
    candidates = [tiny_tokenizer(" A", add_special_tokens=False)["input_ids"][0], 5, 17]
    table = next_token_logprobs(tiny_model, tiny_tokenizer, contexts, candidates, batch_size=2)
    for row, context in enumerate(contexts):
        ids = torch.tensor([tiny_tokenizer(context, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = torch.log_softmax(tiny_model(input_ids=ids).logits[0, -1].double(), dim=-1)[candidates]
        torch.testing.assert_close(table[row], expected, rtol=1e-5, atol=1e-6)


def test_cloze_prediction_is_normalised_per_byte():
    from flora.eval.loglik import Scored
    scored = [Scored(-4.0, 2), Scored(-6.0, 3)]
    # raw log-likelihood prefers choice 0; per byte (-4/2 = -2 vs -6/6 = -1) prefers choice 1
    assert predict(scored, [" a", " bbbbb"], "cloze") == 1
    assert predict(scored, [" a", " bbbbb"], "letter") == 0


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def _questions(n_subjects=3, per=10):
    return [Question(f"q{s}-{i}?", (f"a{i}", f"b{i}", f"c{i}", f"d{i}"), i % 4, f"subject {s}")
            for s in range(n_subjects) for i in range(per * (s + 1))]


def test_stratified_subset_is_proportional_and_seeded():
    questions = _questions()  # 10, 20, 30 per subject
    subset = stratified_subset(questions, 12, seed=3)
    counts = {s: sum(q.subject == s for q in subset) for s in ("subject 0", "subject 1", "subject 2")}
    assert counts == {"subject 0": 2, "subject 1": 4, "subject 2": 6}
    assert subset == stratified_subset(questions, 12, seed=3)
    assert subset != stratified_subset(questions, 12, seed=4)
    assert stratified_subset(questions, 0) == questions


def test_load_mmlu_skips_bad_answers_and_names_bad_lines(tmp_path):
    good = {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
            "correct_answer": "B", "topic": "math"}
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps({**good, "correct_answer": "answer"}),
                               json.dumps({"question": "x"})]))
    questions, skipped = load_mmlu(path)
    assert len(questions) == 1 and questions[0].answer == 1
    assert skipped == {"correct_answer not A-D": 1, "missing or non-string field": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20])
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_mmlu(path)
    with pytest.raises(DataError, match="not found"):
        load_mmlu(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_evaluate_mmlu_counts_and_matches_manual_argmax(tiny_model, tiny_tokenizer, scoring):
    questions = _questions(2, 3)
    result = evaluate_mmlu(tiny_model, tiny_tokenizer, questions, scoring=scoring, shots=1, batch_size=5)
    assert result.num_questions == len(questions)
    assert sum(s["n"] for s in result.per_subject.values()) == len(questions)
    manual = 0
    for q in questions:  # recompute with the generic path and the same shots
        from flora.eval.mmlu import pick_shots
        shots = [d for d in pick_shots(questions, questions, 1).get(q.subject, []) if d is not q][:1]
        reqs = (cloze_requests if scoring == "cloze" else letter_requests)(q, shots)
        scores = [reference_logprob(tiny_model, tiny_tokenizer, c, x) for c, x in reqs]
        from flora.eval.loglik import Scored
        manual += predict([Scored(v, 1) for v in scores], [x for _, x in reqs], scoring) == q.answer
    assert result.correct == manual
    assert 0 <= result.ci95[0] <= result.accuracy <= result.ci95[1] <= 1


@pytest.mark.slow
def test_shipped_mmlu_file_has_14042_valid_questions():
    questions, skipped = load_mmlu()
    assert len(questions) == 14042 and skipped == {"correct_answer not A-D": 2}
    assert len({q.subject for q in questions}) == 57


# --- MT-bench -------------------------------------------------------------------------------------

def test_mtbench_questions_and_generation(tmp_path, tiny_model, tiny_tokenizer):
    from flora.eval.mtbench import generate_answers, load_questions

    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Explain recursion?",
                                                                                    "Shorter, please."]}) + "\n")
    questions = load_questions(path)
    answers = generate_answers(tiny_model, tiny_tokenizer, questions, max_new_tokens=4)
    assert answers[0]["question_id"] == 81 and len(answers[0]["choices"][0]["turns"]) == 2
    again = generate_answers(tiny_model, tiny_tokenizer, questions, max_new_tokens=4)
    assert again == answers  # greedy: deterministic
    path.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(DataError, match="line 1: 'turns' must be a non-empty list"):
        load_questions(path)
    path.write_text('{"question_id": 1, "turns": ["a"]\n')
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        load_questions(path)


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, self.headers.get("Authorization"), body))
        turn_two = "second user question" in body["messages"][0]["content"]
        reply = {"choices": [{"message": {"content": "Fine. Rating: [[3]]" if turn_two else "Good. [[7.5]]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_client_against_local_server(monkeypatch):
    from flora.eval.mtbench import Judge, JudgeError, MTQuestion, judge_answers, parse_rating

    server = http.server.HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
        judge = Judge(f"http://127.0.0.1:{server.server_port}/v1", "judge-model", key_env="TEST_JUDGE_KEY")
        questions = [MTQuestion(1, "writing", ("Q1", "Q2"))]
        answers = [{"question_id": 1, "choices": [{"turns": ["A1", "A2"]}]}]
        result = judge_answers(judge, questions, answers)
    finally:
        server.shutdown()
    assert result["mean_per_turn"] == {1: 7.5, 2: 3.0} and result["mean"] == pytest.approx(5.25)
    path, auth, body = _JudgeHandler.received[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert "[Question]\nQ1" in body["messages"][1]["content"] and "A1" in body["messages"][1]["content"]
    assert parse_rating("score [5]") == 5.0 and parse_rating("no score") == -1.0
    with pytest.raises(JudgeError, match="unreachable"):
        Judge(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2).complete("s", "u")


# --- reports and CLI ------------------------------------------------------------------------------

def _write_run(path, method, losses, err):
    path.mkdir(parents=True)
    lines = [{"round": i + 1, "method": method, "aggregation_error": err, "train_loss": loss + 0.1,
              "test_loss": loss, "bytes_up": 2**20, "bytes_down": 2 * 2**20, "clients_ok": 2,
              "clients_failed": 0, "seconds": 1.5} for i, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_compare_report_from_metrics_files(tmp_path):
    from flora.cli import main

    _write_run(tmp_path / "homogeneous-flora", "flora", [2.0, 1.8, 1.7], 1e-7)
    _write_run(tmp_path / "homogeneous-fedit", "fedit", [2.0, 1.9, 1.95], 0.9)
    (tmp_path / "homogeneous-flora" / "eval.json").write_text(
        json.dumps({"mmlu": {"cloze": {"accuracy": 0.3, "ci95": [0.27, 0.33]}}}))
    (tmp_path / "homogeneous-flora" / "round0.json").write_text(json.dumps({"round": 0, "test_loss": 2.25}))
    assert main(["report", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "compare.json").read_text())}
    assert rows["homogeneous-flora"]["test_loss_round0"] == 2.25  # the compare plot starts there, at round 0
    assert rows["homogeneous-fedit"]["test_loss_round0"] is None  # a run from before round0.json: from round 1
    table = (tmp_path / "compare.md").read_text()
    assert "| homogeneous-flora | 1.7000 | 1.7000 | 0.300 (0.270–0.330) | 1.00e-07 | 3.0 | 6.0 |" in table
    assert "| homogeneous-fedit | 1.9500 | 1.9000 | – | 9.00e-01 |" in table
    assert (tmp_path / "test_loss.png").stat().st_size > 1000 and (tmp_path / "bytes.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "homogeneous-fedit")]) == 0
    assert (tmp_path / "homogeneous-fedit" / "results.md").is_file()


def test_eval_cli_errors(tmp_path, capsys):
    from flora.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing-model")]) == 2
    assert "missing-model" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_plan_runs_skips_equal_rank_methods_when_heterogeneous():
    from flora.compare import plan_runs
    from flora.config import RunConfig

    runs = plan_runs(RunConfig(ranks=[8, 4, 2, 2]), ["flora", "fedit", "zeropad"], ["homogeneous", "heterogeneous"], 4)
    assert [name for name, _ in runs] == ["homogeneous-flora", "homogeneous-fedit", "homogeneous-zeropad",
                                          "heterogeneous-flora", "heterogeneous-zeropad"]
    assert runs[0][1].ranks == [4] and runs[3][1].ranks == [8, 4, 2, 2]
    assert runs[3][1].out_dir.endswith("heterogeneous-flora")


def test_packed_scores_equal_separate_scoring_and_the_shared_cache_path(tiny_model, tiny_tokenizer):
    """Context + all continuations in one row (4-D mask): the pairs' scores (each continuation after its context
    alone, the plain reference), at batch sizes that mix lengths and put padding rows in, and with a cut context."""
    from flora.eval.loglik import score_packed_contexts

    groups = [("Explain recursion?", [" A function that calls itself", " red", " x"]),
              ("List three colors:", [" red, green and blue", " one"]),
              ("x", [" y", " def add(a, b): return a + b", " z"])]
    for batch_size in (1, 2, 3):
        packed = score_packed_contexts(tiny_model, tiny_tokenizer, groups, batch_size=batch_size)
        for (context, continuations), row in zip(groups, packed):
            for continuation, got in zip(continuations, row):
                assert got.logprob == pytest.approx(reference_logprob(tiny_model, tiny_tokenizer, context, continuation),
                                                    rel=1e-5, abs=1e-5)
                assert got.num_tokens == len(tiny_tokenizer(continuation, add_special_tokens=False)["input_ids"])
    shared = score_shared_contexts(tiny_model, tiny_tokenizer, groups, batch_size=2)
    assert [x.logprob for r in packed for x in r] == pytest.approx([x.logprob for r in shared for x in r], rel=1e-5)
    long_context = "The quick brown fox jumps over the lazy dog. " * 20
    cut_packed = score_packed_contexts(tiny_model, tiny_tokenizer, [(long_context, [" red", " blue"])], max_length=40)
    cut_shared = score_shared_contexts(tiny_model, tiny_tokenizer, [(long_context, [" red", " blue"])], max_length=40)
    assert [x.logprob for x in cut_packed[0]] == pytest.approx([x.logprob for x in cut_shared[0]], rel=1e-5)
