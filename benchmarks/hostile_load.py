"""32 normal requests with hostile traffic mixed in, against the real server: do the normal ones still get exactly
their solo answers, does every hostile one get a clean 4xx (or a 200 where it is valid), and what does the hostile
traffic cost? Prints one JSON line; exits 1 if a normal answer changed, a hostile request got a 5xx or hung.

The tiny Llama of ``ftserve.testing`` (hidden 128, 2 layers, vocab 1000) served by ``ftserve serve`` in a subprocess
on 127.0.0.1 (started as serve_http.py starts it; 32 sequences a batch, the default 256 concurrent requests), with
three adapters of different methods (lora, vera, delta-lora) whose every factor is random.
The 32 normal requests mix completions and chat, streaming and not, the base and each adapter, greedy (temperature
0) and seeded sampling (temperature 0.8 and a seed: each request has its own generator, so its sample does not
depend on its batch), 16 to 32 new tokens; they go through the official ``openai`` client. Phases:

* solo: the 32 one at a time; their texts are the reference;
* clean: the 32 at once, nothing else: the reference for latency;
* mixed: the 32 at once while 8 workers fire hostile requests (httpx, raw bodies where JSON cannot say it) for
  the whole time, at least one pass over every case: fan-out (``n`` > 1, prompt lists) with one prompt invalid,
  denormal temperature, vanishing repetition penalty, 5000-digit and 2**70 integers, 100000-deep nesting, lone
  surrogates, echo of token ids outside the vocabulary, bad ``logit_bias`` keys, unknown models, malformed JSON,
  oversized bodies, clients that hang up 50 ms into a request or in the middle of a stream, chat and /tokenize
  for two adapters whose own chat templates loop for ever or build 10 GB (``TEMPLATES``), output constraints
  that cannot compile or are over the engine's bounds (hostile_cases.structured_cases); and, all along,
  ``SLOW`` connections that send nothing, stop inside their headers, declare a body and send part of it, or
  declare one over the limit and send none of it (each must be closed by the server, with 408 or 413 where a
  request had begun), and a /health probe every 50 ms (its p99 must stay under a second).

Reported: normal answers equal to solo in each concurrent phase; hostile requests sent, their statuses (client side,
and the server's own 5xx count from /metrics, which also sees requests whose client hung up), hung ones (no answer
in 60 s), the slow connections' outcomes (how the server ended each, "hung" if it did not in 60 s), /health's
latency during the mixed phase, the server's peak and current RSS before and after it, and every 5xx or hang
with its body and ``alone``, its outcome when sent again by itself after the mixed phase (hung after 20 s), which
tells a request that fails on its own from one failed by another in its batch;
``mixed_over_clean_p50`` (median latency of the normal requests, mixed against clean) and the wall times; at the
end, the requests the server still serves, whether it is alive, /health answers 200 and SIGTERM exits 0. Last,
``health_while_tokenizing``: /health's latency while two ~3.9 MB prompts are being tokenized, against idle
(prompts are tokenized in worker threads, off the event loop).

    python benchmarks/hostile_load.py                     # the figure (a minute or two on 2 cores)
    python benchmarks/hostile_load.py --log server.log    # the same, keeping the server's log
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ftserve.testing import save_random_adapter, save_tiny_model, toy_sentences  # noqa: E402
from hostile_cases import cost_cases, structured_cases  # noqa: E402  (this script's folder is on sys.path)
from serve_http import start_server  # noqa: E402

BASE, ADAPTERS = "base", {"lora": "lora", "vera": "vera", "delta": "delta-lora"}
MODELS = (BASE, *ADAPTERS)
NORMAL, HOSTILE_WORKERS, HANG_S, ALONE_HANG_S, NORMAL_TIMEOUT_S = 32, 8, 60.0, 20.0, 300.0
TEMPLATES = {"loop": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
             "gigabytes": "{{ 'x' * 10**10 }}"}  # adapters with their own (hostile) chat template
SLOW = {"idle": b"", "mid_headers": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty",
        "part_of_body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n{\"model\": ",
        "body_over_limit": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000000\r\n\r\n"}
SLOW_EACH = 75  # connections of each kind: 300 in all
HEALTH_EVERY_S = 0.05


def write_models(root: Path) -> tuple[Path, list[str]]:
    """The tiny Llama and one adapter per method of ``ADAPTERS``, in ``root``; (base folder, adapter names)."""
    base = save_tiny_model(root / "base", "llama")
    for seed, (name, method) in enumerate(ADAPTERS.items()):
        save_random_adapter(base, method, root / name, seed)
    for name, template in TEMPLATES.items():
        save_random_adapter(base, "lora", root / name, seed=9)
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(root / name)
    return base, [*ADAPTERS, *TEMPLATES]


# Normal requests ----------------------------------------------------------------------------------------

def normal_requests() -> list[dict]:
    """32 requests over every combination of route, streaming and model; every fifth one sampled with a seed."""
    sentences = toy_sentences(NORMAL, seed=7)
    requests = []
    for i in range(NORMAL):
        sampled = i % 5 == 0
        requests.append({"chat": (i // 4) % 2 == 1, "stream": (i // 8) % 2 == 1, "model": MODELS[i % 4],
                         "text": sentences[i], "max_tokens": 16 + (7 * i) % 17,
                         "temperature": 0.8 if sampled else 0.0, "seed": 1000 + i if sampled else None,
                         "ignore_eos": i % 3 != 0})
    return requests


async def complete(client: openai.AsyncOpenAI, r: dict) -> str:
    """The request's text, through the official client, streamed or not."""
    common = {"model": r["model"], "max_tokens": r["max_tokens"], "temperature": r["temperature"],
              "seed": r["seed"], "stream": r["stream"], "extra_body": {"ignore_eos": r["ignore_eos"]}}
    if r["chat"]:
        answer = await client.chat.completions.create(messages=[{"role": "user", "content": r["text"]}], **common)
        if not r["stream"]:
            return answer.choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in answer if c.choices])
    answer = await client.completions.create(prompt=r["text"], **common)
    if not r["stream"]:
        return answer.choices[0].text
    return "".join([c.choices[0].text async for c in answer if c.choices])


async def timed(client: openai.AsyncOpenAI, r: dict) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        text = await complete(client, r)
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        text = f"<error: {type(exc).__name__}: {exc}>"
    return text, time.perf_counter() - start


async def concurrently(client: openai.AsyncOpenAI, requests: list[dict]) -> tuple[list, list[float], float]:
    start = time.perf_counter()
    results = await asyncio.gather(*[timed(client, r) for r in requests])
    return [t for t, _ in results], [s for _, s in results], time.perf_counter() - start


# Hostile requests ---------------------------------------------------------------------------------------

def raw(body: str) -> bytes:
    return body.encode()


def hostile_cases() -> list[tuple[str, str, bytes | dict, str]]:
    """(name, path, body, how): a dict is sent as JSON, bytes as they are; ``how`` is "send", "drop_50ms" (the
    client closes the connection 50 ms in) or "drop_stream" (the client closes it after the first event)."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    huge = "9" * 5000
    deep = "[" * 100_000 + "]" * 100_000
    user = [{"role": "user", "content": "the cat sees"}]
    return [
        ("fanout_empty_prompt", c, {"model": "lora", "prompt": ["the cat", "", "a dog"], "n": 4, "max_tokens": 8},
         "send"),
        ("fanout_token_outside_vocab", c, {"model": "vera", "prompt": [[1, 5, 6], [1, 10**9]], "n": 3,
                                           "max_tokens": 8}, "send"),
        ("fanout_stream_token_outside_vocab", c, {"model": BASE, "prompt": [[1, 5, 6, 7], [1, 2, 10**9]], "n": 2,
                                                  "max_tokens": 8, "stream": True}, "send"),
        ("fanout_negative_token", c, {"model": "delta", "prompt": [[1, 5], [-1]], "n": 2, "max_tokens": 4}, "send"),
        ("fanout_valid_n16", c, {"model": "lora", "prompt": ["the cat", "a dog"], "n": 8, "max_tokens": 16,
                                 "temperature": 0.9, "seed": 3}, "send"),
        ("chat_fanout_stream_n8", chat, {"model": "vera", "messages": user, "n": 8, "max_tokens": 16,
                                         "temperature": 1.0, "stream": True}, "send"),
        ("temperature_denormal", c, {"model": BASE, "prompt": "the cat", "temperature": 1e-45, "max_tokens": 8},
         "send"),
        ("chat_temperature_denormal_n4", chat, {"model": "delta", "messages": user, "temperature": 1e-45, "n": 4,
                                                "max_tokens": 8}, "send"),
        ("repetition_penalty_tiny", c, {"model": "lora", "prompt": "the cat the cat", "repetition_penalty": 1e-300,
                                        "max_tokens": 8}, "send"),
        ("top_p_tiny", c, {"model": BASE, "prompt": "the dog", "top_p": 1e-300, "temperature": 1.0,
                           "max_tokens": 8}, "send"),
        ("max_tokens_5000_digits", c, raw(f'{{"model": "{BASE}", "prompt": "hi", "max_tokens": {huge}}}'), "send"),
        ("seed_5000_digits", c, raw(f'{{"model": "{BASE}", "prompt": "hi", "seed": {huge}}}'), "send"),
        ("seed_2_pow_70", c, {"model": "vera", "prompt": "the sun", "seed": 2**70, "temperature": 1.0,
                              "max_tokens": 8}, "send"),
        ("chat_seed_2_pow_70_n3", chat, {"model": "lora", "messages": user, "seed": 2**70 - 1, "n": 3,
                                         "temperature": 1.0, "max_tokens": 8}, "send"),
        ("seed_negative_2_pow_70", c, {"model": BASE, "prompt": "hi", "seed": -(2**70), "max_tokens": 4}, "send"),
        ("max_tokens_2_pow_63", c, {"model": BASE, "prompt": "hi", "max_tokens": 2**63}, "send"),
        ("top_k_2_pow_70", c, {"model": BASE, "prompt": "hi", "top_k": 2**70, "max_tokens": 4}, "send"),
        ("prompt_nested_100000_deep", c, raw(f'{{"model": "{BASE}", "prompt": {deep}}}'), "send"),
        ("prompt_lone_surrogate", c, raw(f'{{"model": "{BASE}", "prompt": "the cat \\ud800 sees"}}'), "send"),
        ("chat_lone_surrogate", chat, raw(f'{{"model": "lora", "messages": [{{"role": "user", '
                                          f'"content": "\\udfff"}}]}}'), "send"),
        ("echo_tokens_outside_vocab", c, {"model": BASE, "prompt": [1, 10**6, 5, 2**40], "echo": True,
                                          "max_tokens": 0, "logprobs": 1}, "send"),
        ("echo_fanout_tokens_outside_vocab", c, {"model": "delta", "prompt": [[1, 5], [1, 1000]], "echo": True,
                                                 "n": 2, "max_tokens": 2}, "send"),
        ("logit_bias_word_key", c, {"model": BASE, "prompt": "hi", "logit_bias": {"abc": 5}}, "send"),
        ("logit_bias_negative_key", c, {"model": BASE, "prompt": "hi", "logit_bias": {"-1": 5}}, "send"),
        ("logit_bias_outside_vocab", c, {"model": "lora", "prompt": "hi", "logit_bias": {str(10**9): 5},
                                         "max_tokens": 4}, "send"),
        ("logit_bias_huge_key", c, {"model": BASE, "prompt": "hi", "logit_bias": {"9" * 5000: 1}}, "send"),
        ("unknown_model", c, {"model": "no-such-adapter", "prompt": "hi"}, "send"),
        ("chat_unknown_model_n4", chat, {"model": "../lora", "messages": user, "n": 4}, "send"),
        ("malformed_json", c, raw(f'{{"model": "{BASE}", "prompt": '), "send"),
        ("json_nan", c, raw(f'{{"model": "{BASE}", "prompt": "hi", "temperature": NaN}}'), "send"),
        ("invalid_utf8", c, b'{"model": "base", "prompt": "\xff\xfe"}', "send"),
        ("body_not_object", chat, raw('[1, 2, 3]'), "send"),
        ("oversized_body", c, raw(f'{{"model": "{BASE}", "prompt": "{"a" * (5 * 1024 * 1024)}"}}'), "send"),
        ("drop_after_50ms", c, {"model": "vera", "prompt": "the cat", "n": 4, "max_tokens": 32,
                                "ignore_eos": True}, "drop_50ms"),
        ("chat_drop_after_50ms", chat, {"model": "delta", "messages": user, "max_tokens": 32,
                                        "ignore_eos": True}, "drop_50ms"),
        ("drop_mid_stream", c, {"model": "lora", "prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 32,
                                "ignore_eos": True, "stream": True}, "drop_stream"),
        ("chat_drop_mid_stream", chat, {"model": BASE, "messages": user, "n": 3, "max_tokens": 32,
                                        "ignore_eos": True, "stream": True}, "drop_stream"),
        *[(f"chat_template_{name}", chat, {"model": name, "messages": user, "max_tokens": 4}, "send")
          for name in TEMPLATES],
        *[(f"tokenize_template_{name}", "/tokenize", {"model": name, "messages": user}, "send") for name in TEMPLATES],
        *cost_cases(BASE),
        *structured_cases(BASE),
    ]


async def hostile_one(url: str, path: str, body: bytes | dict, how: str, hang_s: float = HANG_S) -> str:
    """The outcome: the status code, "dropped" (we hung up first, as meant), "hung" (no answer in ``hang_s``) or
    the client-side error's name."""
    try:
        return await asyncio.wait_for(sent(url, path, body, how), hang_s)
    except asyncio.TimeoutError:
        return "hung"


async def sent(url: str, path: str, body: bytes | dict, how: str) -> str:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=HANG_S) as client:  # its own connection, closed on exit
        try:
            if how == "drop_stream":
                async with client.stream("POST", path, content=content, headers=headers) as response:
                    async for _ in response.aiter_lines():
                        break  # leaving the block closes the connection mid-stream
                    return "dropped" if response.status_code == 200 else str(response.status_code)
            send = client.post(path, content=content, headers=headers)
            if how == "drop_50ms":
                try:
                    response = await asyncio.wait_for(send, 0.05)
                except asyncio.TimeoutError:
                    return "dropped"
            else:
                response = await send
            return str(response.status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__


async def hostile_stream(url: str, normal_done: asyncio.Event) -> tuple[collections.Counter, dict, list]:
    """Workers fire the cases in turn until the normal requests are done and every case has gone at least once."""
    cases, turn = hostile_cases(), itertools.count()
    statuses, by_case, failures = collections.Counter(), collections.defaultdict(collections.Counter), []

    async def worker():
        while True:
            i = next(turn)
            if i >= len(cases) and normal_done.is_set():
                return
            name, path, body, how = cases[i % len(cases)]
            outcome = await hostile_one(url, path, body, how)
            statuses[outcome] += 1
            by_case[name][outcome] += 1
            if outcome == "hung" or outcome.startswith("5") or outcome.endswith("Error"):
                shown = body if isinstance(body, dict) else body[:300].decode("utf-8", "replace")
                failures.append({"case": name, "path": path, "outcome": outcome, "how": how,
                                 "body": json.dumps(shown)[:300], "request": (path, body, how)})

    await asyncio.gather(*[worker() for _ in range(HOSTILE_WORKERS)])
    return statuses, {k: dict(v) for k, v in by_case.items()}, failures


async def slow_connection(url: str, sent: bytes) -> str:
    """How the server ended a connection that sent ``sent`` and then nothing: the status it answered ("closed"
    without one), or "hung" if it was still open after ``HANG_S``."""
    host, port = url.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as exc:
        return type(exc).__name__
    try:
        writer.write(sent)
        answer = await asyncio.wait_for(reader.read(), HANG_S)
        return answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    except asyncio.TimeoutError:
        return "hung"
    except OSError as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def slow_connections(url: str) -> dict:
    kinds = [kind for kind in SLOW for _ in range(SLOW_EACH)]
    outcomes = await asyncio.gather(*[slow_connection(url, SLOW[kind]) for kind in kinds])
    by_kind = collections.defaultdict(collections.Counter)
    for kind, outcome in zip(kinds, outcomes):
        by_kind[kind][outcome] += 1
    return {kind: dict(counter) for kind, counter in by_kind.items()}


async def health_probe(url: str, stop: asyncio.Event) -> list[float]:
    """/health's latency every ``HEALTH_EVERY_S`` until ``stop``; a non-200 answer counts as ``HANG_S``."""
    latencies = []
    async with httpx.AsyncClient(timeout=HANG_S) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = (await client.get(url + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start if ok else HANG_S)
            await asyncio.sleep(HEALTH_EVERY_S)
    return latencies


def memory(pid: int) -> dict:
    """The server's peak and current resident memory, MiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: round(int(fields[name].split()[0]) / 1024, 1) for key, name in (("peak_rss_mib", "VmHWM"),
                                                                               ("rss_mib", "VmRSS"))}


# The run ------------------------------------------------------------------------------------------------

def server_counts(url: str) -> dict:
    """5xx answers the server counted (on every route), including those whose client had already hung up, and
    the requests it is still serving."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return {"server_counted_5xx": sum(int(float(line.split()[-1])) for line in lines
                                      if line.startswith("ftserve_http_requests_total{") and 'status="5' in line),
            "server_in_flight_at_end": next(int(float(line.split()[-1])) for line in lines
                                            if line.startswith("ftserve_requests_in_flight "))}


async def measure(url: str, pid: int) -> dict:
    requests = normal_requests()
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                  timeout=NORMAL_TIMEOUT_S,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as client:
        await concurrently(client, requests[:8])  # warm up: first batches, adapter slots, connections
        solo, solo_s = [], []
        for r in requests:
            text, seconds = await timed(client, r)
            solo.append(text)
            solo_s.append(seconds)
        clean, clean_s, clean_wall = await concurrently(client, requests)

        memory_before = memory(pid)
        normal_done = asyncio.Event()
        hostile = asyncio.create_task(hostile_stream(url, normal_done))
        slow = asyncio.create_task(slow_connections(url))
        health = asyncio.create_task(health_probe(url, normal_done))
        await asyncio.sleep(0.2)  # the hostile workers are already at it when the normal ones arrive
        mixed, mixed_s, mixed_wall = await concurrently(client, requests)
        normal_done.set()
        statuses, by_case, failures = await hostile
        health_s = await health
        slow_outcomes = await slow
        memory_after = memory(pid)
    for failure in failures:  # alone, so that a request failed by another one in its batch shows as such
        failure["alone"] = await hostile_one(url, *failure.pop("request"), hang_s=ALONE_HANG_S)
    differ = [{"request": i, **{k: requests[i][k] for k in ("chat", "stream", "model", "temperature")},
               "solo": solo[i], "clean": clean[i], "mixed": mixed[i]}
              for i in range(NORMAL) if not solo[i] == clean[i] == mixed[i]]
    return {"differ": differ, "clean_exact_as_solo": sum(map(str.__eq__, solo, clean)),
            "mixed_exact_as_solo": sum(map(str.__eq__, solo, mixed)), "statuses": statuses, "by_case": by_case,
            "failures": failures, "slow_connections": slow_outcomes,
            "health_during_mixed": {"probes": len(health_s), "p50_s": round(statistics.median(health_s), 4),
                                    "p99_s": round(sorted(health_s)[int(0.99 * (len(health_s) - 1))], 4),
                                    "max_s": round(max(health_s), 4)},
            "memory_before_mixed": memory_before, "memory_after_mixed": memory_after,
            "solo_sum_s": sum(solo_s), "clean_s": clean_s, "clean_wall_s": clean_wall, "mixed_s": mixed_s,
            "mixed_wall_s": mixed_wall}


async def health_while_tokenizing(url: str, prompts: int = 2, probes: int = 20) -> dict:
    """/health's latency idle, then while ``prompts`` completions of a ~3.9 MB prompt (under the 4 MiB body
    limit; refused with 400 once tokenized, far past the context) are being tokenized: the event loop must not
    wait for a tokenizer."""
    sentences = " ".join(toy_sentences(2000, seed=3)) + " "
    text = (sentences * (3_900_000 // len(sentences) + 1))[:3_900_000]

    async def probe(client: httpx.AsyncClient) -> float:
        start = time.perf_counter()
        assert (await client.get(url + "/health")).status_code == 200
        return time.perf_counter() - start

    async with httpx.AsyncClient(timeout=HANG_S) as client:
        idle = [await probe(client) for _ in range(probes)]
        huge = [asyncio.create_task(client.post(url + "/v1/completions",
                                                json={"model": BASE, "prompt": text, "max_tokens": 1}))
                for _ in range(prompts)]
        busy = []
        await asyncio.sleep(0.3)  # the bodies are read and tokenizing
        while not all(task.done() for task in huge):
            busy.append(await probe(client))
            await asyncio.sleep(0.05)
        statuses = sorted({(await task).status_code for task in huge})
    return {"huge_prompt_chars": len(text), "huge_prompt_statuses": statuses, "health_probes_during": len(busy),
            "health_p50_idle_s": round(statistics.median(idle), 4),
            "health_max_during_huge_prompts_s": round(max(busy, default=0.0), 4),
            "health_p50_during_over_idle": round(statistics.median(busy) / statistics.median(idle), 3)
            if busy else None}


def shut_down(proc: subprocess.Popen, url: str) -> dict:
    alive = proc.poll() is None
    try:
        health = httpx.get(url + "/health", timeout=10).status_code
    except httpx.HTTPError:
        health = None
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "did not exit in 60 s"
    return {"server_alive": alive, "health_status": health, "sigterm_exit": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="keep the server's whole log in this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, names = write_models(root)
        proc, url = start_server(base, root, names, root / "server.log")
        try:
            run = asyncio.run(measure(url, proc.pid))
            tokenizing = asyncio.run(health_while_tokenizing(url))
            counts = server_counts(url)
        finally:
            end = shut_down(proc, url)
            log = (root / "server.log").read_text(errors="replace")
            if args.log:
                args.log.write_text(log)
    log_tail = log[-2000:]
    statuses = run["statuses"]
    hung = statuses.get("hung", 0)
    fivexx = sum(n for s, n in statuses.items() if s.startswith("5"))
    exact = NORMAL - len(run["differ"])
    slow_hung = sum(counter.get("hung", 0) for counter in run["slow_connections"].values())
    ok = (exact == NORMAL and fivexx == 0 and counts["server_counted_5xx"] == 0 and hung == 0 and end["server_alive"]
          and slow_hung == 0 and run["health_during_mixed"]["p99_s"] < 1.0
          and tokenizing["huge_prompt_statuses"] == [400]
          and end["health_status"] == 200 and end["sigterm_exit"] == 0)
    print(json.dumps({
        "benchmark": "hostile_load", "model": "ftserve.testing llama (hidden 128, 2 layers, vocab 1000)",
        "adapters": ADAPTERS, "normal_total": NORMAL, "normal_exact_as_solo": exact,
        "clean_exact_as_solo": run["clean_exact_as_solo"], "mixed_exact_as_solo": run["mixed_exact_as_solo"],
        "normal_sampled_with_seed": sum(r["seed"] is not None for r in normal_requests()),
        "normal_differ": run["differ"], "hostile_cases": len(hostile_cases()), "hostile_workers": HOSTILE_WORKERS,
        "hostile_sent": sum(statuses.values()), "hostile_statuses": dict(sorted(statuses.items())),
        "hostile_5xx": fivexx, **counts, "hostile_hung": hung, "hang_after_s": HANG_S,
        "hostile_failures": run["failures"], "hostile_by_case": run["by_case"],
        "slow_connections": run["slow_connections"], "slow_connections_hung": slow_hung,
        "health_during_mixed": run["health_during_mixed"], "memory_before_mixed": run["memory_before_mixed"],
        "memory_after_mixed": run["memory_after_mixed"],
        "solo_sum_s": round(run["solo_sum_s"], 3), "clean_wall_s": round(run["clean_wall_s"], 3),
        "mixed_wall_s": round(run["mixed_wall_s"], 3),
        "clean_p50_s": round(statistics.median(run["clean_s"]), 4),
        "mixed_p50_s": round(statistics.median(run["mixed_s"]), 4),
        "mixed_over_clean_p50": round(statistics.median(run["mixed_s"]) / statistics.median(run["clean_s"]), 3),
        "mixed_over_clean_wall": round(run["mixed_wall_s"] / run["clean_wall_s"], 3),
        "mixed_wall_over_solo_sum": round(run["mixed_wall_s"] / run["solo_sum_s"], 3),
        **tokenizing, **end, "ok": ok, **({} if ok else {"server_log_tail": log_tail}),
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
