"""openmp.py: a thread's OpenMP workers are given back, so that the engine thread's pool spins instead of
sleeping between parallel regions (the speed itself is benchmarks/serve_engine.py's, never a test's).

Threads are counted in /proc/self/task of a fresh interpreter, where no other test's threads come and go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ftserve.engine.torch.openmp import _libgomp

pytestmark = pytest.mark.skipif(_libgomp() is None or (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
                                reason="needs torch on libgomp and 2 or more CPUs")

SCRIPT = textwrap.dedent("""
    import json, os, threading, time
    import torch
    from ftserve.engine.torch.openmp import release_pool

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    def settled(expected):  # a joined or freed thread may linger in /proc for a moment
        deadline = time.monotonic() + 5
        while os_threads() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return os_threads()

    def parallel_work():
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        for _ in range(3):
            a @ a

    got = {"start": os_threads()}
    def worker():
        parallel_work()  # this thread's first parallel region: libgomp gives it a pool
        got["with_pool"] = os_threads()
        release_pool()
        got["released"] = settled(got["with_pool"] - 1)  # its freed worker exits a moment later
        parallel_work()  # torch still runs here, on a new pool
        got["again"] = os_threads()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    got["after_thread"] = settled(got["again"] - 2)  # the thread and its worker gone
    parallel_work()
    got["main_pool"] = os_threads()
    other = threading.Thread(target=release_pool)
    other.start()
    other.join()
    got["after_other_release"] = settled(got["main_pool"])
    release_pool()
    got["main_released"] = settled(got["main_pool"] - 1)
    print(json.dumps(got))
""")


def test_release_pool_frees_the_calling_threads_workers_only():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    # (torch starts one thread of its own at its first parallel work, so the counts are compared by difference)
    assert got["released"] == got["with_pool"] - 1  # its one worker (2 threads) gone, the thread still there
    assert got["again"] == got["with_pool"]
    assert got["main_pool"] == got["after_thread"] + 1  # the main thread's worker
    assert got["after_other_release"] == got["main_pool"]  # another thread's release leaves it alone
    assert got["main_released"] == got["main_pool"] - 1
