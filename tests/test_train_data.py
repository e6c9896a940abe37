"""ftserve/train/data.py: the row shapes, the loss mask of chat rows checked on a hand-built conversation, and
every malformed input named with its line before any training, all of them in one error."""

from __future__ import annotations

import json

import pytest

from ftserve.errors import DataError
from ftserve.train.data import IGNORE, encode_chat, encode_row, load_rows, pack, prepare


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def learned_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])


def test_chat_rows_learn_the_assistant_turns_and_their_end_markers_only(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sees the dog"}, {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "runs over the tree"}]
    ids, labels = encode_chat(tokenizer, messages, "row 1")
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert learned_text(tokenizer, ids, labels) == "sees the dog<|end|>\nruns over the tree<|end|>\n"
    hidden = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert hidden == "<|system|>be brief<|end|>\n<|user|>the cat<|end|>\n<|assistant|><|user|>and then<|end|>\n" \
                     "<|assistant|>"


def test_prompt_completion_rows_learn_the_completion_and_eos(tokenizer):
    ids, labels = encode_row(tokenizer, {"prompt": "the cat", "completion": " sees the dog"}, "prompt/completion",
                             "row 1")
    assert learned_text(tokenizer, ids, labels) == " sees the dog</s>"
    assert tokenizer.decode(ids) == "the cat sees the dog</s>"


def test_truncation_is_counted_and_rows_left_with_nothing_to_learn_are_dropped(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat " * 20, "completion": " runs"},
                                              {"prompt": "a", "completion": " dog"},
                                              {"prompt": "a", "completion": " b c " * 20}])
    prepared = prepare(load_rows(path), tokenizer, max_seq_len=16)
    assert (prepared.truncated, prepared.dropped, len(prepared.rows)) == (2, 1, 2)
    assert prepared.notes == ["truncated 2 of 3 rows to --max-seq-len 16",
                              "dropped 1 rows whose learned tokens all lay past --max-seq-len"]
    assert all(len(row["input_ids"]) <= 16 for row in prepared.rows)


def test_packing_cuts_the_stream_into_blocks_and_keeps_the_labels_aligned():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]}]
    assert pack(rows, 3) == [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
                             {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}, {"input_ids": [7], "labels": [7]}]


def test_csv_and_parquet_files_are_read_with_their_rows(tmp_path, tokenizer):
    import pandas

    frame = pandas.DataFrame({"prompt": ["the cat", "a dog"], "completion": [" runs", " sings"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert prepare(load_rows(tmp_path / name), tokenizer, 64).shape == "prompt/completion"
    rows = load_rows(tmp_path / "d.csv")
    assert [rows.where(i) for i in range(2)] == [f"{tmp_path / 'd.csv'} line 2", f"{tmp_path / 'd.csv'} line 3"]


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


BAD = [
    ("malformed", ['{"text": "ok"}', '', '{"text": "broken"', '{"text": "ok"}'], r"d.jsonl line 3: not valid JSON"),
    ("not-an-object", ['{"text": "ok"}', '["text"]'], r"d.jsonl line 2: a row must be a JSON object; got list"),
    ("no-known-shape", ['{"question": "a", "answer": "b"}'], r"rows of no known shape \(columns \['answer', "
                                                              r"'question'\]\)"),
    ("no-assistant", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                      '{"messages": [{"role": "user", "content": "hi"}]}'],
     r"d.jsonl line 2: a chat row with no assistant turn \(roles \['user'\]\)"),
    ("empty-text", ['{"text": "ok"}', '{"text": ""}'], r"d.jsonl line 2: 'text' must be a non-empty string"),
    ("mixed-shapes", ['{"prompt": "a", "completion": "b"}', '{"text": "a dog"}'],
     r"d.jsonl line 2: 'prompt' must be a non-empty string; got None"),
    ("empty-file", [''], r"d.jsonl: the file holds no rows"),
    ("unknown-role", [chat(("user", "hi"), ("assistant", "ok")), chat(("bot", "hi"), ("assistant", "ok"))],
     r"d.jsonl line 2: message 1 has the role 'bot'; the roles are system, user, assistant, tool"),
    ("empty-content", [chat(("user", "hi"), ("assistant", "  "))],
     r"d.jsonl line 1: message 2 \(assistant\) has empty content"),
    ("empty-user-content", [chat(("system", ""), ("user", "hi"), ("assistant", "ok"))],
     r"d.jsonl line 1: message 1 \(system\) has empty content"),
]


@pytest.mark.parametrize("case, lines, message", BAD, ids=[case for case, _, _ in BAD])
def test_bad_data_is_named_with_its_line(case, lines, message, tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        prepare(load_rows(path), tokenizer, 64)


def test_a_missing_file_and_an_unknown_format_are_named(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unknown data format '.txt'"):
        load_rows(tmp_path / "d.txt")


def test_a_dataset_id_is_read_from_the_local_cache_offline(datasets_cache):
    rows = load_rows("someone/toy-rows")
    assert list(rows.rows) == datasets_cache and rows.where(0) == "someone/toy-rows row 1"
    with pytest.raises(DataError, match="someone/other-rows: no such data file, and not a dataset in the local cache"):
        load_rows("someone/other-rows")


def test_a_role_the_template_refuses_or_leaves_out_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [json.loads(chat(("tool", "42"), ("user", "hi"), ("assistant", "ok")))])
    quiet = tokenizer.chat_template.replace("{% for message in messages %}",
                                            "{% for message in messages if message['role'] != 'tool' %}")
    strict = "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}" + \
        tokenizer.chat_template
    kept = tokenizer.chat_template  # the session's tokenizer: put its template back for the other tests
    for template, message in ((quiet, r"d.jsonl line 1: the chat template leaves out message 1 \(role 'tool'\)"),
                              (strict, r"d.jsonl line 1: the chat template refuses this conversation: no tools here")):
        tokenizer.chat_template = template
        try:
            with pytest.raises(DataError, match=message):
                prepare(load_rows(path), tokenizer, 64)
        finally:
            tokenizer.chat_template = kept
    assert prepare(load_rows(path), tokenizer, 64).shape == "messages"  # the fixture's template renders tools


@pytest.mark.parametrize("name, first, second", [("d.jsonl", b'{"text": "ok"}\n', b'{"text": "caf\xe9"}\n'),
                                                  ("d.csv", b"text\n", b"caf\xe9\n")])
def test_bytes_that_are_not_utf8_are_named_with_their_line_and_offset(name, first, second, tmp_path, tokenizer):
    path = tmp_path / name
    path.write_bytes(first + second)
    offset = len(first) + second.index(0xE9)
    with pytest.raises(DataError, match=rf"{name} line 2: not valid UTF-8 \(byte 0xe9 at byte offset {offset} of "
                                        rf"the file\)"):
        prepare(load_rows(path), tokenizer, 64)


def test_every_bad_row_is_reported_in_one_error_up_to_a_bound(tmp_path, tokenizer):
    from ftserve.train.data import REPORTED

    lines = ['{"text": "ok"}'] + ['{"text": ""}'] * (REPORTED + 5) + ['{"text": broken'] + ['{"text": "fine"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        prepare(load_rows(path), tokenizer, 64)
    report = str(caught.value).splitlines()
    assert report[0] == f"{path}: {REPORTED + 6} bad rows, nothing was trained; fix them and run again:"
    assert report[1:] == [f"  {path} line {n}: 'text' must be a non-empty string; got ''"
                          for n in range(2, REPORTED + 2)] + ["  and 6 more"]
