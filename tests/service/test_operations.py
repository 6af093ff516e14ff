"""The paper's other operations as jobs, end to end with real parts: redis-server, the API over HTTP and a real
``ddpm worker`` process (``shared_stack``: the tiny checkpoint, 8x8 RGB, T=40).

Reconstruction and variation (``POST /generate`` with ``init_image``), interpolation (``POST /interpolate``),
likelihood (``POST /likelihood``), animations (``GET /jobs/{id}/animation.webp|gif``), and a likelihood job
sharing the worker's U-Net forwards with a generation job. Numbers are held against ``model.latents`` and
``model.bound`` run in this process with the worker's network precision (reported by its heartbeat and in a
likelihood result)."""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image

from model.bound import likelihood, rd_grid
from model.image_fit import fit_picture
from model.inference import InferenceOptions
from model.latents import reconstruct
from service.engine import ServedModel
from service.queue import job_key, worker_key

from .conftest import ApiServer, WorkerProcess

TERMINAL = ("succeeded", "failed", "canceled")
T = 40


def picture(seed: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> Image.Image:
    """A smooth random picture (a blurred colour field), so reconstructions have something to keep."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BILINEAR).convert(mode)


def b64(img: Image.Image, fmt: str = "PNG", data_url: bool = False) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    text = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/{fmt.lower()};base64,{text}" if data_url else text


def x0_of(img: Image.Image) -> torch.Tensor:
    """As the API fits it and the worker reads it: (1, 3, 8, 8) in [-1, 1] on the 8-bit grid."""
    arr = np.asarray(fit_picture(img, 8, 3), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1.0


def submit(api: ApiServer, route: str, **body: Any) -> str:
    r = httpx.post(f"{api.url}{route}", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait(api: ApiServer, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{api.url}/jobs/{job_id}").json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def pixels(api: ApiServer, url: str) -> np.ndarray:
    r = httpx.get(api.url + url)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def worker_precision(api: ApiServer) -> str:
    client = redis.Redis.from_url(api.settings.redis_url)
    try:
        info = json.loads(client.get(worker_key("shared-worker")) or b"{}")
    finally:
        client.close()
    return str(info["inference"]["precision"])


@pytest.fixture(scope="module")
def stack(shared_stack: tuple[ApiServer, WorkerProcess]) -> tuple[ApiServer, WorkerProcess]:
    return shared_stack


@pytest.fixture(scope="module")
def served(stack: tuple[ApiServer, WorkerProcess], tiny_checkpoint: Path) -> ServedModel:
    """The tiny model as the worker serves it: its precision, a lone row padded to two (batch invariance)."""
    options = InferenceOptions(precision=worker_precision(stack[0]))  # type: ignore[arg-type]
    return ServedModel.load("tiny", str(tiny_checkpoint), "cpu", batch_invariant=True, options=options)


@pytest.fixture
def paused(stack: tuple[ApiServer, WorkerProcess]) -> Iterator[WorkerProcess]:
    """The worker stopped (SIGSTOP) until the test resumes it or ends: jobs submitted meanwhile wait together."""
    worker = stack[1]
    worker.signal(signal.SIGSTOP)
    try:
        yield worker
    finally:
        worker.signal(signal.SIGCONT)


# ---- reconstruction and variation -----------------------------------------------------------------------------
def test_reconstructions_and_variations_of_an_upload_are_the_models(stack: tuple[ApiServer, WorkerProcess],
                                                                     served: ServedModel) -> None:
    api = stack[0]
    img = picture(1, (12, 8))  # not the model's shape: fitted (resized, centre-cropped)
    job = wait(api, submit(api, "/generate", init_image=b64(img, data_url=True), start_t=10, num_images=2, seed=3))
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "generate" and job["progress"]["total"] == 10  # steps default to start_t
    request = job["request"]
    assert request["start_t"] == 10 and request["steps"] == 10 and request["shared_latent"] is False
    upload = request["init_image"]["upload"]
    assert upload["format"] == "PNG" and (upload["width"], upload["height"]) == (12, 8)
    assert len(upload["sha256"]) == 64 and "data" not in json.dumps(request)  # described, never echoed
    got = [pixels(api, im["url"]) for im in job["images"]]
    with torch.inference_mode():
        want = reconstruct(served.forward, served.diffusion, x0_of(img), start_t=10, seed=3, num_images=2)
    want_u8 = ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for g, w in zip(got, want_u8, strict=True):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1  # the same chain, noise and network
    assert not np.array_equal(got[0], got[1])  # two variations, each with its own noise stream
    back = wait(api, submit(api, "/generate", init_image=b64(img), start_t=1, seed=3))  # t = 1: the picture back
    gap = np.abs(pixels(api, back["images"][0]["url"]).astype(int) - np.asarray(fit_picture(img, 8, 3), int))
    assert gap.mean() < 4 and gap.max() < 12, gap


def test_a_finished_jobs_image_is_an_input_by_reference(stack: tuple[ApiServer, WorkerProcess]) -> None:
    api = stack[0]
    first = wait(api, submit(api, "/generate", num_images=2, steps=6, seed=8))
    ref = {"job": first["id"], "index": 1}
    same = wait(api, submit(api, "/generate", init_image=ref, start_t=3, seed=2, shared_latent=True, num_images=2))
    assert same["status"] == "succeeded" and same["request"]["init_image"] == ref
    assert same["request"]["shared_latent"] is True
    row = wait(api, submit(api, "/interpolate", images=[{"job": first["id"], "index": 0}, ref], t=5,
                           lambdas=[0, 1], seed=1))
    assert row["status"] == "succeeded" and len(row["images"]) == 2


# ---- interpolation ---------------------------------------------------------------------------------------------
def test_interpolation_images_follow_lambdas_and_lambda_0_is_the_reconstruction(
        stack: tuple[ApiServer, WorkerProcess]) -> None:
    api = stack[0]
    a, b = b64(picture(2)), b64(picture(3), "JPEG", data_url=True)
    job = wait(api, submit(api, "/interpolate", images=[a, b], t=12, lambdas=[0, 0.5, 1], seed=4, preview_every=4))
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "interpolate" and job["request"]["lambdas"] == [0, 0.5, 1]
    assert job["request"]["steps"] == job["progress"]["total"] == 12  # steps default to t
    assert [s["upload"]["format"] for s in job["request"]["images"]] == ["PNG", "JPEG"]
    assert [f["step"] for f in job["frames"]] == [1, 5, 9, 12]
    rows = [pixels(api, im["url"]) for im in job["images"]]
    assert len(rows) == 3 and not np.array_equal(rows[0], rows[2])
    alone = wait(api, submit(api, "/generate", init_image=a, start_t=12, seed=4))  # A's reconstruction, image 0
    np.testing.assert_array_equal(rows[0], pixels(api, alone["images"][0]["url"]))
    default = wait(api, submit(api, "/interpolate", images=[a, b], seed=4, steps=2))
    assert default["request"]["t"] == T // 2 and len(default["request"]["lambdas"]) == 11  # 0, 0.1, ..., 1


# ---- likelihood ------------------------------------------------------------------------------------------------
def _sse(api: ApiServer, job_id: str) -> list[dict[str, Any]]:
    events, current = [], {}
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith((":", "retry:")):
                key, _, value = line.partition(": ")
                current[key] = json.loads(value) if key == "data" else value
    return events


def test_a_likelihood_jobs_bits_per_dim_are_model_bound_likelihoods(stack: tuple[ApiServer, WorkerProcess],
                                                                    served: ServedModel) -> None:
    api = stack[0]
    images = [picture(5), picture(6, (9, 9), "L")]
    job_id = submit(api, "/likelihood", images=[b64(i) for i in images], seed=5, preview_every=10, rd_points=5)
    events = _sse(api, job_id)
    job = wait(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "likelihood" and job["images"] == [] and job["progress"] == {"step": T, "total": T, "t": 0}
    names = [e["event"] for e in events]
    assert names[0] == "queued" and names[-1] == "succeeded" and names.count("frame") == 5
    assert [e["data"]["total"] for e in events if e["event"] == "progress"][-1] == T  # progress counts terms
    assert [f["t"] for f in job["frames"]] == [39, 29, 19, 9, 0]  # x0-hat at each preview t
    assert pixels(api, job["frames"][0]["url"]).shape[1] > 8  # a grid of both pictures' x0-hat
    result = job["result"]
    assert result["num_timesteps"] == T and result["clip_denoised"] is True
    with torch.inference_mode():
        want = likelihood(served.forward, served.diffusion, torch.cat([x0_of(i) for i in images]), seed=5)
    np.testing.assert_allclose(result["bits_per_dim"], want.bits_per_dim.double().numpy(), rtol=1e-5)
    terms = np.array(result["terms"])
    assert terms.shape == (2, T + 1)  # L_0 .. L_T
    np.testing.assert_allclose(terms[:, :T], want.terms.double().numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(terms[:, T], want.prior.double().numpy(), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(terms.sum(axis=1), result["bits_per_dim"], rtol=1e-5)
    points, grid = result["rate_distortion"], rd_grid(T, 5)
    assert [p["t"] for p in points] == grid and grid[0] == 1 and grid[-1] == T
    columns = [t - 1 for t in grid]
    np.testing.assert_allclose([p["rate_bits_per_dim"] for p in points],
                               want.rate().double().numpy()[:, columns].T, rtol=1e-5)
    np.testing.assert_allclose([p["distortion_rmse"] for p in points],
                               want.distortion().double().numpy()[:, columns].T, rtol=1e-5)
    assert httpx.get(f"{api.url}/jobs/{job_id}/images/0.png").status_code == 404
    refused = httpx.post(f"{api.url}/generate", json={"init_image": {"job": job_id, "index": 0}})
    assert refused.status_code == 422 and "has no images" in refused.json()["error"]["message"]


def _samples(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_a_likelihood_job_and_a_generation_job_share_the_forwards(stack: tuple[ApiServer, WorkerProcess],
                                                                  paused: WorkerProcess) -> None:
    api, worker = stack
    metrics = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    paused.signal(signal.SIGCONT)
    measured_alone = wait(api, submit(api, "/likelihood", images=[b64(picture(7))], seed=9))
    time.sleep(0.3)
    before = httpx.get(metrics).text  # the worker serves its metrics itself: read them while it runs
    paused.signal(signal.SIGSTOP)
    lik = submit(api, "/likelihood", images=[b64(picture(7))], seed=9)
    gen = submit(api, "/generate", num_images=2, steps=T, seed=9)
    paused.signal(signal.SIGCONT)  # both are waiting: the worker admits them together
    lik_job, gen_job = wait(api, lik), wait(api, gen)
    assert lik_job["status"] == gen_job["status"] == "succeeded"
    time.sleep(0.3)  # the metrics of a tick are observed right after it
    after = httpx.get(metrics).text
    ticks = _samples(after, "ddpm_denoising_step_batch_images_count") - _samples(
        before, "ddpm_denoising_step_batch_images_count")
    rows = _samples(after, "ddpm_denoising_step_batch_images_sum") - _samples(
        before, "ddpm_denoising_step_batch_images_sum")
    assert (ticks, rows) == (T, 3 * T)  # 40 forwards of 3 rows, not 80 of 1 or 2
    assert lik_job["result"]["bits_per_dim"] == measured_alone["result"]["bits_per_dim"]  # sharing changes nothing
    assert _samples(after, "ddpm_jobs_finished_total", kind="likelihood", status="succeeded") >= 2
    api_metrics = httpx.get(f"{api.url}/metrics").text
    assert _samples(api_metrics, "ddpm_jobs_submitted_total", kind="likelihood") >= 2


def test_a_running_likelihood_job_can_be_canceled(stack: tuple[ApiServer, WorkerProcess],
                                                  paused: WorkerProcess) -> None:
    api = stack[0]
    job_id = submit(api, "/likelihood", images=[b64(picture(i)) for i in range(16)], seed=1, preview_every=1)
    paused.signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while httpx.get(f"{api.url}/jobs/{job_id}").json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert httpx.delete(f"{api.url}/jobs/{job_id}").status_code in (200, 202)
    job = wait(api, job_id)
    assert job["status"] == "canceled" and job["result"] is None and job["progress"]["step"] < T


# ---- animations ------------------------------------------------------------------------------------------------
def test_animations_of_a_finished_job_are_built_once_and_kept_with_the_job(
        stack: tuple[ApiServer, WorkerProcess]) -> None:
    api = stack[0]
    job = wait(api, submit(api, "/generate", num_images=2, steps=8, preview_every=1, seed=12))
    frames = [Image.open(io.BytesIO(httpx.get(api.url + f["url"]).content)).convert("RGB") for f in job["frames"]]
    assert len(frames) == 8
    url = f"{api.url}/jobs/{job['id']}/animation"
    webp = httpx.get(url + ".webp")
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
    anim = Image.open(io.BytesIO(webp.content))
    assert anim.format == "WEBP" and anim.is_animated and anim.n_frames == 8
    scale = anim.width // frames[0].width
    assert scale > 1 and anim.size == (frames[0].width * scale, frames[0].height * scale)
    for k in (0, 7):  # lossless: every pixel of each frame, enlarged
        anim.seek(k)
        big = frames[k].resize(anim.size, Image.Resampling.NEAREST)
        np.testing.assert_array_equal(np.asarray(anim.convert("RGB")), np.asarray(big))
    gif = httpx.get(url + ".gif")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(gif.content)).is_animated
    client = redis.Redis.from_url(api.settings.redis_url)
    try:
        key = job_key(job["id"], "animation", "webp")
        assert client.get(key) == webp.content  # built once, then served from the store
        assert 0 < client.ttl(key) <= client.ttl(job_key(job["id"])) + 1  # kept as long as the job
    finally:
        client.close()
    assert httpx.get(url + ".webp").content == webp.content
    assert httpx.get(f"{api.url}/jobs/{'0' * 32}/animation.webp").status_code == 404


def test_a_likelihood_jobs_animation_is_its_progressive_decoding(stack: tuple[ApiServer, WorkerProcess],
                                                                 paused: WorkerProcess) -> None:
    api = stack[0]
    job_id = submit(api, "/likelihood", images=[b64(picture(4))], seed=2, preview_every=8)
    queued = httpx.get(f"{api.url}/jobs/{job_id}/animation.gif")
    assert queued.status_code == 404 and "is queued" in queued.json()["error"]["message"]
    paused.signal(signal.SIGCONT)
    job = wait(api, job_id)
    anim = Image.open(io.BytesIO(httpx.get(f"{api.url}/jobs/{job_id}/animation.webp").content))
    assert anim.n_frames == len(job["frames"]) == 6  # t = 39, 31, 23, 15, 7 and 0
