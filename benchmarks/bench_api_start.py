"""The API process's footprint: cold start and resident memory of a real ``ddpm serve``.

Each start runs ``ddpm serve`` (its own process, on a private redis-server, serving the demo checkpoint or
``--checkpoint``), times spawn -> first ``GET /healthz`` 200 and spawn -> first ``GET /models`` 200 (the
checkpoint metadata read), sends a few requests (``/models``, ``/openapi.json``, ``POST /generate``,
``GET /jobs/{id}``, ``/metrics``), then reads the process's resident set (``VmRSS``) and its peak (``VmHWM``)
from ``/proc`` and stops it with SIGTERM. Reported: medians over ``--repeats`` starts after a warm-up start. With
``--with-torch`` the same server also runs with PyTorch imported first (what the API cost while it imported torch),
the two alternating start by start, and the cost ratios ``serve_over_with_torch`` are reported (time and memory;
the median of the per-round ratios, with their range).

This measures the API process alone, so it starts ``ddpm serve`` itself rather than a whole stack.

    .venv/bin/python -m benchmarks.bench_api_start [--repeats 5] [--with-torch]

Output: one JSON object on stdout and in ``benchmarks/results/bench_api_start-cpu-<UTC time>.json``. Linux only
(``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, Run, add_out_argument, compare, interleaved
from service.redis_server import RedisServer, free_port
from service.settings import DEMO_CHECKPOINT

# `ddpm serve` exactly as the console script runs it; the torch variant imports torch first.
SERVE = "import sys; from service.cli import main; sys.exit(main())"
SERVE_WITH_TORCH = "import torch, sys; from service.cli import main; sys.exit(main())"


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _wait_200(client: httpx.Client, url: str, proc: subprocess.Popen[bytes], start: float) -> float:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ddpm serve exited with {proc.returncode}")
        try:
            if client.get(url).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        if time.perf_counter() - start > 120:
            raise TimeoutError(f"{url} not 200 after 120 s")
        time.sleep(0.01)


def one_run(code: str, checkpoint: Path, redis_url: str) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-c", code, "serve", "--port", str(port), "--redis-url", redis_url,
            "--checkpoint", f"bench={checkpoint}"]
    env = {**os.environ, "DDPM_LOG_LEVEL": "WARNING"}
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=10) as client:
            healthz_s = _wait_200(client, url + "/healthz", proc, start)
            models_s = _wait_200(client, url + "/models", proc, start)
            for path in ("/models", "/openapi.json", "/metrics"):
                client.get(url + path).raise_for_status()
            job = client.post(url + "/generate", json={"num_images": 1, "steps": 2}).raise_for_status().json()
            client.get(url + job["status_url"]).raise_for_status()
            rss, peak = _kib(proc.pid, "VmRSS"), _kib(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"healthz_s": healthz_s, "models_s": models_s, "rss_mib": rss / 1024, "peak_rss_mib": peak / 1024}


KEYS = ("healthz_s", "models_s", "rss_mib", "peak_rss_mib")  # what one_run measures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--repeats", type=int, default=5, help="measured starts of each variant")
    parser.add_argument("--with-torch", action="store_true", help="also time the server with torch imported first")
    add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_api_start", args, "cpu", argv)
    variants = {"serve": SERVE} | ({"serve_with_torch": SERVE_WITH_TORCH} if args.with_torch else {})

    def start(code: str, redis_url: str) -> Callable[[], dict[str, float]]:
        return lambda: one_run(code, args.checkpoint, redis_url)

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, RedisServer(data_dir=Path(tmp)) as redis:
        runs = interleaved({name: start(code, redis.url) for name, code in variants.items()}, args.repeats)

    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "repeats": args.repeats}
    for name, results in runs.items():
        report[name] = {k: round(statistics.median(r[k] for r in results), 3) for k in KEYS} | {"runs": results}
    if args.with_torch:
        report["serve_over_with_torch"] = {name: value for k in KEYS for name, value in compare(
            [r[k] for r in runs["serve"]], [r[k] for r in runs["serve_with_torch"]], k).items()}
    out = run.write(report)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict) else v
                      for k, v in report.items()}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
