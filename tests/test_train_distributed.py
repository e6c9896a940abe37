"""Data parallelism is the Trainer's: `ftserve train` under torchrun, or `accelerate launch`, with two CPU
processes (gloo), two rows each, trains the same adapter as one process with four rows a step, and only the first
process writes and reports.

`accelerate launch --cpu --num_processes 2` is not data-parallel: with --cpu, accelerate 1.16's launch_command
skips its multi-process launcher (every branch is `... and not args.cpu`) and runs one plain process, unless
--mpirun_hostfile hands the processes to mpirun (Intel MPI / oneCCL). `--multi_gpu --num_processes 2` on a
machine without GPUs takes the torchrun path, and the Trainer's processes join over gloo: that is tested here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from ftserve import read_adapter
from ftserve.testing import toy_sentences

from support.processes import ONE_THREAD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    return [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port())]


@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(llama_dir, tmp_path, launch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in toy_sentences(32)))
    common = [str(llama_dir), str(data), "--max-steps", "4", "--lr", "1e-2", "--seed", "0", "--method", "lora+",
              "--logging-steps", "1"]
    cli = [sys.executable, "-m", "ftserve.cli", "train"]
    run([*cli, *common, "-o", "one", "--batch-size", "4"], tmp_path)
    two = run([*launcher(launch), "-m", "ftserve.cli", "train", *common, "-o", "two", "--batch-size", "2"], tmp_path)
    assert two.stdout.count("ftserve merge") == 1  # the first process alone reports
    one, two = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert one.extra["steps_done"] == two.extra["steps_done"] == 4
    for name, state in one.modules.items():
        for key, tensor in state.items():
            torch.testing.assert_close(two.modules[name][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    assert not (tmp_path / "two.checkpoints").exists()
