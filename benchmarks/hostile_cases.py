"""Hostile requests that ask for far more work than their size suggests, for ``hostile_load.py``'s case list.

Each is (name, path, body, how) as ``hostile_load.hostile_cases`` lists them; every one must be refused with a
4xx before the work it asks for is built (ftserve/server/cost.py, protocol.py, app.py's body parsing), whatever
the engine's limits are (prompts x n beyond the default queue of 1024, log probabilities beyond 2^20 however
long the context, lists beyond their bounds, nesting beyond 64 levels, a 4 MiB list of token ids beyond any
context).
"""

from __future__ import annotations

import json


def cost_cases(base: str) -> list[tuple[str, str, bytes | dict, str]]:
    c, chat = "/v1/completions", "/v1/chat/completions"
    user = [{"role": "user", "content": "the cat sees"}]
    ids = [5 + i % 900 for i in range(450)]
    nested = json.dumps({"model": base, "prompt": "hi", "max_tokens": 1, "user": "x"}).encode()
    return [
        ("fan_out_1000_prompts_n64", c, {"model": base, "prompt": [f"prompt {i}" for i in range(1000)], "n": 64,
                                         "max_tokens": 16}, "send"),
        ("fan_out_1025_token_lists", c, {"model": base, "prompt": [[1, 5, 6]] * 1025, "max_tokens": 1}, "send"),
        ("echo_logprobs_20_n128", c, {"model": base, "prompt": ids, "echo": True, "logprobs": 20, "n": 128,
                                      "max_tokens": 0}, "send"),
        ("chat_top_logprobs_20_n128", chat, {"model": base, "messages": user, "n": 128, "logprobs": True,
                                             "top_logprobs": 20, "max_tokens": 400}, "send"),
        ("token_ids_4mib", c, json.dumps({"model": base, "prompt": [7] * 1_300_000, "max_tokens": 1,
                                          "user": "\U0001f600"}).encode(), "send"),
        ("nested_65_deep", c, nested.replace(b'"x"', b"[" * 64 + b"]" * 64), "send"),
        ("stop_5_strings", c, {"model": base, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "send"),
        ("stop_token_ids_1025", c, {"model": base, "prompt": "hi", "stop_token_ids": list(range(1025))}, "send"),
        ("logit_bias_1025", chat, {"model": base, "messages": user,
                                   "logit_bias": {f"{i:04d}": -1 for i in range(1025)}}, "send"),
    ]
