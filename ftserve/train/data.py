"""Training data for ``ftserve train``: files read with the ``datasets`` library, checked row by row before any
training, tokenised with loss only where the model should learn.

Row shapes (the first that fits, the same for every row):

- ``text``: loss on every token;
- ``prompt`` / ``completion``: loss on the completion only;
- ``messages`` (a list of ``{"role", "content"}``): rendered with the tokenizer's chat template, loss on the
  assistant turns only (their content and the template's end-of-turn marker, so the model learns to stop).

Each assistant turn is located by rendering the conversation up to it (with the generation prompt) and through
it: the template must render a conversation as a prefix of any longer one, which every common template does.
The whole conversation is then tokenised once and a token learns iff its characters lie in an assistant span,
so no token boundary differs from what the model sees at inference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100  # labels the loss skips, as transformers' models expect


@dataclass
class Prepared:
    """Tokenised rows and what happened to them."""

    rows: list[dict[str, list[int]]]
    shape: str
    total: int
    truncated: int = 0
    dropped: int = 0  # rows left with nothing to learn after truncation
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


# Reading ------------------------------------------------------------------------------------------

def load_rows(source: str | os.PathLike) -> tuple[Any, list[str]]:
    """A ``datasets.Dataset`` of ``source`` (a local file, or a dataset id in the local cache) and, for each
    row, where it came from (``data.jsonl line 7``), for messages."""
    path = Path(source)
    if path.suffix.lower() in FORMATS or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        where = _check_json_lines(path) if path.suffix.lower() == ".jsonl" else None
        dataset = _load(kind, str(path))
        if where is None:
            offset = 2 if kind == "csv" else 1  # csv: after the header line
            unit = "line" if kind == "csv" else "row"
            where = [f"{path.name} {unit} {i + offset}" for i in range(len(dataset))]
        return dataset, where
    dataset = _load_cached(str(source))
    return dataset, [f"{source} row {i + 1}" for i in range(len(dataset))]


def _check_json_lines(path: Path) -> list[str]:
    """Parse every line first, so a malformed one is reported by its number (``datasets`` does not say)."""
    where = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: a row must be a JSON object; got {type(row).__name__}")
            where.append(f"{path.name} line {number}")
    if not where:
        raise DataError(f"{path}: the file holds no rows")
    return where


def _load(kind: str, path: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as exc:  # datasets raises many types, all of which mean the file cannot be read
        raise DataError(f"{path}: cannot read it as {kind}: {_first_line(exc)}") from None


def _load_cached(name: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise DataError(f"{name}: no such data file, and not a dataset in the local cache "
                        f"({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Shapes ---------------------------------------------------------------------------------------------

def row_shape(columns: list[str], where: str) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt/completion"
    if "text" in columns:
        return "text"
    raise DataError(f"{where}: rows of no known shape (columns {sorted(columns)}); expected a 'text' column, "
                    f"'prompt' and 'completion', or chat 'messages'")


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string; got {value!r:.60}")
    return value


def _messages(row: dict, where: str) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; got {messages!r:.60}")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: every message needs a string 'role' and 'content'; got {message!r:.60}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a chat row with no assistant turn (roles {[m['role'] for m in messages]}): "
                        f"there is nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# Tokenising -----------------------------------------------------------------------------------------

def encode_row(tokenizer, row: dict, shape: str, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row; labels are IGNORE where no loss is taken."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if shape == "text":
        ids = tokenizer(_string(row, "text", where))["input_ids"] + eos
        return ids, list(ids)
    if shape == "prompt/completion":
        prompt = tokenizer(_string(row, "prompt", where))["input_ids"]
        completion = tokenizer(_string(row, "completion", where), add_special_tokens=False)["input_ids"] + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    return encode_chat(tokenizer, _messages(row, where), where)


def encode_chat(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Loss on the assistant turns only: tokens whose characters lie in an assistant span learn."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else \
            render([], tokenize=False, add_generation_prompt=True)
        end = render(messages[:i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(f"{where}: the chat template does not render a conversation as a prefix of a longer "
                            f"one, so the assistant turns cannot be located; use a template that does")
        spans.append((len(start), len(end)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(a <= lo and hi <= b and hi > lo for a, b in spans) else IGNORE
              for token, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return list(encoded["input_ids"]), labels


def prepare(dataset, where: list[str], tokenizer, max_seq_len: int) -> Prepared:
    """Check and tokenise every row (the first bad one stops everything, before any training), truncate to
    ``max_seq_len`` and count what was cut."""
    if len(dataset) == 0:
        raise DataError(f"{where[0] if where else 'the data'}: the data holds no rows")
    shape = row_shape(list(dataset.column_names), where[0].rsplit(" ", 2)[0])
    if shape == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat rows need a chat template, and the tokenizer has none: pass --chat-template FILE")
    prepared = Prepared(rows=[], shape=shape, total=len(dataset))
    for index, row in enumerate(dataset):
        ids, labels = encode_row(tokenizer, row, shape, where[index])
        if len(ids) > max_seq_len:
            prepared.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE for label in labels):
            prepared.dropped += 1
            continue
        prepared.tokens += len(ids)
        prepared.rows.append({"input_ids": ids, "labels": labels})
    if not prepared.rows:
        raise DataError(f"no row has anything to learn within --max-seq-len {max_seq_len}")
    if prepared.truncated:
        prepared.notes.append(f"truncated {prepared.truncated} of {prepared.total} rows to --max-seq-len "
                              f"{max_seq_len}")
    if prepared.dropped:
        prepared.notes.append(f"dropped {prepared.dropped} rows whose learned tokens all lay past --max-seq-len")
    return prepared


def pack(rows: list[dict[str, list[int]]], block: int) -> list[dict[str, list[int]]]:
    """Concatenate rows and cut the stream into blocks of ``block`` tokens (TRL's "wrapped" packing: no
    padding, and attention runs across the seams of rows within a block). The last partial block is kept."""
    ids = [t for row in rows for t in row["input_ids"]]
    labels = [t for row in rows for t in row["labels"]]
    blocks = [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]} for i in range(0, len(ids), block)]
    return [b for b in blocks if any(label != IGNORE for label in b["labels"])]
