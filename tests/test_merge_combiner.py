"""The merge's combiner (ftserve.merge.combine): a row-scaled adapter form folded exactly, in Llama's and in GPT-2's
transposed (Conv1D) storage, whatever the block size; a combiner's first pass sees every block before the fold,
one block's rows at a time; verify judges a merge by the combiner that made it.

The row-scaled form (DoRA's, arXiv:2402.09353) on a base weight ``W (d_out x d_in)``::

    W' = diag(r) (W + s B A),      r = m / ||W + s B A||_row

comes from a test-only method registered here, whose folders are written by hand.
"""

import dataclasses
import threading

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ftserve import CheckpointError, ConfigError, FineTuningConfig
from ftserve.files.adapter_folder import ADAPTER_WEIGHTS, PREFIX, write_adapter_folder
from ftserve.merge import AdapterSpec, merge_checkpoint, verify_merge
from ftserve.merge import write as merge_write
from ftserve.merge.combine import Combiner, DenseFold, Part, TensorFold
from ftserve.methods import AdapterMethod, LoraFactors, register, unregister
from ftserve.methods.base import linear_shape, targetable_types

pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = dict(rtol=1e-5, atol=1e-5)
ROWS_PER_SMALL_BLOCK = merge_write.ROW_MULTIPLE  # write.py's smallest block, what a BLOCK_BYTES of 1 gives
BLOCK_SIZES = {"smallest": 1, "some-rows": 16 * 2**10, "default": merge_write.BLOCK_BYTES}
RANK, ALPHA = 4, 8


class RowScaledTest(AdapterMethod):
    """LoRA factors plus a magnitude per output row, served in the row-scaled form."""

    name = "row-scaled-test"
    title = "row-scaled test"
    saved_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    row_scaled = True

    def export_factors(self, state, shared, config, module_name, in_features):
        return LoraFactors(state["lora_A.weight"], state["lora_B.weight"], config.scale_for(module_name),
                           state["lora_magnitude_vector"])


@pytest.fixture(scope="module", autouse=True)
def row_scaled_method():
    register(RowScaledTest())
    yield
    unregister(RowScaledTest.name)


def targets(base_dir) -> dict[str, torch.nn.Module]:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, targetable_types()) and not name.endswith(("lm_head", "embed_out"))}


def write_adapter(path, base_dir, method: str, seed: int, magnitude_scale: float = 1.0) -> dict[str, LoraFactors]:
    """An adapter folder of ``method`` on every linear layer of the base, with random factors whose delta is
    about a third of the weight and, for the row-scaled method, magnitudes of ``magnitude_scale`` times 1 to 1.5
    the base's row norms (so that the row scale is far from 1); returns its factors by module."""
    generator = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    conv1d = False
    for name, module in targets(base_dir).items():
        d_out, d_in = linear_shape(module)
        A = torch.randn(RANK, d_in, generator=generator) / d_in ** 0.5
        B = torch.randn(d_out, RANK, generator=generator) * 0.02
        magnitude = None
        weight = module.weight.detach()
        if not isinstance(module, torch.nn.Linear):  # Conv1D stores (d_in, d_out)
            weight, conv1d = weight.T, True
        if method == RowScaledTest.name:
            magnitude = weight.norm(dim=1) * (1 + 0.5 * torch.rand(d_out, generator=generator)) * magnitude_scale
            tensors[PREFIX + f"{name}.lora_magnitude_vector"] = magnitude
        tensors[PREFIX + f"{name}.lora_A.weight"], tensors[PREFIX + f"{name}.lora_B.weight"] = A, B
        factors[name] = LoraFactors(A, B, ALPHA / RANK, magnitude)
    config = FineTuningConfig(method=method, lora_r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                              base_model_name_or_path=str(base_dir))
    kinds = sorted({name.rsplit(".", 1)[-1] for name in factors})
    peft_config = config.to_peft_dict(kinds, conv1d, {"config": dataclasses.asdict(config)})
    write_adapter_folder(path, peft_config, {ADAPTER_WEIGHTS: tensors})
    return factors


def stored(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def stored_key(name: str, tensors: dict) -> str:
    return f"{name}.weight" if f"{name}.weight" in tensors else f"{name.split('.', 1)[1]}.weight"


def expected_weights(base_dir, adapters: list[tuple[float, dict[str, LoraFactors]]]) -> dict[str, torch.Tensor]:
    """``W + sum_k w_k Delta_k`` per targeted weight, in float64, as stored (Conv1D: transposed), with
    ``Delta_k = s B A`` for a plain adapter and ``diag(r)(W + s B A) - W`` for a row-scaled one."""
    base, out = stored(base_dir), {}
    for name, module in targets(base_dir).items():
        key = stored_key(name, base)
        transposed = not isinstance(module, torch.nn.Linear)
        W = (base[key].T if transposed else base[key]).double()
        total = W.clone()
        for w, by_module in adapters:
            f = by_module[name]
            summed = W + f.scale * (f.B.double() @ f.A.double())
            if f.magnitude is None:
                delta = summed - W
            else:
                delta = summed * (f.magnitude.double() / summed.norm(dim=1))[:, None] - W
            total += w * delta
        out[key] = total.T if transposed else total
    return out


@pytest.fixture(scope="module")
def bases(llama_dir, gpt2_dir):
    return {"llama": llama_dir, "gpt2": gpt2_dir}


@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_row_scaled_adapter_merges_to_diag_r_of_w_plus_sba_whatever_the_block_size(tmp_path, bases, kind, block,
                                                                                   monkeypatch):
    monkeypatch.setattr(merge_write, "BLOCK_BYTES", BLOCK_SIZES[block])
    factors = write_adapter(tmp_path / "adapter", bases[kind], RowScaledTest.name, seed=1)
    merge_checkpoint(bases[kind], [AdapterSpec(tmp_path / "adapter")], tmp_path / "merged")
    expected, merged, base = expected_weights(bases[kind], [(1.0, factors)]), stored(tmp_path / "merged"), \
        stored(bases[kind])
    assert set(merged) == set(base)
    for key, tensor in merged.items():
        if key in expected:
            torch.testing.assert_close(tensor.double(), expected[key], **FP32, msg=key)
        else:
            assert torch.equal(tensor, base[key]), key


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_weighted_row_scaled_adapter_moves_w_along_its_delta_and_verifies(tmp_path, bases, kind, monkeypatch):
    """``W + w (diag(r)(W + s B A) - W)``: the line from the base to the adapted weight."""
    monkeypatch.setattr(merge_write, "BLOCK_BYTES", BLOCK_SIZES["smallest"])
    scaled = write_adapter(tmp_path / "scaled", bases[kind], RowScaledTest.name, seed=2)
    specs = [AdapterSpec(tmp_path / "scaled", 0.6)]
    merge_checkpoint(bases[kind], specs, tmp_path / "merged")
    expected, merged = expected_weights(bases[kind], [(0.6, scaled)]), stored(tmp_path / "merged")
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key].double(), tensor, **FP32, msg=key)
    report = verify_merge(bases[kind], specs, tmp_path / "merged", new_tokens=2)
    assert report.passed, report.summary()


def test_a_row_scaled_adapter_beside_another_is_refused_before_anything_is_written(tmp_path, llama_dir):
    write_adapter(tmp_path / "scaled", llama_dir, RowScaledTest.name, seed=2)
    write_adapter(tmp_path / "plain", llama_dir, "lora", seed=3)
    specs = [AdapterSpec(tmp_path / "plain", 0.4), AdapterSpec(tmp_path / "scaled", 0.6)]
    with pytest.raises(ConfigError) as caught:
        merge_checkpoint(llama_dir, specs, tmp_path / "merged")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'scaled'}: a row-scaled test adapter merges "
                                                      f"only on its own, not with 1 other adapter(s)")
    assert "norm of its own adapted weight, and such norms do not add across adapters" in message
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ConfigError, match="merges only on its own"):
        verify_merge(llama_dir, specs, llama_dir)


def test_row_scaled_merge_past_the_written_dtype_is_refused_and_nothing_written(tmp_path, llama_dir):
    # every row's norm becomes 1e7 times the base's: fine in fp32, past float16's 6.6e4
    write_adapter(tmp_path / "adapter", llama_dir, RowScaledTest.name, seed=4, magnitude_scale=1e7)
    with pytest.raises(CheckpointError, match="folding the adapters gives inf or NaN in torch.float16"):
        merge_checkpoint(llama_dir, [AdapterSpec(tmp_path / "adapter")], tmp_path / "merged", dtype="float16")
    assert not (tmp_path / "merged").exists()


class TrimmedSum(Combiner):
    """A combiner that needs the whole tensor: ``W' = W + sum_k w_k trim(Delta_k)``, where ``trim`` keeps the
    entries of at least ``KEEP`` times the largest magnitude of that delta over the whole tensor (TIES' trim step
    with a relative threshold), on plain adapters. It records every call, to show how write.py drives it."""

    KEEP = 0.5
    name = "trimmed sum"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int, int]] = []  # (phase, id of the fold, start, stop, rows given)
        self.lock = threading.Lock()

    def fold(self, parts: list[Part], transposed: bool) -> TensorFold:
        return TrimmedFold(self, parts, transposed)


class TrimmedFold(DenseFold):
    def __init__(self, combiner: TrimmedSum, parts: list[Part], transposed: bool) -> None:
        super().__init__(parts, transposed)
        self.combiner, self.passes = combiner, 1
        self.thresholds: list[float] = []

    def record(self, phase: str, rows: torch.Tensor, start: int, stop: int) -> None:
        with self.combiner.lock:
            self.combiner.calls.append((phase, str(id(self)), start, stop, len(rows)))

    def scan(self, rows, scratch, start, stop):
        self.record("scan", rows, start, stop)
        largest = [float(self.delta(k, rows, scratch, start, stop).abs().max()) for k in range(len(self.parts))]
        return super().scan(rows, scratch, start, stop), largest

    def gather(self, partials):
        partials = list(partials)
        super().gather(row_norms for row_norms, _ in partials)
        self.thresholds = [TrimmedSum.KEEP * max(m) for m in zip(*(largest for _, largest in partials))]
        with self.combiner.lock:
            self.combiner.calls.append(("gather", str(id(self)), 0, 0, 0))

    def block(self, weight, scratch, start, stop):
        self.record("block", weight, start, stop)
        total = torch.zeros_like(weight)
        for k, (part, threshold) in enumerate(zip(self.parts, self.thresholds)):
            delta = self.delta(k, weight, scratch, start, stop)
            total += part.weight * torch.where(delta.abs() >= threshold, delta, 0.0)
        return weight.add_(total)


def trimmed_reference(base_dir, adapters: list[tuple[float, dict[str, LoraFactors]]]) -> dict[str, torch.Tensor]:
    base, out = stored(base_dir), {}
    for name, module in targets(base_dir).items():
        key = stored_key(name, base)
        transposed = not isinstance(module, torch.nn.Linear)
        total = (base[key].T if transposed else base[key]).double()
        for w, by_module in adapters:
            delta = w * by_module[name].scale * (by_module[name].B.double() @ by_module[name].A.double())
            total = total + torch.where(delta.abs() >= TrimmedSum.KEEP * delta.abs().max(), delta, 0.0)
        out[key] = total.T if transposed else total
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_first_pass_sees_every_block_before_the_fold_one_block_at_a_time(tmp_path, bases, kind, monkeypatch):
    monkeypatch.setattr(merge_write, "BLOCK_BYTES", BLOCK_SIZES["smallest"])
    a = write_adapter(tmp_path / "a", bases[kind], "lora", seed=5)
    b = write_adapter(tmp_path / "b", bases[kind], "lora", seed=6)
    specs = [AdapterSpec(tmp_path / "a", 0.7), AdapterSpec(tmp_path / "b", 0.3)]
    combiner = TrimmedSum()
    result = merge_checkpoint(bases[kind], specs, tmp_path / "merged", combiner=combiner, workers=2)
    expected, merged = trimmed_reference(bases[kind], [(0.7, a), (0.3, b)]), stored(tmp_path / "merged")
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key].double(), tensor, **FP32, msg=key)

    folds = {str(id(t.fold)): t for t in result.plan.tensors if t.fold is not None}
    assert len(folds) == len(expected)
    for fold_id, t in folds.items():
        calls = [c for c in combiner.calls if c[1] == fold_id]
        phases = [c[0] for c in calls]
        blocks = [(start, min(start + ROWS_PER_SMALL_BLOCK, t.source.rows))
                  for start in range(0, t.source.rows, ROWS_PER_SMALL_BLOCK)]
        assert len(blocks) > 1, f"{t.name}: one block proves nothing"
        assert phases == ["scan"] * len(blocks) + ["gather"] + ["block"] * len(blocks), t.name
        for phase in ("scan", "block"):
            given = sorted((start, stop) for p, _, start, stop, _ in calls if p == phase)
            assert given == blocks, (t.name, phase)
        assert all(rows == stop - start for _, _, start, stop, rows in calls[:len(blocks)] + calls[-len(blocks):])

    assert verify_merge(bases[kind], specs, tmp_path / "merged", new_tokens=2, combiner=TrimmedSum()).passed
    wrong = verify_merge(bases[kind], specs, tmp_path / "merged", new_tokens=2)
    assert not wrong.passed, "verify judged the trimmed merge against a plain weighted sum and passed it"
