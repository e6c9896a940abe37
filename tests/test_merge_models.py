"""`ftserve merge` of full models (mergekit's methods, recipes, model+adapter inputs), with mergekit as the oracle.

A tiny fp32 Llama is the base; three "fine-tuned" checkpoints are the base plus seeded noise, saved with
save_pretrained, and a PEFT LoRA is saved beside them. Each recipe runs through our CLI and through mergekit's
``run_merge``, and the output tensors are compared.
"""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ftserve.cli import main
from ftserve.testing import build_tokenizer, tiny_llama

from support.files import tree_digest

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(vocab_size=256, hidden=64, heads=2, intermediate=128)


def llama(dtype=torch.float32, noise_seed=None, **sizes):
    model = tiny_llama(**{**SIZES, **sizes}, dtype=dtype)
    if noise_seed is not None:  # a "fine-tune": every weight moved a little, differently per seed
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=generator) * 0.02).to(p.dtype))
    return model


def save(model, path):
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, ft1..ft3 (fp32), a PEFT LoRA on q/v/down of the base, and the same in bf16 (b16_*)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("models")
    paths = {"base": save(llama(), root / "base")}
    for i in (1, 2, 3):
        paths[f"ft{i}"] = save(llama(noise_seed=i), root / f"ft{i}")
    peft_model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(root / "adapter")
    paths["adapter"] = root / "adapter"
    paths["b16_base"] = save(llama(torch.bfloat16), root / "b16_base")
    for i in (1, 2):
        paths[f"b16_ft{i}"] = save(llama(torch.bfloat16, noise_seed=i), root / f"b16_ft{i}")
    return paths


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32 rows of the tiny model (8 KB), so that every tensor streams in several blocks and the
    methods' first passes span them, as on a real model."""
    import ftserve.merge.write

    monkeypatch.setattr(ftserve.merge.write, "BLOCK_BYTES", 8 * 2**10)


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def mergekit_merge(recipe: dict, out, cache):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(lora_merge_cache=str(cache), quiet=True, copy_tokenizer=False, write_model_card=False))
    return tensors(out)


def ours(recipe: dict, tmp_path, name="ours"):
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(recipe))
    result = run("merge", "--recipe", file, "-o", tmp_path / name)
    assert result.exit_code == 0, result.output
    return tensors(tmp_path / name)


def recipes(p):
    """(method, recipe) for every deterministic method, gradients and filters included."""
    base, ft1, ft2, ft3 = (str(p[k]) for k in ("base", "ft1", "ft2", "ft3"))
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": [0.2, 0.9]}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 0.7}}, {"model": ft2, "parameters": {"weight": 0.5}}],
            "parameters": {"lambda": 0.9}},
        "task_arithmetic in bf16": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                                    "out_dtype": "float32", "models": [{"model": ft1, "parameters": {"weight": 0.7}},
                                                                       {"model": ft2, "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": ft2, "parameters": {"weight": 0.4, "density": 0.7}},
            {"model": ft3, "parameters": {"weight": 0.3, "density": [0.2, 0.9]}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base, "models": [
            {"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.8, "gamma": 0.05}},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft1}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]}},
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "task_arithmetic in bf16", "ties", "breadcrumbs_ties",
                                    "slerp"])
def test_recipe_gives_mergekit_tensors(method, models, tmp_path, small_blocks):
    recipe = recipes(models)[method]
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    got = ours(recipe, tmp_path)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        if method == "slerp":  # its whole-tensor sums are float64 (methods.py): a coefficient's last bit may differ
            torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max())


def test_base_plus_adapter_is_mergekits_model_plus_lora_and_a_bare_adapter_the_same(models, tmp_path, small_blocks):
    base, adapter = str(models["base"]), str(models["adapter"])
    recipe = {"merge_method": "ties", "base_model": base, "models": [
        {"model": f"{base}+{adapter}", "parameters": {"weight": 1.0, "density": 0.6}},
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.6}}]}
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    got = ours(recipe, tmp_path)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    recipe["models"][0]["model"] = adapter
    assert all(torch.equal(t, got[n]) for n, t in ours(recipe, tmp_path, "bare").items())


def test_bf16_base_plus_adapter_rounds_once_as_mergekits_model_plus_lora(models, tmp_path):
    """PEFT's merge_and_unload (mergekit's model+lora) adds the fp32 delta to the bf16 weight in place: one
    rounding of W + (B @ A) s, not a rounded delta added in bf16."""
    base, adapter = str(models["b16_base"]), str(models["adapter"])
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": str(models["b16_ft1"]), "parameters": {"weight": 0.5}}]}
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    got = ours(recipe, tmp_path)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], t) for n, t in expected.items())


def test_flags_merge_reloads_records_its_recipe_and_verifies(models, tmp_path):
    out = tmp_path / "out"
    result = run("merge", models["base"], models["ft1"], models["ft2"], "--method", "ties", "--density", "0.5",
                 "--weights", "0.6,0.4", "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "Merged 2 model(s) with ties" in result.output and "OK: all" in result.output
    card = (out / "README.md").read_text()
    assert "TIES" in card and "seed: 0" in card and str(models["ft1"]) in card and "density=0.5" in card
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["parameters"]["density"] == 0.5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()
    # mergekit reads the recipe we wrote and makes the same model
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    assert all(torch.equal(t, tensors(out)[n]) for n, t in expected.items())
    # verify finds a changed tensor and names it
    stored = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    stored[name][0, 0] += 0.25
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    wrong = run("verify", out)
    assert wrong.exit_code == 1 and f"1 of {len(stored)} tensors differ" in wrong.output, wrong.output
    assert name in wrong.output and "0.25" in wrong.output


def test_dare_is_reproducible_by_seed_and_verifies(models, tmp_path):
    args = [models["base"], models["ft1"], models["ft2"], "--method", "dare_ties", "--density", "0.5"]
    assert run("merge", *args, "-o", tmp_path / "a", "--seed", "3").exit_code == 0
    assert run("merge", *args, "-o", tmp_path / "b", "--seed", "3", "--max-shard-size", "100KB").exit_code == 0
    assert run("merge", *args, "-o", tmp_path / "c", "--seed", "4").exit_code == 0
    a, b, c = (tensors(tmp_path / k) for k in "abc")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert "seed: 3" in (tmp_path / "a" / "README.md").read_text()
    result = run("verify", tmp_path / "b")
    assert result.exit_code == 0 and "OK: all" in result.output, result.output
    other_seed = run("verify", "--recipe", tmp_path / "c" / "mergekit_config.yml", tmp_path / "b")
    assert other_seed.exit_code == 1 and "tensors differ from dare_ties" in other_seed.output, other_seed.output


def test_bf16_ties_is_mergekits_except_where_the_cut_is_tied(models, tmp_path, small_blocks):
    """mergekit picks among elements tied at the k-th magnitude by an unstable sort; we take them in index
    order. Every element that differs must sit at a tied cut of some input's task vector."""
    base, fts = models["b16_base"], [models["b16_ft1"], models["b16_ft2"]]
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.3},
              "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (0.6, 0.4))]}
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    got = ours(recipe, tmp_path)
    base_t, ft_t = load_file(base / "model.safetensors"), [load_file(f / "model.safetensors") for f in fts]
    differing = total = 0
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16
        diff = got[name] != tensor
        total += tensor.numel()
        if not diff.any():
            continue
        differing += int(diff.sum())
        at_cut = torch.zeros_like(diff)
        for ft in ft_t:
            magnitude = (ft[name] - base_t[name]).abs().float().flatten()
            k = max(1, int(0.3 * magnitude.numel()))
            at_cut |= (magnitude == magnitude.topk(k).values[-1]).reshape(diff.shape)
        assert not (diff & ~at_cut).any(), name
    assert differing < total / 100


def test_default_method_with_model_inputs_is_task_arithmetic(models, tmp_path):
    result = run("merge", models["base"], f"{models['ft1']}:0.5", models["ft2"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5}},
        {"model": str(models["ft2"]), "parameters": {"weight": 1.0}}]}
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    assert all(torch.equal(t, tensors(tmp_path / "out")[n]) for n, t in expected.items())


@pytest.fixture(scope="module")
def odd_models(models, tmp_path_factory):
    """A model of other shapes, ft1's weights under another architecture's config, a DoRA adapter and a LoRA
    with a NaN."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("odd")
    get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(root / "dora")
    nan = root / "nan"
    nan.mkdir()
    for f in models["adapter"].iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    state = load_file(nan / "adapter_model.safetensors")
    next(t for n, t in state.items() if "lora_B" in n)[1, 2] = float("nan")
    save_file(state, nan / "adapter_model.safetensors")
    narrow = save(llama(intermediate=64), root / "narrow")
    other = root / "mistral"
    other.mkdir()
    for f in models["ft1"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                   "model_type": "mistral"}))
    return {"narrow": narrow, "mistral": other, "dora": root / "dora", "nan": nan}


@pytest.mark.parametrize("case, args, words", [
    ("unknown method", ["@base", "@ft1", "--method", "frobnicate"], "unknown merge method 'frobnicate'"),
    ("parameter the method lacks", ["@base", "@ft1", "--method", "linear", "--density", "0.5"], "'density'"),
    ("density above 1", ["@base", "@ft1", "--method", "ties", "--density", "1.5"], "(0, 1]"),
    ("density 0", ["@base", "@ft1", "--method", "ties", "--density", "0"], "(0, 1]"),
    ("other shapes", ["@base", "@ft1", "@narrow", "--method", "ties"], "shape"),
    ("other architecture", ["@base", "@ft1", "@mistral", "--method", "ties"], "MistralForCausalLM"),
    ("missing model", ["@base", "@ft1", "/no/such/model", "--method", "ties"], "/no/such/model"),
    ("DoRA adapter", ["@base", "@ft1", "@dora", "--method", "ties"], "DoRA adapter rescales each row"),
    ("NaN in an adapter", ["@base", "@ft1", "@nan", "--method", "ties"], "nan"),
    ("recipe and flags", ["--recipe", "@recipe", "--method", "ties"], "--recipe holds the whole merge"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, args, words, models, odd_models, tmp_path):
    before = tree_digest(models["base"].parent)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipes(models)["ties"]))
    places = {**models, **odd_models, "recipe": recipe}
    result = run("merge", *[places[a[1:]] if a.startswith("@") else a for a in args], "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and words in result.output, result.output
    assert not (tmp_path / "out").exists()
    assert tree_digest(models["base"].parent) == before


def test_conv1d_adapter_on_gpt2_is_mergekits_model_plus_lora(tmp_path):
    """GPT-2 stores Conv1D weights transposed; PEFT's fan_in_fan_out adapter is applied as stored."""
    from peft import LoraConfig, get_peft_model

    from ftserve.testing import tiny_gpt2

    base = save(tiny_gpt2(vocab_size=256, hidden=32), tmp_path / "base")
    tuned = tiny_gpt2(vocab_size=256, hidden=32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    save(tuned, tmp_path / "tuned")
    peft_model = get_peft_model(tiny_gpt2(vocab_size=256, hidden=32),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5}, "models": [
        {"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.7}},
        {"model": str(tmp_path / "tuned"), "parameters": {"weight": 0.5}}]}
    expected = mergekit_merge(recipe, tmp_path / "mergekit", tmp_path / "cache")
    got = ours(recipe, tmp_path)
    assert expected and all(torch.equal(got[n], t) for n, t in expected.items())


def test_a_hub_id_in_the_local_cache_is_a_model_input(hub_cache, llama_dir, tmp_path):
    result = run("merge", "acme/tiny-llama", f"{llama_dir}:0.5", "--method", "task_arithmetic", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    base = tensors(hub_cache)
    assert all(torch.equal(t, base[n]) for n, t in tensors(tmp_path / "out").items())  # a zero task vector


MEMORY_PROBE = """
import sys
from pathlib import Path
from ftserve.merge import merge_models
from ftserve.merge.request import InputModel, MergeRequest

def rss_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

root = Path(sys.argv[1])
request = MergeRequest(sys.argv[2], str(root / "base"), [InputModel(str(root / f"ft{i}"), str(root / f"ft{i}"), None,
                       {"weight": 0.5, "density": 0.3}) for i in (1, 2)], {})
merge_models(request, root / "warm", workers=1)  # code pages and allocator arenas: what any merge costs once
before = rss_kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from now
merge_models(request, root / "out", workers=1)
print(rss_kib("VmHWM:") - before)
"""


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "ties"])
def test_peak_memory_does_not_grow_with_the_tensors(method, tmp_path):
    """A breadcrumbs_ties merge of three one-tensor checkpoints (three passes over every input) grows the process
    by the same few blocks whether the tensor is 8 MB or 32 MB. A ties merge keeps mergekit's ties at its top-k
    cut by holding one input's keys over the tensor at a time and replaying its sort (introsort.py): 4-byte keys
    of fp32, 4-byte positions, two masks, plus batches of swaps, and still not the inputs whole. glibc's sliding
    mmap threshold makes freed blocks' pages linger by chance; a fixed threshold makes the figure exact. Both
    tensors outgrow the output file's fixed stages (files/output_file.py), which a smaller output would touch
    only in part."""
    import os
    import subprocess
    import sys

    from ftserve.merge.plan import BLOCK_BYTES

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
    growth = {}
    for rows in (1024, 4096):
        root = tmp_path / str(rows)
        generator = torch.Generator().manual_seed(0)
        for name in ("base", "ft1", "ft2"):
            (root / name).mkdir(parents=True)
            (root / name / "config.json").write_text(json.dumps(config))
            save_file({"model.layers.0.mlp.up_proj.weight": torch.randn((rows, 2048), generator=generator)},
                      root / name / "model.safetensors")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**17)}
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root), method], capture_output=True,
                              text=True, env=env, check=True)
        growth[rows] = int(done.stdout.split()[-1]) * 1024
        assert (root / "out" / "model.safetensors").is_file()
    if method == "ties":
        from ftserve.merge.introsort import SWAP_BATCH

        per_element, batches = 4 + 4 + 2, 32 * SWAP_BATCH
        assert growth[4096] - growth[1024] < per_element * 3072 * 2048 + batches + 2 * BLOCK_BYTES, growth
        return
    assert growth[4096] < 3 * 4096 * 2048 * 4, growth  # what holding the three inputs whole would take
    assert abs(growth[4096] - growth[1024]) < 2 * BLOCK_BYTES, growth


def test_output_kind_adapter_merges_adapters_into_one_and_rank_needs_it(models, tmp_path):
    pytest.importorskip("ftserve.merge.adapter_merge")
    from ftserve.files.adapter_folder import read_adapter

    out = tmp_path / "cat"
    result = run("merge", models["base"], models["adapter"], f"{models['adapter']}:0.5", "--output-kind", "adapter",
                 "--method", "cat", "-o", out)
    assert result.exit_code == 0, result.output
    one, two = read_adapter(models["adapter"]), read_adapter(out)
    ranks = {two.config.adapter_method.state_shape(s)[2] for s in two.modules.values()}
    assert sorted(two.modules) == sorted(one.modules) and ranks == {8}  # cat: the ranks add
    refused = run("merge", models["base"], models["adapter"], "--rank", "4", "-o", tmp_path / "r")
    assert refused.exit_code == 1 and "--output-kind adapter" in refused.output
    assert not (tmp_path / "r").exists()


def test_output_kind_adapter_needs_no_base(models, tmp_path):
    """Adapters merged into a new adapter without their base model (mergekit #470): the first INPUT is an
    adapter, so there is no BASE, and the factors equal those of the same merge given the base."""
    with_base, without = tmp_path / "with", tmp_path / "without"
    for out, head in ((with_base, [models["base"]]), (without, [])):
        result = run("merge", *head, models["adapter"], f"{models['adapter']}:0.5", "--output-kind", "adapter",
                     "--method", "svd", "--rank", "3", "-o", out)
        assert result.exit_code == 0, result.output
    a, b = load_file(with_base / "adapter_model.safetensors"), load_file(without / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, flags", [
    ("linear", []), ("task_arithmetic", ["--lambda", "0.8"]), ("ties", ["--density", "0.4"]),
    ("dare_linear", ["--density", "0.6"]), ("dare_ties", ["--density", "0.6"]),
    ("magnitude_prune", ["--density", "0.3"]), ("breadcrumbs", ["--density", "0.8"]),
    ("breadcrumbs_ties", ["--density", "0.8"]), ("della", ["--density", "0.5"]),
    ("della_linear", ["--density", "0.5"]), ("slerp", ["--t", "0.4"]),
])
def test_every_method_merges_an_adapter_and_a_model_and_verifies(method, flags, models, tmp_path, small_blocks):
    """A bare adapter folder (BASE + adapter) beside a fine-tuned model, through the flags: the merge streamed
    in several blocks per tensor differs from the base, and verify recomputes it whole, tensor for tensor."""
    inputs = [models["adapter"]] if method == "slerp" else [models["adapter"], models["ft1"]]
    out = tmp_path / "out"
    result = run("merge", models["base"], *inputs, "--method", method, *flags, "-o", out, "--verify")
    assert result.exit_code == 0 and "OK: all" in result.output, result.output
    merged, base = tensors(out), tensors(models["base"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == method
