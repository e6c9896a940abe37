"""`ftserve train` on CUDA in bf16 against the same steps on CPU in fp32, for every registered method, and QLoRA
(--load-in-4bit) on CUDA; part of tests/gpu/run.sh.

    python tests/gpu/train_check.py            # on a GPU machine: CUDA bf16 against CPU fp32
    python tests/gpu/train_check.py --device cpu   # here: CPU bf16 autocast against CPU fp32 (the same check)

Every run is the command users type, `python -m ftserve.cli train ...`, in its own process, on one tiny random
Llama (head_dim 32) and one toy data file, with one seed: the adapter's initial tensors are drawn on CPU before
the Trainer moves the model, so both runs start from the same tensors and see the same batches. The CPU
reference runs with CUDA_VISIBLE_DEVICES="" (the Trainer then picks the CPU, as on a machine without a GPU).

Tolerances, from what the numbers are. `--bf16` is autocast: the weights and the adapter stay fp32, the matmuls
run in bf16, whose 8-bit significand rounds each input by up to 2^-9 relative (0.2%); the loss of a 1000-way
softmax computed so is off by a few thousandths of a nat. So each logged loss must agree within 0.02 nats
(LOSS_ATOL), and the loss's fall over the run (0.02-0.25 nats here) within 25% of the fp32 run's (FALL_RTOL).
Adam divides each update by its running gradient scale, so an element with a near-zero gradient (LoRA's A while
B is still near zero, VeRA's lambda_d) takes a full-size step in whatever direction bf16 noise gives it: a single
tensor can differ by 40%, but the adapter's whole change from the common initial tensors, by relative Frobenius
norm, stays within 25% (DELTA_RTOL). Measured with `--device cpu` (CPU bf16 autocast against CPU fp32): losses
within 0.004 nats, falls within 2%, changes within 10%. A wrong device path (lr+'s B group at the plain rate, a
method's rule skipped, an adapter left frozen) moves the fall or the change by far more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_ATOL = 0.02  # nats, each logged loss
FALL_RTOL = 0.25  # the loss's fall over the run, relative
DELTA_RTOL = 0.25  # the adapter's change over the run, relative Frobenius norm
STEPS = 6
COMMON = ["--max-steps", str(STEPS), "--seed", "0", "--lr", "2e-3", "--batch-size", "4", "--max-seq-len", "64",
          "--logging-steps", "1", "--rank", "8", "--targets", "all-linear"]
START_STEP = 2  # a method's start step (Delta-LoRA's default lies far past STEPS): its rule is compared too


def start_setting(method: str) -> dict:
    """The method's start step as a setting, if it has one."""
    from ftserve.methods import METHODS

    return {"delta_start_step": START_STEP} if "delta_start_step" in METHODS[method].option_defaults else {}


def train(base: Path, data: Path, output: Path, device: str, *flags: str) -> tuple[list[float], float]:
    """One `ftserve train` run; its logged training losses and its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "ftserve.cli", "train", str(base), str(data), "-o", str(output), *COMMON,
               *flags]
    begin = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"FAIL: {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    history = json.loads((output / "training_log.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    steps = int(flags[flags.index("--max-steps") + 1]) if "--max-steps" in flags else STEPS
    if len(losses) != steps:
        raise SystemExit(f"FAIL: {output}: {len(losses)} logged losses, expected {steps}")
    return losses, time.perf_counter() - begin


def initial(base: Path, method: str, folder: Path) -> dict:
    """The adapter's tensors before any step, as `ftserve train` draws them (set_seed, then the model)."""
    from transformers import AutoModelForCausalLM, set_seed

    from ftserve.model import FineTuningModel
    from ftserve.train.settings import TrainSettings

    settings = TrainSettings(base=str(base), data="unused", output="unused", method=method, rank=8,
                             targets="all-linear", seed=0,
                             settings=start_setting(method))
    set_seed(0)
    FineTuningModel(AutoModelForCausalLM.from_pretrained(base), settings.adapter_config()).save_adapter(folder)
    return flat_state(folder)


def flat_state(folder: Path) -> dict:
    from ftserve import read_adapter

    adapter = read_adapter(folder)
    found = {f"{module}.{key}": tensor.float() for module, state in adapter.modules.items()
             for key, tensor in state.items()}
    return {**found, **{f"shared.{key}": tensor.float() for key, tensor in adapter.shared.items()}}


def compare(method: str, start: dict, reference: Path, other: Path, ref_losses, other_losses) -> dict:
    import torch

    loss_error = max(abs(a - b) for a, b in zip(other_losses, ref_losses))
    fall = ref_losses[0] - ref_losses[-1]
    fall_error = abs((other_losses[0] - other_losses[-1]) - fall) / abs(fall)
    ref, oth = flat_state(reference), flat_state(other)
    if set(ref) != set(oth):
        raise SystemExit(f"FAIL {method}: the two adapters hold different tensors")
    start = {name: start.get(name, torch.zeros_like(tensor)) for name, tensor in ref.items()}  # Delta-LoRA's
    worst, worst_name = 0.0, ""  # snapshots at delta_start_step exist only after it: compared as they are
    for name, tensor in ref.items():
        begin = start[name]
        delta_ref = tensor - begin
        delta_oth = oth[name] - begin
        scale = float(delta_ref.norm())
        if scale == 0.0:  # a frozen tensor saved with the adapter (VeRA's shared projections, LoRA-FA's A)
            error = float(delta_oth.norm())
        else:
            error = float((delta_oth - delta_ref).norm()) / scale
        if error > worst:
            worst, worst_name = error, name
    delta_ref = torch.cat([(tensor - start[name]).flatten() for name, tensor in ref.items()])
    delta_oth = torch.cat([(oth[name] - start[name]).flatten() for name in ref])
    moved = float(delta_ref.norm())
    overall = float((delta_oth - delta_ref).norm()) / moved if moved else float("inf")
    return {"method": method, "loss_max_abs_err": round(loss_error, 5), "fall_rel_err": round(fall_error, 4), "delta_rel_err": round(overall, 5),
            "worst_tensor_rel_err": round(worst, 5), "worst_tensor": worst_name, "adapter_moved": moved > 0.0,
            "ok": loss_error <= LOSS_ATOL and fall_error <= FALL_RTOL and fall > 0 and overall <= DELTA_RTOL and moved > 0.0
            and torch.isfinite(torch.tensor(other_losses)).all().item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: CUDA bf16 against CPU fp32; cpu: CPU bf16 autocast against CPU fp32 (no GPU)")
    parser.add_argument("--methods", help="comma-separated; default: every registered method")
    args = parser.parse_args()
    import torch

    from ftserve.methods import METHODS
    from ftserve.testing import save_tiny_model, toy_sentences

    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device visible to torch; run with --device cpu for the CPU self-check")
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = save_tiny_model(root / "base", "llama", hidden=128, layers=2, heads=4, intermediate=256)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in toy_sentences(48)))
        for method in args.methods.split(",") if args.methods else METHODS:
            extra = [arg for name, value in start_setting(method).items() for arg in ("--setting", f"{name}={value}")]
            ref_losses, _ = train(base, data, root / f"cpu-{method}", "cpu", "--method", method, *extra)
            losses, seconds = train(base, data, root / f"{args.device}-bf16-{method}", args.device, "--method",
                                    method, "--bf16", *extra)
            start = initial(base, method, root / f"init-{method}")
            row = compare(method, start, root / f"cpu-{method}", root / f"{args.device}-bf16-{method}", ref_losses,
                          losses)
            row.update(device=args.device, first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
                       seconds=round(seconds, 1))
            print(json.dumps(row), flush=True)
            results.append(row)
        qlora = {"method": "lora", "qlora": True, "device": args.device}
        losses, seconds = train(base, data, root / "qlora", args.device, "--method", "lora", "--load-in-4bit",
                                "--max-steps", "12", "--lr", "5e-3")
        # A loss falls noisily step to step: the mean of the last three against the first (CPU: 6.91 -> 6.66).
        last = sum(losses[-3:]) / 3
        from ftserve import read_adapter

        recorded = bool(read_adapter(root / "qlora").extra.get("quantized_base"))
        qlora.update(first_loss=round(losses[0], 4), last3_mean=round(last, 4), seconds=round(seconds, 1),
                     recorded_4bit_base=recorded, ok=last < losses[0] - 0.1 and recorded)
        print(json.dumps(qlora), flush=True)
        results.append(qlora)
    failed = [r for r in results if r["ok"] is False]
    summary = {"train_check": "FAIL" if failed else "OK", "device": args.device, "loss_atol": LOSS_ATOL,
               "fall_rtol": FALL_RTOL, "delta_rtol": DELTA_RTOL, "failed": [r["method"] + ("/qlora" if r.get("qlora") else "")
                                                    for r in failed]}
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
