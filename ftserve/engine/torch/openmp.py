"""Giving back the OpenMP thread pools of threads other than the engine's, so that the engine's stays fast.

torch's CPU kernels and MKL's GEMMs run on GNU OpenMP (libgomp, which torch's wheels ship), and libgomp keeps
a pool of worker threads for every thread that ever ran a parallel region, asleep once idle. Between two
regions a worker spins for the next one, but only while the process holds no more libgomp threads than it
has CPUs (libgomp's ``gomp_managed_threads > gomp_available_cpus``, config/linux/wait.h); past that, every
worker of every pool waits on a futex, and each of the ~600 parallel regions of a decode step pays a wake-up.
The engine computes on a thread of its own, and the thread that loaded the model (and each executor thread
that read an adapter) keeps a pool: the engine's pool alone already reaches the CPU count, so with those
pools alive it runs throttled, and the LoRA term's many small GEMMs suffer most (benchmarks/serve_engine.py
has the figures).

So those threads give their pools back with OpenMP 5's ``omp_pause_resource_all``, which frees the calling
thread's pool only (a later parallel region on that thread makes a new one) and is a cheap no-op when there
is none: every call into the engine on its event loop's thread (start, each request, each load) does it
there, and an adapter read does it on its executor thread when it is done. Torch work a
user runs beside a live engine on a thread of their own keeps a pool; that costs speed, never correctness.

vLLM's CPU worker is a process of its own, so it does not meet this. With another OpenMP runtime (Intel's, or
macOS builds), or none, ``release_pool`` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger("ftserve.engine")

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: frees the threads, not only their stacks' use


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch's own), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: ("/torch/" not in p, p)):  # torch's own first, if there are two
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            return lib
    return None


def release_pool() -> None:
    """Free the calling thread's OpenMP worker threads (libgomp), if it has any; never fails."""
    lib = _libgomp()
    if lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_HARD) != 0:
        logger.debug("omp_pause_resource_all refused (inside a parallel region)")
