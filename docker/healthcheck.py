"""The image's HEALTHCHECK: probe the /healthz of whichever ddpm process this container runs.

The same image runs the API (`ddpm serve`, /healthz on the API port), a worker (`ddpm worker`, /healthz on its
metrics port, 200 once the model is loaded) and training (`ddpm train`, no server: healthy while it runs). The
role and the port come from the container's command line (``/proc/1/cmdline``; under an init such as tini the
ddpm process is a child, so every process is looked at), then the DDPM_* environment, then the defaults of
service/settings.py. Standard library only: it must start fast and import nothing of the project.

Exit status 0 = healthy, 1 = unhealthy (Docker's HEALTHCHECK convention).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

API_PORT = 8000  # service.settings.Settings.port
WORKER_METRICS_PORT = 9100  # service.settings.Settings.worker_metrics_port
HEALTH_PATH = "/healthz"
TIMEOUT_SECONDS = 4.0

# subcommand -> (flag naming the port, env var naming it, default port)
_PROBED = {
    "serve": ("--port", "DDPM_PORT", API_PORT),
    "worker": ("--metrics-port", "DDPM_WORKER_METRICS_PORT", WORKER_METRICS_PORT),
}


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def probe_target(argv: Sequence[str], env: dict[str, str]) -> int | None:
    """The port whose /healthz tells this process's health, or None when there is nothing to probe."""
    command = next((a for a in argv if a in _PROBED), None)
    if command is None:
        return None
    flag, env_var, default = _PROBED[command]
    port = int(_flag_value(argv, flag) or env.get(env_var) or default)
    return port or None  # port 0 = the worker's metrics server is off


def ddpm_argv(proc: Path = Path("/proc")) -> list[str]:
    """The argv of the first process in this container that runs a probed ddpm subcommand (else [])."""
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            argv = (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        if any("ddpm" in a for a in argv[:3]) and any(a in _PROBED for a in argv):
            return argv
    return []


def is_healthy(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{HEALTH_PATH}", timeout=TIMEOUT_SECONDS) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    port = probe_target(ddpm_argv() if argv is None else argv, dict(os.environ))
    if port is None:
        return 0
    return 0 if is_healthy(port) else 1


if __name__ == "__main__":
    sys.exit(main())
