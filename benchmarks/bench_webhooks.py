"""Does webhook delivery slow the denoising loop? 16 concurrent jobs with and without ``frame`` webhooks, side by
side in one run.

A private redis-server, one real ``ddpm worker`` process (its dispatcher thread on, as in serving) and a receiver
process on 127.0.0.1 (allow-listed) answering 204. Each round queues ``--jobs`` single-image jobs at once, twice,
in alternating order: *plain* (no webhook) and *hooked* (``webhook_events_filter`` = start, frame, completed, a
frame every ``--preview-every`` steps and, by default, frames not throttled (``--frame-interval 0``), so the
dispatcher renders, signs and POSTs a delivery for every frame of every job while the loop runs). Reported:

- throughput: image-steps per second of the batch, from the job records (first start to last end);
- step time: the worker's mean ``ddpm_denoising_step_duration_seconds`` over the round (its own histogram);
- ``hooked / plain`` of both, per round, and their medians; deliveries made and failed; the CPU seconds the
  worker and its dispatcher process used in each run (from /proc).

Between runs the outbox drains, so no delivery of one run overlaps the next. Without ``--checkpoint`` it uses
the demo checkpoint if present, else a random-weight ``digits``-preset model (the same compute).

    .venv/bin/python benchmarks/bench_webhooks.py --jobs 16 --steps 40 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.queue import JobStore, connect, new_job_id  # noqa: E402
from service.redis_server import RedisServer, free_port  # noqa: E402
from service.settings import DEMO_CHECKPOINT  # noqa: E402
from service.webhooks.outbox import Outbox  # noqa: E402
from service.webhooks.signing import new_secret  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def run(store: JobStore, outbox: Outbox, args: argparse.Namespace, hook: str | None, metrics_url: str,
        pids: dict[str, int]) -> dict[str, Any]:
    before = step_seconds(metrics_url)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    request = {"num_images": 1, "steps": args.steps, "sampler": "ddpm", "eta": 0.0, "variance": "fixedlarge",
               "preview_every": args.preview_every, "model": "bench"}
    ids = []
    for i in range(args.jobs):
        job_id = new_job_id()
        if hook:
            outbox.subscribe(job_id, hook, ["start", "frame", "completed"], 3600, time.time())
        store.submit({**request, "seed": i}, "bench", num_images=1, total_steps=args.steps, seeds=[i],
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
    cpu = {f"{name}_cpu_s": round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
    jobs = [store.get(j) for j in ids]
    wall = max(j["ended_at"] for j in jobs) - min(j["started_at"] for j in jobs)  # type: ignore[index]
    views = [outbox.view(j) for j in ids] if hook else []
    statuses = [d["status"] for v in views if v for d in v["deliveries"]]
    return {"webhooks": bool(hook), "wall_s": round(wall, 3), "image_steps_per_s": args.jobs * args.steps / wall,
            "mean_step_ms": 1000 * (after[0] - before[0]) / max(after[1] - before[1], 1),
            "steps_timed": after[1] - before[1], "delivered": statuses.count("delivered"),
            "failed": statuses.count("failed"), **cpu}


def _open(outbox: Outbox, job_id: str) -> bool:
    view = outbox.view(job_id)
    return view is None or not any(d["event"] == "completed" for d in view["deliveries"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preview-every", type=int, default=1)
    ap.add_argument("--frame-interval", type=float, default=0.0,
                    help="DDPM_WEBHOOK_FRAME_INTERVAL_SECONDS (0: every frame delivered; serving default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)  # internal: run as the receiver process
    args = ap.parse_args()
    if args.receiver:
        receive(args.receiver)
        return 0
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        checkpoint = args.checkpoint or (DEMO_CHECKPOINT if DEMO_CHECKPOINT.exists() else _random(Path(tmp)))
        server = RedisServer(data_dir=Path(tmp) / "redis").start()
        receiver_port, metrics_port = free_port(), free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DDPM_WEBHOOK_SECRET": new_secret(),
               "DDPM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "DDPM_WEBHOOK_FRAME_INTERVAL_SECONDS": str(args.frame_interval)}
        procs = [subprocess.Popen([sys.executable, __file__, "--receiver", str(receiver_port)]),
                 subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--redis-url", server.url,
                                   f"--checkpoint=bench={checkpoint}", "--device", args.device, "--metrics-port",
                                   str(metrics_port), "--metrics-host", "127.0.0.1", "--max-batch-size",
                                   str(args.jobs)], cwd=ROOT, env=env)]
        try:
            store = JobStore(connect(server.url, timeout=5.0))
            outbox = Outbox(store.redis)
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            _wait_ready(store)
            worker = procs[1].pid
            pids = {"worker": worker}
            for pid in children(worker)[:1]:
                pids["dispatcher"] = pid
            hook = f"http://127.0.0.1:{receiver_port}/hook"
            run(store, outbox, args, None, metrics_url, pids)  # warm-up
            rounds = []
            for r in range(args.rounds):  # alternate which goes first: a drifting machine load hits both
                order = (None, hook) if r % 2 == 0 else (hook, None)
                got = {bool(h): run(store, outbox, args, h, metrics_url, pids) for h in order}
                rounds.append({"plain": got[False], "hooked": got[True],
                               "throughput_ratio": got[True]["image_steps_per_s"] / got[False]["image_steps_per_s"],
                               "step_time_ratio": got[True]["mean_step_ms"] / got[False]["mean_step_ms"]})
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            server.cleanup()
    report = {"script": "bench_webhooks", "device": args.device, "checkpoint": checkpoint.name, "jobs": args.jobs,
              "steps": args.steps, "preview_every": args.preview_every, "frame_interval_s": args.frame_interval,
              "threads": args.threads,
              "rounds": rounds, "load_average": os.getloadavg(),
              "median_throughput_ratio": statistics.median(r["throughput_ratio"] for r in rounds),
              "median_step_time_ratio": statistics.median(r["step_time_ratio"] for r in rounds)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_webhooks-{args.device}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.jobs} jobs x {args.steps} steps, a frame every {args.preview_every} step(s), frame deliveries at "
          f"most every {args.frame_interval:g} s per job, {args.rounds} rounds; "
          f"raw: {out.relative_to(ROOT)}\n")
    print("| round | plain img-steps/s | hooked img-steps/s | throughput hooked/plain | step ms plain | step ms "
          "hooked | step time hooked/plain | deliveries (failed) | dispatcher CPU s plain / hooked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        p, h = r["plain"], r["hooked"]
        print(f"| {i + 1} | {p['image_steps_per_s']:.1f} | {h['image_steps_per_s']:.1f} | {r['throughput_ratio']:.3f} "
              f"| {p['mean_step_ms']:.1f} | {h['mean_step_ms']:.1f} | {r['step_time_ratio']:.3f} "
              f"| {h['delivered']} ({h['failed']}) "
              f"| {p.get('dispatcher_cpu_s', '-')} / {h.get('dispatcher_cpu_s', '-')} |")
    print(f"\nmedian throughput hooked/plain {report['median_throughput_ratio']:.3f}, "
          f"median step time hooked/plain {report['median_step_time_ratio']:.3f}")
    return 0


def _wait_ready(store: JobStore, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not store.live_workers():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)


def _random(tmp: Path) -> Path:
    from model.checkpoint import save_checkpoint
    from model.config import MODEL_PRESETS
    from model.unet import UNet

    preset = MODEL_PRESETS["digits"]
    path = tmp / "digits-random.safetensors"
    save_checkpoint(path, UNet(preset.unet), preset.unet, preset.diffusion, dataset="random", step=0, ema=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
