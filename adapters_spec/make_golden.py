"""Write the golden vectors in adapters_spec/golden/: small inputs and the outputs the spec says they give.

    python adapters_spec/make_golden.py        # rewrites golden/*.json; byte-identical on every run

Every expected value is computed here from the formulas of adapters_spec/*.md in float64 torch math. Nothing
is imported from ftserve: these files are an independent check of it (tests/test_golden.py) and of any other
implementation. Inputs are hand-placed multiples of 1/8, exact in float32, so they read the same in every
precision; the one seeded input is VeRA's shared pair, which the spec defines by its generator.

Conventions (PEFT's): a Linear stores W (d_out x d_in); A is (r x d_in), B is (d_out x r); x is a batch of
row vectors (n x d_in) and h = x W^T + bias + (adapter term). A Conv1D stores W^T (d_in x d_out), computes
the same h, and folds the transposed delta. Expected outputs are rounded to 12 significant digits.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
F64 = torch.float64

# One small layer, d_in = 4, d_out = 3, r = 2; values chosen so a product can be checked by eye.
W = [[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -0.5], [0.25, 0.0, 1.0, 0.0]]
BIAS = [0.5, -1.0, 0.0]
A = [[1.0, 0.0, 0.5, 0.0], [0.0, -1.0, 0.0, 0.25]]
B = [[1.0, 0.0], [0.5, -0.5], [0.0, 2.0]]
X = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 0.5, 2.0]]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def out(value):
    """Tensors and floats as JSON numbers, rounded to 12 significant digits (stable across BLAS builds)."""
    if isinstance(value, torch.Tensor):
        return out(value.tolist())
    if isinstance(value, list):
        return [out(v) for v in value]
    if isinstance(value, float):
        rounded = float(f"{value:.12g}")
        return 0.0 if rounded == 0 else rounded
    return value


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r (LoRA, arXiv:2106.09685); alpha / sqrt(r) with rsLoRA (arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def layer_case(name: str, layer: str, w, bias, x, delta: torch.Tensor, export_A, export_B, export_scale: float,
               adapter_inputs: dict, extra: dict | None = None) -> dict:
    """One layer: h = x W^T + bias + x delta^T; folded weight W + delta (Linear) or W^T + delta^T (Conv1D)."""
    w, bias, x = t(w), t(bias), t(x)
    h = x @ w.T + bias + x @ delta.T
    stored = w if layer == "linear" else w.T
    folded = w + delta if layer == "linear" else (w + delta).T
    case = {
        "name": name,
        "layer": layer,
        "d_in": w.shape[1],
        "d_out": w.shape[0],
        "inputs": {"base_weight": stored.tolist(), "base_bias": bias.tolist(), "x": x.tolist(), **adapter_inputs},
        "expected": {
            "h": out(h),
            "delta_weight": out(delta),
            "folded_base_weight": out(folded),
            "export": {"A": out(export_A), "B": out(export_B), "scale": out(export_scale),
                       "rank": int(export_A.shape[0])},
        },
    }
    case.update(extra or {})
    return case


def lora_cases(method: str) -> list[dict]:
    """LoRA's forward, delta s B A, and the adapter itself as its export; also LoRA+'s and LoRA-FA's."""
    cases = []
    for name, layer, alpha, rslora in (("linear", "linear", 4.0, False), ("linear_rslora", "linear", 4.0, True),
                                       ("conv1d", "conv1d", 4.0, False)):
        r = len(A)
        s = lora_scale(alpha, r, rslora)
        delta = s * t(B) @ t(A)
        config = {"method": method, "lora_r": r, "lora_alpha": alpha, "use_rslora": rslora}
        cases.append(layer_case(name, layer, W, BIAS, X, delta, t(A), t(B), s,
                                {"lora_A.weight": A, "lora_B.weight": B},
                                {"config": config, "scale": out(s)}))
    return cases


def loraplus_groups() -> list[dict]:
    """LoRA+ (arXiv:2402.12354): lora_B and 1-D tensors at lr * ratio, the rest at lr; weight decay as given."""
    cases = []
    for lr, ratio, wd in ((1e-3, 16.0, 0.0), (2e-4, 4.0, 0.01)):
        cases.append({
            "config": {"method": "lora+", "lora_r": 2, "lora_alpha": 4.0, "loraplus_lr_ratio": ratio,
                       "target_modules": ["proj"]},
            "lr": lr,
            "weight_decay": wd,
            "expected_groups": [
                {"params": ["proj.lora_A.weight"], "lr": out(lr), "weight_decay": wd},
                {"params": ["proj.lora_B.weight"], "lr": out(lr * ratio), "weight_decay": wd},
            ],
        })
    return cases


def lora_fa_gradients() -> dict:
    """LoRA-FA (arXiv:2308.03303): A frozen; with L = 1/2 sum (h - y)^2 and G = h - y,
    dL/dB = s G^T (x A^T), dL/dx = G W + s G B A, and A gets no gradient."""
    r, alpha = len(A), 4.0
    s = lora_scale(alpha, r, False)
    w, x, a, b, bias = t(W), t(X), t(A), t(B), t(BIAS)
    y = t([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    h = x @ w.T + bias + s * (x @ a.T) @ b.T
    g = h - y
    return {
        "config": {"method": "lora-fa", "lora_r": r, "lora_alpha": alpha},
        "loss": "0.5 * sum((h - y)^2)",
        "inputs": {"base_weight": W, "base_bias": BIAS, "x": X, "y": y.tolist(),
                   "lora_A.weight": A, "lora_B.weight": B},
        "expected": {
            "loss": out(0.5 * float((g ** 2).sum())),
            "grad_lora_B": out(s * g.T @ (x @ a.T)),
            "grad_lora_A": None,
            "grad_x": out(g @ w + s * g @ b @ a),
            "trainable": ["lora_B.weight"],
            "frozen": ["lora_A.weight"],
        },
    }


def vera_pair(r: int, max_out: int, max_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair: a CPU generator seeded with projection_prng_key draws A (r x max_in) first, then
    B (max_out x r), each Kaiming-uniform in float32 with bound sqrt(6 / fan_in), fan_in = size(1)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pair = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(6.0 / shape[1])
        pair.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
    return pair[0].to(F64), pair[1].to(F64)


def vera() -> dict:
    """VeRA (arXiv:2310.11454): h = x W^T + bias + ((x A_l^T) * d) B_l^T * b, A_l = A[:, :d_in], B_l = B[:d_out]."""
    r, seed = 2, 7
    layers = {"q": (3, 4), "v": (5, 2)}  # (d_out, d_in); the pair is sized (r, 4) and (5, r)
    max_out, max_in = max(s[0] for s in layers.values()), max(s[1] for s in layers.values())
    pair_A, pair_B = vera_pair(r, max_out, max_in, seed)
    weights = {"q": (W, BIAS, X),
               "v": ([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0], [0.0, 0.25]], [0.0, 0.0, 1.0, 0.0, -0.5],
                     [[1.0, -2.0], [0.5, 0.25]])}
    vectors = {"q": ([0.5, -1.0, 2.0], [1.0, -0.5]), "v": ([1.0, 0.0, -0.5, 0.25, 2.0], [0.125, 3.0])}
    cases = []
    for name, layer in (("q", "linear"), ("v", "linear"), ("q", "conv1d")):
        (d_out, d_in), (w, bias, x), (b, d) = layers[name], weights[name], vectors[name]
        A_l, B_l = pair_A[:, :d_in], pair_B[:d_out, :]
        export_A, export_B = t(d)[:, None] * A_l, t(b)[:, None] * B_l
        delta = torch.diag(t(b)) @ B_l @ torch.diag(t(d)) @ A_l
        cases.append(layer_case(f"{name}_{layer}", layer, w, bias, x, delta, export_A, export_B, 1.0,
                                {"vera_lambda_b": b, "vera_lambda_d": d}, {"module": name}))
    return {
        "config": {"method": "vera", "lora_r": r, "projection_prng_key": seed, "d_initial": 0.1},
        "target_shapes": {k: list(v) for k, v in layers.items()},
        "shared": {"vera_A": pair_A.tolist(), "vera_B": pair_B.tolist(),
                   "bound_A": out(math.sqrt(6.0 / max_in)), "bound_B": out(math.sqrt(6.0 / r))},
        "init": {"vera_lambda_b": 0.0, "vera_lambda_d": 0.1},
        "cases": cases,
    }


def delta_static(ratio: float) -> list[dict]:
    """Delta-LoRA (arXiv:2309.02411) with start snapshot (A_s, B_s): the effective weight is
    W_0 + s ((1 + ratio) B A - ratio B_s A_s), exported as A' = [A; A_s], B' = [(1 + ratio) B, -ratio B_s]."""
    A_s = [[0.5, 0.0, 0.5, 0.0], [0.0, -1.0, 0.0, 0.0]]
    B_s = [[0.5, 0.0], [0.5, -0.5], [0.0, 1.0]]
    r, alpha = len(A), 4.0
    s = lora_scale(alpha, r, False)
    delta = s * ((1 + ratio) * t(B) @ t(A) - ratio * t(B_s) @ t(A_s))
    export_A = torch.cat([t(A), t(A_s)], dim=0)
    export_B = torch.cat([(1 + ratio) * t(B), -ratio * t(B_s)], dim=1)
    config = {"method": "delta-lora", "lora_r": r, "lora_alpha": alpha, "delta_update_ratio": ratio}
    adapter = {"lora_A.weight": A, "lora_B.weight": B, "lora_A_start.weight": A_s, "lora_B_start.weight": B_s}
    return [layer_case(name, layer, W, BIAS, X, delta, export_A, export_B, s, adapter, {"config": config})
            for name, layer in (("linear", "linear"), ("conv1d", "conv1d"))]


def delta_trajectory(ratio: float = 2.0, start_step: int = 0, steps: int = 3, lr: float = 0.01) -> dict:
    """Three plain-SGD steps on L = 1/2 sum (h - y)^2, h = x (W_t + s B_t A_t)^T + bias, done the paper's way:
    W gets no gradient and, after step t (0-based) with t > K, W_{t+1} = W_t + ratio s (B_{t+1} A_{t+1} - B_t A_t).
    It telescopes: W_T = W_0 + ratio s (B_T A_T - B_{K+1} A_{K+1})."""
    r, alpha = len(A), 4.0
    s = lora_scale(alpha, r, False)
    w, a, b, x, bias = t(W), t(A), t(B), t(X), t(BIAS)
    y = t([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    history, snapshot = [], None
    for step in range(steps):
        h = x @ w.T + bias + s * (x @ a.T) @ b.T
        g = h - y
        grad_A, grad_B = s * b.T @ g.T @ x, s * g.T @ (x @ a.T)
        a_next, b_next = a - lr * grad_A, b - lr * grad_B
        if step > start_step:
            w = w + ratio * s * (b_next @ a_next - b @ a)
        a, b = a_next, b_next
        if step == start_step:  # step K+1 (1-based) is done: the snapshot (A_{K+1}, B_{K+1})
            snapshot = (a.clone(), b.clone())
        history.append({"step": step + 1, "loss": out(0.5 * float((g ** 2).sum())), "lora_A": out(a),
                        "lora_B": out(b), "W": out(w)})
    a_s, b_s = snapshot
    telescoped = ratio * s * (b @ a - b_s @ a_s)
    effective = w + s * b @ a - t(W)
    h_final = x @ (w + s * b @ a).T + bias
    return {
        "config": {"method": "delta-lora", "lora_r": r, "lora_alpha": alpha, "delta_update_ratio": ratio,
                   "delta_start_step": start_step, "target_modules": ["proj"]},
        "optimizer": {"name": "SGD", "lr": lr, "momentum": 0.0, "weight_decay": 0.0},
        "tolerance_float32": {"rtol": 1e-4, "atol": 1e-4},
        "loss": "0.5 * sum((h - y)^2)",
        "inputs": {"base_weight": W, "base_bias": BIAS, "x": X, "y": y.tolist(), "lora_A.weight": A,
                   "lora_B.weight": B},
        "expected": {
            "history": history,
            "W_T": out(w),
            "W_T_minus_W_0": out(w - t(W)),
            "telescoped": out(telescoped),
            "lora_A_start": out(a_s),
            "lora_B_start": out(b_s),
            "delta_weight": out(effective),
            "h": out(h_final),
            "export": {"A": out(torch.cat([a, a_s])), "B": out(torch.cat([(1 + ratio) * b, -ratio * b_s], dim=1)),
                       "scale": s, "rank": 2 * r},
        },
    }


# DoRA's magnitude, one per output row. In `linear` (s = 2) the rows of W + s B A are [3, 0, 0, 0.5],
# [1, 3, 0.5, -0.75] and [0.25, -4, 1, 1], of norms sqrt(9.25), sqrt(10.8125) and 4.25: r = m / norm is 5 / 4.25
# on the last row, and differs from one on every row.
MAGNITUDE = [4.0, 3.0, 5.0]


def dora_cases() -> list[dict]:
    """DoRA (arXiv:2402.09353): W' = diag(r) (W + s B A), r = m / ||W + s B A||_row (each row's 2-norm over
    d_in); h = x W'^T + bias (the bias is not scaled); dense delta W' - W; no plain-LoRA export: the served form
    is A, B, s with the magnitude m and the row scale r."""
    cases = []
    for name, layer, alpha, rslora in (("linear", "linear", 4.0, False), ("linear_rslora", "linear", 4.0, True),
                                       ("conv1d", "conv1d", 4.0, False)):
        r = len(A)
        s = lora_scale(alpha, r, rslora)
        adapted = t(W) + s * t(B) @ t(A)
        norm = adapted.norm(dim=1)
        row_scale = t(MAGNITUDE) / norm
        delta = row_scale[:, None] * adapted - t(W)
        config = {"method": "dora", "lora_r": r, "lora_alpha": alpha, "use_rslora": rslora}
        case = layer_case(name, layer, W, BIAS, X, delta, t(A), t(B), s,
                          {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": MAGNITUDE},
                          {"config": config, "scale": out(s)})
        case["expected"]["export"]["magnitude"] = MAGNITUDE
        case["expected"].update(adapted_norm=out(norm), row_scale=out(row_scale))
        cases.append(case)
    return cases


def dora_gradients() -> dict:
    """DoRA's gradients with the norm detached (the paper's section 4.3, PEFT): with L = 1/2 sum (h - y)^2,
    G = h - y, V = W + s B A and r = m / ||V||_row a constant in the norm,
    dL/dm = sum_n G (x V^T) / ||V||_row, dL/dB = s (G r)^T (x A^T), dL/dA = s B^T (G r)^T x."""
    r, alpha = len(A), 4.0
    s = lora_scale(alpha, r, False)
    w, x, a, b, bias, m = t(W), t(X), t(A), t(B), t(BIAS), t(MAGNITUDE)
    y = t([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    adapted = w + s * b @ a
    norm = adapted.norm(dim=1)
    h = (m / norm) * (x @ adapted.T) + bias
    g = h - y
    g_scaled = g * (m / norm)
    return {
        "config": {"method": "dora", "lora_r": r, "lora_alpha": alpha},
        "loss": "0.5 * sum((h - y)^2)",
        "inputs": {"base_weight": W, "base_bias": BIAS, "x": X, "y": y.tolist(), "lora_A.weight": A,
                   "lora_B.weight": B, "lora_magnitude_vector": MAGNITUDE},
        "expected": {
            "loss": out(0.5 * float((g ** 2).sum())),
            "grad_lora_magnitude_vector": out((g * (x @ adapted.T)).sum(0) / norm),
            "grad_lora_B": out(s * g_scaled.T @ (x @ a.T)),
            "grad_lora_A": out(s * b.T @ g_scaled.T @ x),
        },
    }


def documents() -> dict[str, dict]:
    common = {"generated_by": "adapters_spec/make_golden.py", "tolerance_float32": {"rtol": 1e-5, "atol": 1e-5}}
    return {
        "lora": {"method": "lora", "spec": "adapters_spec/lora.md", **common, "cases": lora_cases("lora")},
        "loraplus": {"method": "lora+", "spec": "adapters_spec/loraplus.md", **common,
                     "cases": lora_cases("lora+"), "param_groups": loraplus_groups()},
        "lora_fa": {"method": "lora-fa", "spec": "adapters_spec/lora_fa.md", **common,
                    "cases": lora_cases("lora-fa"), "gradients": lora_fa_gradients()},
        "vera": {"method": "vera", "spec": "adapters_spec/vera.md", **common, **vera()},
        "delta_lora": {"method": "delta-lora", "spec": "adapters_spec/delta_lora.md", **common,
                       "cases": delta_static(2.0), "trajectory": delta_trajectory()},
        "dora": {"method": "dora", "spec": "adapters_spec/dora.md", **common, "cases": dora_cases(),
                 "gradients": dora_gradients()},
    }


def compact(text: str) -> str:
    """Put each innermost list of numbers on one line, so a matrix reads row by row."""
    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, document in documents().items():
        path = GOLDEN / f"{name}.json"
        path.write_text(compact(json.dumps(document, indent=1)) + "\n")
        print(f"wrote {path.relative_to(GOLDEN.parent.parent)}")


if __name__ == "__main__":
    main()
