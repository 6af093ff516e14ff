"""Server-Sent Events: the wire format, event ids and stream slots (service.sse) on their own, then over real HTTP:
order, ids, Last-Event-ID replay, keep-alives, closing after the end."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from httpx_sse import connect_sse

from model.images import png_bytes
from service.queue import JobStore, connect
from service.schemas import RequestInvalid
from service.sse import StreamSlots, format_event, parse_event_id
from service.web import ApiError

from .conftest import ApiServer


# ---- service.sse on its own --------------------------------------------------------------------------------
def test_an_event_is_its_id_its_name_and_one_line_of_json() -> None:
    text = format_event("17-0", "frame", {"index": 2, "url": "/jobs/x/frames/2.png", "text": "a\nb"})
    assert text == 'id: 17-0\nevent: frame\ndata: {"index":2,"url":"/jobs/x/frames/2.png","text":"a\\nb"}\n\n'


def test_event_ids_are_what_redis_could_have_made() -> None:
    assert parse_event_id(None, "Last-Event-ID") is None and parse_event_id("", "Last-Event-ID") is None
    assert parse_event_id("0-0", "x") == "0-0" and parse_event_id(f"{2**64 - 1}-{2**64 - 1}", "x")
    with pytest.raises(RequestInvalid, match=r"^last_event_id: must be the id of an event"):
        parse_event_id(f"{2**64}-0", "last_event_id")


def test_stream_slots_are_per_client_and_given_back_once() -> None:
    slots = StreamSlots(limit=2)
    first, _ = slots.take("key-a"), slots.take("key-a")
    with pytest.raises(ApiError) as refused:
        slots.take("key-a")
    assert (refused.value.status, refused.value.code) == (429, "too_many_streams")
    assert refused.value.headers == {"Retry-After": "1"}
    slots.take("addr-1.2.3.4")  # another client has its own slots
    first()
    first()  # giving back twice frees one slot, not two
    slots.take("key-a")
    with pytest.raises(ApiError):
        slots.take("key-a")


# ---- over HTTP ---------------------------------------------------------------------------------------------
def _events(lines: list[str]) -> list[dict[str, Any]]:
    """Parse SSE lines into [{id, event, data}] (comments kept as {"comment": ...})."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if current:
                out.append(current)
            current = {}
        elif line.startswith(":"):
            out.append({"comment": line[1:].strip()})
        elif not line.startswith("retry:"):  # the reconnection delay, sent with the first event
            key, _, value = line.partition(":")
            current[key] = json.loads(value.strip()) if key == "data" else value.strip()
    return out


def _stream(url: str, headers: dict[str, str] | None = None, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read an SSE response to its end (the server closes it after the terminal event)."""
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return _events(list(r.iter_lines()))


def _png() -> bytes:
    return png_bytes(torch.zeros(3, 8, 8))


def _work(store: JobStore, job_id: str, steps: int, delay: float = 0.0) -> None:
    time.sleep(delay)
    store.start(job_id, "w")
    for i in range(steps):
        store.progress(job_id, i + 1, steps, steps - 1 - i)
        store.add_frame(job_id, i, steps - 1 - i, _png())
    store.succeed(job_id, [_png()])


def _submit(api: ApiServer, **body: Any) -> str:
    return str(httpx.post(f"{api.url}/generate", json=body).json()["id"])


def test_events_arrive_in_order_and_the_stream_ends(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=3)
    store = JobStore(connect(api_server.settings.redis_url))
    worker = threading.Thread(target=_work, args=(store, job_id, 3, 0.3))  # events arrive while we listen
    worker.start()
    events = [e for e in _stream(f"{api_server.url}/jobs/{job_id}/events") if "event" in e]
    worker.join()
    names = [e["event"] for e in events]
    assert names == ["queued", "running"] + ["progress", "frame"] * 3 + ["succeeded"]
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    frames = [e["data"] for e in events if e["event"] == "frame"]
    assert [f["index"] for f in frames] == [0, 1, 2]
    assert frames[2]["url"] == f"/jobs/{job_id}/frames/2.png"
    assert events[-1]["data"] == {"status": "succeeded", "num_images": 1}


def test_last_event_id_replays_what_was_missed(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    _work(JobStore(connect(api_server.settings.redis_url)), job_id, 2)
    everything = [e for e in _stream(f"{api_server.url}/jobs/{job_id}/events") if "event" in e]
    missed_after = everything[2]["id"]
    replay = [e for e in _stream(f"{api_server.url}/jobs/{job_id}/events", {"Last-Event-ID": missed_after})
              if "event" in e]
    assert replay == everything[3:]
    # After the terminal event there is nothing more: the stream closes at once.
    assert [e for e in _stream(f"{api_server.url}/jobs/{job_id}/events", {"Last-Event-ID": everything[-1]["id"]})
            if "event" in e] == []


def test_keep_alive_comments_while_waiting_then_cancel_ends_it(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(app_kwargs={"sse_keepalive_s": 0.2, "sse_block_ms": 100})
    job_id = _submit(api, steps=2)
    lines: list[str] = []
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=10) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(": keep-alive") and not any("canceled" in x for x in lines):
                httpx.delete(f"{api.url}/jobs/{job_id}")
    events = _events(lines)
    assert {"comment": "keep-alive"} in events
    assert [e["event"] for e in events if "event" in e] == ["queued", "canceled"]


def test_events_of_an_unknown_job_are_404(api_server: ApiServer) -> None:
    r = httpx.get(f"{api_server.url}/jobs/{'f' * 32}/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_an_sse_client_library_sees_no_empty_event(api_server: ApiServer) -> None:
    # httpx-sse, as an integrating app would use it: the reconnection delay rides on the first event, so every
    # event it yields is one the API sent (a lone "retry:" block used to surface as an empty "message" event).
    job_id = _submit(api_server, steps=2)
    _work(JobStore(connect(api_server.settings.redis_url)), job_id, 2)
    with httpx.Client(timeout=20) as client, connect_sse(client, "GET",
                                                         f"{api_server.url}/jobs/{job_id}/events") as source:
        seen = list(source.iter_sse())
    assert [e.event for e in seen] == ["queued", "running"] + ["progress", "frame"] * 2 + ["succeeded"]
    assert all(e.id and e.data for e in seen)
    assert seen[0].retry == 1000 and all(e.retry is None for e in seen[1:])


@pytest.mark.parametrize("value", ["99999999999999999999-0", "0-18446744073709551616", "1-2-3", "abc", "-1-0",
                                   "1795000000000", "1-0 x", "１-0", "1" * 30 + "-0", "../0-0"])
@pytest.mark.parametrize("where", ["header", "query"])
def test_a_malformed_or_out_of_range_last_event_id_is_422(api_server: ApiServer, value: str, where: str) -> None:
    job_id = _submit(api_server, steps=2)
    url = f"{api_server.url}/jobs/{job_id}/events"
    if where == "header":
        r = httpx.get(url, headers={"Last-Event-ID": value.encode()}, timeout=5)
    else:
        r = httpx.get(url, params={"last_event_id": value}, timeout=5)
    assert r.status_code == 422, r.text[:200]
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_request"
    assert message.startswith("Last-Event-ID:" if where == "header" else "last_event_id:")


def test_the_largest_event_id_is_valid_and_replays_nothing(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    _work(JobStore(connect(api_server.settings.redis_url)), job_id, 2)
    largest = f"{2**64 - 1}-{2**64 - 1}"
    assert _stream(f"{api_server.url}/jobs/{job_id}/events", {"Last-Event-ID": largest}) == []
