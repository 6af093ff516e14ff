"""The API's OpenAPI document: the response declarations routes use, and the finishing of the document.

Every status, body, media type and header a route answers is declared, so a generated client parses every
answer (tested with ``openapi-python-client`` against the live document, and every response the test suite
sees is validated against it):

    error_responses(*statuses)  {"error": {"code", "message"}} (ErrorBody) with the codes each status carries and
                                its headers (Retry-After on 429/503, WWW-Authenticate on 401)
    PNG, ANIMATION, EVENT_STREAM, PROMETHEUS_TEXT, LOCATION  the non-JSON bodies and the Location header of 202
    operation_id(route)         operation ids are the route functions' names (``get_job``, ``cancel_job``...)
    install(app, limits, models)  the document FastAPI builds, with every 422 in the real error shape (FastAPI
                                declares its own ``HTTPValidationError``, which this API never sends) and this
                                server's limits and model names in the job-creating requests' schemas

This module knows the response shapes (``service.schemas``), not the routes or how errors are raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.schemas import ErrorBody, Limits

__all__ = ["ANIMATION", "EVENT_STREAM", "LOCATION", "PNG", "PROMETHEUS_TEXT", "error_responses", "install",
           "operation_id"]

_REF = "#/components/schemas/"
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
# status -> (the error codes it carries, headers every such answer has, headers some have)
_ERRORS: dict[int, tuple[str, dict[str, Any], dict[str, Any]]] = {
    400: ("bad_request: the body could not be read", {}, {}),
    401: ("unauthorized: an API key is needed (API keys are configured)",
          {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}, {}),
    403: ("forbidden: the API key is not valid", {}, {}),
    404: ("not_found: unknown id, expired job, or no such frame or image", {}, {}),
    409: ("idempotency_in_progress: a request with this Idempotency-Key is still creating its job; retry",
          {"Retry-After": RETRY_AFTER}, {}),
    410: ("expired: the PNG (or a frame of an animation) is gone (its job outlived it)", {}, {}),
    413: ("body_too_large: the request body is over DDPM_MAX_BODY_BYTES (DDPM_MAX_UPLOAD_BYTES for the routes that "
          "take pictures) | image_too_large: an input picture has more than DDPM_MAX_INPUT_PIXELS pixels", {}, {}),
    422: ("invalid_request: the field and its allowed range or values", {}, {}),
    429: ("queue_full | rate_limited | too_many_streams", {"Retry-After": RETRY_AFTER}, {}),
    503: ("store_unavailable (Redis unreachable, read-only or loading; Retry-After) | store_full (Redis near its "
          "maxmemory: no new jobs; Retry-After) | model_unavailable", {},
          {"Retry-After": RETRY_AFTER}),
}

PNG: dict[int | str, dict[str, Any]] = {200: {
    "description": "a PNG image",
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    "headers": {"Cache-Control": {"description": "private, max-age=3600", "required": True,
                                  "schema": {"type": "string"}}},
}}
# One event of the stream (``itemSchema``, as OpenAPI 3.2 and FastAPI's own event streams declare it).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "the event's id (ms-seq); reconnect with it as Last-Event-ID"},
        "event": {"enum": ["queued", "running", "progress", "frame", "succeeded", "failed", "canceled"]},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}},
        "retry": {"type": "integer", "minimum": 0, "description": "reconnection delay in milliseconds"},
    },
}
EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events, each with an id, a name and one JSON object as data: queued, running, "
                   "progress, frame, then one of succeeded, failed, canceled; the stream ends after it",
    "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
}}
ANIMATION: dict[str, dict[int | str, dict[str, Any]]] = {fmt: {200: {
    "description": f"an animated {fmt.upper()}: the job's x0-hat frames in order, looping",
    "content": {f"image/{fmt}": {"schema": {"type": "string", "format": "binary"}}},
    "headers": {"Cache-Control": {"description": "private, max-age=3600", "required": True,
                                  "schema": {"type": "string"}}},
}} for fmt in ("webp", "gif")}
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {200: {
    "description": "the Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}}
LOCATION = {"Location": {"description": "the job's URL (the same as status_url)", "required": True,
                         "schema": {"type": "string"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers of a route: ``ErrorBody``, the codes, the headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes, always, sometimes = _ERRORS[status]
        headers = {**{k: {**v, "required": True} for k, v in always.items()}, **sometimes}
        out[status] = {"model": ErrorBody, "description": codes, **({"headers": headers} if headers else {})}
    return out


def operation_id(route: APIRoute) -> str:
    """The operation id of a route: its function's name (what a generated client calls the method)."""
    return route.name


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                yield path, method, operation


def _real_validation_errors(doc: dict[str, Any]) -> None:
    """Every 422 FastAPI declared as its ``HTTPValidationError`` becomes the ``ErrorBody`` this API sends."""
    real = error_responses(422)[422]
    for _, _, operation in _operations(doc):
        answer = operation["responses"].get("422")
        if answer and "HTTPValidationError" in str(answer):
            operation["responses"]["422"] = {"description": real["description"], "content": {
                "application/json": {"schema": {"$ref": _REF + "ErrorBody"}}}}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _integer_options(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in prop.get("anyOf", [prop]) if o.get("type") == "integer"]


def _document_limits(doc: dict[str, Any], limits: Limits, models: list[str]) -> None:
    """This server's numeric limits and model names in the schemas of the job-creating requests."""
    schemas = doc["components"]["schemas"]
    for name in ("GenerateRequest", "InterpolateRequest", "LikelihoodRequest"):
        props = schemas[name]["properties"]
        for field in ("steps", "preview_every"):
            for option in _integer_options(props.get(field, {})):
                option["maximum"] = limits.max_steps
        for option in props["model"].get("anyOf", [props["model"]]):
            if option.get("type") == "string":
                option["enum"] = models
    schemas["GenerateRequest"]["properties"]["num_images"]["maximum"] = limits.max_num_images
    for option in schemas["InterpolateRequest"]["properties"]["lambdas"].get("anyOf", []):
        if option.get("type") == "array":
            option["maxItems"] = limits.max_num_images
    schemas["LikelihoodRequest"]["properties"]["images"]["maxItems"] = limits.max_num_images


def install(app: FastAPI, limits: Limits, models: list[str]) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) build the finished document once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            _real_validation_errors(doc)
            _document_limits(doc, limits, models)
            for _, _, operation in _operations(doc):  # by status: 2xx first (router-wide errors come first)
                operation["responses"] = dict(sorted(operation["responses"].items()))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
