"""`ftserve serve` over HTTP against the same engine called directly, measured in one run. Prints one JSON line.

A small Llama-shaped model (hidden 256, 4 layers, 8 heads, intermediate 512, vocab 1000, fp32) with 8 LoRA
adapters of rank 16 on every linear projection. Each request: a 32-token prompt, 32 greedy new tokens run to
full length, on the adapters in turn. At concurrency 1, 8 and 32 (requests in flight at once):

* direct: ``TorchEngine.generate`` in this process, no HTTP;
* http: the real server (``ftserve serve`` in a subprocess on 127.0.0.1), non-streaming
  ``/v1/completions`` requests over keep-alive connections;

run alternately, round by round (5 rounds of 4, 16 and 64 requests), so both see the same machine. Reported
per level: requests/s (median over rounds) and p50/p99 latency of each, ``http_over_direct``, the median
per-round ratio of HTTP to direct requests/s: the cost of HTTP, JSON and the server's request handling (goal
>= 0.9 at concurrency 32), ``forwards_per_request``, engine steps per request in each run (more steps for
the same work means arrivals were spread over more forward passes), and ``cpu_ms_per_request`` of the direct
run, the server process and the client, with ``server_cpu_over_direct_cpu``: the server's cost measured in
CPU time, whatever the client costs.

The load generator shares the machine's cores with the server (the direct run has none), so by default it is
a lean asyncio HTTP/1.1 client, as a load tester such as wrk would be; ``--client httpx`` sends the same
requests with httpx, whose own CPU time (several times more per request) then counts against the server.

    python benchmarks/serve_http.py                  # the figure (about a minute on 2 cores)
    python benchmarks/serve_http.py --client httpx   # the same, with httpx as the client
    python benchmarks/serve_http.py --quick          # one short round: checks that the script runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from ftserve.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from ftserve.testing import build_tokenizer, save_random_lora, tiny_llama  # noqa: E402

SHAPE = {"vocab_size": 1000, "hidden": 256, "layers": 4, "heads": 8, "intermediate": 512}
ADAPTERS, RANK, PROMPT_TOKENS, NEW_TOKENS, LEVELS = 8, 16, 32, 32, (1, 8, 32)


def write_model(root: Path) -> tuple[Path, list[str]]:
    base = root / "base"
    tiny_llama(**SHAPE).save_pretrained(base)
    build_tokenizer(SHAPE["vocab_size"]).save_pretrained(base)
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        save_random_lora(tiny_llama(**SHAPE), root / name, RANK, seed=100 + i)
    return base, names


def workload(count: int, names: list[str], seed: int) -> list[tuple[list[int], str]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(10, SHAPE["vocab_size"], (PROMPT_TOKENS,), generator=generator).tolist(),
             names[i % len(names)]) for i in range(count)]


async def timed(jobs, concurrency: int, send) -> tuple[float, list[float]]:
    """Run ``send(prompt, adapter)`` over ``jobs`` with at most ``concurrency`` in flight: (requests/s, latencies)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(prompt, adapter):
        async with gate:
            start = time.perf_counter()
            tokens = await send(prompt, adapter)
            latencies.append(time.perf_counter() - start)
            assert tokens == NEW_TOKENS, tokens

    start = time.perf_counter()
    await asyncio.gather(*[one(p, a) for p, a in jobs])
    return len(jobs) / (time.perf_counter() - start), latencies


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def summary(rates: list[float], latencies: list[float]) -> dict:
    latencies = sorted(latencies)
    return {"requests_per_s": round(statistics.median(rates), 3), "p50_s": round(statistics.median(latencies), 4),
            "p99_s": round(latencies[round(0.99 * (len(latencies) - 1))], 4)}


async def measure(base: Path, root: Path, names: list[str], url: str, counts: dict[int, int], rounds: int,
                  client_kind: str, server_pid: int) -> dict:
    """Direct and HTTP runs alternate, round by round, so that both see the same machine; each level's ratio is
    the median of its per-round ratios."""
    from ftserve.engine.torch import TorchEngine

    engine = TorchEngine.from_pretrained(base, model_name="base", max_loras=ADAPTERS, max_batch_size=32)
    this, server = psutil.Process(), psutil.Process(server_pid)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    async def direct(prompt, adapter):
        return sum([len(c.token_ids) async for c in engine.generate(GenerationRequest(prompt, adapter, params))])

    async with engine, httpx.AsyncClient(base_url=url, timeout=600,
                                         limits=httpx.Limits(max_connections=64)) as client:
        raw = RawClient(url)

        async def http(prompt, adapter):
            payload = {"model": adapter, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "ignore_eos": True}
            if client_kind == "raw":
                return (await raw.post("/v1/completions", payload))["usage"]["completion_tokens"]
            response = await client.post("/v1/completions", json=payload)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        for name in names:
            await engine.load_adapter(name, str(root / name))
        for send in (direct, http):  # warm up: first batches, adapter slots, connections
            await timed(workload(32, names, 0), 32, send)

        async def steps(label):
            if label == "direct":
                stats = engine.stats()
            else:
                text = (await client.get("/metrics")).text
                stats = {line.split()[0].removeprefix("ftserve_engine_"): float(line.split()[1])
                         for line in text.splitlines() if line.startswith("ftserve_engine_")}
            return stats["steps_total"]

        figures = {}
        for c in LEVELS:
            runs = {"direct": ([], []), "http": ([], [])}
            forwards = {"direct": 0.0, "http": 0.0}
            cpu = {"direct": 0.0, "server": 0.0, "client": 0.0}
            ratios = []
            for r in range(rounds):
                for label, send in (("direct", direct), ("http", http)):
                    before, here, there = await steps(label), cpu_seconds(this), cpu_seconds(server)
                    rate, latencies = await timed(workload(counts[c], names, 1000 * c + r), c, send)
                    forwards[label] += await steps(label) - before
                    if label == "direct":
                        cpu["direct"] += cpu_seconds(this) - here
                    else:
                        cpu["client"] += cpu_seconds(this) - here
                        cpu["server"] += cpu_seconds(server) - there
                    runs[label][0].append(rate)
                    runs[label][1].extend(latencies)
                ratios.append(runs["http"][0][-1] / runs["direct"][0][-1])
            figures[f"c{c}"] = {"http": summary(*runs["http"]), "direct": summary(*runs["direct"]),
                                "http_over_direct": round(statistics.median(ratios), 3),
                                "forwards_per_request": {k: round(v / (rounds * counts[c]), 2)
                                                         for k, v in forwards.items()},
                                "cpu_ms_per_request": {k: round(1000 * v / (rounds * counts[c]), 1)
                                                       for k, v in cpu.items()},
                                "server_cpu_over_direct_cpu": round(cpu["server"] / cpu["direct"], 3)}
        await raw.close()
        return figures


class RawClient:
    """A lean HTTP/1.1 keep-alive client for JSON POSTs, so that the load generator, which shares the machine's
    cores with the server, costs little CPU (as wrk or vegeta would); httpx costs several times more per request."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                if not reused:  # the server closed an idle keep-alive connection: retry on a new one
                    raise
        status = int(head[0].split()[1])
        length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
        data = json.loads(await reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data}")
        self.idle.append((reader, writer))
        return data

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def start_server(base: Path, root: Path, names: list[str], log: Path,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-c", "from ftserve.cli import main; main()", "serve", str(base),
            "--served-model-name", "base", "--port", str(port), "--max-loras", str(ADAPTERS),
            "--max-num-seqs", "32", "--log-level", "warning", *extra]
    for name in names:
        args += ["--adapter", f"{name}={root / name}"]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round, to check that the script runs")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the HTTP client (see above)")
    args = parser.parse_args()
    quick = args.quick
    counts, rounds = ({1: 2, 8: 8, 32: 32}, 1) if quick else ({1: 4, 8: 16, 32: 64}, 5)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, names = write_model(root)
        proc, url = start_server(base, root, names, root / "server.log")
        try:
            figures = asyncio.run(measure(base, root, names, url, counts, rounds, args.client, proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
    print(json.dumps({
        "benchmark": "serve_http", "quick": quick, "client": args.client, "model": SHAPE, "adapters": ADAPTERS,
        "rank": RANK,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": rounds,
        "requests_per_round": {f"c{c}": counts[c] for c in LEVELS}, "threads": torch.get_num_threads(),
        **figures, "goal_c32": 0.9, "meets_goal_c32": figures["c32"]["http_over_direct"] >= 0.9,
    }))


if __name__ == "__main__":
    main()
