"""``flora chat``: the token loop against ``model.generate``, sampling, streaming, ``--prompt`` and the
interactive loop with its history, on tiny models."""

from __future__ import annotations

import io

import pytest
import torch

from flora.chat import ChatError, IncrementalDecoder, Reply, Sampling, chat_loop, next_token, open_model, stream
from flora.cli import main
from tiny_chat import write_lively_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tiny_tokenizer):
    return write_lively_model(tmp_path_factory.mktemp("chat"), tiny_tokenizer)


@pytest.fixture(scope="module")
def lively(lively_dir):
    return open_model(str(lively_dir))


def test_greedy_reply_is_what_generate_gives(lively):
    reply = Reply(lively, QUESTION, Sampling(max_new_tokens=16))
    pieces = list(reply)
    ids = reply.input_ids
    generated = lively.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                      do_sample=False, pad_token_id=lively.tokenizer.pad_token_id)[0, ids.shape[1]:]
    expected = lively.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == reply.text == expected
    assert len(set(generated.tolist())) > 5 and len(pieces) > 3  # varied tokens, streamed in pieces
    assert (reply.completion_tokens, reply.finish_reason) == (16, "length")
    assert reply.prompt_tokens == ids.shape[1]


def test_reply_stops_at_an_end_token(lively):
    first = Reply(lively, QUESTION, Sampling(max_new_tokens=1))
    first_text = "".join(first)
    stop_on_first = type(lively)(lively.model, lively.tokenizer, "x")
    stop_on_first.stop_ids = lambda: {int(lively.tokenizer.encode(first_text)[0])}
    reply = Reply(stop_on_first, QUESTION, Sampling(max_new_tokens=8))
    assert list(reply) == [] and (reply.completion_tokens, reply.finish_reason) == (0, "stop")


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(lively):
    def sample(seed):
        return "".join(Reply(lively, QUESTION, Sampling(temperature=1.0, max_new_tokens=12, seed=seed)))

    assert sample(1) == sample(1) and sample(1) != sample(2)
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])  # probabilities 0.64, 0.24, 0.09, 0.03
    generator = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(300)}
    assert drawn == {0, 1}
    drawn = {next_token(logits, Sampling(temperature=1.0), generator) for _ in range(300)}
    assert drawn == {0, 1, 2, 3}
    assert next_token(logits, Sampling(), None) == 0


def test_conversation_longer_than_the_context_is_refused(lively):
    with pytest.raises(ChatError, match=r"tokens; the model's context window is 256"):
        Reply(lively, [{"role": "user", "content": "word " * 300}], Sampling())
    reply = Reply(lively, [{"role": "user", "content": "word " * 20}], Sampling(max_new_tokens=500))
    assert 0 < reply.max_new_tokens == 256 - reply.prompt_tokens < 256  # generation stops at the window


def test_incremental_decoder_holds_back_partial_characters(tiny_tokenizer):
    ids = tiny_tokenizer.encode("café é")
    decoder = IncrementalDecoder(tiny_tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.push()]
    assert "".join(pieces) == "café é" and not any("\ufffd" in p for p in pieces)


def test_stream_writes_as_it_generates(lively):
    out = io.StringIO()
    writes = []
    out.write = lambda text: writes.append(text)  # type: ignore[method-assign]
    text = stream(Reply(lively, QUESTION, Sampling(max_new_tokens=10)), out)
    assert "".join(writes) == text and len(writes) > 3


def test_chat_prompt_answers_once(lively_dir, lively, capsys):
    expected = "".join(Reply(lively, QUESTION, Sampling(max_new_tokens=12)))
    assert main(["chat", "--model", str(lively_dir), "--prompt", QUESTION[0]["content"],
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n" and expected.strip()
    sampled = "".join(Reply(lively, QUESTION, Sampling(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=3)))
    assert main(["chat", "--model", str(lively_dir), "--prompt", QUESTION[0]["content"], "--max-new-tokens", "12",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out == sampled + "\n" and sampled != expected


def test_chat_with_a_run_checkpoint(lively_dir, tmp_path, capsys, assets_dir):
    from flora.checkpoint import load_run_model
    from flora.chat import ChatModel
    from flora.config import RunConfig
    from flora.engines import run_in_process

    config = RunConfig.from_dict(dict(
        model=str(lively_dir), data=str(assets_dir / "data.jsonl"), num_clients=2, ranks=[4, 2], rounds=1,
        local_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, cutoff=64, max_examples=0, partition="iid",
        test_fraction=0.1, eval_examples=0, dropout=0.0, out_dir=str(tmp_path / "run")))
    run_in_process(config, progress=lambda _: None)
    loaded = load_run_model(tmp_path / "run")[0]
    trained = ChatModel(loaded.model.eval(), loaded.tokenizer, "run")
    expected = "".join(Reply(trained, QUESTION, Sampling(max_new_tokens=12)))
    base = "".join(Reply(open_model(str(lively_dir)), QUESTION, Sampling(max_new_tokens=12)))
    assert main(["chat", "--checkpoint", str(tmp_path / "run"), "--prompt", QUESTION[0]["content"],
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n" and expected != base
    assert main(["chat", "--checkpoint", str(tmp_path / "run"), "--round", "2", "--prompt", "hi"]) == 2
    assert "no round 2; the checkpoint holds rounds 1..1" in capsys.readouterr().err


def test_interactive_chat_keeps_the_history(lively_dir, monkeypatch, capsys):
    import flora.chat

    rendered = []
    original = flora.chat.prompt_ids

    def recording(tokenizer, messages):
        rendered.append([dict(m) for m in messages])
        return original(tokenizer, messages)

    lines = iter(["What is the capital of France?", "", "And of Spain?", "/reset", "Hello", "/exit", "never read"])
    monkeypatch.setattr(flora.chat, "prompt_ids", recording)
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert main(["chat", "--model", str(lively_dir), "--system", "Be brief.", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert len(rendered) == 3 and next(lines) == "never read"
    first, second, third = rendered
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    assert second[:2] == first and second[2]["role"] == "assistant" and second[3] == {"role": "user",
                                                                                       "content": "And of Spain?"}
    assert second[2]["content"] and second[2]["content"] in out
    assert third == [first[0], {"role": "user", "content": "Hello"}]  # /reset keeps only the system message
    assert out.count("assistant> ") == 3 and "(history cleared)" in out


def test_interactive_chat_ends_at_eof_and_survives_a_too_long_message(lively):
    lines = iter(["word " * 300, "Hi"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    history = chat_loop(lively, Sampling(max_new_tokens=4), read=read, out=out)
    assert "(error: the conversation is" in out.getvalue()
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hi"


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature -1.0: expected a number >= 0 (0 = greedy)"),
    (["--top-p", "0"], "top_p 0.0: expected a number in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens 0: expected an integer >= 1"),
])
def test_bad_chat_settings_fail_before_loading(args, message, capsys):
    assert main(["chat", "--model", "/nonexistent/model", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"flora: error: {message}\n"


def test_round_without_checkpoint_is_refused(lively_dir, capsys):
    assert main(["chat", "--model", str(lively_dir), "--round", "1", "--prompt", "hi"]) == 2
    assert "--round and --client select a run's model" in capsys.readouterr().err
