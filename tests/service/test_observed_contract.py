"""The OpenAPI document tells the truth about every response the test suite saw.

``tests/conftest.py`` records every httpx exchange of the session (``tests/observed.py``); the last test of the
session checks each one from an API against the document: its status is declared for the route, its media type
is declared for that status, its declared headers are there and valid, and its body validates against the
declared schema. Response declarations do not depend on settings (limits and model names only shape the request
schema, checked below), so one document, built from default settings, judges every API the tests started.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from typing import Any

import pytest

from service.api import create_app
from service.settings import Settings
from tests.observed import Exchange, Recorder, check

log = logging.getLogger(__name__)


def _document(**settings: Any) -> dict[str, Any]:
    if not settings:
        return copy.deepcopy(_default_document())
    fields: dict[str, Any] = {"checkpoints": {"tiny": "tiny.safetensors"}, **settings}
    return create_app(Settings(**fields)).openapi()


@functools.cache
def _default_document() -> dict[str, Any]:
    return create_app(Settings(checkpoints={"tiny": "tiny.safetensors"})).openapi()


def _responses(document: dict[str, Any]) -> dict[str, Any]:
    return {f"{method} {path}": op["responses"] for path, item in document["paths"].items()
            for method, op in item.items()}


def test_response_declarations_do_not_depend_on_settings() -> None:
    other = _document(api_keys=["a-key-of-16-chars-0123"], max_num_images=3, max_steps=9, rate_limit_per_minute=5,
                      checkpoints={"a": "a.safetensors", "b": "b.safetensors"})
    assert _responses(other) == _responses(_document())
    assert "HTTPValidationError" not in json.dumps(_document())  # every 422 is the API's own error shape


def _job(status: str = "running") -> dict[str, Any]:
    return {"id": "0" * 32, "status": status, "model": "tiny", "request": {}, "queue_position": None,
            "progress": {"step": 1, "total": 4, "t": 3}, "frames": [], "images": [], "error": None,
            "cancel_requested": True, "attempt": 1, "created_at": None, "started_at": None, "ended_at": None}


def _exchange(method: str, path: str, status: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> Exchange:
    return Exchange(method, "http://127.0.0.1:1" + path, {}, status,
                    [("server", "uvicorn"), ("content-type", content_type), *(headers or {}).items()],
                    bytearray(body), complete=True)


def test_the_check_names_the_route_and_the_mismatch() -> None:
    """The checker itself: the lies of the old document are caught and described."""
    old = _document()
    del old["paths"]["/jobs/{job_id}"]["delete"]["responses"]["202"]  # the old document had no 202
    canceling = _exchange("DELETE", "/jobs/" + "0" * 32, 202, "application/json", json.dumps(_job()).encode())
    problems, seen = check([canceling], old)
    assert seen["DELETE /jobs/{job_id}"] == 1
    assert len(problems) == 1 and problems[0].startswith("DELETE /jobs/{job_id} -> 202: Undocumented status code")
    assert check([canceling], _document())[0] == []
    too_many = _exchange("POST", "/generate", 429, "application/json",
                         b'{"error": {"code": "queue_full", "message": "full"}}')  # no Retry-After
    bad_png = _exchange("GET", f"/jobs/{'0' * 32}/images/0.png", 200, "application/json", b"{}",
                        {"cache-control": "private"})
    problems, _ = check([too_many, bad_png], _document())
    assert any(p.startswith("POST /generate -> 429: Missing required response headers") and "Retry-After" in p
               for p in problems), problems
    assert any(p.startswith("GET /jobs/{job_id}/images/{index}.png -> 200: Undocumented Content-Type")
               for p in problems), problems
    # What a test did not read is not judged: a JSON body left unread, the unfinished event of an open stream.
    unread = _exchange("GET", f"/jobs/{'0' * 32}/events", 429, "application/json", b"", {"retry-after": "1"})
    half = _exchange("GET", f"/jobs/{'0' * 32}/events", 200, "text/event-stream; charset=utf-8",
                     b'id: 1-0\nevent: queued\ndata: {"status": "queued"}\n\nid: 1-1\nevent: runn')
    unread.complete = half.complete = False
    assert check([unread, half], _document())[0] == []
    half.body[:] = half.body.replace(b"queued", b"lost")  # but what was read is
    assert "SSE event" in check([half], _document())[0][0]


@pytest.mark.after_all
def test_every_response_the_suite_observed_conforms_to_the_document(observed_responses: Recorder) -> None:
    exchanges = [e for e in observed_responses.exchanges if e.from_api]
    if not exchanges:
        pytest.skip("no API response was observed in this session: run it with the service tests")
    problems, seen = check(exchanges, _document())
    log.info("checked %d API responses: %s", len(exchanges), dict(seen.most_common()))
    assert len(seen) > 1, seen  # some exchanges matched operations of the document
    assert not problems, (f"{len(problems)} kinds of responses the OpenAPI document does not declare "
                          f"(of {len(exchanges)} observed):\n" + "\n".join(problems[:40]))
