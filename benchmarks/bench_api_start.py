"""The API process's footprint: cold start and resident memory of a real ``ddpm serve``.

Each repeat starts ``ddpm serve`` (its own process, on a private redis-server, serving the demo checkpoint or
``--checkpoint``), times spawn -> first ``GET /healthz`` 200 and spawn -> first ``GET /models`` 200 (the
checkpoint metadata read), sends a few requests (``/models``, ``/openapi.json``, ``POST /generate``,
``GET /jobs/{id}``, ``/metrics``), then reads the process's resident set (``VmRSS``) and its peak (``VmHWM``)
from ``/proc`` and stops it with SIGTERM. Reported: medians over ``--repeats``. With ``--with-torch`` a second
series runs the same server with PyTorch imported first (what the API cost while it imported torch), side by
side, and the ratios are reported.

    .venv/bin/python benchmarks/bench_api_start.py [--repeats 5] [--with-torch]

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.redis_server import RedisServer, free_port  # noqa: E402
from service.settings import DEMO_CHECKPOINT  # noqa: E402

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


def series(code: str, checkpoint: Path, redis_url: str, repeats: int) -> dict[str, Any]:
    runs = [one_run(code, checkpoint, redis_url) for _ in range(repeats)]
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]} | {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--with-torch", action="store_true", help="also time the server with torch imported first")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "repeats": args.repeats,
                              "python": sys.version.split()[0], "cpus": os.cpu_count(),
                              "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, RedisServer(data_dir=Path(tmp)) as redis:
        variants = {"serve": SERVE, **({"serve_with_torch": SERVE_WITH_TORCH} if args.with_torch else {})}
        for _ in range(1):  # one warm-up start: the first start also pays for cold file caches
            one_run(SERVE, args.checkpoint, redis.url)
        for name, code in variants.items():
            result[name] = series(code, args.checkpoint, redis.url, args.repeats)
    if args.with_torch:
        base, torch_ = result["serve"], result["serve_with_torch"]
        result["ratios_serve_over_with_torch"] = {k: round(base[k] / torch_[k], 3) for k in base if k != "runs"}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"bench_api_start-cpu-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("serve", "serve_with_torch")}
                     | {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                        for k, v in result.items() if k in ("serve", "serve_with_torch")}, indent=2))


if __name__ == "__main__":
    main()
