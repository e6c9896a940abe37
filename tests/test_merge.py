"""Streaming merge (ftserve.merge): equal to the in-memory fold and the unmerged forward for every method on
Llama- and GPT-2-shaped models; sharded bf16 bases rounded once; weighted adapters; every refusal."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ftserve import AdapterFileError, CheckpointError, ConfigError, read_adapter
from ftserve.merge import AdapterSpec, merge_checkpoint
from ftserve.testing import save_tiny_model, tiny_llama

from support.cases import CASE_IDS, CASES
from support.files import tree_digest
from support.models import FP32, IDS, trained
from support.processes import ONE_THREAD

pytestmark = pytest.mark.usefixtures("one_thread")


def stored(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def matrix(llama_dir, gpt2_dir, tmp_path_factory):
    """For every (model, method): adapter folder, unmerged and in-memory-folded logits, streaming-merged folder."""
    root = tmp_path_factory.mktemp("matrix")
    digests = {kind: tree_digest(path) for kind, path in (("llama", llama_dir), ("gpt2", gpt2_dir))}
    rows = {}
    for case in CASES:
        base_dir = llama_dir if case.kind == "llama" else gpt2_dir
        model = trained(AutoModelForCausalLM.from_pretrained(base_dir), case.settings)
        adapter = root / case.id
        model.save_adapter(adapter)
        adapter_digest = tree_digest(adapter)
        with torch.no_grad():
            unmerged = model(input_ids=IDS).logits
            folded = model.merge_and_unload()(input_ids=IDS).logits
        out = root / f"{case.id}-merged"
        merge_checkpoint(base_dir, [AdapterSpec(adapter)], out)
        assert tree_digest(adapter) == adapter_digest
        rows[case.id] = dict(adapter=adapter, unmerged=unmerged, folded=folded, out=out)
    assert digests == {"llama": tree_digest(llama_dir), "gpt2": tree_digest(gpt2_dir)}, "inputs were modified"
    return rows


@pytest.mark.parametrize("row", CASE_IDS)
def test_streaming_merge_equals_in_memory_fold_and_unmerged_forward(matrix, row):
    case = matrix[row]
    merged = AutoModelForCausalLM.from_pretrained(case["out"]).eval()
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
    torch.testing.assert_close(logits, case["folded"], **FP32)
    torch.testing.assert_close(logits, case["unmerged"], **FP32)
    files = sorted(p.name for p in case["out"].iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    card = (case["out"] / "README.md").read_text()
    assert str(case["adapter"]) in card and read_adapter(case["adapter"]).config.method in card
    assert oct(os.stat(case["out"] / "model.safetensors").st_mode & 0o777) == "0o644"


def test_merged_folders_load_with_plain_transformers_in_a_fresh_process(matrix, tmp_path):
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "ids, out = torch.load(sys.argv[1]), {}\n"
        "for path in sys.argv[3:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "    with torch.no_grad(): out[path] = model(input_ids=ids).logits\n"
        "assert not any(m.split('.')[0] in ('ftserve', 'finetuning_toolkit') for m in sys.modules)\n"
        "torch.save(out, sys.argv[2])\n")
    torch.save(IDS, tmp_path / "ids.pt")
    paths = [str(case["out"]) for case in matrix.values()]
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *paths],
                   check=True, cwd=tmp_path, timeout=300, env={**os.environ, **ONE_THREAD})
    logits = torch.load(tmp_path / "out.pt")
    for case in matrix.values():
        torch.testing.assert_close(logits[str(case["out"])], case["unmerged"], **FP32)


def write_three_shards(model, folder: Path) -> None:
    """A Hugging Face folder whose weights are split into exactly three safetensors shards."""
    model.save_pretrained(folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3],
                              names[2 * len(names) // 3:])):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))


def test_sharded_bf16_base_is_rounded_once_and_resharded_consistently(tmp_path, llama_dir):
    base = tmp_path / "base"
    write_three_shards(tiny_llama(dtype=torch.bfloat16), base)
    shutil.copy(llama_dir / "tokenizer.json", base)
    before = tree_digest(base)
    model = trained(AutoModelForCausalLM.from_pretrained(base), dict(method="lora", lora_r=4, lora_alpha=8))
    model.save_adapter(tmp_path / "adapter")
    out = tmp_path / "merged"
    result = merge_checkpoint(base, [AdapterSpec(tmp_path / "adapter")], out, max_shard_size="300KB")
    assert tree_digest(base) == before
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) == len(result.plan.shards) >= 3
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert set(index["weight_map"].values()) == set(shards)
    sizes = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            shard_bytes = sum(f.get_tensor(k).numel() * 2 for k in keys)
            assert shard_bytes <= 300_000 or len(keys) == 1
            sizes += shard_bytes
    assert index["metadata"]["total_size"] == sizes == sum(t.numel() * 2 for t in stored(base).values())
    inputs, merged = stored(base), stored(out)
    assert set(merged) == set(inputs)
    factors = model.lora_factors()
    for key, w in inputs.items():
        module = key.removesuffix(".weight")
        if module in factors:
            expected = (w.float() + factors[module].delta_weight()).to(torch.bfloat16)
            assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], expected), key
        else:
            assert torch.equal(merged[key], w), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_two_adapters_weighted_add_their_deltas(tmp_path, llama_dir):
    a = trained(AutoModelForCausalLM.from_pretrained(llama_dir), dict(method="lora", lora_r=4, lora_alpha=8), seed=1)
    b = trained(AutoModelForCausalLM.from_pretrained(llama_dir), dict(method="vera", lora_r=16), seed=2,
                targets=["q_proj", "down_proj"])
    a.save_adapter(tmp_path / "a")
    b.save_adapter(tmp_path / "b")
    out = tmp_path / "merged"
    specs = [AdapterSpec.parse(f"{tmp_path / 'a'}:0.7"), AdapterSpec.parse(f"{tmp_path / 'b'}:0.3")]
    merge_checkpoint(llama_dir, specs, out)
    fa, fb = a.lora_factors(), b.lora_factors()
    inputs, merged = stored(llama_dir), stored(out)
    for key, w in inputs.items():
        module = key.removesuffix(".weight")
        expected = w.clone()
        if module in fa:
            expected += 0.7 * fa[module].delta_weight()
        if module in fb:
            expected += 0.3 * fb[module].delta_weight()
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-6)
    card = (out / "README.md").read_text()
    assert "| 0.7 | lora |" in card and "| 0.3 | vera |" in card


def test_merge_dtype_option_converts_every_float_tensor(tmp_path, llama_dir, matrix):
    out = tmp_path / "merged"
    merge_checkpoint(llama_dir, [AdapterSpec(matrix["llama-lora"]["adapter"])], out, dtype="bfloat16")
    reference = stored(matrix["llama-lora"]["out"])
    for key, t in stored(out).items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, reference[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_lm_head_is_written_out_and_the_config_untied(tmp_path, gpt2_dir):
    model = trained(AutoModelForCausalLM.from_pretrained(gpt2_dir), dict(method="lora", lora_r=4, lora_alpha=8),
                    targets=["c_attn", "lm_head"])
    model.save_adapter(tmp_path / "adapter")
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
    out = tmp_path / "merged"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_checkpoint(gpt2_dir, [AdapterSpec(tmp_path / "adapter")], out)
    assert any("unties" in str(w.message) for w in caught)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in stored(out) and "lm_head.weight" not in stored(gpt2_dir)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=IDS).logits
    torch.testing.assert_close(logits, unmerged, **FP32)


# Refusals: nothing is written, inputs stay as they were --------------------------------------------------

def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_nan_or_inf_weight_given_from_python_is_refused(tmp_path, weight):
    with pytest.raises(ConfigError, match=f"adapter weight {weight!r} is not a finite number"):
        AdapterSpec(tmp_path / "adapter", weight)


def test_adapter_for_another_architecture_is_refused_naming_the_module(tmp_path, llama_dir, matrix):
    out = tmp_path / "merged"
    with pytest.raises(AdapterFileError, match=r"module transformer\.h\.0\.attn\.c_attn is not in the base"):
        merge_checkpoint(llama_dir, [AdapterSpec(matrix["gpt2-lora"]["adapter"])], out)
    assert_nothing_written(out)


def test_shape_mismatch_is_refused_with_both_shapes(tmp_path, matrix):
    small = save_tiny_model(tmp_path / "small", "llama", hidden=64, heads=2, intermediate=128)
    before = tree_digest(small)
    out = tmp_path / "merged"
    with pytest.raises(AdapterFileError) as info:
        merge_checkpoint(small, [AdapterSpec(matrix["llama-lora"]["adapter"])], out)
    # e.g. "module model.layers.0.mlp.gate_proj does not fit the base: the adapter needs a weight of shape
    # (256, 128), the base has model.layers.0.mlp.gate_proj.weight with shape (128, 64)"
    assert re.search(r"module (model\.layers\.0\.\S+) does not fit the base: the adapter needs a weight of shape "
                     r"\((128|256), (128|256)\), the base has \1\.weight with shape \((64|128), (64|128)\)",
                     str(info.value)), str(info.value)
    assert_nothing_written(out)
    assert tree_digest(small) == before


def test_different_recorded_base_name_is_a_warning_not_a_refusal(tmp_path, llama_dir, matrix):
    adapter = tmp_path / "adapter"
    shutil.copytree(matrix["llama-lora"]["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Some-Other-Name"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ours = json.loads((adapter / "ftserve_config.json").read_text())
    ours["config"]["base_model_name_or_path"] = "meta-llama/Some-Other-Name"
    (adapter / "ftserve_config.json").write_text(json.dumps(ours))
    with pytest.warns(UserWarning, match="Some-Other-Name"):
        merge_checkpoint(llama_dir, [AdapterSpec(adapter)], tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_pickled_base_is_refused_unless_allowed_then_read_safely(tmp_path, llama_dir, matrix):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(llama_dir / "config.json", base)
    torch.save(stored(llama_dir), base / "pytorch_model.bin")
    out = tmp_path / "merged"
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        merge_checkpoint(base, [AdapterSpec(matrix["llama-lora"]["adapter"])], out)
    assert_nothing_written(out)
    merge_checkpoint(base, [AdapterSpec(matrix["llama-lora"]["adapter"])], out, allow_pickle=True)
    reference = stored(matrix["llama-lora"]["out"])
    assert all(torch.equal(t, reference[k]) for k, t in stored(out).items())


def test_existing_output_is_refused_unless_forced_and_inputs_are_never_targets(tmp_path, llama_dir, matrix):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    adapter = [AdapterSpec(matrix["llama-lora"]["adapter"])]
    with pytest.raises(CheckpointError, match="already exists; pass force=True"):
        merge_checkpoint(llama_dir, adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_checkpoint(llama_dir, adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="overlaps the input"):
        merge_checkpoint(llama_dir, adapter, llama_dir, force=True)
    assert (llama_dir / "model.safetensors").exists()


def test_hub_ids_resolve_through_the_local_cache_offline_and_missing_ids_fail_clearly(tmp_path, matrix, hub_cache):
    merge_checkpoint("acme/tiny-llama", [AdapterSpec(matrix["llama-lora"]["adapter"])], tmp_path / "merged")
    assert stored(tmp_path / "merged").keys() == stored(matrix["llama-lora"]["out"]).keys()
    with pytest.raises(CheckpointError, match="acme/missing-model: no such folder, and the Hugging Face hub"):
        merge_checkpoint("acme/missing-model", [AdapterSpec(matrix["llama-lora"]["adapter"])], tmp_path / "m2")
    assert_nothing_written(tmp_path / "m2")
