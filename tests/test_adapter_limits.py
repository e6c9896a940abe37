"""Adapters that cost before they are checked, or load and then fail every request, against the real server.

Allocation before validation: a PEFT VeRA folder of a few KB whose config declares r = 1,000,000 without its
saved projections made the server build a 1,000,000-row projection pair (GBs) before refusing the adapter.
Load then fail: a LoRA whose scale overflows the serving dtype loaded with 200, then every request on it got a
500. Config files parsed without limits: a deeply nested adapter_config.json gave a 500 (RecursionError).
Each is now a 400 at load (the load API, first use under the adapter root, or --adapter at startup), and the
refused VeRA costs the server next to no memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftserve.cli import main
from ftserve.testing import save_random_adapter

from support.processes import ServerProcess

BASE = "base"
HUGE_RANK = 1_000_000
MEMORY_SLACK = 200 * 2**20  # the projection pair the VeRA config asks for is ~2 GB on this base


def vera_declaring_a_huge_rank(base, path):
    """PEFT's layout without our settings file and without the projections: r is the config's word alone."""
    save_random_adapter(base, "vera", path, seed=1, save_projection=False)
    (path / "ftserve_config.json").unlink()
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": HUGE_RANK}))
    return path


def lora_with_scale(base, path, alpha: float, factor: float = 1.0):
    save_random_adapter(base, "lora", path, seed=2, rank=4)
    (path / "ftserve_config.json").unlink()
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    weights = path / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(weights).items()}, weights)
    return path


def deeply_nested(base, path):
    save_random_adapter(base, "lora", path, seed=3, rank=4)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config)[:-1] + ', "x": ' + "[" * 100_000
                                              + "]" * 100_000 + "}")
    return path


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    save_random_adapter(llama_dir, "lora", root / "good", seed=0, rank=4)
    vera_declaring_a_huge_rank(llama_dir, root / "vera-huge-rank")
    lora_with_scale(llama_dir, root / "alpha-1e38", 1e38, factor=100.0)  # scale x B is inf even in float32
    lora_with_scale(llama_dir, root / "alpha-1e6", 1e6)  # finite in float32, beyond float16's top, 65504
    deeply_nested(llama_dir, root / "deep-config")
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--enable-adapter-api",
                          "--enable-adapter-resolution", "--adapter-root",
                          str(root), "--dtype", "float16", "--max-model-len", "256"],
                         tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def peak_rss(server) -> int:
    """The server process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{server.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def load(server, name: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name},
                      timeout=120)


def assert_400(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    return message


def test_a_vera_config_declaring_a_huge_rank_is_refused_before_any_allocation(server):
    assert load(server, "good").status_code == 200  # the first load's one-off costs, before measuring
    before = peak_rss(server)
    assert_400(load(server, "vera-huge-rank"), "vera-huge-rank", f"r={HUGE_RANK}", "vera_lambda_d")
    first_use = server.client().completions.create  # a request naming the folder loads it on first use
    with pytest.raises(Exception) as refused:
        first_use(model="vera-huge-rank", prompt="the cat", max_tokens=2)
    assert getattr(refused.value, "status_code", None) == 400, refused.value
    assert peak_rss(server) - before < MEMORY_SLACK


@pytest.mark.parametrize("name, words", [
    ("alpha-1e38", ["alpha-1e38", "lora_B reaches", "beyond the largest finite float16", "scale 2.5e+37"]),
    ("alpha-1e6", ["alpha-1e6", "lora_B reaches", "beyond the largest finite float16", "scale 250000"]),
])
def test_an_adapter_whose_scale_overflows_the_serving_dtype_is_refused_at_load(server, name, words):
    assert_400(load(server, name), *words, "lora_alpha")
    names = [m.id for m in server.client().models.list().data]
    assert name not in names and "good" in names


def test_a_deeply_nested_adapter_config_is_a_400_not_a_500(server):
    assert_400(load(server, "deep-config"), "adapter_config.json", "levels deep")


def test_an_adapter_given_at_startup_is_refused_before_any_allocation(llama_dir, root, tmp_path):
    """--adapter (vLLM's --lora-modules) reads the adapter before the server listens: the refusal ends startup."""
    result = subprocess.run([sys.executable, "-c", "from ftserve.cli import main; main()", "serve", str(llama_dir),
                             "--adapter", f"big={root / 'vera-huge-rank'}", "--port", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"r={HUGE_RANK}" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_merge_refuses_a_scale_that_would_write_inf(tmp_path, llama_dir, root):
    result = CliRunner().invoke(main, ["merge", str(llama_dir), str(root / "alpha-1e6"), "-o", str(tmp_path / "m"),
                                       "--dtype", "float16"])
    assert result.exit_code == 1 and "beyond the largest finite float16 value" in result.output, result.output
    assert "--dtype 'float32'" in result.output and not (tmp_path / "m").exists()
    result = CliRunner().invoke(main, ["merge", str(llama_dir), str(root / "alpha-1e38"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and "beyond the largest finite float32 value" in result.output, result.output


def test_a_merge_whose_fold_still_overflows_writes_nothing(tmp_path, llama_dir):
    """The plan bounds the delta; a base weight near the dtype's top plus a modest delta is caught per block."""
    base = tmp_path / "base"
    CliRunner().invoke(main, ["merge", str(llama_dir), str(save_random_adapter(llama_dir, "lora", tmp_path / "a",
                                                                               seed=4, rank=4)),
                              "-o", str(base)])
    weights = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = torch.full_like(weights[name], 65504.0)  # float16's largest: a delta of 16 rounds to inf
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    adapter = lora_with_scale(llama_dir, tmp_path / "b", 8.0, factor=5.0)  # delta within the plan's bound
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--dtype",
                                       "float16"])
    assert result.exit_code == 1 and "gives inf or NaN in torch.float16" in result.output, result.output
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
