"""DoRA (arXiv:2402.09353) folded, merged, verified, inspected and exported, with PEFT as the oracle.

A DoRA adapter on a base weight ``W (d_out x d_in)`` means ``W' = diag(r) (W + s B A)``, ``r = m /
||W + s B A||_row``. The adapters here are made by PEFT itself (``LoraConfig(use_dora=True)``) on a Llama
(``nn.Linear``) and a GPT-2 (``Conv1D``, stored transposed), with random ``A``, ``B`` and magnitudes spread around
the adapted rows' norms, so that ``r`` is far from one.

PEFT's ``merge_and_unload`` computes, per weight, in fp32 from the stored ``W`` (bf16 upcast): ``delta = (B @ A) *
s``, ``norm = torch.linalg.norm(W + delta, dim=1)``, ``W' = (m / norm) * (W + delta)``, rounded once to the
weight's dtype. The fold and the merge compute it in the same order, so a ``nn.Linear`` weight is PEFT's bit for
bit. A ``Conv1D`` weight is stored transposed: PEFT takes the norm over a transposed view, and the streaming merge
sums each row's squares block by block in float64, so the two norms may differ in the last bits, and the weights
by a few fp32 units in the last place (``CONV1D``: a relative 1e-6 in fp32, one unit in bf16).
"""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ftserve import AdapterFileError, ConfigError, export_adapter, export_approximate, load_adapter
from ftserve.cli import main
from ftserve.merge import AdapterSpec, merge_checkpoint, verify_merge

from support.models import FP32, IDS

pytestmark = pytest.mark.usefixtures("one_thread")

CONV1D = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=0)}
MERGED_FP32 = dict(rtol=1e-5, atol=1e-5)  # merged vs unmerged logits, fp32
RANK, ALPHA = 4, 8


def peft_dora(base_dir, path, seed: int = 0):
    """A PEFT DoRA adapter on every linear layer of the base, random, saved at ``path``."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    conv1d = model.config.model_type == "gpt2"
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", use_dora=True,
                        fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 / p.shape[-1] ** 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(path)
    return path


def peft_merged(base_dir, adapter, dtype=torch.float32) -> dict[str, torch.Tensor]:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def assert_peft_weight(mine: torch.Tensor, theirs: torch.Tensor, kind: str, key: str) -> None:
    assert mine.dtype == theirs.dtype, key
    if kind == "llama":
        assert torch.equal(mine, theirs), key
    else:
        torch.testing.assert_close(mine, theirs, **CONV1D[mine.dtype], msg=key)


def stored(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_keys(merged: dict, reference: dict) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Pairs of tensors by name; a checkpoint may drop the model prefix (GPT-2's ``transformer.``) or a tied
    output embedding."""
    pairs = []
    for key, tensor in reference.items():
        name = key if key in merged else key.split(".", 1)[1]
        if name in merged:
            pairs.append((merged[name], tensor, key))
    return pairs


@pytest.fixture(scope="module")
def bases(llama_dir, gpt2_dir, tmp_path_factory):
    """The conftest bases, in fp32 and saved again in bf16 without tokenizer files (verify then feeds fixed ids)."""
    out = {}
    for kind, path in (("llama", llama_dir), ("gpt2", gpt2_dir)):
        out[kind, torch.float32] = path
        bf16 = tmp_path_factory.mktemp(f"{kind}-bf16") / "base"
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(bf16)
        out[kind, torch.bfloat16] = bf16
    return out


@pytest.fixture(scope="module")
def doras(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return {kind: peft_dora(bases[kind, torch.float32], root / kind, seed=seed)
            for seed, kind in enumerate(("llama", "gpt2"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_gives_peft_merge_and_unload(kind, dtype, bases, doras):
    base_dir = bases[kind, dtype]
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), doras[kind]).eval()
    unmerged = model(input_ids=IDS).logits.detach()
    ours = model.merge_and_unload()
    for mine, theirs, key in same_keys(ours.state_dict(), peft_merged(base_dir, doras[kind], dtype)):
        assert_peft_weight(mine, theirs, kind, key)
    if dtype == torch.float32:
        torch.testing.assert_close(ours(input_ids=IDS).logits, unmerged, **MERGED_FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streaming_merge_gives_peft_merge_and_unload_and_verifies(kind, dtype, bases, doras, tmp_path):
    base_dir, out = bases[kind, dtype], tmp_path / "merged"
    merge_checkpoint(base_dir, [AdapterSpec(doras[kind])], out)
    merged = stored(out)
    pairs = same_keys(merged, peft_merged(base_dir, doras[kind], dtype))
    assert len(pairs) == len(merged)
    for mine, theirs, key in pairs:
        assert mine.dtype == dtype, key
        assert_peft_weight(mine, theirs, kind, key)
    report = verify_merge(base_dir, [AdapterSpec(doras[kind])], out, new_tokens=2)
    assert report.passed, report.summary()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_logits_equal_the_unmerged_models(kind, bases, doras, tmp_path):
    """fp32: within 1e-5 of the unmerged model; bf16: the merged weights are the fp32 fold rounded once."""
    unmerged = load_adapter(AutoModelForCausalLM.from_pretrained(bases[kind, torch.float32]), doras[kind]).eval()
    merge_checkpoint(bases[kind, torch.float32], [AdapterSpec(doras[kind])], tmp_path / "fp32")
    merge_checkpoint(bases[kind, torch.float32], [AdapterSpec(doras[kind])], tmp_path / "bf16", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, unmerged(input_ids=IDS).logits, **MERGED_FP32)
    fp32, bf16 = stored(tmp_path / "fp32"), stored(tmp_path / "bf16")
    for key, tensor in fp32.items():
        assert torch.equal(bf16[key], tensor.to(torch.bfloat16)), key


def test_a_dora_adapter_merges_only_on_its_own_and_the_cli_says_why(llama_dir, doras, tmp_path):
    other = peft_dora(llama_dir, tmp_path / "other", seed=7)
    result = CliRunner().invoke(main, ["merge", str(llama_dir), str(doras["llama"]), f"{other}:0.5",
                                       "-o", str(tmp_path / "m")])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: {doras['llama']}: a DoRA adapter merges only on its own, not with 1 other")
    assert "such norms do not add across adapters" in line
    assert not (tmp_path / "m").exists()
    half = CliRunner().invoke(main, ["merge", str(llama_dir), f"{doras['llama']}:0.5", "-o", str(tmp_path / "half"),
                                     "--verify"])
    assert half.exit_code == 0 and "OK: largest logit difference" in half.output, half.output


def test_inspect_shows_a_dora_adapter_as_row_scaled_and_not_for_vllm(doras):
    info = json.loads(CliRunner().invoke(main, ["inspect", str(doras["gpt2"]), "--json"]).output)
    assert info["method"] == "dora" and info["rank"] == RANK
    assert info["form"].startswith("row-scaled (DoRA): W' = diag(m / ||W + s B A||_row) (W + s B A)")
    assert info["vllm"].startswith("no: a DoRA adapter (method dora) scales each output row by m / ||W + s B A||")
    assert "approximate_rank=R" in info["vllm"]


def test_export_refuses_dora_naming_why_and_the_approximation(doras, tmp_path):
    with pytest.raises(AdapterFileError) as caught:
        export_adapter(doras["llama"], tmp_path / "plain")
    message = str(caught.value)
    assert "\n" not in message and "scales each output row by m / ||W + s B A||" in message
    assert "approximate_rank=R" in message and not (tmp_path / "plain").exists()
    result = CliRunner().invoke(main, ["export", str(doras["llama"]), "-o", str(tmp_path / "plain")])
    assert result.exit_code == 1 and "--approximate-rank R" in result.output


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_full_rank_approximation_is_exact_and_peft_runs_it_as_the_merged_model(kind, bases, doras, tmp_path):
    base_dir = bases[kind, torch.float32]
    full = min(min(w.shape) for w in stored(base_dir).values() if w.dim() == 2)  # conftest models: hidden size
    result = CliRunner().invoke(main, ["export", str(doras[kind]), "-o", str(tmp_path / "plain"), "--base",
                                       str(base_dir), "--approximate-rank", str(full)])
    assert result.exit_code == 0, result.output
    assert f"as its best rank-{full} plain LoRA (r={full}, lora_alpha={full})" in result.output
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (full, full, False)
    merge_checkpoint(base_dir, [AdapterSpec(doras[kind])], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, merged(input_ids=IDS).logits, **FP32)


def test_low_rank_approximation_is_eckart_youngs_and_reports_its_error(bases, doras, tmp_path):
    """Rank 2 of each delta: the printed error is ``||Delta - B' A'||_F / ||Delta||_F`` of the written factors,
    and the smallest any rank-2 matrix reaches (the tail of the singular values, in float64)."""
    base_dir = bases["gpt2", torch.float32]
    result = export_approximate(doras["gpt2"], tmp_path / "plain", base_dir, rank=2)
    merge_checkpoint(base_dir, [AdapterSpec(doras["gpt2"])], tmp_path / "merged")
    merged, base = stored(tmp_path / "merged"), stored(base_dir)
    with safe_open(str(tmp_path / "plain" / "adapter_model.safetensors"), "pt") as f:
        plain = {k: f.get_tensor(k) for k in f.keys()}
    assert len(result.errors) == len(plain) // 2
    for module, error in result.errors.items():
        key = f"{module}.weight" if f"{module}.weight" in base else module.split(".", 1)[1] + ".weight"
        delta = (merged[key] - base[key]).double().T  # Conv1D stores (d_in, d_out)
        A = plain[f"base_model.model.{module}.lora_A.weight"].double()
        B = plain[f"base_model.model.{module}.lora_B.weight"].double()
        assert error == pytest.approx(float((delta - B @ A).norm() / delta.norm()), rel=1e-4, abs=1e-6)
        singular = torch.linalg.svdvals(delta)
        assert error == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=1e-4, abs=1e-6)
        assert error > 1e-3  # a DoRA delta is not of rank 2


@pytest.mark.parametrize("rank", ["0", "129", "-1"])
def test_a_bad_approximate_rank_is_a_one_line_error_and_nothing_is_written(rank, llama_dir, doras, tmp_path):
    result = CliRunner().invoke(main, ["export", str(doras["llama"]), "-o", str(tmp_path / "plain"), "--base",
                                       str(llama_dir), "--approximate-rank", rank])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: --approximate-rank {rank} is not a rank these layers have: give 1 to 128")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(ConfigError, match="approximate_rank=0 is not a rank"):
        export_approximate(doras["llama"], tmp_path / "plain", llama_dir, rank=0)
    missing = CliRunner().invoke(main, ["export", str(doras["llama"]), "-o", str(tmp_path / "plain"),
                                        "--approximate-rank", "4"])
    assert missing.exit_code == 1 and "Error: --approximate-rank needs the base model" in missing.output


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_zero_norm_row_is_a_one_line_error_and_nothing_is_written(kind, bases, tmp_path):
    """A base row of zeros that the adapter leaves at zero: ``m / ||W + s B A||`` divides by zero. Stored as W
    the row's own block finds it; stored transposed (GPT-2), the first pass does."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(bases[kind, torch.float32]).save_pretrained(base)
    adapter = peft_dora(base, tmp_path / "adapter")
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.endswith(("q_proj.weight", "attn.c_attn.weight")))
    if kind == "llama":
        weights[key][3] = 0
    else:
        weights[key][:, 3] = 0  # Conv1D: output row 3 is column 3
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    module = key.removesuffix(".weight").split(".", 1)[1] if kind == "gpt2" else key.removesuffix(".weight")
    b_key = next(k for k in tensors if module in k and "lora_B" in k)
    tensors[b_key][3] = 0
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})

    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "output row 3 of W + s B A has norm 0" in line and "nothing was written" in line, line
    assert not (tmp_path / "merged").exists()
