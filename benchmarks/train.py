"""Training figures against PEFT, measured in one run on a Llama-shaped model of about 100M parameters.

* Step time (forward + backward + AdamW step) of each of our methods relative to PEFT's same method, on
  copies of one base, interleaved step by step (the order flips every round); the figure is the median of
  the per-round ratios ours / PEFT. LoRA+ is compared with PEFT's ``create_loraplus_optimizer``, Delta-LoRA
  (past its start step, so its snapshot term runs) with PEFT LoRA, LoRA-FA with PEFT LoRA whose A is frozen,
  DoRA with PEFT's ``use_dora`` (which forms the dense ``W + s B A`` every step; ours expands the row norm and
  keeps ``||W||_row`` from the first step) and, ``dora_step_ratio_vs_our_lora``, with our own LoRA step.
* Activation memory: bytes of non-parameter tensors saved for backward in one training forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` and de-duplicated by storage; LoRA-FA against LoRA, ours and
  PEFT's (A frozen), with lora_dropout 0 and 0.05.
* Trainable parameters of VeRA relative to LoRA.

    python benchmarks/train.py            # the figure: hidden 768, 8 layers, batch 4 x 256, 2 threads
    python benchmarks/train.py --quick    # a tiny model, seconds: checks that the script runs

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import statistics
import sys
import time
import warnings

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear, not lm_head
LORA_R, VERA_R, ALPHA, LR = 16, 256, 32, 1e-4
FULL = {"vocab": 32000, "hidden": 768, "layers": 8, "heads": 12, "intermediate": 2048, "batch": 4, "seq": 256}
QUICK = {"vocab": 1000, "hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "batch": 2, "seq": 64}


def build_base(shape: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         intermediate_size=shape["intermediate"], max_position_embeddings=shape["seq"],
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def ours(base: nn.Module, method: str, r: int, dropout: float, **extra) -> tuple[nn.Module, torch.optim.Optimizer]:
    from ftserve import FineTuningConfig, FineTuningModel

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Delta-LoRA's note that it drops dropout
        config = FineTuningConfig(method=method, lora_r=r, lora_alpha=ALPHA, lora_dropout=dropout,
                                  target_modules=TARGETS, **extra)
    model = FineTuningModel(copy.deepcopy(base), config).train()
    return model, model.create_optimizer(lr=LR)


def peft(base: nn.Module, method: str, r: int, dropout: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, VeraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(1)
    if method == "vera":
        config = VeraConfig(r=r, target_modules=TARGETS, vera_dropout=dropout, d_initial=0.1, projection_prng_key=0)
    else:
        config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS,
                            use_dora=method == "dora")
    model = get_peft_model(copy.deepcopy(base), config).train()
    if method == "lora-fa":  # LoRA with A frozen, the plain way
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    if method == "lora+":
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_times(base, batch, ours_spec: tuple, peft_spec: tuple, rounds: int, warmup: int) -> dict:
    """Median seconds per step of ours and PEFT's (``peft_spec`` starting with "ours": our own method's), and the
    median of the per-round ratios ours / PEFT."""
    ours_model, ours_opt = ours(base, *ours_spec[:3], **(ours_spec[3] if len(ours_spec) > 3 else {}))
    reference = ours if peft_spec[0] == "ours" else peft
    peft_model, peft_opt = reference(base, *peft_spec[-3:])
    pair = [(ours_model, ours_opt), (peft_model, peft_opt)]
    for _ in range(warmup):
        for model, opt in pair:
            train_step(model, opt, batch)
    if hasattr(ours_model, "adapter_layers") and ours_spec[0] == "delta-lora":
        assert all(layer.started for layer in ours_model.adapter_layers.values()), "Delta-LoRA did not start"
    times: list[list[float]] = [[], []]
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[k].append(train_step(*pair[k], batch))
    del pair, ours_model, ours_opt, peft_model, peft_opt
    gc.collect()
    ratios = [o / p for o, p in zip(*times)]
    return {"ours_s": statistics.median(times[0]), "peft_s": statistics.median(times[1]),
            "ratio": statistics.median(ratios), "round_ratios": [round(r, 3) for r in ratios]}


def saved_activation_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward, parameters and buffers excluded."""
    exclude = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t  # the graph holds t until `out` goes, so no address is reused while counting

    torch.manual_seed(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch, labels=batch)
    del out
    return sum(seen.values())


def activation_ratios(base, batch) -> dict:
    figures = {}
    for dropout in (0.0, 0.05):
        sizes = {}
        for side, method in itertools.product(("ours", "peft"), ("lora", "lora-fa")):
            model, _ = (ours if side == "ours" else peft)(base, method, LORA_R, dropout)
            sizes[side, method] = saved_activation_bytes(model, batch)
            del model
            gc.collect()
        figures[f"lorafa_act_mem_ratio_dropout{dropout:g}"] = sizes["ours", "lora-fa"] / sizes["ours", "lora"]
        figures[f"peft_lorafa_act_mem_ratio_dropout{dropout:g}"] = sizes["peft", "lora-fa"] / sizes["peft", "lora"]
        figures[f"lora_act_mem_ratio_vs_peft_dropout{dropout:g}"] = sizes["ours", "lora"] / sizes["peft", "lora"]
        figures[f"lorafa_act_mem_mb_dropout{dropout:g}"] = sizes["ours", "lora-fa"] / 2**20
        figures[f"lora_act_mem_mb_dropout{dropout:g}"] = sizes["ours", "lora"] / 2**20
    return figures


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check the script in seconds")
    parser.add_argument("--rounds", type=int, default=None, help="measured steps per model (default 4, quick 2)")
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the timed runs (not Delta-LoRA)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None,
                        help="comma-separated step-time pairs to run (lora,vera,vera_r16,loraplus,delta_lora,lorafa,dora,"
                             "dora_vs_our_lora), "
                             "or 'none' for the memory and parameter figures alone; default all")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 4)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base = build_base(shape)
    batch = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0))
    p = args.dropout
    runs = {
        "lora": (("lora", LORA_R, p), ("lora", LORA_R, p)),
        "vera": (("vera", VERA_R, p), ("vera", VERA_R, p)),
        "vera_r16": (("vera", LORA_R, p), ("vera", LORA_R, p)),
        "loraplus": (("lora+", LORA_R, p), ("lora+", LORA_R, p)),
        "delta_lora": (("delta-lora", LORA_R, 0.0, {"delta_start_step": 0}), ("lora", LORA_R, 0.0)),
        "lorafa": (("lora-fa", LORA_R, p), ("lora-fa", LORA_R, p)),
        "dora": (("dora", LORA_R, p), ("dora", LORA_R, p)),
        "dora_vs_our_lora": (("dora", LORA_R, p), ("ours", "lora", LORA_R, p)),
    }
    if args.only is not None:
        chosen = set(filter(None, args.only.split(","))) - {"none"}
        unknown = chosen - set(runs)
        if unknown:
            parser.error(f"--only: unknown pairs {sorted(unknown)}; choose from {sorted(runs)} or 'none'")
        runs = {name: spec for name, spec in runs.items() if name in chosen}
    figures: dict = {}
    raw: dict = {}
    for name, (ours_spec, peft_spec) in runs.items():
        result = step_times(base, batch, ours_spec, peft_spec, rounds, warmup=1)
        if peft_spec[0] == "ours":
            figures[f"{name.replace('_vs_', '_step_ratio_vs_')}"] = result["ratio"]
        else:
            figures[f"{name}_step_ratio_vs_peft"] = result["ratio"]
            raw[f"{name}_step_s"], raw[f"peft_{name}_step_s"] = result["ours_s"], result["peft_s"]
        print(f"{name}: {result}", file=sys.stderr, flush=True)

    figures.update(activation_ratios(base, batch))

    counts = {}
    for key, method, r in (("lora", "lora", LORA_R), ("vera", "vera", VERA_R), ("vera_r16", "vera", LORA_R)):
        model, _ = ours(base, method, r, 0.0)
        counts[key] = trainable(model)
        counts[f"peft_{key}"] = trainable(peft(base, method, r, 0.0)[0])
        del model
    figures["vera_trainable_ratio"] = counts["vera"] / counts["lora"]
    figures["vera_r16_trainable_ratio"] = counts["vera_r16"] / counts["lora"]
    figures["trainable_matches_peft"] = all(counts[k] == counts[f"peft_{k}"] for k in ("lora", "vera", "vera_r16"))

    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    raw = {k: round(v, 3) for k, v in raw.items()}
    print(json.dumps({**figures, **raw, "trainable_params": counts, "rounds": rounds, "dropout": p,
                      "threads": args.threads, "quick": args.quick,
                      "total_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
