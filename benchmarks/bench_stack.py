"""The service stack's overhead, measured side by side in one run.

1. Time from ``POST /generate`` to the final image bytes through the whole stack (private redis-server, the real
   ``ddpm worker`` process, the API served by uvicorn in its own process, SSE to learn the end, then GET of every
   image PNG) against calling the sampler directly in this process with the same checkpoint, steps, images and
   seed. Reported as medians and their ratio (stack / direct), with the default previews (about 20 x0-hat
   frames, each a PNG in Redis) and with one frame only (``preview_every = steps``).
2. ``GET /jobs/{id}`` latency under a bounded concurrent load on loopback: ``--concurrency`` clients share a
   fixed ``--requests`` count, stopped at ``--time-limit`` seconds; p50/p99 and throughput.

    .venv/bin/python benchmarks/bench_stack.py [--checkpoint FILE] [--steps 100] [--num-images 4]

Both sides use ``--threads`` torch threads (default 1: on a small shared machine, oversubscribed intra-op
threads slow both sides by an order of magnitude and bury the overhead in noise). Without ``--checkpoint`` it
uses the demo checkpoint if present, else a random-weight ``digits``-preset model (the demo's compute per step).
Output: one JSON object on stdout and in ``benchmarks/results/bench_stack-<device>-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import MODEL_PRESETS  # noqa: E402
from model.sampler import sample  # noqa: E402
from model.unet import UNet  # noqa: E402
from service.redis_server import RedisServer, free_port  # noqa: E402
from service.settings import DEMO_CHECKPOINT  # noqa: E402


def random_checkpoint(path: Path) -> Path:
    preset = MODEL_PRESETS["digits"]
    unet = UNet(preset.unet)
    save_checkpoint(path, unet, preset.unet, preset.diffusion, dataset="random", step=0, ema=True)
    return path


class Direct:
    """The sampler called in this process: the floor the stack is compared with (same inference set-up as the
    worker: eval mode, cached time embeddings, inference mode)."""

    def __init__(self, checkpoint: Path, device: str):
        self.loaded = load_checkpoint(checkpoint, device=device)
        self.loaded.unet.cache_time_embeddings(self.loaded.diffusion.num_timesteps)
        meta = self.loaded.metadata
        self.shape = (meta["channels"], meta["image_size"], meta["image_size"])

    def run(self, steps: int, num_images: int, seed: int) -> float:
        start = time.perf_counter()
        images = sample(self.loaded.unet, self.loaded.diffusion, num_images, self.shape, seed=seed, steps=steps)
        images.cpu()  # waits for the device, as the worker's PNG encoding does
        return time.perf_counter() - start


class Stack:
    """redis-server + ``ddpm worker`` + ``ddpm serve`` as processes, like ``ddpm up``."""

    def __init__(self, checkpoint: Path, tmp: Path, threads: int, device: str):
        self.redis = RedisServer(data_dir=tmp / "redis").start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ck = ["--redis-url", self.redis.url, f"--checkpoint=bench={checkpoint}"]
        env = {**os.environ, "DDPM_MAX_QUEUE_LENGTH": "1000", "DDPM_MAX_NUM_IMAGES": "64",
               "OMP_NUM_THREADS": str(threads)}
        cli = [sys.executable, "-m", "service.cli"]
        self.procs = [
            subprocess.Popen([*cli, "worker", *ck, "--device", device, "--metrics-port", "0"], cwd=ROOT, env=env),
            subprocess.Popen([*cli, "serve", *ck, "--port", str(self.port)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200 and ready.json()["worker"] == "serving":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the stack did not become ready")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)
        self.redis.cleanup()


PHASES: list[dict[str, float]] = []  # per stack job: where its time went (from the job record's timestamps)


def _phases(client: httpx.Client, job_id: str, start_wall: float, end_wall: float) -> dict[str, float]:
    job = client.get(f"/jobs/{job_id}").json()
    created, started, ended = (datetime.fromisoformat(job[k]).timestamp() for k in
                               ("created_at", "started_at", "ended_at"))
    return {"post_to_created_s": round(created - start_wall, 4), "queue_wait_s": round(started - created, 4),
            "run_s": round(ended - started, 4), "ended_to_images_s": round(end_wall - ended, 4)}


def run_job(client: httpx.Client, body: dict[str, Any]) -> tuple[float, str]:
    """POST, follow the SSE stream to the terminal event, GET every image: seconds from POST to last byte."""
    start_wall = time.time()
    start = time.perf_counter()
    accepted = client.post("/generate", json=body).raise_for_status().json()
    terminal = None
    with client.stream("GET", accepted["events_url"], timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "canceled"):
                terminal = line[7:]
    if terminal != "succeeded":
        raise RuntimeError(f"job ended {terminal}")
    for i in range(body["num_images"]):
        client.get(f"/jobs/{accepted['id']}/images/{i}.png").raise_for_status()
    seconds = time.perf_counter() - start
    PHASES.append(_phases(client, accepted["id"], start_wall, time.time()))
    return seconds, accepted["id"]


def get_latency(url: str, job_id: str, concurrency: int, requests: int, time_limit: float) -> dict[str, Any]:
    """``requests`` GET /jobs/{id} shared by ``concurrency`` threads, each with its own keep-alive client."""
    latencies: list[float] = []
    lock, remaining = threading.Lock(), [requests]
    deadline = time.perf_counter() + time_limit
    errors = [0]

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while time.perf_counter() < deadline:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                ok = client.get(f"/jobs/{job_id}").status_code == 200
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors[0] += not ok

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors[0], "concurrency": concurrency, "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, the same for this process and the worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for the JSON result file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        checkpoint = args.checkpoint or (DEMO_CHECKPOINT if DEMO_CHECKPOINT.exists()
                                         else random_checkpoint(tmp / "digits-random.safetensors"))
        direct = Direct(checkpoint, args.device)
        stack = Stack(checkpoint, tmp, args.threads, args.device)
        try:
            with httpx.Client(base_url=stack.url, timeout=30) as client:
                body = {"num_images": args.num_images, "steps": args.steps, "seed": 0}
                direct.run(args.steps, args.num_images, 0)  # warm-ups
                run_job(client, body)
                one_frame = {**body, "preview_every": args.steps}  # only the last step's x0-hat
                direct_s, through_stack, lean, job_id = [], [], [], ""
                for _ in range(args.repeats):  # interleaved, so all see the same machine load
                    direct_s.append(direct.run(args.steps, args.num_images, 0))
                    seconds, job_id = run_job(client, body)
                    through_stack.append(seconds)
                    lean.append(run_job(client, one_frame)[0])
            load = get_latency(stack.url, job_id, args.concurrency, args.requests, args.time_limit)
        finally:
            stack.stop()
    d, s = statistics.median(direct_s), statistics.median(through_stack)
    result = {
        "benchmark": "bench_stack", "device": args.device, "checkpoint": checkpoint.name, "steps": args.steps,
        "num_images": args.num_images,
        "torch_threads": torch.get_num_threads(), "direct_s": [round(x, 3) for x in direct_s],
        "stack_s": [round(x, 3) for x in through_stack], "direct_median_s": round(d, 3),
        "stack_median_s": round(s, 3), "stack_over_direct": round(s / d, 3),
        "stack_one_frame_s": [round(x, 3) for x in lean],
        "stack_one_frame_over_direct": round(statistics.median(lean) / d, 3),
        "stack_phases": PHASES[1::2], "stack_one_frame_phases": PHASES[2::2], "get_job_latency": load,
        "load_average": os.getloadavg(), "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"bench_stack-{args.device}-{stamp}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
