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
so no token boundary differs from what the model sees at inference. A chat row is refused, not mapped, when a
message has a role other than ``system``, ``user``, ``assistant`` or ``tool``, empty content, or a role the
template refuses or leaves out of the rendering: training on it would teach something the data never said.

Every bad row is found before any training and reported at once, each by its line (the first ``REPORTED``, then
how many more), so one run names everything to fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100  # labels the loss skips, as transformers' models expect
ROLES = ("system", "user", "assistant", "tool")
REPORTED = 20  # bad rows listed in one error; the rest are counted


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

@dataclass
class Rows:
    """The rows of one data source: a ``datasets.Dataset``, or the rows that could be read when some lines of a
    JSON-lines file could not (those are in ``bad``, as ``(line, message)``, to be reported with the rest)."""

    rows: Any
    columns: list[str]
    source: str  # the file or the dataset id
    unit: str  # what a row's number counts: "line" of a file, or "row"
    numbers: list[int]
    bad: list[tuple[int, str]] = field(default_factory=list)

    def where(self, index: int) -> str:
        return f"{self.source} {self.unit} {self.numbers[index]}"


def load_rows(source: str | os.PathLike) -> Rows:
    """The rows of ``source``: a local file, or a dataset id in the local cache."""
    path = Path(source)
    if path.suffix.lower() in FORMATS or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        if path.suffix.lower() == ".jsonl":
            rows = _read_json_lines(path)
            if rows.bad:
                return rows
            dataset = _load(kind, str(path))
            return Rows(dataset, list(dataset.column_names), str(path), "line", rows.numbers)
        if kind != "parquet":  # a text file: name the lines that are not UTF-8, which datasets does not
            bad: list[tuple[int, str]] = []
            for _ in _utf8_lines(path, bad):
                pass
            refuse_bad_rows(bad, str(path))
        dataset = _load(kind, str(path))
        offset = 2 if kind == "csv" else 1  # csv: after the header line
        return Rows(dataset, list(dataset.column_names), str(path), "line" if kind == "csv" else "row",
                    [i + offset for i in range(len(dataset))])
    dataset = _load_cached(str(source))
    return Rows(dataset, list(dataset.column_names), str(source), "row", list(range(1, len(dataset) + 1)))


def _read_json_lines(path: Path) -> Rows:
    """Parse every line first, so each bad one is named by its number (``datasets`` names none): bytes that are
    not UTF-8, JSON that does not parse, a value that is not an object."""
    rows, numbers, bad, columns = [], [], [], {}
    for number, line in _utf8_lines(path, bad):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append((number, f"{where}: not valid JSON ({exc.msg}, column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            bad.append((number, f"{where}: a row must be a JSON object; got {type(row).__name__}"))
            continue
        rows.append(row)
        numbers.append(number)
        columns.update(dict.fromkeys(row))
    if not rows and not bad:
        raise DataError(f"{path}: the file holds no rows")
    return Rows(rows, list(columns), str(path), "line", numbers, bad)


def _utf8_lines(path: Path, bad: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """The lines of a text file with their numbers; a line that is not UTF-8 is added to ``bad`` instead, with
    the offset of its first bad byte in the file."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append((number, f"{path} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                                    f"offset {offset + exc.start} of the file); save the file as UTF-8"))
            offset += len(raw)


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
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: every message needs a string 'role' and 'content'; got {message!r:.60}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {number} has the role {message['role']!r}; the roles are "
                            f"{', '.join(ROLES)}")
        if not message["content"].strip():
            raise DataError(f"{where}: message {number} ({message['role']}) has empty content")
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
    def render(conversation, **kwargs) -> str:
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        except Exception as exc:  # the template's own raise_exception(...), or any error inside it
            raise DataError(f"{where}: the chat template refuses this conversation: {_first_line(exc)}") from None

    full = render(messages)
    for number, message in enumerate(messages, 1):  # an assistant turn is located below, whatever it renders
        if message["role"] != "assistant" and message["content"].strip() not in full:
            raise DataError(f"{where}: the chat template leaves out message {number} (role {message['role']!r}), "
                            f"so the model would never see it; use the roles the template renders")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:i], add_generation_prompt=True)
        end = render(messages[:i + 1])
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(f"{where}: the chat template does not render a conversation as a prefix of a longer "
                            f"one, so the assistant turns cannot be located; use a template that does")
        spans.append((len(start), len(end)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(a <= lo and hi <= b and hi > lo for a, b in spans) else IGNORE
              for token, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return list(encoded["input_ids"]), labels


def prepare(rows: Rows, tokenizer, max_seq_len: int) -> Prepared:
    """Check and tokenise every row, truncate to ``max_seq_len`` and count what was cut. Every bad row is
    reported in one error, before any training."""
    if not rows.numbers:
        refuse_bad_rows(rows.bad, rows.source)
        raise DataError(f"{rows.source}: the data holds no rows")
    shape = row_shape(rows.columns, rows.source)
    if shape == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat rows need a chat template, and the tokenizer has none: pass --chat-template FILE")
    prepared = Prepared(rows=[], shape=shape, total=len(rows.numbers) + len(rows.bad))
    bad = list(rows.bad)
    for index, row in enumerate(rows.rows):
        try:
            ids, labels = encode_row(tokenizer, row, shape, rows.where(index))
        except DataError as exc:
            bad.append((rows.numbers[index], str(exc)))
            continue
        if len(ids) > max_seq_len:
            prepared.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE for label in labels):
            prepared.dropped += 1
            continue
        prepared.tokens += len(ids)
        prepared.rows.append({"input_ids": ids, "labels": labels})
    refuse_bad_rows(bad, rows.source)
    if not prepared.rows:
        raise DataError(f"no row has anything to learn within --max-seq-len {max_seq_len}")
    if prepared.truncated:
        prepared.notes.append(f"truncated {prepared.truncated} of {prepared.total} rows to --max-seq-len "
                              f"{max_seq_len}")
    if prepared.dropped:
        prepared.notes.append(f"dropped {prepared.dropped} rows whose learned tokens all lay past --max-seq-len")
    return prepared


def refuse_bad_rows(bad: list[tuple[int, str]], source: str) -> None:
    """One error for every bad row, in file order: a lone one as its own line, several as a list (the first
    REPORTED, then how many more)."""
    if not bad:
        return
    bad = sorted(bad, key=lambda entry: entry[0])
    if len(bad) == 1:
        raise DataError(bad[0][1])
    listed = "".join(f"\n  {message}" for _, message in bad[:REPORTED])
    more = f"\n  and {len(bad) - REPORTED} more" if len(bad) > REPORTED else ""
    raise DataError(f"{source}: {len(bad)} bad rows, nothing was trained; fix them and run again:{listed}{more}")


def pack(rows: list[dict[str, list[int]]], block: int) -> list[dict[str, list[int]]]:
    """Concatenate rows and cut the stream into blocks of ``block`` tokens (TRL's "wrapped" packing: no
    padding, and attention runs across the seams of rows within a block). The last partial block is kept."""
    ids = [t for row in rows for t in row["input_ids"]]
    labels = [t for row in rows for t in row["labels"]]
    blocks = [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]} for i in range(0, len(ids), block)]
    return [b for b in blocks if any(label != IGNORE for label in b["labels"])]
