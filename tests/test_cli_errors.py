"""The command line fails fast and in its own words: a busy port or an impossible --max-model-len is refused
before any slow work, the library's Python names become the command's flags, and the libraries' progress bars
stay out of our output."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.cli import main
from ftserve.engine.options import EngineOptionsError
from ftserve.engine.torch.engine import TorchEngine
from ftserve.errors import CheckpointError
from ftserve.merge import AdapterSpec, merge_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def busy_port():
    """A port another server listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "adapter"
    FineTuningModel(AutoModelForCausalLM.from_pretrained(llama_dir),
                    FineTuningConfig(lora_r=2, target_modules=["q_proj"])).save_adapter(path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_serve_refuses_a_busy_port_before_loading_anything(llama_dir, busy_port):
    result = run("serve", llama_dir, "--port", busy_port)
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{busy_port}" in result.output and "--port" in result.output
    assert "Loading" not in result.output and "Traceback" not in result.output


def test_quickstart_refuses_a_busy_port_before_training(tmp_path, busy_port):
    result = run("quickstart", "-o", tmp_path / "qs", "--port", busy_port)
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{busy_port}" in result.output, result.output
    assert not (tmp_path / "qs").exists()


def test_a_max_model_len_beyond_the_model_is_refused_with_both_numbers(llama_dir):
    result = run("serve", llama_dir, "--max-model-len", 100000)
    assert result.exit_code == 2 and "--max-model-len" in result.output, result.output
    assert "is 100000, beyond the model's 512 positions" in result.output and "Loading" not in result.output
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(EngineOptionsError, match="max_model_len is 100000, beyond the model's 512 positions"):
        TorchEngine(model, AutoTokenizer.from_pretrained(llama_dir), max_model_len=100000)


def test_the_library_speaks_python_and_the_command_its_flags(tmp_path, llama_dir, adapter):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists; pass force=True to replace it"):
        merge_checkpoint(llama_dir, [AdapterSpec(adapter)], out)
    result = run("merge", llama_dir, adapter, "-o", out)
    assert result.exit_code == 1 and "already exists; pass --force to replace it" in result.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_dir / "config.json", pickled)
    torch.save(load_file(llama_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    result = run("merge", pickled, adapter, "-o", tmp_path / "m")
    assert result.exit_code == 1 and "pass --allow-pickle (read with weights_only=True)" in result.output
    assert "allow_pickle" not in result.output and "Traceback" not in result.output
    result = run("serve", llama_dir, "--max-num-seqs", 16, "--max-num-batched-tokens", 16)
    assert result.exit_code == 2 and "must be > --max-num-seqs (16)" in result.output


def test_option_names_in_a_path_stay_as_they_are(tmp_path, llama_dir, adapter):
    """A folder named like an option (allow_pickle) is part of a path, not a Python name to translate."""
    out = tmp_path / "allow_pickle" / "out"
    out.mkdir(parents=True)
    result = run("merge", llama_dir, adapter, "-o", out)
    assert result.exit_code == 1 and f"{out} already exists; pass --force" in result.output.replace("\n", "")


def test_no_library_progress_bars_unless_verbose(tmp_path, llama_dir, adapter):
    """transformers draws its "Loading weights" bar on stderr; `ftserve verify` loads the models three times."""
    assert run("merge", llama_dir, adapter, "-o", tmp_path / "m").exit_code == 0
    command = [sys.executable, "-m", "ftserve.cli", "verify", str(llama_dir), str(adapter), str(tmp_path / "m")]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "OK:" in quiet.stdout, quiet.stderr
    assert "Loading weights" not in quiet.stdout + quiet.stderr
    verbose = subprocess.run(command[:3] + ["-v"] + command[3:], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr
