"""The service stack's overhead, measured side by side in one run.

1. Time from ``POST /generate`` to the final image bytes through the whole stack (``ddpm up``: a private
   redis-server, the real ``ddpm worker`` process and the API, see ``benchmarks.up``; SSE to learn the end, then
   GET of every image PNG) against calling the sampler directly in this process with the same checkpoint, steps,
   images and seed. Interleaved rounds (direct, stack, stack with one frame) after a warm-up round; reported as
   medians and the cost ratios ``stack_over_direct`` (median of the per-round stack / direct, with its range),
   with the default previews (about 20 x0-hat frames, each a PNG in Redis) and with one frame only
   (``preview_every = steps``). Each stack job's time is split by its record's timestamps.
2. ``GET /jobs/{id}`` latency under a bounded concurrent load on loopback: ``--concurrency`` clients share a
   fixed ``--requests`` count, stopped at ``--time-limit`` seconds; p50/p99 and throughput.

    .venv/bin/python -m benchmarks.bench_stack [--checkpoint FILE] [--steps 100] [--num-images 4]

Both sides use ``--threads`` torch threads (default 1: on a small shared machine, oversubscribed intra-op
threads slow both sides by an order of magnitude and bury the overhead in noise). Without ``--checkpoint`` it
uses the demo checkpoint if present, else a random-weight ``digits``-preset model (the demo's compute per step).
Output: one JSON object on stdout and in ``benchmarks/results/bench_stack-<device>-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.common import Run, add_out_argument, compare, interleaved, set_threads, timer
from benchmarks.models import demo_or_random_checkpoint
from benchmarks.up import Up
from model.checkpoint import load_checkpoint
from model.sampler import sample

STACK_ENV = {"DDPM_MAX_QUEUE_LENGTH": "1000", "DDPM_MAX_NUM_IMAGES": "64"}


class Direct:
    """The sampler called in this process: the floor the stack is compared with (same inference set-up as the
    worker: eval mode, cached time embeddings, inference mode)."""

    def __init__(self, checkpoint: Path, device: str):
        self.loaded = load_checkpoint(checkpoint, device=device)
        self.loaded.unet.cache_time_embeddings(self.loaded.diffusion.num_timesteps)
        meta = self.loaded.metadata
        self.shape = (meta["channels"], meta["image_size"], meta["image_size"])

    def sample(self, steps: int, num_images: int, seed: int) -> torch.Tensor:
        images = sample(self.loaded.unet, self.loaded.diffusion, num_images, self.shape, seed=seed, steps=steps)
        return images.cpu()  # waits for the device, as the worker's PNG encoding does


@dataclass
class StackJob:
    """One job through the stack: seconds from POST to the last image byte, and when (wall clock) it began
    and ended, to split its time by its record's timestamps."""

    seconds: float
    job_id: str
    start_wall: float
    end_wall: float


def run_job(client: httpx.Client, body: dict[str, Any]) -> StackJob:
    """POST, follow the SSE stream to the terminal event, GET every image."""
    start_wall, start = time.time(), time.perf_counter()
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
    return StackJob(time.perf_counter() - start, accepted["id"], start_wall, time.time())


def phases(client: httpx.Client, job: StackJob) -> dict[str, float]:
    """Where a stack job's time went: POST -> record created, queue wait, worker run, end -> images fetched."""
    record = client.get(f"/jobs/{job.job_id}").json()
    created, started, ended = (datetime.fromisoformat(record[k]).timestamp() for k in
                               ("created_at", "started_at", "ended_at"))
    return {"post_to_created_s": round(created - job.start_wall, 4), "queue_wait_s": round(started - created, 4),
            "run_s": round(ended - started, 4), "ended_to_images_s": round(job.end_wall - ended, 4)}


def side_by_side(direct: Direct, client: httpx.Client, args: argparse.Namespace) -> dict[str, list[Any]]:
    """Interleaved rounds of the direct call (seconds) and the two stack variants (``StackJob``s)."""
    body = {"num_images": args.num_images, "steps": args.steps, "seed": 0}
    one_frame = {**body, "preview_every": args.steps}  # only the last step's x0-hat
    return interleaved({
        "direct": timer(lambda: direct.sample(args.steps, args.num_images, 0), args.device),
        "stack": lambda: run_job(client, body),
        "stack_one_frame": lambda: run_job(client, one_frame),
    }, args.repeats)


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


def summary(rounds: dict[str, list[Any]]) -> dict[str, Any]:
    direct = rounds["direct"]
    stack = [j.seconds for j in rounds["stack"]]
    lean = [j.seconds for j in rounds["stack_one_frame"]]
    return {"direct_s": [round(x, 3) for x in direct], "stack_s": [round(x, 3) for x in stack],
            "direct_median_s": round(statistics.median(direct), 3),
            "stack_median_s": round(statistics.median(stack), 3),
            **compare(stack, direct, "stack_over_direct"), "stack_one_frame_s": [round(x, 3) for x in lean],
            **compare(lean, direct, "stack_one_frame_over_direct")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads, the same for this process and the worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_stack", args, args.device, argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        checkpoint = args.checkpoint or demo_or_random_checkpoint(tmp)
        direct = Direct(checkpoint, args.device)
        with Up(checkpoint, tmp, device=args.device, threads=args.threads, env=STACK_ENV) as up, \
                httpx.Client(base_url=up.url, timeout=30) as client:
            rounds = side_by_side(direct, client, args)
            job_phases = {k: [phases(client, j) for j in rounds[k]] for k in ("stack", "stack_one_frame")}
            load = get_latency(up.url, rounds["stack"][-1].job_id, args.concurrency, args.requests,
                               args.time_limit)
    report = {"device": args.device, "checkpoint": checkpoint.name, "steps": args.steps,
              "num_images": args.num_images, **summary(rounds), "stack_phases": job_phases["stack"],
              "stack_one_frame_phases": job_phases["stack_one_frame"], "get_job_latency": load}
    print(json.dumps(report, indent=2))
    print(f"wrote {run.write(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
