"""The OpenAPI document served at ``/openapi.json``: the real request models, and the error object.

The handlers read their bodies themselves (any Content-Type, OpenAI's error object for every bad value), so
FastAPI cannot see the bodies in their signatures; the document is built from the same pydantic models the
handlers validate with, so a client generator or a fuzzer (CI runs schemathesis from it) sees exactly what
the server accepts. Every error answer, whatever its status, is declared as OpenAI's error object.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def install(app: FastAPI, bodies: dict[str, type[BaseModel]], version: str) -> None:
    """Serve the document for ``app``, whose POST routes take the JSON bodies ``bodies`` (path -> model)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, bodies, version)
        return app.openapi_schema

    app.openapi = build


def document(app: FastAPI, bodies: dict[str, type[BaseModel]], version: str) -> dict[str, Any]:
    schema = get_openapi(title="ftserve", version=version, routes=app.routes,
                         description="OpenAI-compatible multi-adapter server (vLLM's routes).")
    keys, definitions = models_json_schema([(model, "validation") for model in bodies.values()],
                                           ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    components["ErrorResponse"] = ERROR_SCHEMA
    refs = {model: keys[(model, "validation")] for model in bodies.values()}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method == "post" and path in bodies:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": refs[bodies[path]]}}}
            declared = {status: answer for status, answer in operation.get("responses", {}).items()
                        if status not in ("200", "422")}  # 422: FastAPI's own validation, never sent here
            operation["responses"] = {
                "200": {"description": "Success", "content": operation_content(operation)}, **declared,
                "default": {"description": "An error, as OpenAI's error object",
                            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}},
            }
    return schema


def operation_content(operation: dict) -> dict:
    """What FastAPI inferred for a 200 (JSON, plain text, event stream), without a schema to hold it to."""
    content = operation.get("responses", {}).get("200", {}).get("content") or {"application/json": {}}
    return {media: {} for media in content}
