"""The README's main job, end to end: `ftserve quickstart` trains, merges, verifies and serves, offline."""

import os
import socket
import subprocess
import sys

import pytest

from ftserve.config import METHODS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_trains_merges_and_serves_every_method(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "ftserve.cli", "quickstart", "-o", str(out), "--steps", "4",
                          "--port", str(_free_port()), "--exit-after-check"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for method in METHODS:
        assert (out / "adapters" / method / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert "verify: OK" in run.stdout
    for name in ("vera", "lora+", "delta-lora", "lora-fa"):  # served as written, not as "loraplus"
        assert f"    {name:<12} -> '" in run.stdout, run.stdout[-2000:]
    assert "client.chat.completions.create" in run.stdout and "temperature=0," in run.stdout
    assert "Loading weights" not in run.stdout + run.stderr and "Traceback" not in run.stderr


def test_loss_last_is_the_mean_of_the_last_five_steps_or_of_all_of_them(tmp_path):
    from ftserve.quickstart import build_base, train_adapter

    for steps in (2, 7):
        losses = []
        result = train_adapter(build_base(tmp_path), "lora", tmp_path, steps, lambda m, s, t, loss: losses.append(loss))
        assert result.last_loss == pytest.approx(sum(losses[-5:]) / min(steps, 5))
