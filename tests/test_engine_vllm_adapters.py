"""What the vLLM engine hands vLLM, checked without vLLM: plain-LoRA exports cached by content, and ranks.

vLLM itself runs these exports in CI's vLLM stage (tests/vllm_engine/); here the export is checked against the
adapter's own exact factors, which is what vLLM computes from it.
"""

import pytest
import torch
from safetensors.torch import load_file

from ftserve.engine import ENGINES
from ftserve.engine.errors import AdapterLoadError
from ftserve.engine.options import EngineOptions, EngineOptionsError
from ftserve.engine.vllm.adapters import (base_shapes, check_rank, derived_max_lora_rank, prepare, round_rank,
                                          zero_adapter)
from ftserve.files.adapter_folder import read_adapter
from ftserve.server.errors import from_exception
from ftserve.testing import peft_dora_model
from support.engine import write_random_adapter


@pytest.mark.parametrize("rank, accepted", [(1, 1), (2, 8), (8, 8), (9, 16), (200, 256), (300, 320), (512, 512)])
def test_ranks_round_up_to_one_vllm_accepts(rank, accepted):
    assert round_rank(rank) == accepted


def test_a_rank_vllm_cannot_take_is_refused_with_the_number():
    with pytest.raises(EngineOptionsError, match="at most 512"):
        round_rank(513)
    with pytest.raises(EngineOptionsError) as info:
        check_rank(24)
    assert info.value.flag == "--max-lora-rank" and "got 24" in info.value.reason and "Use 32" in info.value.reason


def test_max_lora_rank_is_derived_from_the_startup_adapters(llama_dir, tmp_path):
    small = write_random_adapter(llama_dir, tmp_path / "small", "lora", seed=1, r=4)
    wide = write_random_adapter(llama_dir, tmp_path / "wide", "delta-lora", seed=2, r=12)  # exports rank 24
    assert derived_max_lora_rank(llama_dir, {}) == 16
    assert derived_max_lora_rank(llama_dir, {"small": str(small)}) == 16
    assert derived_max_lora_rank(llama_dir, {"small": str(small), "wide": str(wide)}) == 32


@pytest.mark.parametrize("method", ["vera", "delta-lora", "lora"])
def test_the_export_is_the_adapters_exact_plain_lora_written_once_per_content(method, llama_dir, tmp_path):
    adapter = write_random_adapter(llama_dir, tmp_path / "adapter", method, seed=3)
    shapes = base_shapes(llama_dir)
    first = prepare(adapter, shapes, 16, cache=tmp_path / "cache")
    exported = read_adapter(first.export)
    assert exported.config.method == "lora" and exported.raw_config["peft_type"] == "LORA"
    want = first.folder.lora_factors({name: d_in for name, (_, d_in) in shapes.items()})
    assert "lora_alpha" in exported.raw_config and first.rank == max(f.rank for f in want.values())
    got = exported.lora_factors()
    assert set(got) == set(want)
    for name, f in want.items():
        torch.testing.assert_close(got[name].delta_weight(), f.delta_weight(), atol=1e-6, rtol=1e-5)
    stamp = (first.export / "adapter_model.safetensors").stat().st_mtime_ns
    again = prepare(adapter, shapes, 16, cache=tmp_path / "cache")
    assert again.export == first.export and (again.export / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text() + "\n")
    assert prepare(adapter, shapes, 16, cache=tmp_path / "cache").export != first.export


def test_an_adapter_above_the_rank_is_refused_before_anything_is_written(llama_dir, tmp_path):
    adapter = write_random_adapter(llama_dir, tmp_path / "adapter", "delta-lora", seed=4, r=12)
    with pytest.raises(AdapterLoadError, match="rank 24 .* exceeds the engine's max_lora_rank 16"):
        prepare(adapter, base_shapes(llama_dir), 16, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_zero_adapter_changes_nothing(llama_dir, tmp_path):
    path = zero_adapter(base_shapes(llama_dir), cache=tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    assert tensors and all(not t.any() for t in tensors.values())
    assert read_adapter(path).config.lora_r == 1


def test_a_dora_adapter_is_refused_in_one_line_naming_the_torch_engine_and_ftserve_merge(llama_dir, tmp_path):
    """A DoRA folder as PEFT writes it: refused at startup by the vllm entry before vLLM is built (with
    --max-lora-rank derived or given), and at runtime by ``prepare`` (the load API's and resolution's path), an
    AdapterLoadError the server answers 400; nothing is written to the export cache."""
    adapter = tmp_path / "dora"
    peft_dora_model(llama_dir, rank=4, seed=5).save_pretrained(adapter)
    startup = {"dora": str(adapter)}
    refusals = [lambda: ENGINES["vllm"].prepare(str(llama_dir), EngineOptions(), startup),
                lambda: ENGINES["vllm"].prepare(str(llama_dir), EngineOptions(max_lora_rank=16), startup),
                lambda: prepare(adapter, base_shapes(llama_dir), 16, cache=tmp_path / "cache")]
    for refusal in refusals:
        with pytest.raises(AdapterLoadError) as info:
            refusal()
        message = str(info.value)
        assert "\n" not in message and str(adapter) in message
        assert "which vLLM's LoRA cannot serve; serve it with --engine torch, or merge it into the base model " \
               "(`ftserve merge`)" in message
        assert from_exception(info.value).status == 400
    assert not (tmp_path / "cache").exists()
