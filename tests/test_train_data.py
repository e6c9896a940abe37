"""ftserve/train/data.py: the row shapes, the loss mask of chat rows checked on a hand-built conversation, and
every malformed input named with its line before any training."""

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
    dataset, where = load_rows(path)
    prepared = prepare(dataset, where, tokenizer, max_seq_len=16)
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
        dataset, where = load_rows(tmp_path / name)
        assert prepare(dataset, where, tokenizer, 64).shape == "prompt/completion"
    assert load_rows(tmp_path / "d.csv")[1] == ["d.csv line 2", "d.csv line 3"]


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
]


@pytest.mark.parametrize("case, lines, message", BAD, ids=[case for case, _, _ in BAD])
def test_bad_data_is_named_with_its_line(case, lines, message, tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        dataset, where = load_rows(path)
        prepare(dataset, where, tokenizer, 64)


def test_a_missing_file_and_an_unknown_format_are_named(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unknown data format '.txt'"):
        load_rows(tmp_path / "d.txt")


# A dataset id, read offline from the local datasets cache -------------------------------------------------

# datasets' own json builder, run as load_dataset runs it after downloading ``someone/toy-rows``: it writes
# ``{cache}/someone___toy-rows/default/0.0.0/{hash}/toy-rows-train.arrow`` and its dataset_info.json, the layout
# that offline load_dataset's Cache builder looks up (config folder named after the config, then version, hash).
CACHE_A_DOWNLOAD = """
import sys
from datasets.packaged_modules.json.json import Json

builder = Json(cache_dir=sys.argv[1], dataset_name="someone___toy-rows", config_name="default", config_id="default",
               hash="0123abcd", data_files={"train": sys.argv[2]})
builder.dataset_name = "toy-rows"  # the arrow file is named after the dataset, without its namespace
builder.download_and_prepare()
"""

READ_ROWS = """
import json, sys
from ftserve.errors import DataError
from ftserve.train.data import load_rows

try:
    dataset, where = load_rows(sys.argv[1])
except DataError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"rows": dataset.to_list(), "where": where}))
"""


def _python(code: str, *args: str, env: dict) -> dict | None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ftserve

    here = str(Path(ftserve.__file__).parents[1])  # the child imports the ftserve under test
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": here, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def test_a_dataset_id_is_read_offline_from_the_local_datasets_cache(tmp_path):
    rows = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "HF_HUB_OFFLINE": "1"}
    _python(CACHE_A_DOWNLOAD, env["HF_DATASETS_CACHE"], write_jsonl(tmp_path / "download.jsonl", rows), env=env)
    (tmp_path / "download.jsonl").unlink()  # only the cache is left, as after a download

    read = _python(READ_ROWS, "someone/toy-rows", env=env)
    assert read == {"rows": rows, "where": ["someone/toy-rows row 1", "someone/toy-rows row 2"]}

    missing = _python(READ_ROWS, "someone/not-cached", env=env)
    assert missing["error"].startswith("someone/not-cached: no such data file, and not a dataset in the local cache")
    assert "\n" not in missing["error"]
