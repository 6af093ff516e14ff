"""Input pictures and the new job routes against hostile and careless clients: the real API over HTTP on a real
redis-server, no worker (nothing here needs one: finished jobs are made through the job store as a worker
makes them). Every refusal is the API's error shape naming the field."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.image_fit import fit_picture
from service import inputs
from service.queue import JobStore, connect
from service.resolve import DEFAULT_LAMBDAS

from .conftest import ApiServer

KEY_A, KEY_B = "input-key-a-0123456789", "input-key-b-0123456789"


def encoded(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo(size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)


PNG = b64(encoded(photo()))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` in its header and holds one tiny compressed row: a decompression
    bomb's shape without its bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def post(api: ApiServer, route: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(f"{api.url}{route}", json=body, headers={"X-API-Key": key} if key else {}, timeout=30)


def stored_input(api: ApiServer, job_id: str, k: int = 0) -> Image.Image:
    """Input picture ``k`` of a job as the worker reads it (``JobStore.inputs``)."""
    store = JobStore(connect(api.settings.redis_url), queue_name=api.settings.queue_name)
    try:
        data = store.inputs(job_id, k + 1)[k]
    finally:
        store.redis.close()
    assert data is not None
    return Image.open(io.BytesIO(data))


def finished_job(api: ApiServer, owner: str | None = None, images: int = 2, kind: str = "generate",
                 status: str = "succeeded") -> str:
    """A job as a worker leaves it: queued, started, and then (``status``) succeeded with ``images`` PNGs."""
    store = JobStore(connect(api.settings.redis_url))
    try:
        job_id = store.submit({"num_images": images, "seed": 1, "steps": 2, "model": "tiny"}, "tiny",
                              num_images=images, total_steps=2, seeds=[1] * images, max_queue_length=100,
                              owner=owner, kind=kind)
        if status == "queued":
            return job_id
        store.rq_queue().remove(job_id)
        store.start(job_id, "test")
        if status == "succeeded":
            pngs = [encoded(photo(seed=10 + i)) for i in range(images)] if kind != "likelihood" else []
            store.succeed(job_id, pngs, {"bits_per_dim": [1.0]} if kind == "likelihood" else None)
        return job_id
    finally:
        store.redis.close()


def digest(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


# ---- pictures that are not what they claim ---------------------------------------------------------------------
@pytest.mark.parametrize(("value", "message"), [
    ("not base64 at all!", "not valid base64"),
    ("", "is empty"),
    (b64(b"hello, this is text"), "is not a PNG or JPEG picture"),
    (b64(encoded(photo(), "GIF")), "is not a PNG or JPEG picture"),
    (b64(encoded(photo(), "BMP")), "is not a PNG or JPEG picture"),
    (b64(encoded(photo(), "WEBP")), "is not a PNG or JPEG picture"),
    (b64(encoded(photo((64, 64)))[:200]), "could not be decoded"),  # truncated
    ("data:image/png," + PNG, "base64 only"),
    ("data:image/png;base64,%%%", "not valid base64"),
])
def test_pictures_that_are_not_pictures_are_422_naming_the_field(api_server: ApiServer, value: str,
                                                                 message: str) -> None:
    got = error(post(api_server, "/generate", {"init_image": value, "start_t": 4}), 422, "invalid_request")
    assert got.startswith("init_image: ") and message in got, got
    got = error(post(api_server, "/interpolate", {"images": [PNG, value]}), 422, "invalid_request")
    assert got.startswith("images[1]: ") and message in got, got
    got = error(post(api_server, "/likelihood", {"images": [value]}), 422, "invalid_request")
    assert got.startswith("images[0]: ") and message in got, got


def test_huge_pictures_are_413_before_any_pixel_is_decoded(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_input_pixels=64 * 64, max_upload_bytes=64 * 1024)
    bomb = b64(png_header_only(100_000, 100_000))  # 10^10 pixels claimed in 0.1 KB
    got = error(post(api, "/likelihood", {"images": [bomb]}), 413, "image_too_large")
    assert got.startswith("images[0]: ") and "10000000000 pixels" in got and "DDPM_MAX_INPUT_PIXELS" in got
    got = error(post(api, "/likelihood", {"images": [PNG, b64(png_header_only(3000, 3000))]}), 413, "image_too_large")
    assert got.startswith("images[1]: the picture is 3000x3000 = 9000000 pixels; at most 4096")  # ours, first
    got = error(post(api, "/generate", {"init_image": b64(encoded(photo((65, 64)))), "start_t": 2}), 413,
                "image_too_large")
    assert "65x64 = 4160 pixels; at most 4096" in got
    assert post(api, "/generate", {"init_image": b64(encoded(photo((64, 64)))), "start_t": 2}).status_code == 202
    big = b64(encoded(photo((200, 200)), "PNG", compress_level=0))  # 120 KB of pixels, base64
    got = error(post(api, "/interpolate", {"images": [big, PNG]}), 413, "body_too_large")
    assert "65536 bytes (DDPM_MAX_UPLOAD_BYTES)" in got


def test_pictures_of_any_size_and_mode_are_fitted_to_the_model(api_server: ApiServer) -> None:
    """Stored as the worker reads them: 8x8 RGB, by the one rule (model.image_fit)."""
    cases = [photo((40, 20)), photo((8, 8), "L"), photo((10, 30), "RGBA"), photo((9, 9), "P"),
             photo((16, 16), "I;16")]
    for img in cases:
        for fmt in ("PNG", "JPEG") if img.mode in ("RGB", "L") else ("PNG",):
            data = encoded(img, fmt)
            r = post(api_server, "/generate", {"init_image": f"data:image/{fmt.lower()};base64,{b64(data)}",
                                               "start_t": 3})
            assert r.status_code == 202, (img.mode, fmt, r.text)
            stored = stored_input(api_server, r.json()["id"])
            assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", (8, 8))
            want = fit_picture(Image.open(io.BytesIO(data)), 8, 3)
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(want))
    job = httpx.get(f"{api_server.url}/jobs/{r.json()['id']}").json()
    assert job["kind"] == "generate" and job["request"]["init_image"]["upload"]["format"] == "PNG"


def test_exif_orientation_is_applied(api_server: ApiServer) -> None:
    img = photo((16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture stands 8 wide and 16 high
    r = post(api_server, "/likelihood", {"images": [b64(encoded(img, "JPEG", exif=exif))]})
    assert r.status_code == 202, r.text
    upload = httpx.get(f"{api_server.url}/jobs/{r.json()['id']}").json()["request"]["images"][0]["upload"]
    assert (upload["width"], upload["height"]) == (8, 16)


def test_decoding_never_runs_on_the_event_loop(api_server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []
    decode = inputs._decode

    def watched(data: bytes, field: str, max_pixels: int) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        seen.append((threading.current_thread().name, on_loop))
        return decode(data, field, max_pixels)

    monkeypatch.setattr(inputs, "_decode", watched)
    assert post(api_server, "/interpolate", {"images": [PNG, PNG], "t": 3}).status_code == 202
    assert len(seen) == 2 and not any(on_loop for _, on_loop in seen), seen


# ---- requests out of range -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("route", "body", "field", "message"), [
    ("/interpolate", {"images": [PNG, PNG], "lambdas": [0, 1.5]}, "lambdas[1]", "between 0 and 1"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": [-0.1]}, "lambdas[0]", "between 0 and 1"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": [0.5] * 17}, "lambdas", "at most 16"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": [0.5] * 1025}, "lambdas", "at most 1024"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": []}, "lambdas", "at least 1"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": [True]}, "lambdas", "not true or false"),
    ("/interpolate", {"images": [PNG, PNG], "lambdas": ["half"]}, "lambdas[0]", "valid number"),
    ("/interpolate", {"images": [PNG]}, "images", "at least 2"),
    ("/interpolate", {"images": [PNG, PNG, PNG]}, "images", "at most 2"),
    ("/interpolate", {"images": [PNG, 7]}, "images[1]", "base64 PNG or JPEG (a string) or a reference"),
    ("/interpolate", {"images": [PNG, PNG], "t": 41}, "t", "between 1 and 40"),
    ("/interpolate", {"images": [PNG, PNG], "t": 10, "steps": 11}, "steps", "between 1 and 10"),
    ("/interpolate", {"images": [PNG, PNG], "frames": 3}, "frames", "allowed: images, seed, t, lambdas"),
    ("/generate", {"start_t": 5}, "start_t", "only means something with init_image"),
    ("/generate", {"shared_latent": True}, "shared_latent", "only means something with init_image"),
    ("/generate", {"init_image": PNG, "start_t": 0}, "start_t", "between 1 and the model's T"),
    ("/generate", {"init_image": PNG, "start_t": 41}, "start_t", "between 1 and 40"),
    ("/generate", {"init_image": PNG, "start_t": 10, "steps": 11}, "steps", "between 1 and 10"),
    ("/generate", {"init_image": {"job": "x", "index": 0, "crop": 1}}, "init_image.crop", "unknown field"),
    ("/generate", {"init_image": {"job": "x"}}, "init_image.index", "Field required"),
    ("/generate", {"init_image": {"job": "x", "index": -1}}, "init_image.index", "greater than or equal to 0"),
    ("/likelihood", {"images": []}, "images", "at least 1"),
    ("/likelihood", {"images": [PNG] * 17}, "images", "at most 16"),
    ("/likelihood", {"images": [PNG], "rd_points": 41}, "rd_points", "between 1 and 40"),
    ("/likelihood", {"images": [PNG], "rd_points": 101}, "rd_points", "between 1 and 100"),
    ("/likelihood", {"images": [PNG], "steps": 10}, "steps", "unknown field"),
])
def test_out_of_range_requests_are_422_naming_the_field(make_api: Callable[..., ApiServer], route: str,
                                                        body: dict[str, Any], field: str, message: str) -> None:
    got = error(post(make_api(), route, body), 422, "invalid_request")
    assert got.startswith(f"{field}: ") and message in got, got


def test_preview_every_and_the_budget_bound_likelihood_jobs(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(max_image_steps=100, max_frames_per_job=10)
    got = error(post(api, "/likelihood", {"images": [PNG] * 3}), 422, "invalid_request")
    assert got == "images: len(images) x steps must be at most 100 (got 3 x 40 = 120)"  # T forwards per picture
    got = error(post(api, "/likelihood", {"images": [PNG], "preview_every": 2}), 422, "invalid_request")
    assert got.startswith("preview_every: at most 10 frames per job")
    ok = post(api, "/likelihood", {"images": [PNG, PNG]}).json()
    job = httpx.get(f"{api.url}/jobs/{ok['id']}").json()
    assert job["kind"] == "likelihood" and job["progress"]["total"] == 40 and job["request"]["rd_points"] == 20
    capped = make_api(max_steps=20)
    got = error(post(capped, "/likelihood", {"images": [PNG]}), 422, "invalid_request")
    assert got.startswith("model: the bound takes all T = 40 steps")


def test_the_default_lambdas_are_the_models() -> None:
    from model.latents import DEFAULT_LAMBDAS as MODEL_DEFAULT

    assert DEFAULT_LAMBDAS == MODEL_DEFAULT


# ---- references to jobs ----------------------------------------------------------------------------------------
def test_references_follow_the_owner_rules_of_every_job_route(make_api: Callable[..., ApiServer]) -> None:
    api = make_api(api_keys=[KEY_A, KEY_B])
    mine = finished_job(api, owner=digest(KEY_A))
    ref = {"job": mine, "index": 1}
    accepted = post(api, "/interpolate", {"images": [ref, {"job": mine, "index": 0}], "t": 4}, KEY_A)
    assert accepted.status_code == 202, accepted.text
    unknown = error(post(api, "/generate", {"init_image": {"job": "0" * 32, "index": 0}}, KEY_B), 422,
                    "invalid_request")
    theirs = error(post(api, "/generate", {"init_image": ref}, KEY_B), 422, "invalid_request")
    assert theirs == unknown.replace("0" * 32, mine)  # another key's job answers exactly as an unknown id
    assert theirs.startswith("init_image.job: no job")
    bad_id = error(post(api, "/likelihood", {"images": [{"job": "../../etc", "index": 0}]}, KEY_A), 422,
                   "invalid_request")
    assert bad_id.startswith("images[0].job: no job")
    got = error(post(api, "/generate", {"init_image": {"job": mine, "index": 2}}, KEY_A), 422, "invalid_request")
    assert got == f"init_image.index: job {mine} has images 0..1 (got 2)"


@pytest.mark.parametrize(("status", "kind", "message"), [
    ("queued", "generate", "is queued: its images exist once it has succeeded"),
    ("running", "generate", "is running: its images exist once it has succeeded"),
    ("succeeded", "likelihood", "measured a likelihood: it has no images"),
])
def test_references_to_jobs_without_images_are_422(api_server: ApiServer, status: str, kind: str,
                                                    message: str) -> None:
    job_id = finished_job(api_server, status=status, kind=kind)
    got = error(post(api_server, "/likelihood", {"images": [PNG, {"job": job_id, "index": 0}]}), 422,
                "invalid_request")
    assert got == f"images[1].job: job {job_id} {message}"


# ---- the same machinery as /generate: idempotency, webhooks, animations ------------------------------------------
def test_idempotency_keys_replay_interpolate_and_likelihood(api_server: ApiServer) -> None:
    for route, body in (("/interpolate", {"images": [PNG, PNG], "t": 3}), ("/likelihood", {"images": [PNG]})):
        headers = {"Idempotency-Key": f"retry-{route}"}
        first = httpx.post(f"{api_server.url}{route}", json=body, headers=headers)
        again = httpx.post(f"{api_server.url}{route}", json=body, headers=headers)
        assert (first.status_code, again.status_code) == (202, 200)
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        other = httpx.post(f"{api_server.url}{route}", json={**body, "seed": 5}, headers=headers)
        assert error(other, 422, "invalid_request").startswith("Idempotency-Key:")


def test_webhooks_subscribe_on_every_job_creating_route(make_api: Callable[..., ApiServer]) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    api = make_api(webhook_secret=secret, webhook_allow_hosts=["127.0.0.1"])
    hook = {"webhook": "http://127.0.0.1:9/hook", "webhook_events_filter": ["completed"]}
    for route, body in (("/interpolate", {"images": [PNG, PNG], "t": 3}), ("/likelihood", {"images": [PNG]}),
                        ("/generate", {"init_image": PNG, "start_t": 2})):
        job = httpx.get(f"{api.url}/jobs/{post(api, route, {**body, **hook}).json()['id']}").json()
        assert job["webhook"]["url"] == hook["webhook"] and job["webhook"]["events"] == ["completed"]
    got = error(post(api, "/likelihood", {"images": [PNG], "webhook": "http://10.0.0.1/x"}), 422, "invalid_request")
    assert got.startswith("webhook: refused")


def test_animations_need_a_finished_job_with_frames_and_follow_the_owner_rules(
        make_api: Callable[..., ApiServer], tiny_checkpoint: Path) -> None:
    api = make_api(api_keys=[KEY_A, KEY_B])
    queued = finished_job(api, owner=digest(KEY_A), status="queued")
    url = f"{api.url}/jobs/{queued}/animation.webp"
    assert "is queued" in error(httpx.get(url, headers={"X-API-Key": KEY_A}), 404, "not_found")
    done = finished_job(api, owner=digest(KEY_A))  # no frames were stored
    url = f"{api.url}/jobs/{done}/animation.gif"
    assert "no frames" in error(httpx.get(url, headers={"X-API-Key": KEY_A}), 404, "not_found")
    theirs = error(httpx.get(url, headers={"X-API-Key": KEY_B}), 404, "not_found")
    assert theirs.startswith(f"no job {done}")
    assert httpx.get(f"{api.url}/jobs/not-an-id/animation.gif", headers={"X-API-Key": KEY_A}).status_code == 404
