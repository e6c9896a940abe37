"""``ftserve serve`` in a subprocess, and the environment test subprocesses run in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for test subprocesses; conftest's one_thread says why


class ServerProcess:
    """``ftserve serve ...`` in a subprocess on a free loopback port, its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> None:
        self.args, self.log, self.env = args, log, {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.cwd = cwd
        self._start()

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = list(self.args)
        # FTSERVE_TEST_PREFIX_CACHING=0 (conftest.py) reaches an engine in this process only; a server the test
        # did not give either flag gets it off as well.
        if os.environ.get("FTSERVE_TEST_PREFIX_CACHING") == "0" and not any("prefix-caching" in a for a in args):
            args.append("--no-enable-prefix-caching")
        cmd = [sys.executable, "-c", "from ftserve.cli import main; main()", "serve", *args,
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline, retries = time.monotonic() + timeout, 2
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text()
                if "address already in use" in log and retries:  # another process took the free port first
                    retries -= 1
                    self._start()
                    continue
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
