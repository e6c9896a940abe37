"""Fuzz the real ``ftserve serve`` from its own OpenAPI document with schemathesis; then check it still serves.

What it does, in order:

1. Builds the tiny Llama (``ftserve.testing.save_tiny_model``) and a LoRA with random factors, and an adapter
   root holding a copy of that LoRA.
2. Starts ``ftserve serve BASE`` on 127.0.0.1 with ``--adapter fuzz-lora=PATH``, ``--enable-adapter-api
   --adapter-root ROOT`` and ``--api-key KEY``; checks that /v1 answers 401 without the key and with a wrong one.
3. Sends a greedy completion (temperature 0, a fixed prompt, max_tokens 8) to the base and to the adapter,
   and keeps the texts (they must differ, or the adapter check below would prove nothing).
4. Runs ``st run`` on ``/openapi.json`` with the key: positive and negative generation, the examples,
   coverage and fuzzing phases, the checks ``not_a_server_error``, ``status_code_conformance``,
   ``content_type_conformance``, ``response_schema_conformance`` and ``negative_data_rejection`` (a body
   that breaks the schema must get a 4xx). ``schemathesis_hooks.py`` aims most requests at served models with
   small sizes, and writes every answer down. Bounded by ``--max-examples`` per operation and round and
   ``--max-time`` for the whole run; a request that takes longer than ``--request-timeout`` is a hang.
5. Afterwards: the same two completions give exactly the same texts, GET /health is 200, SIGTERM makes the
   server exit 0 within 30 s, and its log holds no traceback beyond one per 500 answered.
6. Prints the answers by operation and status, each distinct failure with the smallest request that showed
   it (as curl), each traceback in the server's log, then one JSON line: operations, requests sent, 5xx,
   hangs, schema violations (responses off the document), invalid_accepted (bodies off the document answered
   2xx), network_errors (other transport failures; once an operation has hung twice, schemathesis waits only
   4x its slowest answer, so these are mostly hangs cut short), and the checks of 2, 3 and 5.

Exits 0 only if every count of failures is 0 and every check of 2, 3 and 5 held.

Usage: ``python fuzz/run_schemathesis.py [--max-examples N] [--max-time S] [--request-timeout S]
[--workers N] [--seed N] [--workdir DIR]``. Needs ``schemathesis>=4,<5`` (``.ci/run`` installs it). With
``--workdir`` the models, server log, schemathesis output and reports stay there; without it they go to a
temporary folder, removed after a clean run and kept (its path printed) after a failing one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
BASE_NAME, ADAPTER_NAME = "tiny-base", "fuzz-lora"
PROMPT = "the cat sees"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
EXIT_WAIT = 30


def build_models(work: Path) -> tuple[Path, Path, Path]:
    """The tiny Llama, a LoRA over it with random factors, and an adapter root that holds a copy of the LoRA."""
    from transformers import AutoModelForCausalLM

    from ftserve.testing import save_random_lora, save_tiny_model

    base = save_tiny_model(work / "base", "llama")
    adapter = save_random_lora(AutoModelForCausalLM.from_pretrained(base), work / "adapter", rank=8, seed=0)
    root = work / "root"
    shutil.copytree(adapter, root / "copy")
    return base, adapter, root


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from ftserve.cli import main; main()", "serve", *args,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up (exit status {proc.wait()}):\n{log.read_text()[-4000:]}")


def greedy_texts(url: str, key: str) -> dict[str, str]:
    """The base's and the adapter's greedy completion of PROMPT, max_tokens 8."""
    texts = {}
    for model in (BASE_NAME, ADAPTER_NAME):
        answer = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                            json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        answer.raise_for_status()
        texts[model] = answer.json()["choices"][0]["text"]
    return texts


def auth_holds(url: str, key: str) -> bool:
    refused = [httpx.get(url + "/v1/models", headers=headers, timeout=10).status_code
               for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key})]
    allowed = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    names = {card["id"] for card in allowed.json().get("data", [])} if allowed.status_code == 200 else set()
    return refused == [401, 401, 401] and names == {BASE_NAME, ADAPTER_NAME}


def run_schemathesis(url: str, key: str, base: Path, root: Path, work: Path, opts) -> tuple[int, dict, list[dict]]:
    """``st run`` with the hooks; its exit status, its JSON report, and the hooks' record of each request."""
    record, report = work / "requests.ndjson", work / "schemathesis-report.json"
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py"), "FUZZ_RECORD": str(record),
           "FUZZ_MODELS": f"{BASE_NAME},{ADAPTER_NAME}", "FUZZ_PROTECTED": f"{BASE_NAME},{ADAPTER_NAME}",
           "FUZZ_ROOT_FOLDERS": f"copy,{root / 'copy'}", "FUZZ_VOCAB": str(vocab)}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}",
           "--checks", CHECKS, "--mode", "all", "--phases", "examples,coverage,fuzzing",
           "--max-examples", str(opts.max_examples), "--max-time", str(opts.max_time),
           "--request-timeout", str(opts.request_timeout), "--workers", str(opts.workers), "--seed", str(opts.seed),
           "--generation-database", "none", "--suppress-health-check", "all", "--output-sanitize", "false",
           "--no-color", "--report", "json", "--report-json-path", str(report)]
    with open(work / "schemathesis.txt", "w") as out:
        try:
            status = subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=opts.max_time + opts.request_timeout + 120).returncode
        except subprocess.TimeoutExpired:
            status = -1  # schemathesis itself overran its bounds
    print((work / "schemathesis.txt").read_text(), flush=True)
    lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return status, json.loads(report.read_text()) if report.exists() else {}, lines


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM; the exit status, or None (and a kill) if the server is still up after EXIT_WAIT seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(EXIT_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


FOR_A_500 = "unexpected error while serving a request"  # what the server logs with the traceback of a 500


def tracebacks(log: str) -> list[tuple[str, str]]:
    """(the log line before it, its exception line) for each traceback in the server's log."""
    found, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            rest = (lines[j] for j in range(i + 1, len(lines)))
            exception = next((x for x in rest if x and not x.startswith((" ", "\t"))), "?")
            found.append((lines[i - 1] if i else "", exception[:300]))
    return found


def unexplained(traces: list[tuple[str, str]], errors_500: int) -> int:
    """Tracebacks that no 500 answer accounts for: beyond one per 500, or with an exception no 500 had."""
    exceptions_500 = [exception for header, exception in traces if FOR_A_500 in header]
    others = [exception for header, exception in traces if FOR_A_500 not in header]
    return max(0, len(exceptions_500) - errors_500) + sum(1 for e in others if e not in exceptions_500)


def curl(url: str, op: str, body) -> str:
    method, path = op.split(" ", 1)
    data = f" -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}" if body is not None else ""
    return f"curl -sS -X {method} {url}{path} -H \"Authorization: Bearer $KEY\"{data}"


def distinct_failures(lines: list[dict], timeout: float) -> dict[tuple, dict]:
    """One entry per (operation, what went wrong), with the smallest body that showed it."""
    groups: dict[tuple, dict] = {}
    for line in lines:
        if line["kind"] == "response" and line["status"] >= 500:
            key = (line["op"], f"HTTP {line['status']}")
        elif line["kind"] == "failure" and line["code"] != "ST101":  # ST101 is the 5xx above
            key = (line["op"], f"{line['code']} {line['title']}")
        elif line["kind"] == "network_error":
            key = (line["op"], f"hang (no answer in {timeout} s)" if line["elapsed"] >= timeout - 1
                   else "network error")
        else:
            continue
        detail = "; ".join(x for x in line.get("message", "").splitlines() if x and not x.startswith("Expected:"))
        group = groups.setdefault(key, {"count": 0, "body": line["body"], "detail": detail, "bodies": []})
        group["count"] += 1
        group["bodies"].append(line["body"])
        if len(json.dumps(line["body"])) < len(json.dumps(group["body"])):
            group.update(body=line["body"], detail=detail)
    return groups


def replay_5xx(url: str, key: str, groups: dict[tuple, dict], tries: int = 10) -> int:
    """Send each 5xx group's bodies again, one at a time, smallest first, and keep the first that fails alone:
    while other requests run, a request can fail for another's fault, so the smallest body may be innocent.
    Returns how many 500s the replays got (each leaves a traceback in the log)."""
    errors_500 = 0
    for (op, what), group in groups.items():
        if not what.startswith("HTTP 5"):
            continue
        method, path = op.split(" ", 1)
        group["alone"] = None
        for body in sorted(group["bodies"], key=lambda b: len(json.dumps(b)))[:tries]:
            try:
                answer = httpx.request(method, url + path, json=body, timeout=30,
                                       headers={"Authorization": f"Bearer {key}"})
            except httpx.HTTPError:
                continue
            if answer.status_code >= 500:
                errors_500 += answer.status_code == 500
                group["alone"] = body
                break
    return errors_500


def after_checks(url: str, key: str) -> tuple[dict[str, str] | str, int | str]:
    """The greedy texts and the /health status once fuzzing is over, or what went wrong in asking."""
    try:
        texts: dict[str, str] | str = greedy_texts(url, key)
    except httpx.HTTPError as exc:
        texts = f"{type(exc).__name__}: {exc}"
    try:
        health: int | str = httpx.get(url + "/health", timeout=10).status_code
    except httpx.HTTPError as exc:
        health = f"{type(exc).__name__}: {exc}"
    return texts, health


def counts_of(lines: list[dict], report: dict, timeout: float) -> dict:
    answers = Counter(line["status"] for line in lines if line["kind"] == "response")
    failures = Counter(line["code"] for line in lines if line["kind"] == "failure")
    silent = [line for line in lines if line["kind"] == "network_error"]
    hangs = sum(1 for line in silent if line["elapsed"] >= timeout - 1)
    return {
        "operations": report.get("operations", {}).get("tested"),
        "requests": len(silent) + sum(answers.values()),
        "test_cases": report.get("test_cases", {}).get("generated"),
        "5xx": sum(n for status, n in answers.items() if status >= 500),
        "hangs": hangs,
        "schema_violations": sum(n for code, n in failures.items() if code not in ("ST101", "ST201")),
        "invalid_accepted": failures["ST201"],
        "network_errors": len(silent) - hangs,
        "schemathesis_errors": sum(error.get("count", 1) for error in report.get("errors", [])),
    }


def print_findings(url: str, lines: list[dict], groups: dict[tuple, dict], traces: list[tuple[str, str]]) -> None:
    by_operation: dict[str, Counter] = {}
    for line in lines:
        if line["kind"] == "response":
            by_operation.setdefault(line["op"], Counter())[line["status"]] += 1
    for op, statuses in sorted(by_operation.items()):
        print(f"ANSWERS {op}: {dict(sorted(statuses.items()))}")
    for (op, what), group in sorted(groups.items()):
        print(f"FAILURE {op}: {what} ({group['count']}x){' - ' + group['detail'] if group['detail'] else ''}")
        if "alone" not in group:
            print(f"  {curl(url, op, group['body'])}")
        elif group["alone"] is not None:
            print(f"  alone, too: {curl(url, op, group['alone'])}")
        else:
            print(f"  not alone: only while other requests ran, e.g. {curl(url, op, group['body'])}")
    for (header, exception), n in Counter(traces).items():
        print(f"TRACEBACK in the server log ({n}x), after {header.strip()!r}: {exception}")


def fuzz(opts, work: Path) -> bool:
    base, adapter, root = build_models(work)
    key, log = secrets.token_urlsafe(16), work / "server.log"
    proc, url = start_server([str(base), "--served-model-name", BASE_NAME, "--adapter", f"{ADAPTER_NAME}={adapter}",
                              "--enable-adapter-api", "--adapter-root", str(root), "--api-key", key,
                              "--max-model-len", "256"], log)
    try:
        auth = auth_holds(url, key)
        before = greedy_texts(url, key)
        started = time.monotonic()
        st_status, report, lines = run_schemathesis(url, key, base, root, work, opts)
        fuzz_seconds = time.monotonic() - started
        after, health = after_checks(url, key)
        groups = distinct_failures(lines, opts.request_timeout)
        replayed_500 = replay_5xx(url, key, groups)
    finally:
        exit_status = stop(proc) if proc.poll() is None else proc.returncode
    traces = tracebacks(log.read_text())
    counts = counts_of(lines, report, opts.request_timeout)
    answered_500 = replayed_500 + sum(1 for line in lines if line["kind"] == "response" and line["status"] == 500)
    checks = {
        "auth_refuses_bad_keys": auth,
        "adapter_changes_output": before[BASE_NAME] != before[ADAPTER_NAME],
        "same_text_after": after == before,
        "health_after": health,
        "exit_status_on_sigterm": exit_status,
        "tracebacks_in_log": len(traces),
        "tracebacks_without_a_500": unexplained(traces, answered_500),
    }
    print_findings(url, lines, groups, traces)
    if after != before:
        print(f"CHANGED: greedy texts before fuzzing {before}, after {after}")
    ok = (st_status == 0 and not any(counts[k] for k in counts if k not in ("operations", "requests", "test_cases"))
          and auth and checks["adapter_changes_output"] and after == before and health == 200 and exit_status == 0
          and checks["tracebacks_without_a_500"] == 0)
    print(json.dumps({"ok": ok, **counts, "distinct_failures": len(groups), **checks, "seed": opts.seed,
                      "fuzz_seconds": round(fuzz_seconds, 1), "schemathesis_exit_status": st_status}), flush=True)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=50, help="test cases per operation and round")
    parser.add_argument("--max-time", type=int, default=180, help="seconds for the whole schemathesis run")
    parser.add_argument("--request-timeout", type=float, default=60, help="seconds after which a request is a hang")
    parser.add_argument("--workers", type=int, default=2, help="schemathesis workers (concurrent requests)")
    parser.add_argument("--seed", type=int, default=random.randrange(2**32), help="schemathesis's seed")
    parser.add_argument("--workdir", type=Path, help="keep models, logs and reports here")
    opts = parser.parse_args()
    if importlib.util.find_spec("schemathesis") is None:
        raise SystemExit("fuzz/run_schemathesis.py needs schemathesis 4: pip install 'schemathesis>=4,<5'")
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="ftserve-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = fuzz(opts, work.resolve())
    if ok and opts.workdir is None:
        shutil.rmtree(work)
    elif not ok:
        print(f"fuzz: FAILED; the server log, schemathesis's output and the request record are in {work}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
