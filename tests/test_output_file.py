"""Output files written front to back (files/output_file.py): direct I/O and the page cache give the same bytes,
whatever the sizes of the pieces and where they fall against the stages and the alignment."""

import os
from pathlib import Path

import pytest

from ftserve.errors import CheckpointError
from ftserve.files.output_file import ALIGNMENT, STAGE_BYTES, OutputFile

# (kind, size): bytes from memory or a range of the input file, around stage and alignment boundaries
PIECES = [("write", 1), ("copy", 3), ("write", ALIGNMENT - 5), ("copy", STAGE_BYTES - 2), ("write", 17),
          ("copy", STAGE_BYTES + ALIGNMENT + 1), ("write", 2 * STAGE_BYTES + 3), ("copy", 1), ("write", 8)]


def write_pieces(path: Path, source: Path, direct: bool) -> tuple[bytes, bool]:
    """The file OutputFile writes from PIECES, and the bytes it should hold."""
    data = source.read_bytes()
    expected, offset = bytearray(), 0
    fd = os.open(source, os.O_RDONLY)
    try:
        with OutputFile(path, direct=direct) as f:
            for i, (kind, size) in enumerate(PIECES):
                if kind == "write":
                    piece = bytes([i + 1]) * size
                    f.write(memoryview(bytearray(piece)) if i % 2 else piece)
                else:
                    f.copy(fd, offset, size)
                    piece = data[offset:offset + size]
                    offset += size + 7
                expected += piece
            used_direct = f.direct
    finally:
        os.close(fd)
    return bytes(expected), used_direct


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "input.bin"
    path.write_bytes(os.urandom(2 * STAGE_BYTES + 3 * ALIGNMENT + 100))
    return path


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_output_file_holds_exactly_the_pieces_in_order(tmp_path, source, direct):
    out = tmp_path / "out.bin"
    expected, used_direct = write_pieces(out, source, direct)
    assert out.read_bytes() == expected  # length too: the padded last stage is cut back
    if direct and not used_direct:
        pytest.skip(f"{tmp_path} takes no direct I/O; the page-cache path wrote it")
    assert used_direct == direct


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_copying_past_the_end_of_the_input_is_a_truncated_checkpoint(tmp_path, source, direct):
    size = source.stat().st_size
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match="ended early while copying a tensor; truncated checkpoint"):
            with OutputFile(tmp_path / "out.bin", direct=direct) as f:
                f.copy(fd, size - 10, 20)
    finally:
        os.close(fd)


def test_an_empty_output_file_is_empty(tmp_path):
    with OutputFile(tmp_path / "out.bin") as f:
        f.write(b"")
    assert (tmp_path / "out.bin").read_bytes() == b""
