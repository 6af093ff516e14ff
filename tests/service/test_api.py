"""The HTTP API over real HTTP (uvicorn on a free port) against a real redis-server.

Jobs here are driven by the worker-side methods of ``JobStore`` (the worker's own contract), so these tests
pin the API alone; tests/service/test_e2e.py runs the real worker process.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from model.images import png_bytes
from service.queue import JobStore, connect
from service.redis_server import RedisServer, free_port

from .conftest import ApiServer

VALID_BUT_UNKNOWN = "0123456789abcdef0123456789abcdef"


def _png(value: float, size: int = 8) -> bytes:
    return png_bytes(torch.full((3, size, size), value))


def _store(api: ApiServer) -> JobStore:
    return JobStore(connect(api.settings.redis_url), queue_name=api.settings.queue_name)


def _submit(api: ApiServer, **body: Any) -> str:
    r = httpx.post(f"{api.url}/generate", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _run_job(store: JobStore, job_id: str, frames: int = 3, images: int = 1) -> None:
    """What a worker does to a job: start, progress, frames, final images."""
    assert store.start(job_id, "test-worker") is not None
    for i in range(frames):
        store.progress(job_id, step=i + 1, total=frames, t=frames - 1 - i)
        store.add_frame(job_id, step=i, t=frames - 1 - i, png=_png(i / frames))
    assert store.succeed(job_id, [_png(0.5) for _ in range(images)])


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


def test_generate_accepts_and_resolves_every_default(api_server: ApiServer) -> None:
    r = httpx.post(f"{api_server.url}/generate", json={})
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/jobs/{body['id']}" == body["status_url"]
    assert body["events_url"] == f"/jobs/{body['id']}/events" and body["status"] == "queued"
    job = httpx.get(f"{api_server.url}/jobs/{body['id']}").json()
    req = job["request"]
    assert req["steps"] == 40 and req["num_images"] == 1 and req["model"] == "tiny"  # the tiny model's T
    assert req["sampler"] == "ddpm" and req["eta"] == 0.0 and req["variance"] == "fixedlarge"
    assert req["preview_every"] == 2 and 0 <= req["seed"] < 2**31  # ceil(40 / 20): about 20 frames
    assert job["status"] == "queued" and job["queue_position"] == 1 and job["images"] == []  # 1 = next to run
    assert job["progress"] == {"step": 0, "total": 40, "t": None}
    assert job["created_at"].endswith("Z") and job["started_at"] is None


def test_job_view_follows_the_worker(api_server: ApiServer) -> None:
    job_id = _submit(api_server, num_images=2, steps=3, seed=7)
    store = _store(api_server)
    _run_job(store, job_id, frames=3, images=2)
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["queue_position"] is None
    assert [f["index"] for f in job["frames"]] == [0, 1, 2] and [f["t"] for f in job["frames"]] == [2, 1, 0]
    assert job["images"] == [{"index": i, "seed": 7, "url": f"/jobs/{job_id}/images/{i}.png", "data": None}
                             for i in range(2)]
    assert job["started_at"] <= job["ended_at"] and job["error"] is None and job["attempt"] == 1
    later = httpx.get(f"{api_server.url}/jobs/{job_id}", params={"since": 1, "inline": 1}).json()
    assert [f["index"] for f in later["frames"]] == [2]
    assert Image.open(io.BytesIO(base64.b64decode(later["frames"][0]["data"]))).size == (8, 8)
    assert Image.open(io.BytesIO(base64.b64decode(later["images"][1]["data"]))).size == (8, 8)
    for path in (f"/jobs/{job_id}/frames/2.png", f"/jobs/{job_id}/images/1.png"):
        r = httpx.get(api_server.url + path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    _error(httpx.get(f"{api_server.url}/jobs/{job_id}/frames/3.png"), 404, "not_found")
    _error(httpx.get(f"{api_server.url}/jobs/{job_id}/images/2.png"), 404, "not_found")


def test_a_job_handed_back_by_its_worker_says_so(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    store = _store(api_server)
    store.start(job_id, "w1")
    store.requeued(job_id, "worker w1 stopped")  # what a stopping worker (or the reaper of a dead one) does
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 1
    store.start(job_id, "w2")
    assert httpx.get(f"{api_server.url}/jobs/{job_id}").json()["attempt"] == 2


def test_failed_job_reports_its_error(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    store = _store(api_server)
    store.start(job_id, "w")
    store.fail(job_id, "out_of_memory", "the GPU ran out of memory; use fewer images")
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["images"] == []
    assert job["error"] == {"code": "out_of_memory", "message": "the GPU ran out of memory; use fewer images"}
    _error(httpx.get(f"{api_server.url}/jobs/{job_id}/images/0.png"), 404, "not_found")


@pytest.mark.parametrize(("body", "field", "allowed"), [
    ({"num_images": 0}, "num_images", "between 1 and 16"),
    ({"num_images": 17}, "num_images", "between 1 and 16"),
    ({"steps": 41}, "steps", "between 1 and 40"),
    ({"steps": 0}, "steps", "between 1 and min(1000, the model's T"),
    ({"sampler": "euler"}, "sampler", "'ddpm' or 'ddim'"),
    ({"eta": 1.5}, "eta", "between 0 and 1"),
    ({"variance": "learned"}, "variance", "'fixedlarge' or 'fixedsmall'"),
    ({"steps": 10, "preview_every": 11}, "preview_every", "between 1 and 10"),
    ({"model": "nope"}, "model", "['tiny']"),
    ({"seed": -1}, "seed", "between 0 and 2147483647"),
    ({"num_images": "two"}, "num_images", "valid integer"),
    ({"prompt": "a cat"}, "prompt", "allowed: num_images, seed, steps"),
])
def test_invalid_requests_get_422_naming_the_field(api_server: ApiServer, body: dict[str, Any], field: str,
                                                    allowed: str) -> None:
    message = _error(httpx.post(f"{api_server.url}/generate", json=body), 422, "invalid_request")
    assert message.startswith(f"{field}:") and allowed in message


def test_image_steps_budget_and_broken_json(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_image_steps=50)
    message = _error(httpx.post(f"{api.url}/generate", json={"num_images": 2, "steps": 30}), 422, "invalid_request")
    assert "num_images x steps must be at most 50" in message
    assert httpx.post(f"{api.url}/generate", json={"num_images": 2, "steps": 25}).status_code == 202
    r = httpx.post(f"{api.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    _error(r, 422, "invalid_request")
    _error(httpx.get(f"{api.url}/jobs/{VALID_BUT_UNKNOWN}", params={"since": "x"}), 422, "invalid_request")


def test_unknown_job_is_404_and_expiry_is_explained(api_server: ApiServer) -> None:
    for path in (f"/jobs/{VALID_BUT_UNKNOWN}", f"/jobs/{VALID_BUT_UNKNOWN}/frames/0.png", "/jobs/../etc",
                 "/jobs/not-an-id", f"/jobs/{VALID_BUT_UNKNOWN}/events", "/nowhere"):
        _error(httpx.get(api_server.url + path), 404, "not_found")
    message = _error(httpx.delete(f"{api_server.url}/jobs/{VALID_BUT_UNKNOWN}"), 404, "not_found")
    assert "expired" in message and "404, not 410" in message
    # A frame whose bytes expired while the job record still exists: 410 (written by a store whose TTL is 1 s).
    job_id = _submit(api_server, steps=2)
    store = JobStore(connect(api_server.settings.redis_url), queue_name=api_server.settings.queue_name,
                     ttl_seconds=1)
    store.start(job_id, "w")
    store.add_frame(job_id, 0, 1, _png(0.1))
    deadline = time.monotonic() + 10
    while store.frame_png(job_id, 0) is not None:
        assert time.monotonic() < deadline, "the frame never expired"
        time.sleep(0.1)
    assert httpx.get(f"{api_server.url}/jobs/{job_id}").json()["status"] == "running"  # the job lives on
    _error(httpx.get(f"{api_server.url}/jobs/{job_id}/frames/0.png"), 410, "expired")


def test_malformed_ids_never_touch_redis(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    _error(httpx.get(f"{api.url}/jobs/NOT-A-JOB-ID"), 404, "not_found")
    _error(httpx.get(f"{api.url}/jobs/{VALID_BUT_UNKNOWN}"), 503, "store_unavailable")


def test_body_too_large_is_413(make_api: Callable[..., ApiServer]) -> None:
    # The job-creating routes take pictures: DDPM_MAX_UPLOAD_BYTES; every other path DDPM_MAX_BODY_BYTES.
    api = make_api(max_body_bytes=512, max_upload_bytes=2048)
    big = b'{"num_images": 1, "pad": "' + b"x" * 2100 + b'"}'
    for route in ("/generate", "/interpolate", "/likelihood"):
        message = _error(httpx.post(f"{api.url}{route}", content=big, headers={"content-type": "application/json"}),
                         413, "body_too_large")
        assert "2048 bytes (DDPM_MAX_UPLOAD_BYTES)" in message
    _error(httpx.post(f"{api.url}/generate", content=big[:1000] + b'"}', headers={"content-type": "application/json"}),
           422, "invalid_request")  # under the upload limit: read, and refused for what it says
    message = _error(httpx.post(f"{api.url}/jobs/{'0' * 32}", content=big[:600],
                                headers={"content-type": "application/json"}), 413, "body_too_large")
    assert "512 bytes (DDPM_MAX_BODY_BYTES)" in message

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"num_images": 1, "pad": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    _error(httpx.post(f"{api.url}/generate", content=chunks(), headers={"content-type": "application/json"}),
           413, "body_too_large")


def test_full_queue_is_429_with_retry_after(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_queue_length=2)
    _submit(api, steps=1)
    _submit(api, steps=1)
    r = httpx.post(f"{api.url}/generate", json={"steps": 1})
    _error(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) > 0


def test_unreachable_redis_is_503_fast(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    start = time.monotonic()
    r = httpx.post(f"{api.url}/generate", json={"steps": 1})
    assert time.monotonic() - start < 5  # a generous bound only against hanging; speed is in benchmarks
    _error(r, 503, "store_unavailable")
    assert "Retry-After" in r.headers
    _error(httpx.get(f"{api.url}/readyz"), 503, "store_unavailable")
    _error(httpx.delete(f"{api.url}/jobs/{VALID_BUT_UNKNOWN}"), 503, "store_unavailable")
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api.url}/metrics").status_code == 200


def test_cancel_a_queued_job(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    r = httpx.delete(f"{api_server.url}/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    store = _store(api_server)
    assert store.queue_length() == 0 and store.start(job_id, "w") is None  # it never starts
    job = httpx.get(f"{api_server.url}/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["ended_at"] is not None
    assert httpx.delete(f"{api_server.url}/jobs/{job_id}").status_code == 200  # idempotent


def test_cancel_a_running_job_asks_its_worker(api_server: ApiServer) -> None:
    job_id = _submit(api_server, steps=2)
    store = _store(api_server)
    store.start(job_id, "w")
    r = httpx.delete(f"{api_server.url}/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"]
    assert store.cancel_requested(job_id)
    store.mark_canceled(job_id)  # what the worker does at its next step
    assert httpx.get(f"{api_server.url}/jobs/{job_id}").json()["status"] == "canceled"


def test_queue_positions(api_server: ApiServer) -> None:
    ids = [_submit(api_server, steps=1) for _ in range(3)]
    positions = [httpx.get(f"{api_server.url}/jobs/{i}").json()["queue_position"] for i in ids]
    assert positions == [1, 2, 3]


def test_models_and_an_unreadable_checkpoint(make_api: Callable[..., ApiServer], tiny_checkpoint: Any,
                                             tmp_path: Any) -> None:
    api = make_api(checkpoints={"tiny": str(tiny_checkpoint), "later": str(tmp_path / "missing.safetensors")})
    body = httpx.get(f"{api.url}/models").json()
    assert body["default"] == "tiny"
    tiny, later = body["models"]
    assert tiny["available"] and tiny["num_timesteps"] == 40 and tiny["image_size"] == 8 and tiny["channels"] == 3
    assert tiny["metadata"]["diffusion_config"]["num_timesteps"] == 40 and tiny["default"]
    assert not later["available"] and "file not found" in later["error"]
    message = _error(httpx.post(f"{api.url}/generate", json={"model": "later"}), 503, "model_unavailable")
    assert "GET /models" in message
    (tmp_path / "missing.safetensors").write_bytes(tiny_checkpoint.read_bytes())  # appears later: served
    assert httpx.post(f"{api.url}/generate", json={"model": "later", "steps": 1}).status_code == 202


def test_readyz_is_ready_with_its_store_and_says_whether_a_worker_serves(api_server: ApiServer) -> None:
    r = httpx.get(f"{api_server.url}/readyz")  # no worker: still ready (jobs are accepted and queued)
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["worker"] == "none"
    assert "wait in the queue" in r.json()["message"]
    assert httpx.post(f"{api_server.url}/generate", json={"steps": 1}).status_code == 202
    store = _store(api_server)
    store.heartbeat("other", {"name": "other", "models": ["other"], "device": "cpu"})
    assert httpx.get(f"{api_server.url}/readyz").json()["worker"] == "none"  # not the default model
    store.heartbeat("w1", {"name": "w1", "models": ["tiny"], "device": "cpu", "max_batch_size": 8, "pid": 4242,
                           "host": "gpu-node-7"})
    r = httpx.get(f"{api_server.url}/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "worker": "serving",
                                                 "message": "a worker serves the default model"}
    assert [(m["name"], m["workers"]) for m in httpx.get(f"{api_server.url}/models").json()["models"]] == [
        ("tiny", 1)]
    metrics = httpx.get(f"{api_server.url}/metrics").text
    assert _sample(metrics, "ddpm_live_workers", model="tiny") == 1


def test_api_keys(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=["s3cret-0123456789", "other-key-012345"], admin_api_keys=["admin-key-0123456"])
    assert httpx.get(f"{api.url}/healthz").status_code == 200
    assert httpx.get(f"{api.url}/readyz").status_code == 200  # no key needed
    assert httpx.get(f"{api.url}/").status_code == 200
    r = httpx.post(f"{api.url}/generate", json={"steps": 1})
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(httpx.post(f"{api.url}/generate", json={"steps": 1}, headers={"x-api-key": "wrong"}), 403, "forbidden")
    _error(httpx.get(f"{api.url}/metrics"), 401, "unauthorized")
    _error(httpx.get(f"{api.url}/models", headers={"authorization": "Bearer s3cret-012345678"}), 403, "forbidden")
    r = httpx.post(f"{api.url}/generate", json={"steps": 1}, headers={"authorization": "Bearer s3cret-0123456789"})
    assert r.status_code == 202
    location = r.headers["location"]
    assert httpx.get(f"{api.url}{location}", headers={"x-api-key": "s3cret-0123456789"}).status_code == 200
    assert httpx.get(f"{api.url}{location}", headers={"x-api-key": "admin-key-0123456"}).status_code == 200
    _error(httpx.get(f"{api.url}{location}", headers={"x-api-key": "other-key-012345"}), 404, "not_found")


def test_without_keys_everything_is_open(api_server: ApiServer) -> None:
    for path in ("/models", "/metrics", "/healthz"):
        assert httpx.get(api_server.url + path).status_code == 200


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_are_present_and_move(api_server: ApiServer) -> None:
    def scrape() -> str:
        return httpx.get(f"{api_server.url}/metrics").text

    before = scrape()
    for name in ("ddpm_http_request_duration_seconds_bucket", "ddpm_http_requests_total", "ddpm_queue_depth"):
        assert name in before
    job_id = _submit(api_server, steps=1)
    httpx.get(f"{api_server.url}/jobs/{job_id}")
    after = scrape()
    labels = {"method": "GET", "route": "/jobs/{job_id}", "status": "200"}
    assert _sample(after, "ddpm_http_requests_total", **labels) == _sample(before, "ddpm_http_requests_total",
                                                                           **labels) + 1
    assert _sample(after, "ddpm_jobs_submitted_total", model="tiny") >= 1
    assert _sample(after, "ddpm_queue_depth") == 1
    assert not re.search(r'route="/jobs/[0-9a-f]{32}"', after)  # route templates, never raw paths


def test_cors_when_configured(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(cors_origins=["http://app.example"])
    r = httpx.options(f"{api.url}/generate", headers={"origin": "http://app.example",
                                                      "access-control-request-method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.get(f"{api.url}/models", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_openapi_documents_every_route_and_its_errors(api_server: ApiServer) -> None:
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/generate", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/frames/{index}.png",
                 "/jobs/{job_id}/images/{index}.png", "/models", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    assert {"202", "413", "422", "429", "503"} <= set(paths["/generate"]["post"]["responses"])
    assert {"404", "503"} <= set(paths["/jobs/{job_id}"]["get"]["responses"])
    assert "404" in paths["/jobs/{job_id}"]["delete"]["responses"]
    assert "ErrorBody" in spec["components"]["schemas"]
    assert httpx.get(f"{api_server.url}/docs").status_code == 200


def test_redis_going_away_and_coming_back_needs_no_restart(make_api: Callable[..., ApiServer],
                                                           tmp_path: Any) -> None:
    server = RedisServer(data_dir=tmp_path / "redis").start()
    try:
        api = make_api(redis_url=server.url)
        assert httpx.post(f"{api.url}/generate", json={"steps": 1}).status_code == 202
        server.stop()
        _error(httpx.post(f"{api.url}/generate", json={"steps": 1}), 503, "store_unavailable")
        _error(httpx.get(f"{api.url}/readyz"), 503, "store_unavailable")
        server.start()  # same port, same data directory
        r = httpx.post(f"{api.url}/generate", json={"steps": 1})
        assert r.status_code == 202
        assert httpx.get(api.url + r.headers["location"]).json()["status"] == "queued"
    finally:
        server.cleanup()
