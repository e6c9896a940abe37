"""`ftserve train` against TRL's SFTTrainer with PEFT's LoRA, and QLoRA against a bf16 base, in one run.

Each measurement runs in its own process (so peak RSS is its own), on the same Llama-shaped base saved once,
the same text rows and the same number of steps:

* ``ours`` : ``ftserve.train.run.train`` (the command's code path), LoRA on q_proj/v_proj, rank 16;
* ``trl``  : ``trl.SFTTrainer`` with ``peft.LoraConfig`` of the same rank, targets, batch and sequence length;
* ``bf16`` / ``qlora``: ``ftserve train --bf16`` on the base saved in bf16, or loaded in 4 bits.

Figures: step time (wall time of steps 3..N, clocked by a callback; the first two warm caches and allocators)
as ours / TRL, peak RSS as ours / TRL, the base weights' memory as 4-bit / bf16 (see ``weight_bytes``: the
whole model, and the decoder's linear weights alone, which are what QLoRA quantizes; embeddings and head stay
16-bit, as in the paper, PEFT and transformers, so the whole-model figure depends on their share, printed too),
and step time as 4-bit / bf16 (on CPU a 4-bit matmul dequantizes first and is expected to be slower).

    python benchmarks/train_cli.py            # hidden 512, 4 layers, vocab 32000 (~46M parameters), 12 steps
    python benchmarks/train_cli.py --size 135m --steps 6   # SmolLM2-135M's shape, random weights
    python benchmarks/train_cli.py --quick    # a tiny model: checks that the script runs

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Llama-shaped bases: "46m" is untied with a 32000 vocabulary, so embeddings and head are half its weights;
# "135m" has SmolLM2-135M's shape (tied embeddings, 30 layers), where the decoder's linear layers are 79% of them.
SIZES = {
    "quick": {"hidden": 64, "heads": 2, "intermediate": 128},
    "46m": {"hidden": 512, "heads": 8, "intermediate": 1408, "layers": 4, "vocab_size": 32000},
    "135m": {"hidden": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536, "layers": 30, "vocab_size": 49152,
             "tie": True},
}


def build(folder: Path, size: str) -> tuple[Path, Path]:
    from ftserve.testing import save_tiny_model, toy_sentences

    base = save_tiny_model(folder / "base", "llama", **SIZES[size])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(folder / "base-bf16")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "base-bf16")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join([s] * 6)}) + "\n" for s in toy_sentences(256)))
    return base, data


def measure(role: str, base: str, data: str, steps: int, out: str) -> dict:
    """One measurement, in this process."""
    import torch

    torch.manual_seed(0)
    if role == "trl":
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        tokenizer = AutoTokenizer.from_pretrained(base)
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-4,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                         max_length=128, packing=False, dataloader_num_workers=0, seed=0)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args, processing_class=tokenizer,
                             train_dataset=load_dataset("json", data_files=data, split="train"),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
        start = {}
        trainer.add_callback(_StepClock(start))
        trainer.train()
        footprint = trainer.model.get_memory_footprint()
    else:
        from ftserve.train import run as runner
        from ftserve.train.settings import TrainSettings

        settings = TrainSettings(base=base, data=data, output=out, rank=16, targets=["q_proj", "v_proj"],
                                 max_steps=steps, batch_size=8, max_seq_len=128, lr=2e-4, seed=0, logging_steps=1,
                                 save_steps=10**6, bf16=role in ("bf16", "qlora"), load_in_4bit=role == "qlora")
        start = {}
        captured = {}
        runner.train(settings, echo=lambda line: None, callbacks=(_StepClock(start, captured),))
        footprint = captured["footprint"]
        start["weights"] = captured["weights"]
    return {"step_s": (start["end"] - start["begin"]) / max(steps - 2, 1), "footprint_bytes": footprint,
            "weight_bytes": start.get("weights"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (block absmax, its own nested absmax, codebook, offset):
    not parameters or buffers, so ``get_memory_footprint()`` leaves them out, but weights all the same."""
    if state is None:
        return 0
    tensors = [state.absmax, state.code, state.offset if hasattr(state.offset, "numel") else None]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) + _quant_state_bytes(state.state2)


def weight_bytes(model) -> dict:
    """Bytes of the base's weights (adapter tensors left out, a tied tensor counted once, 4-bit quantization
    constants counted): ``whole`` = every base parameter and buffer; ``decoder_linear`` = the decoder layers'
    linear weights (what QLoRA quantizes; transformers keeps embeddings and lm_head 16-bit, as the paper does)."""
    import torch

    seen, whole, linear = set(), 0, 0
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.data_ptr() in seen or "lora_" in module_name or "vera_" in module_name:
                continue
            seen.add(tensor.data_ptr())
            size = tensor.numel() * tensor.element_size() + _quant_state_bytes(getattr(tensor, "quant_state", None))
            whole += size
            if ".layers." in module_name and isinstance(module, torch.nn.Linear) and name == "weight":
                linear += size
    return {"whole": whole, "decoder_linear": linear}


def _StepClock(times: dict, captured: dict | None = None):
    """A callback timing steps 3..N (the first two warm caches and allocators); it also reads the model's
    weight footprint at the end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                times["begin"] = time.perf_counter()
            if state.global_step == state.max_steps:
                times["end"] = time.perf_counter()
                if captured is not None:
                    captured["footprint"] = model.get_memory_footprint()
                    captured["weights"] = weight_bytes(model)

    return StepClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--size", choices=sorted(SIZES), default="46m", help="the base's shape (default 46m)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 12)
    if args.role:
        print(json.dumps(measure(args.role, args.base, args.data, steps, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base, data = build(folder, "quick" if args.quick else args.size)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
        results = {}
        for role in ("ours", "trl", "bf16", "qlora"):
            weights = folder / "base-bf16" if role == "bf16" else base  # QLoRA quantizes from the same weights
            done = subprocess.run([sys.executable, __file__, "--role", role, "--base", str(weights), "--data", str(data),
                                   "--out", str(folder / role), "--steps", str(steps)],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{role} failed:\n{done.stderr[-3000:]}")
            results[role] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, trl, bf16, qlora = (results[r] for r in ("ours", "trl", "bf16", "qlora"))
    print(json.dumps({
        "benchmark": "train_cli", "size": "quick" if args.quick else args.size, "steps": steps,
        "step_time_ratio_vs_trl_peft": round(ours["step_s"] / trl["step_s"], 3),
        "peak_rss_ratio_vs_trl_peft": round(ours["peak_rss_bytes"] / trl["peak_rss_bytes"], 3),
        # Base weights with the 4-bit constants, adapter left out: the whole model, and the decoder's linear
        # weights alone (what QLoRA quantizes); the embeddings and head stay 16-bit in both.
        "qlora_weight_memory_ratio_vs_bf16": round(qlora["weight_bytes"]["whole"] / bf16["weight_bytes"]["whole"], 3),
        "qlora_decoder_linear_weight_memory_ratio_vs_bf16": round(
            qlora["weight_bytes"]["decoder_linear"] / bf16["weight_bytes"]["decoder_linear"], 3),
        "bf16_decoder_linear_share_of_weights": round(
            bf16["weight_bytes"]["decoder_linear"] / bf16["weight_bytes"]["whole"], 3),
        "qlora_footprint_ratio_vs_bf16": round(qlora["footprint_bytes"] / bf16["footprint_bytes"], 3),
        "qlora_step_time_ratio_vs_bf16": round(qlora["step_s"] / bf16["step_s"], 3),
        "raw": results,
    }))


if __name__ == "__main__":
    main()
