"""The `merge`, `verify`, `inspect` commands as a user runs them, and a merge killed half-way."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ftserve.cli import main
from ftserve.config import FineTuningConfig

from support.files import tree_digest
from support.models import trained
from support.processes import ONE_THREAD

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, settings, seed in (("lora", dict(method="lora", lora_r=4, lora_alpha=8), 0),
                                 ("other", dict(method="lora", lora_r=4, lora_alpha=8), 5),
                                 ("vera", dict(method="vera", lora_r=16), 1),
                                 ("delta", dict(method="delta-lora", lora_r=4, lora_alpha=8), 2)):
        trained(AutoModelForCausalLM.from_pretrained(llama_dir), settings, seed=seed).save_adapter(root / name)
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_with_verify_then_verify_passes_and_fails_for_another_adapter(tmp_path, llama_dir, adapters):
    out = tmp_path / "merged"
    result = run("merge", llama_dir, adapters / "vera", "-o", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "Merged 1 adapter(s) into 14 tensors" in result.output and "OK: largest logit difference" in result.output
    assert run("verify", llama_dir, adapters / "vera", out).exit_code == 0
    wrong = run("verify", llama_dir, adapters / "other", out)
    assert wrong.exit_code == 1 and "FAILED: largest logit difference" in wrong.output
    assert "disagreements" in wrong.output
    refused = run("merge", llama_dir, adapters / "vera", "-o", out)
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.output


def test_bf16_merge_is_judged_against_its_rounding_and_says_so(tmp_path, llama_dir, adapters):
    out = tmp_path / "merged"
    result = run("merge", llama_dir, f"{adapters / 'lora'}:0.7", f"{adapters / 'vera'}:0.3", "-o", out,
                 "--dtype", "bfloat16", "--verify")
    assert result.exit_code == 0 and "OK: largest logit difference" in result.output, result.output
    assert "against base + adapters folded in float32 and rounded to bfloat16 as stored" in result.output
    assert "the rounding alone moves the logits by up to" in result.output
    fp32 = run("merge", llama_dir, adapters / "lora", "-o", tmp_path / "fp32", "--verify")
    assert fp32.exit_code == 0 and "against base + adapters in float32;" in fp32.output, fp32.output


def test_a_bf16_merge_with_a_slightly_wrong_weight_fails_verify(tmp_path, llama_dir, adapters):
    """A fixed bf16 tolerance (5% of the largest logit) passed this merge, 3% off in one weight, and failed
    correct ones; judged against the rounded reference it fails, and a correct one passes."""
    from ftserve.merge import AdapterSpec, merge_checkpoint
    from ftserve.merge.verify import verify_merge

    out = tmp_path / "merged"
    lora, vera = AdapterSpec.parse(f"{adapters / 'lora'}:0.7"), AdapterSpec.parse(f"{adapters / 'vera'}:0.3")
    merge_checkpoint(llama_dir, [lora, AdapterSpec.parse(f"{adapters / 'vera'}:0.29")], out, dtype="bfloat16")
    wrong = verify_merge(llama_dir, [lora, vera], out)
    assert not wrong.passed and wrong.max_abs_diff > wrong.tolerance, wrong.summary()
    right = verify_merge(llama_dir, [lora, AdapterSpec.parse(f"{adapters / 'vera'}:0.29")], out)
    assert right.passed and right.max_abs_diff < wrong.max_abs_diff / 10, right.summary()


def test_weighted_merge_of_two_adapters_verifies(tmp_path, llama_dir, adapters):
    result = run("merge", llama_dir, f"{adapters / 'lora'}:0.7", f"{adapters / 'vera'}:0.3", "-o", tmp_path / "m",
                 "--verify")
    assert result.exit_code == 0 and "Merged 2 adapter(s)" in result.output and "OK:" in result.output, result.output


def test_errors_are_one_line_messages_not_tracebacks(tmp_path, llama_dir, adapters):
    missing = run("merge", "acme/no-such-model", adapters / "lora", "-o", tmp_path / "m")
    assert missing.exit_code == 1
    assert "Error: acme/no-such-model: no such folder, and the Hugging Face hub cannot provide it" in missing.output
    assert "Traceback" not in missing.output and not (tmp_path / "m").exists()
    pickled = run("merge", llama_dir, tmp_path / "nowhere", "-o", tmp_path / "m")
    assert pickled.exit_code == 1 and "no such adapter folder" in pickled.output


DOWN_PROJ_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_merge_refuses_an_adapter_holding_nan_or_inf_and_writes_nothing(tmp_path, llama_dir, adapters, bad):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters / "lora", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[DOWN_PROJ_B][3, 1] = bad
    save_file(tensors, adapter / "adapter_model.safetensors")
    result = run("merge", llama_dir, adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (f"Error: {adapter}: module model.layers.1.mlp.down_proj: its LoRA factor B holds 1 NaN or inf value(s) "
            f"of 512;") in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_merge_refuses_a_nan_or_inf_weight(tmp_path, llama_dir, adapters, weight):
    result = run("merge", llama_dir, f"{adapters / 'lora'}:{weight}", "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {adapters / 'lora'}: adapter weight {float(weight)!r} is not a finite number" in result.output
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_weight_that_overflows_float32(tmp_path, llama_dir, adapters):
    result = run("merge", llama_dir, f"{adapters / 'lora'}:1e39", "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "beyond the largest finite float32 value" in result.output, result.output
    assert "Lower weight 1e+39 x the adapter's scale 2\n" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_weight_that_is_not_a_number_is_named_as_such(tmp_path, llama_dir, adapters):
    text = f"{adapters / 'lora'}:abc"
    result = run("merge", llama_dir, text, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "no such adapter folder" not in result.output
    assert f"Error: adapter weight 'abc' in {text!r} is not a number" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_folder_whose_name_holds_a_colon_is_still_a_folder(tmp_path, llama_dir, adapters):
    for name in ("run:abc", "run:0.5"):
        shutil.copytree(adapters / "lora", tmp_path / name)
        result = run("merge", llama_dir, tmp_path / name, "-o", tmp_path / f"{name}-merged")
        assert result.exit_code == 0, result.output
        assert f"| `{tmp_path / name}` | 1 |" in (tmp_path / f"{name}-merged" / "README.md").read_text()


def test_inspect_says_what_vllm_can_serve(adapters):
    vera = run("inspect", adapters / "vera")
    assert vera.exit_code == 0, vera.output
    assert "method             vera" in vera.output and "needs `ftserve export`" in vera.output
    delta = json.loads(run("inspect", adapters / "delta", "--json").output)
    assert delta["method"] == "delta-lora" and delta["rank"] == 4 and delta["alpha"] == 8
    assert delta["vllm"].startswith("as is: adapter_model.safetensors is the exact rank-8 plain LoRA")
    lora = json.loads(run("inspect", adapters / "lora", "--json").output)
    # r (d_in + d_out) per module: 4 attention projections 128 x 128 and 3 MLP ones 128 x 256, in 2 layers
    assert lora["parameters"] == 2 * (4 * 4 * (128 + 128) + 3 * 4 * (128 + 256))
    assert lora["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora["vllm"].startswith("as is") and lora["size_bytes"] > 0


@pytest.fixture(scope="module")
def slow_merge_inputs(tmp_path_factory):
    """A synthetic checkpoint of eight 1024 x 2048 fp32 weights and a rank-512 LoRA on all of them: enough
    arithmetic that an unmodified merge runs for a while after its first output shard."""
    root = tmp_path_factory.mktemp("slow")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(8)]
    save_file({f"{n}.weight": torch.randn(1024, 2048, generator=gen) for n in names}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    save_file({f"base_model.model.{n}.lora_{m}.weight": torch.randn(shape, generator=gen) * 0.01
               for n in names for m, shape in (("A", (512, 2048)), ("B", (1024, 512)))},
              str(adapter / "adapter_model.safetensors"))
    config = FineTuningConfig(method="lora", lora_r=512, lora_alpha=512, target_modules=["up_proj"])
    (adapter / "adapter_config.json").write_text(json.dumps(config.to_peft_dict(["up_proj"], False)))
    return base, adapter


def interruptible() -> None:
    """Ctrl-C as in a terminal's foreground job. A suite started in the background (`pytest &`, a CI runner)
    inherits SIGINT ignored, and a Python started with SIGINT ignored installs no KeyboardInterrupt handler, so
    the merge would never see the signal and would finish with status 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_merge_killed_after_its_first_shard_leaves_no_output(tmp_path, slow_merge_inputs, sig, llama_dir,
                                                               adapters):
    base, adapter = slow_merge_inputs
    before = tree_digest(base), tree_digest(adapter)
    out = tmp_path / "merged"
    process = subprocess.Popen([sys.executable, "-c", "from ftserve.cli import main; main()", "merge", str(base),
                                str(adapter), "-o", str(out), "--max-shard-size", "8MB"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD},
                               preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if list(tmp_path.glob(".merged.tmp-*/model-00002-of-00008.safetensors")):
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the merge ended before it could be interrupted: {process.stdout.read()!r}"
    process.send_signal(sig)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode != 0
    assert not out.exists()
    if sig == signal.SIGINT:
        assert list(tmp_path.iterdir()) == [], output  # the temporary folder went too
        assert "Traceback" not in output
    else:  # nothing runs on SIGKILL: the next merge to the same output clears what it left
        assert [p.name.split("-")[1] for p in tmp_path.iterdir()] == [str(process.pid)]
        assert run("merge", llama_dir, adapters / "lora", "-o", out).exit_code == 0
        assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (tree_digest(base), tree_digest(adapter)) == before


def merge_under_file_size_limit(*args, limit: int = 64 * 1024) -> subprocess.CompletedProcess:
    """`ftserve merge` in a process whose files cannot grow past ``limit`` bytes: writes fail with EFBIG, a real
    OS error, as on a full disk."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", "from ftserve.cli import main; main()", "merge", *map(str, args)],
                          capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120,
                          env={**os.environ, **ONE_THREAD})


def test_a_merge_that_cannot_write_leaves_no_output_and_keeps_the_existing_one(tmp_path, llama_dir, adapters):
    out = tmp_path / "merged"
    failed = merge_under_file_size_limit(llama_dir, adapters / "lora", "-o", out)
    assert failed.returncode == 1
    message = f"Error: {out}: merge failed, output left as it was (File too large)"
    assert failed.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in failed.stderr
    assert list(tmp_path.iterdir()) == []
    assert run("merge", llama_dir, adapters / "lora", "-o", out).exit_code == 0
    before = tree_digest(out)
    forced = merge_under_file_size_limit(llama_dir, adapters / "other", "-o", out, "--force")
    assert forced.returncode == 1 and "merge failed, output left as it was (File too large)" in forced.stderr
    assert "Traceback" not in forced.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and tree_digest(out) == before
