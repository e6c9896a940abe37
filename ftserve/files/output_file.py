"""Output files written front to back (a merged checkpoint's shards): bytes from memory, byte ranges of input
files, then the length.

Where the file system takes direct I/O (``O_DIRECT``: ext4, XFS, btrfs, most local ones), the bytes gather in
page-aligned stages that a writer thread sends straight to the device, past the page cache, while the next stage
fills. Nothing is copied into the page cache, so nothing has to be written back or reclaimed later: a merge
costs no dirty pages, does not push other programs' files out of memory, and the fsync before the output's
rename (atomic.py) finds nothing left to write. The last stage is padded to the alignment and the file truncated
to its length. Elsewhere (tmpfs, some network and FUSE file systems) writes go through the page cache, and a
thread flushes the file every FLUSH_EVERY bytes (one ``fdatasync`` at a time) so that the final fsync finds
little left; input ranges are then copied inside the kernel (``copy_file_range``).

The file's bytes are the same either way; only the path to the disk differs.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import drop_cache

ALIGNMENT = 4096  # direct I/O wants offsets, lengths and buffers aligned to the device's block: 4 KiB covers them
STAGE_BYTES = 2 * 2**20  # one direct write, a multiple of ALIGNMENT: small, as the stages count in the RSS
STAGES = 3  # one filling while the others are written: two writes in flight keep the device busy
FLUSH_EVERY = 64 * 2**20  # page-cache writes: bytes between two write-behind flushes
COPY_CHUNK_BYTES = 16 * 2**20  # an input range copied by hand (no copy_file_range) goes through memory in chunks


class OutputFile:
    """A new file at ``path`` (replaced if there), written in order: ``write`` bytes, ``copy`` a range of an
    input file, ``close`` (or leave the ``with`` block). ``direct=False`` goes through the page cache even where
    direct I/O works. Not thread-safe: one writer calls it; its own threads only write stages out."""

    def __init__(self, path: str | os.PathLike, direct: bool = True) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd, self.direct = -1, False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o666), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                    raise
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)
        self.length = 0  # bytes written so far, as the file will hold them
        self.threads = ThreadPoolExecutor(STAGES - 1 if self.direct else 1)
        self.stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(STAGES)] if self.direct else []
        self.in_flight: list[Future | None] = [None] * len(self.stages)
        self.stage, self.fill = 0, 0  # the stage being filled and how much of it is
        self.flush: Future | None = None
        self.unflushed = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self.direct:
            size = len(view)
            while view:
                view = view[os.write(self.fd, view):]
            self._wrote(size)
            return
        while view:
            n = min(len(view), STAGE_BYTES - self.fill)
            self.stages[self.stage][self.fill:self.fill + n] = view[:n]
            self._filled(n)
            view = view[n:]

    def copy(self, src_fd: int, offset: int, size: int) -> None:
        """Bytes ``[offset, offset + size)`` of the open file ``src_fd``; the page cache then drops them (an
        input is read once)."""
        done = 0
        while done < size:
            if self.direct:
                n = min(size - done, STAGE_BYTES - self.fill)
                n = os.preadv(src_fd, [memoryview(self.stages[self.stage])[self.fill:self.fill + n]], offset + done)
            else:
                n = _copy_range(src_fd, self.fd, offset + done, size - done)
            if n == 0:
                raise CheckpointError("input file ended early while copying a tensor; truncated checkpoint")
            done += n
            if self.direct:
                self._filled(n)
            else:
                self._wrote(n)
        drop_cache(src_fd, offset, size)

    def close(self) -> None:
        """Write what is left and wait for every write; the file then holds exactly what was written (not yet
        fsynced: atomic.py does that for the whole output)."""
        try:
            if self.direct and self.fill:
                length, self.fill = self.fill, 0
                pad = -length % ALIGNMENT
                self.stages[self.stage][length:length + pad] = bytes(pad)
                self._write_stage(self.stages[self.stage], length + pad, self.length - length)
            for pending in (*self.in_flight, self.flush):
                if pending is not None:
                    pending.result()
            if self.direct:
                os.ftruncate(self.fd, self.length)
        finally:
            self._release()

    def _release(self) -> None:
        self.threads.shutdown(wait=True)
        self.stages = []  # unmapped with their last view (a traceback may still hold one: no close() here)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is None:
            self.close()
        else:  # the caller failed: stop without finishing the file (atomic.py removes it)
            self._release()

    def _filled(self, n: int) -> None:
        """``n`` more bytes in the current stage; a full stage goes to the writer threads."""
        self.fill += n
        self.length += n
        if self.fill < STAGE_BYTES:
            return
        self.in_flight[self.stage] = self.threads.submit(self._write_stage, self.stages[self.stage], STAGE_BYTES,
                                                         self.length - STAGE_BYTES)
        self.stage, self.fill = (self.stage + 1) % len(self.stages), 0
        waiting = self.in_flight[self.stage]
        if waiting is not None:  # the next stage is still being written: its bytes are not ours to overwrite yet
            self.in_flight[self.stage] = None
            waiting.result()

    def _write_stage(self, stage: mmap.mmap, size: int, offset: int) -> None:
        view = memoryview(stage)[:size]
        try:
            while view:
                try:
                    n = os.pwrite(self.fd, view, offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT:
                        raise
                    # the device wants a larger alignment than ALIGNMENT: the rest goes through the page cache
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    continue
                view, offset = view[n:], offset + n
        finally:
            view.release()

    def _wrote(self, n: int) -> None:
        """Page-cache writes: flush behind them every FLUSH_EVERY bytes, one flush at a time."""
        self.length += n
        self.unflushed += n
        if self.unflushed >= FLUSH_EVERY and (self.flush is None or self.flush.done()):
            if self.flush is not None:
                self.flush.result()
            self.unflushed = 0
            self.flush = self.threads.submit(os.fdatasync, self.fd)


def _copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> int:
    """Copy input bytes to the output's current position, inside the kernel (copy_file_range) when it can;
    returns how many were copied (0: the input ended)."""
    try:
        return os.copy_file_range(src_fd, dst_fd, size, offset)
    except (AttributeError, OSError):
        chunk = os.pread(src_fd, min(size, COPY_CHUNK_BYTES), offset)
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]
        return len(chunk)
