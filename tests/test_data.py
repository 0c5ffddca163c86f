"""Data formats, file readers, truncated-JSON recovery, partition and tokenisation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora.data.formats import DataError, Record, detect_format
from flora.data.partition import partition, proxy_label
from flora.data.sources import load_records, read_rows, recover_json_array
from flora.data.tokenize import IGNORE_INDEX, encode, encode_whole_text

ROWS = {
    "sharegpt": [{"id": "a", "conversations": [{"from": "system", "value": "Be brief."},
                                               {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                                               {"from": "human", "value": "More?"}, {"from": "chatgpt", "value": "No."}]}],
    "alpaca": [{"instruction": "Add", "input": "1 and 2", "output": "3"}],
    "dolly": [{"instruction": "Who?", "context": "Ada wrote code.", "response": "Ada.", "category": "closed_qa"}],
    "wizard": [{"instruction": "Say hi", "output": "hi"}],
    "messages": [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}],
}


def write(tmp_path, name, rows, jsonl=False):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("jsonl", [False, True])
def test_each_format_loads_to_canonical_messages(tmp_path, fmt, jsonl):
    path = write(tmp_path, f"{fmt}.json" + ("l" if jsonl else ""), ROWS[fmt], jsonl)
    records, report = load_records(path, fmt=fmt)
    assert report.kept == 1 and not report.skipped
    roles = [m["role"] for m in records[0].messages]
    assert roles[-1] == "assistant" and "user" in roles
    auto, _ = load_records(path)  # auto-detection agrees (wizard reads as alpaca)
    assert auto[0].messages == records[0].messages


def test_format_details():
    sharegpt, _ = load_records_from(ROWS["sharegpt"], "sharegpt")
    assert [m["role"] for m in sharegpt.messages] == ["system", "user", "assistant", "user", "assistant"]
    alpaca, _ = load_records_from(ROWS["alpaca"], "alpaca")
    assert alpaca.messages[0]["content"] == "Add\n\n1 and 2"
    dolly, _ = load_records_from(ROWS["dolly"], "dolly")
    assert dolly.category == "closed_qa" and "Context:\nAda wrote code." in dolly.messages[0]["content"]
    wizard_conv, _ = load_records_from([{"conversations": [{"from": "human", "value": "x"},
                                                           {"from": "gpt", "value": "y"}]}], "wizard")
    assert wizard_conv.messages[-1] == {"role": "assistant", "content": "y"}


def load_records_from(rows, fmt):
    from flora.data.sources import convert_rows
    records, report = convert_rows(rows, fmt, "<test>")
    return records[0], report


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS["dolly"] * 3).save_to_disk(str(tmp_path / "dolly"))
    records, report = load_records(tmp_path / "dolly")
    assert report.format == "dolly" and len(records) == 3


def test_empty_conversations_are_skipped_and_counted(tmp_path):
    rows = ROWS["sharegpt"] + [{"conversations": []}, {"conversations": [{"from": "human", "value": "only a question"}]},
                               {"conversations": [{"from": "gpt", "value": "answer without question"}]}]
    records, report = load_records(write(tmp_path, "d.json", rows))
    assert report.kept == 1 and report.rows == 4 and sum(report.skipped.values()) == 3


def test_recover_truncated_array():
    text = json.dumps([{"a": 1}, {"b": [1, 2]}, {"c": "x"}])
    cut = text[:-6]  # inside the third element
    elements, tail = recover_json_array(cut)
    assert elements == [{"a": 1}, {"b": [1, 2]}] and tail == len(cut) - cut.index('{"c"')
    assert recover_json_array(text) == ([{"a": 1}, {"b": [1, 2]}, {"c": "x"}], 0)


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},\n{"instruction": "c", "outp', r"line 2.*truncated"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', r"line 2: invalid JSON"),
    ("", "empty"),
])
def test_bad_json_names_the_line(tmp_path, content, message):
    path = tmp_path / ("bad.jsonl" if "oops" in content else "bad.json")
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_missing_field_names_row_and_field(tmp_path):
    rows = ROWS["alpaca"] + [{"instruction": "no output here"}]
    with pytest.raises(DataError, match=r"a.json: item 2 \(alpaca\): missing field 'output'"):  # 1-based item
        load_records(write(tmp_path, "a.json", rows), fmt="alpaca")
    # JSONL: the line an editor shows, blank lines counted
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl: line 3 \(alpaca\): missing field 'output'"):
        load_records(jsonl, fmt="alpaca")
    records, report = load_records(write(tmp_path, "a.json", rows), fmt="alpaca", on_malformed="skip")
    assert len(records) == 1 and report.skipped == {"malformed: missing field 'output'": 1}


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="cannot detect the data format from fields"):
        detect_format({"question": "x"})
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "nope.json")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_records(write(tmp_path, "a.json", ROWS["alpaca"]), fmt="csv")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_reader_raises_only_clear_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "f.json"
    path.write_text(text)
    try:
        load_records(path)
    except DataError:
        pass


# --- partition -------------------------------------------------------------------------------

def test_partitions_are_disjoint_complete_and_seeded(records):
    many = records * 10
    for scheme in ("iid", "dirichlet", "quantity"):
        p = partition(many, 4, scheme=scheme, alpha=0.5, seed=3)
        used = sorted(p.test + [i for c in p.clients for i in c] + [i for t in p.client_tests for i in t])
        assert used == list(range(len(many)))
        again = partition(many, 4, scheme=scheme, alpha=0.5, seed=3)
        assert again.clients == p.clients and again.test == p.test
        assert partition(many, 4, scheme=scheme, alpha=0.5, seed=4).clients != p.clients
        report = p.report()
        assert sum(c["train"] for c in report["clients"]) == sum(len(c) for c in p.clients)


def test_dirichlet_small_alpha_is_skewed(records):
    many = records * 20
    p = partition(many, 3, scheme="dirichlet", alpha=0.05, seed=0, min_per_client=1)
    dominant = [max(c["labels"].values()) / c["train"] for c in p.report()["clients"]]
    assert max(dominant) > 0.8  # with alpha -> 0 clients hold mostly one label


def test_more_clients_than_examples(records):
    with pytest.raises(DataError, match="for 30 clients"):
        partition(records, 30)


def test_proxy_label():
    assert proxy_label(Record(({"role": "user", "content": "x"}, {"role": "assistant", "content": "```py```"}))) == "code"
    assert proxy_label(Record(({"role": "user", "content": "x" * 500}, {"role": "assistant", "content": "y"}))) == "long"


# --- tokenisation ----------------------------------------------------------------------------

def test_loss_only_on_assistant_tokens(tiny_tokenizer, records):
    example = encode(tiny_tokenizer, records[0], cutoff=512)
    targets = tiny_tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])
    assistant = records[0].messages[1]["content"]
    assert targets.startswith(assistant) and "<|im_end|>" in targets
    assert records[0].messages[0]["content"] not in targets


def test_cutoff_and_drop_without_targets(tiny_tokenizer, records):
    full = encode(tiny_tokenizer, records[0], cutoff=512)
    cut = encode(tiny_tokenizer, records[0], cutoff=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert encode(tiny_tokenizer, records[0], cutoff=3) is None  # cut before the answer


HARD_TEXTS = ["=" * 900, "word " * 300, "a" + " " * 700 + "b", "\n\n".join(["x = 1"] * 200), "é漢字🙂 " * 200,
              "no_spaces_at_all_" * 80, "  leading and trailing spaces  " * 40, "don't it's we're " * 100]


@settings(max_examples=60, deadline=None)
@given(user=st.sampled_from(HARD_TEXTS) | st.text(max_size=1500), answer=st.sampled_from(HARD_TEXTS) | st.text(
    min_size=1, max_size=1500), turns=st.integers(1, 3), cutoff=st.sampled_from([1, 5, 40, 128, 400]))
def test_encode_tokenising_a_prefix_equals_tokenising_everything(tiny_tokenizer, user, answer, turns, cutoff):
    from flora.data import tokenize

    messages = [m for _ in range(turns) for m in ({"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer})]
    record = Record(tuple(messages))
    expected = encode_whole_text(tiny_tokenizer, record, cutoff)
    # a short first guess puts the cut right where the cutoff falls: pre-tokens split there would show
    for guess in (1, 2, tokenize._CHARS_PER_TOKEN_GUESS):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tokenize, "_CHARS_PER_TOKEN_GUESS", guess)
            assert encode(tiny_tokenizer, record, cutoff) == expected, guess


def test_head_tokens_equal_the_whole_texts_for_every_cut(tiny_tokenizer, monkeypatch):
    """Every first-guess length and cutoff: the cut lands inside words, at their ends, between spaces."""
    from flora.data import tokenize

    from conftest import CORPUS

    text = " ".join(CORPUS[:4]) + "   spaced   out\n\n" + "=" * 50 + " " + " ".join(CORPUS[:4])
    whole = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for guess in range(1, 9):
        monkeypatch.setattr(tokenize, "_CHARS_PER_TOKEN_GUESS", guess)
        for cutoff in range(1, 60):
            ids, offsets = tokenize._head_tokens(tiny_tokenizer, text, cutoff)
            assert (list(ids), list(offsets)) == (whole["input_ids"][:cutoff], whole["offset_mapping"][:cutoff]), \
                (guess, cutoff)


def test_tokenizer_without_pre_tokenizer_gets_the_whole_text_tokenised():
    from conftest import make_tokenizer

    from flora.data import tokenize

    tokenizer = make_tokenizer()
    assert tokenize._splits_at_spaces(tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = None
    assert not tokenize._splits_at_spaces(tokenizer)
    record = Record(({"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "=" * 400}))
    for cutoff in (5, 40, 128):
        assert encode(tokenizer, record, cutoff) == encode_whole_text(tokenizer, record, cutoff)


@pytest.mark.slow
@pytest.mark.parametrize("cutoff", [16, 128, 512])
def test_encode_matches_whole_text_tokenisation_on_embedded_sharegpt(cutoff):
    from flora.models.loader import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("embedded"))
    records, _ = load_records("embedded")
    for record in records[:: max(1, len(records) // 300)]:  # ~300 conversations spread over the file
        assert encode(tokenizer, record, cutoff) == encode_whole_text(tokenizer, record, cutoff)
