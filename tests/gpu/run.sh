#!/usr/bin/env bash
# The GPU checks: --engine vllm through CUDA vLLM, and `ftserve train` on CUDA; under 11 minutes on one GPU. Not run in CI.
#
#     PY=/path/to/venv/bin/python tests/gpu/run.sh
#
# The machine has no network, so nothing is installed here. It expects $PY (default: python) to have CUDA vLLM
# (`pip install 'finetuning-toolkit[vllm]'`, i.e. the `vllm` wheel, with its CUDA torch) and this checkout's
# dependencies beside it: transformers, safetensors, huggingface-hub, click, tqdm, tokenizers, peft, openai,
# httpx, fastapi, uvicorn, prometheus-client, psutil, pytest (`pip install --no-deps -e .` for ftserve itself,
# or PYTHONPATH, which this script sets). Models and adapters are tiny, random and built here.
#
# 1. tests/vllm_engine/ on the GPU: each method's greedy tokens through `ftserve serve --engine vllm` equal the
#    torch engine's (on the same GPU) and the merged model's, mixed adapters at once, runtime load and unload,
#    bad input answered as on the torch engine, a merged model served by vLLM, chat logprobs' bytes. Every vLLM
#    server gets --gpu-memory-utilization 0.2, since several run at once; with one GPU the two tests of
#    tensor parallelism 2 (one node, two nodes) are left out (they need two GPUs).
# 2. Throughput: the same 64 requests (128 new tokens each, greedy) on the base model alone, and spread over
#    16 LoRA adapters (rank 16), on one engine; one JSON line with tokens/s and the ratio.
# 3. Training (tests/gpu/train_check.py, about 2 minutes): a few steps of each method through `ftserve train` on
#    CUDA in bf16 against the same steps on CPU in fp32 (losses, the loss's fall, the adapter's change, within
#    the tolerances the script states), and QLoRA (--load-in-4bit) on CUDA trains. It needs bitsandbytes and
#    datasets too. `python tests/gpu/train_check.py --device cpu` runs the same comparison without a GPU.
# Each part's result is kept, and one summary line says which passed; the exit status is 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 FTSERVE_REQUIRE_VLLM=1
FTSERVE_VLLM_ADAPTER_CACHE=$(mktemp -d)
export FTSERVE_VLLM_ADAPTER_CACHE
trap 'rm -rf "$FTSERVE_VLLM_ADAPTER_CACHE"' EXIT
"$PY" - <<'PYEOF'
import torch, vllm
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("vllm", vllm.__version__, "torch", torch.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0))
PYEOF
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
SELECT=""
if [ "$GPUS" -lt 2 ]; then SELECT="not tensor_parallel and not two_nodes"; fi
declare -A RESULT=()
set +e
FTSERVE_TEST_VLLM_ARGS="--gpu-memory-utilization 0.2" timeout 330 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/vllm_engine ${SELECT:+-k "$SELECT"}
RESULT[vllm_tests]=$?
timeout 120 "$PY" - <<'PYEOF'
import asyncio, json, tempfile, time
from pathlib import Path

import torch

from ftserve.engine import create_engine
from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.engine.options import EngineOptions
from ftserve.testing import save_random_adapter, save_tiny_model

REQUESTS, NEW, ADAPTERS = 64, 128, 16


async def main(root: Path) -> dict:
    base = save_tiny_model(root / "base", "llama", hidden=1024, layers=8, heads=16, intermediate=2816,
                           dtype=torch.bfloat16)
    paths = [save_random_adapter(base, "lora", root / f"a{i}", seed=i, std=0.6, fan_in=True, rank=16,
                                 targets="all-linear") for i in range(ADAPTERS)]
    engine = create_engine("vllm", str(base), EngineOptions(dtype="bfloat16", max_loras=ADAPTERS, max_lora_rank=16,
                                                            max_num_seqs=REQUESTS, max_model_len=256,
                                                            gpu_memory_utilization=0.5))
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    prompts = [[1, *range(10 + 7 * i, 42 + 7 * i)] for i in range(REQUESTS)]
    async with engine:
        for i, path in enumerate(paths):
            await engine.load_adapter(f"a{i}", str(path))

        async def one(prompt, adapter):
            n = 0
            async for chunk in engine.generate(GenerationRequest(prompt, adapter=adapter, params=params)):
                n += len(chunk.token_ids)
            return n

        async def rate(names):
            begin = time.perf_counter()
            counts = await asyncio.gather(*[one(p, a) for p, a in zip(prompts, names)])
            assert all(c == NEW for c in counts)
            return sum(counts) / (time.perf_counter() - begin)

        base_only, mixed = [None] * REQUESTS, [f"a{i % ADAPTERS}" for i in range(REQUESTS)]
        await rate(mixed[:8])
        best = {"base": 0.0, "mixed": 0.0}
        for _ in range(3):
            best["base"] = max(best["base"], await rate(base_only))
            best["mixed"] = max(best["mixed"], await rate(mixed))
    return {"requests": REQUESTS, "new_tokens": NEW, "adapters": ADAPTERS, "base_tok_s": round(best["base"], 1),
            "mixed_16_adapters_tok_s": round(best["mixed"], 1),
            "mixed_over_base": round(best["mixed"] / best["base"], 3)}


if __name__ == "__main__":  # vLLM starts processes of its own
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(main(Path(tmp)))))
PYEOF
RESULT[throughput]=$?
timeout 240 "$PY" tests/gpu/train_check.py --device cuda
RESULT[training]=$?
set -e
FAILED=0
SUMMARY="gpu checks:"
for part in vllm_tests throughput training; do
    if [ "${RESULT[$part]}" -eq 0 ]; then SUMMARY+=" $part=OK"; else SUMMARY+=" $part=FAIL(rc ${RESULT[$part]})"; FAILED=1; fi
done
echo "$SUMMARY"
exit "$FAILED"
