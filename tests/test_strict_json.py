"""The one strict JSON reader: what Python's json accepts or crashes on, refused with the place named."""

import pytest

from ftserve.errors import AdapterFileError
from ftserve.files.strict_json import MAX_DEPTH, StrictJSONError, loads_strict, read_json_file


@pytest.mark.parametrize("raw, message, path", [
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"nested {MAX_DEPTH + 1} levels deep", None),
    (b"[" * 200_000, "nested 200000 levels deep", None),  # json's RecursionError before
    (b'{"a": {"b": [1, NaN]}}', "at `a.b.1`: NaN is not a JSON number", "a.b.1"),
    (b'{"t": -Infinity}', "at `t`: -Infinity is not a JSON number", "t"),
    (b'{"t": 1e999}', "at `t`: the number 1e999 overflows a float", "t"),
    (b'{"t": ' + b"9" * 400 + b'.5}', "overflows a float", "t"),  # no exponent, still inf
    (b'{"ids": [1, ' + b"7" * 5000 + b"]}", "at `ids.1`: an integer of 5,000 digits", "ids.1"),
    (b'{"m": [{"content": "\\ud800"}]}', "at `m.0.content`: a lone UTF-16 surrogate", "m.0.content"),
    (b'{"\\udfff": 1}', "at `<key>`: a lone UTF-16 surrogate", "<key>"),
    (b'{"a": 1,}', "not valid JSON: Expecting property name", None),
    (b'\xff\xfe\xfd', "not valid UTF-8", None),
])
def test_what_json_accepts_or_crashes_on_is_refused_with_its_place(raw, message, path):
    with pytest.raises(StrictJSONError) as caught:
        loads_strict(raw, what="the body")
    assert caught.value.message.startswith("the body") and message in caught.value.message
    assert caught.value.path == path and isinstance(caught.value, ValueError)


def test_valid_json_reads_as_json_does():
    text = '{"s": "brackets [[{ in \\" a string", "e": "\\ud83d\\ude00", "n": [1, -2.5e300, 12345678901234567890]}'
    assert loads_strict(text.encode(), what="x") == {"s": 'brackets [[{ in " a string', "e": "\U0001F600",
                                                       "n": [1, -2.5e300, 12345678901234567890]}
    assert loads_strict("[" * MAX_DEPTH + "]" * MAX_DEPTH, what="x") is not None


def test_a_file_larger_than_its_bound_is_refused_unread(tmp_path):
    file = tmp_path / "config.json"
    with open(file, "wb") as f:
        f.truncate(2**30)  # sparse
    with pytest.raises(AdapterFileError, match="1,073,741,824 bytes, larger than the 1,000 bytes"):
        read_json_file(file, max_bytes=1000, error=AdapterFileError)
    file.write_text('{"r": 8}')
    assert read_json_file(file, max_bytes=1000, error=AdapterFileError) == {"r": 8}
