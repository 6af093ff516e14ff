"""A bounded load test of the whole stack on loopback: many pollers and SSE clients plus steady job submissions.

Starts ``ddpm up`` (what ``make run`` starts: a private redis-server, one ``ddpm worker`` and the API, as
processes; ``benchmarks.up``) on a free port, then for ``--duration`` seconds (or until ``--max-requests``
requests) runs:

- ``--submitters`` threads, each submitting a job (``--num-images`` images, ``--steps`` steps) every
  ``--submit-interval`` seconds, ``--jobs`` jobs at most in all;
- ``--pollers`` threads, each polling ``GET /jobs/{id}`` of a random submitted job every ``--poll-interval`` s;
- ``--sse-clients`` threads, each following a job's event stream to its terminal event, then another job's.

Then it waits (at most ``--drain-timeout`` s) for every accepted job to end and stops the stack. It always stops
by itself. Reported: responses by status code, 5xx count, lost jobs (accepted but not ``succeeded`` at the end,
or unknown), p50/p99 latency of ``GET /jobs/{id}`` and ``POST /generate``, SSE streams completed. No ratios:
this benchmark bounds latencies and counts failures.

    .venv/bin/python -m benchmarks.bench_load [--duration 60] [--pollers 32] [--sse-clients 16]

Every client runs in this one process (threads, one keep-alive connection each) on the same machine as the
stack, so on a small machine the load generator competes with the server for the CPU: latencies are an upper
bound. All clients share one address, so the per-client SSE limit is raised for the run. Output: one JSON object
on stdout and in ``benchmarks/results/bench_load-<device>-<UTC time>.json``; exit status 1 on any 5xx or lost job.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Run, add_out_argument
from benchmarks.up import Up
from service.settings import DEMO_CHECKPOINT

TERMINAL = ("succeeded", "failed", "canceled")
LOAD_ENV = {"DDPM_MAX_QUEUE_LENGTH": "1000", "DDPM_MAX_SSE_PER_CLIENT": "1000"}


class Recorder:
    """Latencies by route and response counts by status, shared by every client thread."""

    def __init__(self, max_requests: int):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()  # transport errors (no response)
        self.jobs: list[str] = []
        self.sse_done: collections.Counter[str] = collections.Counter()
        self.remaining = max_requests

    def take(self) -> bool:
        with self.lock:
            self.remaining -= 1
            return self.remaining >= 0

    def timed(self, route: str, call: Callable[[], httpx.Response]) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            r = call()
        except httpx.HTTPError as exc:
            with self.lock:
                self.errors[f"{route}: {type(exc).__name__}"] += 1
            return None
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latency[route].append(elapsed)
            self.statuses[r.status_code] += 1
        return r


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    v = sorted(values)
    return {"count": len(v), "p50_ms": round(1000 * v[len(v) // 2], 2),
            "p99_ms": round(1000 * v[min(len(v) - 1, int(len(v) * 0.99))], 2), "max_ms": round(1000 * v[-1], 2)}


def submitter(url: str, rec: Recorder, stop: threading.Event, args: argparse.Namespace, budget: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            with rec.lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            if not rec.take():
                return
            body = {"num_images": args.num_images, "steps": args.steps}
            r = rec.timed("POST /generate", lambda b=body: client.post("/generate", json=b))  # type: ignore[misc]
            if r is not None and r.status_code == 202:
                with rec.lock:
                    rec.jobs.append(r.json()["id"])
            stop.wait(args.submit_interval)


def poller(url: str, rec: Recorder, stop: threading.Event, interval: float) -> None:
    rng = random.Random()
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set() and rec.take():
            with rec.lock:
                job_id = rng.choice(rec.jobs) if rec.jobs else None
            if job_id is not None:
                rec.timed("GET /jobs/{id}", lambda j=job_id: client.get(f"/jobs/{j}"))  # type: ignore[misc]
            stop.wait(interval)


def sse_client(url: str, rec: Recorder, stop: threading.Event) -> None:
    """Follow the newest job's events to its terminal event (the server ends the stream), then the next job
    submitted after it (each client follows a job at most once)."""
    followed = -1
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=60)) as client:
        while not stop.is_set():
            with rec.lock:
                newest = len(rec.jobs) - 1
                job_id = rec.jobs[newest] if newest > followed else None
            if job_id is None:
                stop.wait(0.2)
                continue
            if not rec.take():
                return
            followed = newest
            terminal = "none"
            try:
                with client.stream("GET", f"/jobs/{job_id}/events") as r:
                    with rec.lock:
                        rec.statuses[r.status_code] += 1
                    for line in r.iter_lines():
                        if line.startswith("event: ") and line[7:] in TERMINAL:
                            terminal = line[7:]
            except httpx.HTTPError as exc:
                terminal = f"error {type(exc).__name__}"
            with rec.lock:
                rec.sse_done[terminal] += 1


def drain(url: str, jobs: list[str], timeout: float) -> dict[str, Any]:
    """Wait until every accepted job has ended; their final states (lost = not succeeded or unknown)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        pending = list(jobs)
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                r = client.get(f"/jobs/{job_id}")
                status = r.json()["status"] if r.status_code == 200 else f"http {r.status_code}"
                states[job_id] = status
                if status not in TERMINAL and not status.startswith("http"):
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
        ends = [client.get(f"/jobs/{j}").json() for j in jobs if states.get(j) == "succeeded"]
    counts = collections.Counter(states.values())
    lost = [j for j in jobs if states.get(j) != "succeeded"]
    run_s = [datetime.fromisoformat(e["ended_at"]).timestamp() - datetime.fromisoformat(e["created_at"]).timestamp()
             for e in ends]
    return {"final_states": dict(counts), "lost_jobs": len(lost), "lost_ids": lost[:10],
            "created_to_ended": _percentiles(run_s)}


def apply_load(args: argparse.Namespace, url: str) -> dict[str, Any]:
    rec, stop, budget = Recorder(args.max_requests), threading.Event(), [args.jobs]
    threads = [threading.Thread(target=submitter, args=(url, rec, stop, args, budget))
               for _ in range(args.submitters)]
    threads += [threading.Thread(target=poller, args=(url, rec, stop, args.poll_interval))
                for _ in range(args.pollers)]
    threads += [threading.Thread(target=sse_client, args=(url, rec, stop)) for _ in range(args.sse_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(args.duration)
    stop.set()
    for t in threads:
        t.join(args.drain_timeout)
    load_s = time.perf_counter() - start
    drained = drain(url, list(rec.jobs), args.drain_timeout)
    requests = sum(len(v) for v in rec.latency.values())
    return {
        "load_s": round(load_s, 1), "requests": requests, "throughput_rps": round(requests / load_s, 1),
        "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
        "server_errors_5xx": sum(v for k, v in rec.statuses.items() if k >= 500),
        "transport_errors": dict(rec.errors), "jobs_accepted": len(rec.jobs),
        "get_job": _percentiles(rec.latency["GET /jobs/{id}"]), "post_generate": _percentiles(
            rec.latency["POST /generate"]), "sse_streams": dict(rec.sse_done), **drained,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (then it drains)")
    parser.add_argument("--max-requests", type=int, default=50_000, help="stop the load after this many")
    parser.add_argument("--jobs", type=int, default=120, help="jobs submitted at most")
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--submit-interval", type=float, default=1.0)
    parser.add_argument("--pollers", type=int, default=32)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--sse-clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the worker's device")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_load", args, args.device, argv)
    with tempfile.TemporaryDirectory(prefix="ddpm-load-") as tmp:
        up = Up(args.checkpoint, Path(tmp), device=args.device, threads=args.threads, env=LOAD_ENV).start()
        try:
            result = apply_load(args, up.url)
        finally:
            up_exit = up.stop()
    report = {"ddpm_up_exit": up_exit, **result}
    print(json.dumps(report, indent=2))
    print(f"wrote {run.write(report)}")
    return 1 if result["server_errors_5xx"] or result["lost_jobs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
