"""Does webhook delivery slow the denoising loop? 16 concurrent jobs with and without ``frame`` webhooks, side by
side in one run.

The stack is ``ddpm up`` (``benchmarks.up``: a private redis-server, one real ``ddpm worker`` with its webhook
dispatcher process, as in serving, and the API, idle here: jobs go straight into the store), plus a receiver
process on 127.0.0.1 (allow-listed) answering 204. Each round queues ``--jobs`` single-image jobs at once, twice:
*plain* (no webhook) and *hooked* (``webhook_events_filter`` = start, frame, completed, a frame every
``--preview-every`` steps and, by default, frames not throttled (``--frame-interval 0``), so the dispatcher
renders, signs and POSTs a delivery for every frame of every job while the loop runs). The rounds are
interleaved after a warm-up round, every other one hooked first. Reported:

- wall time of the batch, from the job records (first start to last end), and its image-steps per second;
- step time: the worker's mean ``ddpm_denoising_step_duration_seconds`` over the run (its own histogram);
- the cost ratios ``hooked / plain`` of both, per round, and their medians, quartiles and ranges; deliveries made
  and failed; the CPU seconds the worker and its dispatcher process used in each run (from /proc).

Between runs the outbox drains, so no delivery of one run overlaps the next. Without ``--checkpoint`` it uses
the demo checkpoint if present, else a random-weight ``digits``-preset model (the same compute).

    .venv/bin/python -m benchmarks.bench_webhooks --jobs 16 --steps 40 --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Run, add_out_argument, compare, interleaved, markdown_table
from benchmarks.models import demo_or_random_checkpoint
from benchmarks.up import Up, cli_child
from service.queue import JobStore, connect, new_job_id
from service.redis_server import free_port
from service.settings import get_settings
from service.webhooks.outbox import Outbox
from service.webhooks.signing import new_secret

MODEL = "bench"


# ---- the receiver -------------------------------------------------------------------------------------------------
def receive(port: int) -> None:
    """The receiver process: 204 to every POST, nothing else."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start_receiver(port: int, timeout: float = 30.0) -> BaseProcess:
    """``receive`` in a process of its own, once it accepts connections."""
    proc = multiprocessing.get_context("spawn").Process(target=receive, args=(port,), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or not proc.is_alive():
                proc.terminate()
                raise RuntimeError(f"the webhook receiver did not listen on port {port}") from None
            time.sleep(0.05)


# ---- one run ------------------------------------------------------------------------------------------------------
def step_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the worker's denoising step histogram."""
    total = count = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ddpm_denoising_step_duration_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ddpm_denoising_step_duration_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and the children it reaped, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _open(outbox: Outbox, job_id: str) -> bool:
    view = outbox.view(job_id)
    return view is None or not any(d["event"] == "completed" for d in view["deliveries"])


def run_batch(store: JobStore, outbox: Outbox, args: argparse.Namespace, hook: str | None, metrics_url: str,
              pids: dict[str, int]) -> dict[str, Any]:
    """``--jobs`` single-image jobs queued at once (subscribed to ``hook`` if given), to the end of their
    deliveries."""
    before = step_seconds(metrics_url)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    request = {"num_images": 1, "steps": args.steps, "sampler": "ddpm", "eta": 0.0, "variance": "fixedlarge",
               "preview_every": args.preview_every, "model": MODEL}
    ids = []
    for i in range(args.jobs):
        job_id = new_job_id()
        if hook:
            outbox.subscribe(job_id, hook, ["start", "frame", "completed"], 3600, time.time())
        store.submit({**request, "seed": i}, MODEL, num_images=1, total_steps=args.steps, seeds=[i],
                     max_queue_length=10_000, job_id=job_id)
        ids.append(job_id)
    deadline = time.monotonic() + 1800
    while not all((store.get(j) or {}).get("status") == "succeeded" for j in ids):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.1)
    while outbox.pending() or (hook and any(_open(outbox, j) for j in ids)):
        assert time.monotonic() < deadline, "deliveries did not drain"
        time.sleep(0.1)
    after = step_seconds(metrics_url)
    step_ms = 1000 * (after[0] - before[0]) / max(after[1] - before[1], 1)
    cpu = {f"{name}_cpu_s": round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
    jobs = [store.get(j) for j in ids]
    wall = max(j["ended_at"] for j in jobs) - min(j["started_at"] for j in jobs)  # type: ignore[index]
    views = [outbox.view(j) for j in ids] if hook else []
    statuses = [d["status"] for v in views if v for d in v["deliveries"]]
    print(f"{'hooked' if hook else 'plain '}: {wall:.2f} s, step {step_ms:.1f} ms, {statuses.count('delivered')} "
          "deliveries", flush=True)
    return {"webhooks": bool(hook), "wall_s": wall, "image_steps_per_s": args.jobs * args.steps / wall,
            "mean_step_ms": step_ms,
            "steps_timed": after[1] - before[1], "delivered": statuses.count("delivered"),
            "failed": statuses.count("failed"), **cpu}


def check_batch_size(store: JobStore, jobs: int) -> None:
    """The worker batches all ``jobs`` jobs into one forward (DDPM_MAX_BATCH_SIZE reached it)."""
    live = store.live_workers(get_settings().worker_lease_seconds)  # the lease `ddpm up` runs with
    sizes = [w.get("max_batch_size") for w in live]
    if sizes != [jobs]:
        raise RuntimeError(f"expected one worker with max_batch_size {jobs}, found {sizes}")


# ---- report -------------------------------------------------------------------------------------------------------
def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per round and over the rounds: hooked / plain of the batch's wall time and of the mean step time."""
    plain, hooked = runs["plain"], runs["hooked"]
    rounds = [{"plain": p, "hooked": h, "time_ratio": h["wall_s"] / p["wall_s"],
               "step_time_ratio": h["mean_step_ms"] / p["mean_step_ms"]} for p, h in zip(plain, hooked, strict=True)]
    out: dict[str, Any] = {"rounds": rounds}
    for key, side in (("hooked_over_plain_time", "wall_s"), ("hooked_over_plain_step_time", "mean_step_ms")):
        h, p = [r[side] for r in hooked], [r[side] for r in plain]
        out |= compare(h, p, key)
        if len(rounds) >= 2:
            out[f"{key}_quartiles"] = statistics.quantiles([a / b for a, b in zip(h, p, strict=True)], n=4)
    return out


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.jobs} jobs x {args.steps} steps, a frame every {args.preview_every} step(s), frame deliveries at "
          f"most every {args.frame_interval:g} s per job, {args.rounds} rounds\n")
    print(markdown_table(
        ["round", "plain img-steps/s", "hooked img-steps/s", "time hooked/plain", "step ms plain", "step ms hooked",
         "step time hooked/plain", "deliveries (failed)", "dispatcher CPU s plain / hooked"],
        [[i + 1, f"{r['plain']['image_steps_per_s']:.1f}", f"{r['hooked']['image_steps_per_s']:.1f}",
          f"{r['time_ratio']:.3f}", f"{r['plain']['mean_step_ms']:.1f}", f"{r['hooked']['mean_step_ms']:.1f}",
          f"{r['step_time_ratio']:.3f}", f"{r['hooked']['delivered']} ({r['hooked']['failed']})",
          f"{r['plain'].get('dispatcher_cpu_s', '-')} / {r['hooked'].get('dispatcher_cpu_s', '-')}"]
         for i, r in enumerate(report["rounds"])]))
    print(f"\nmedian time hooked/plain {report['hooked_over_plain_time']:.3f}, "
          f"median step time hooked/plain {report['hooked_over_plain_step_time']:.3f}")


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preview-every", type=int, default=1)
    ap.add_argument("--frame-interval", type=float, default=0.0,
                    help="DDPM_WEBHOOK_FRAME_INTERVAL_SECONDS (0: every frame delivered; serving default 1)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after the warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    ap.add_argument("--device", default="cpu")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_webhooks", args, args.device, argv)
    env = {"DDPM_WEBHOOK_SECRET": new_secret(), "DDPM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
           "DDPM_WEBHOOK_FRAME_INTERVAL_SECONDS": str(args.frame_interval), "DDPM_MAX_BATCH_SIZE": str(args.jobs)}
    receiver_port = free_port()
    hook = f"http://127.0.0.1:{receiver_port}/hook"
    receiver = start_receiver(receiver_port)
    try:
        with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
            checkpoint = args.checkpoint or demo_or_random_checkpoint(Path(tmp))
            with Up(checkpoint, Path(tmp), model=MODEL, device=args.device, threads=args.threads, env=env,
                    worker_metrics=True) as up:
                store = JobStore(connect(up.redis_url, timeout=5.0))
                outbox = Outbox(store.redis)
                check_batch_size(store, args.jobs)
                worker = up.worker_pid()
                pids = {"worker": worker} | ({"dispatcher": d} if (d := cli_child(worker, "webhooks")) else {})
                metrics = up.metrics_url
                assert metrics is not None  # worker_metrics=True
                runs = interleaved({"plain": lambda: run_batch(store, outbox, args, None, metrics, pids),
                                    "hooked": lambda: run_batch(store, outbox, args, hook, metrics, pids)},
                                   args.rounds, alternate=True)
    finally:
        receiver.terminate()
        receiver.join(10)
    report = {"device": args.device, "checkpoint": checkpoint.name, "jobs": args.jobs, "steps": args.steps,
              "preview_every": args.preview_every, "frame_interval_s": args.frame_interval, "threads": args.threads,
              **summary(runs)}
    out = run.write(report)
    print_report(report, args)
    print(f"\nraw: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
