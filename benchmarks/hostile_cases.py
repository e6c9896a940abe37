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


def structured_cases(base: str) -> list[tuple[str, str, bytes | dict, str]]:
    """Output constraints that ask for much work to compile, or cannot compile: each answered (400, or 200 where
    valid) within the engine's bound on compiling, while the normal requests keep their solo answers."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    user = [{"role": "user", "content": "the cat sees"}]

    def schema(value: dict) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": value}}

    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10000)}}
    recursive = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"},
                                                                     "v": {"type": "boolean"}}}},
                 "$ref": "#/$defs/node"}
    return [
        ("json_schema_10000_properties", chat, {"model": base, "messages": user, "max_tokens": 8,
                                                "response_format": schema(wide)}, "send"),
        ("json_schema_not_a_schema", chat, {"model": base, "messages": user,
                                            "response_format": schema({"type": "wat"})}, "send"),
        ("json_schema_recursive_ref_n4_stream", chat, {"model": "lora", "messages": user, "n": 4, "max_tokens": 24,
                                                       "temperature": 1.0, "stream": True,
                                                       "response_format": schema(recursive)}, "send"),
        ("json_schema_drop_mid_stream", chat, {"model": "vera", "messages": user, "max_tokens": 32, "stream": True,
                                               "response_format": {"type": "json_object"}}, "drop_stream"),
        ("regex_unclosed", c, {"model": base, "prompt": "hi", "structured_outputs": {"regex": "(a"}}, "send"),
        ("regex_backtracking", c, {"model": "delta", "prompt": "hi", "max_tokens": 8,
                                   "structured_outputs": {"regex": "(a+)+(b|aa+)*c{0,500}"}}, "send"),
        ("regex_1mb", c, {"model": base, "prompt": "hi", "max_tokens": 4,
                          "structured_outputs": {"regex": "(ab|cd)" * 150_000}}, "send"),
        ("grammar_unparsable", c, {"model": base, "prompt": "hi", "structured_outputs": {"grammar": "root ::= ("}},
         "send"),
        ("choice_5000", c, {"model": "lora", "prompt": "hi", "max_tokens": 8,
                            "structured_outputs": {"choice": [f"option {i}" for i in range(5000)]}}, "send"),
        ("two_constraints", chat, {"model": base, "messages": user, "response_format": {"type": "json_object"},
                                   "structured_outputs": {"regex": "a"}}, "send"),
    ]
