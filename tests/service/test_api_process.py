"""The API process stays light: a real ``ddpm serve`` answers every kind of request without importing PyTorch
(nor safetensors or numpy). The worker is the only process that loads a model."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from service.queue import JobStore, connect
from service.redis_server import free_port

# `ddpm serve` as the console script runs it, plus a note of the heavy modules loaded by the time it stops.
# uvicorn shuts down on SIGTERM, restores the handler it found and raises the signal again: this handler.
SERVE = """
import json, signal, sys
OUT, HEAVY = sys.argv.pop(1), ("torch", "safetensors", "numpy")
def note(signum, frame):
    with open(OUT, "w") as fh:
        json.dump(sorted(name for name in sys.modules if name.partition(".")[0] in HEAVY), fh)
    sys.exit(0)
signal.signal(signal.SIGTERM, note)
from service.cli import main
sys.exit(main())
"""


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _job_with_frames(redis_url: str) -> str:
    """A job ended with two frames, as a worker leaves it."""
    store = JobStore(connect(redis_url))
    try:
        job_id = store.submit({"num_images": 1}, "tiny", num_images=1, total_steps=2, seeds=[1], max_queue_length=10)
        store.rq_queue().remove(job_id)
        store.start(job_id, "test")
        for step in (1, 2):
            store.add_frame(job_id, step, 2 - step, _png(8, 8))
        store.mark_canceled(job_id)
        return job_id
    finally:
        store.redis.close()


def test_ddpm_serve_never_imports_torch(redis_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    port, modules = free_port(), tmp_path / "modules.json"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(modules), "serve", "--port", str(port),
                             "--redis-url", redis_url, "--checkpoint", f"tiny={tiny_checkpoint}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()[0].decode()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "ddpm serve did not start"
                time.sleep(0.05)
            models = client.get("/models").json()["models"]
            assert models[0]["num_timesteps"] == 40 and models[0]["available"]  # the metadata was read
            job = client.post("/generate", json={"num_images": 1, "steps": 4}).json()
            assert client.get(job["status_url"]).json()["status"] == "queued"
            # pictures are decoded and fitted, animations encoded, with Pillow alone
            picture = base64.b64encode(_png(12, 9)).decode()
            assert client.post("/likelihood", json={"images": [picture]}).status_code == 202
            assert client.post("/generate", json={"init_image": picture, "start_t": 3}).status_code == 202
            animated = _job_with_frames(redis_url)
            assert client.get(f"/jobs/{animated}/animation.webp").headers["content-type"] == "image/webp"
            assert client.get(f"/jobs/{animated}/animation.gif").headers["content-type"] == "image/gif"
            assert client.get("/metrics").status_code == 200
            assert client.get("/openapi.json").status_code == 200
            assert client.delete(job["status_url"]).json()["status"] == "canceled"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    heavy = json.loads(modules.read_text())
    assert not heavy, f"the API process imported {sorted({m.partition('.')[0] for m in heavy})}: {heavy[:10]}"
