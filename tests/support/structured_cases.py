"""Structured-output cases every engine runs (tests/test_engine_contract.py, tests/vllm_engine/test_structured.py):
schemas whose answers a random tiny model finishes, bad constraints, and the checks of an answer.

The tiny model is random: free inside a JSON string or array it writes until ``max_tokens``. Every string and
array here is bounded (``maxLength``, ``maxItems``) and every object closed (``additionalProperties: false``), so
a greedy answer ends where the grammar ends it, well within ANSWER_TOKENS.
"""

from __future__ import annotations

import json

import jsonschema

from ftserve.engine.base import StructuredOutputs

ANSWER_TOKENS = 120


def _closed(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties, "required": list(required or properties),
            "additionalProperties": False}


SCHEMAS = {
    "nested object": _closed({"name": {"type": "string", "maxLength": 6},
                              "address": _closed({"city": {"type": "string", "maxLength": 6},
                                                  "zip": {"type": "integer", "minimum": 0, "maximum": 99999}})}),
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
              "maxItems": 4},
    "enum and boolean": _closed({"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}),
    "anyOf": _closed({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                      {"type": "string", "maxLength": 4}, {"type": "null"}]}}),
    "pattern and optional": _closed({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                     "note": {"type": "string", "maxLength": 3}}, required=["code"]),
}


def nested(depth: int) -> str:
    """A schema of objects ``depth`` deep, as JSON text (a dict that deep would pass Python's recursion limit)."""
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth


WIDE = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}}

BAD_CONSTRAINTS = {  # case: (constraint, the field its error names)
    "schema of an unknown type": (StructuredOutputs(json={"type": "frobnicate"}), "structured_outputs.json"),
    "schema text that is not JSON": (StructuredOutputs(json="{not json"), "structured_outputs.json"),
    "regex that does not compile": (StructuredOutputs(regex="a(b"), "structured_outputs.regex"),
    "GBNF that does not parse": (StructuredOutputs(grammar="root ::= foo bar ::="), "structured_outputs.grammar"),
    "Lark that does not parse": (StructuredOutputs(grammar="start: (("), "structured_outputs.grammar"),
    "schema nested 100 deep": (StructuredOutputs(json=nested(100)), "structured_outputs.json"),
    "schema of 10,000 properties": (StructuredOutputs(json=WIDE), "structured_outputs.json"),
    "empty choice": (StructuredOutputs(choice=()), "structured_outputs.choice"),
    "two constraints": (StructuredOutputs(json={"type": "object"}, regex="a"), "structured_outputs"),
}


def valid(text: str, schema) -> bool:
    """``text`` parses as JSON and validates against ``schema`` (a dict or its JSON text)."""
    jsonschema.validate(json.loads(text), json.loads(schema) if isinstance(schema, str) else schema)
    return True


def json_whitespace(text: str) -> bool:
    """True if JSON ``text`` holds whitespace outside its strings."""
    in_string = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char.isspace():
            return True
    return False


def closing_bias(engine) -> dict[int, float]:
    """A logit bias toward '"' and '}', so a random model under ``json_object`` closes its strings and its object
    (the mask still decides what it may write)."""
    ids = {}
    for char in '"}':
        (token,) = engine.tokenizer.encode(char, add_special_tokens=False)
        ids[token] = 50.0
    return ids
