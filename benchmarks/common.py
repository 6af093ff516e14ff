"""What every benchmark shares: the result file a run writes, side-by-side timing and its summary, a table printer.

The ratio convention (stated at the top of benchmarks/README.md): every ratio is a **cost ratio** of the same work
measured side by side, ``measured / reference`` in seconds (or bytes), so below 1 the measured side is faster
(smaller) and above 1 slower; a key names both sides (``ours_over_diffusers``, ``stack_over_direct``). The sides
run in interleaved rounds (``interleaved``), and a ratio is the median of the per-round ratios with their min and
max (``compare``). Throughputs (images/s, requests/s) are reported as measured, never turned into ratios.

A run's result file (``Run.write``): ``benchmarks/results/<script>-<device type>-<UTC end time>.json`` (``--out``,
else ``$OUT``, instead when given), holding the command line, start and end times, the machine and the git commit
beside the script's own figures, which stay at the top level (docs/figures/make_figures.py reads them there).

This module knows no benchmark's subject and imports no torch (the API benchmarks never load it): the models timing
runs use are in ``benchmarks.models``, the stack the service benchmarks run against in ``benchmarks.up``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["RESULTS", "ROOT", "Run", "add_out_argument", "compare", "cpu_model", "interleaved", "machine",
           "markdown_table", "set_threads", "spread", "sync", "timer"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
T = TypeVar("T")


# ---- the result file ----------------------------------------------------------------------------------------------
def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the JSON result file (default: $OUT if set, else benchmarks/results)")


class Run:
    """One benchmark run: its command line and start time, taken when it starts; its result file, at the end."""

    def __init__(self, script: str, args: argparse.Namespace, device: str = "cpu",
                 argv: Sequence[str] | None = None) -> None:
        self.script = script
        self.args = args
        self.device_type = str(device).split(":")[0]  # "cuda:1" -> "cuda", as in the file name
        self.command = shlex.join(["python", "-m", f"benchmarks.{script}",
                                   *(sys.argv[1:] if argv is None else argv)])
        self.started = datetime.now(UTC)
        self.load_at_start = _load_average()
        out = getattr(args, "out", None)
        self.out_dir = Path(out) if out else Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS

    def write(self, report: Mapping[str, Any]) -> Path:
        """Write ``report`` with the run's description; a second file in the same second gets ``-2``, never
        overwriting one. Returns the file's path."""
        finished = datetime.now(UTC)
        header = {"script": self.script, "command": self.command,
                  "args": vars(self.args),  # paths and other objects as strings (json's default=str)
                  "started_utc": self.started.isoformat(timespec="seconds"),
                  "finished_utc": finished.isoformat(timespec="seconds"),
                  "machine": machine(self.device_type) | {"load_average_at_start": self.load_at_start}}
        if clash := header.keys() & report.keys():
            raise ValueError(f"the report may not set {sorted(clash)}: Run.write sets them")
        text = json.dumps({**header, **report}, indent=2, default=str) + "\n"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.script}-{self.device_type}-{finished.strftime('%Y%m%dT%H%M%SZ')}"
        n = 1
        while True:
            path = self.out_dir / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
            try:
                with path.open("x") as f:
                    f.write(text)
                return path
            except FileExistsError:
                n += 1


def machine(device_type: str = "cpu") -> dict[str, Any]:
    """Where a run ran: platform, CPU, load, versions, torch threads (if torch is loaded), GPU name, git commit."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": cpu_model(), "cpus": os.cpu_count(), "load_average": _load_average()}
    for package in ("torch", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    torch = sys.modules.get("torch")  # never imported here: a benchmark that did not load torch stays without it
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if device_type == "cuda" and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name()
    info["git"] = _git_commit()
    return info


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# ---- timing -------------------------------------------------------------------------------------------------------
def set_threads(threads: int | None) -> None:
    """torch's intra-op threads, when given (0 or None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def sync(device: object) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)  # type: ignore[arg-type]


def timer(fn: Callable[[], object], device: object = "cpu") -> Callable[[], float]:
    """``fn`` made to return its wall time in seconds, timed between device syncs."""
    def timed() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    return timed


def interleaved(runs: Mapping[str, Callable[[], T]], repeats: int, *, warmup: int = 1,
                alternate: bool = False) -> dict[str, list[T]]:
    """Each run called in turn, ``repeats`` rounds after ``warmup`` rounds whose results are dropped, so a shared
    machine's drifting load falls on every side alike. ``alternate``: every other measured round runs the sides in
    reverse order, so none always goes first. Returns each run's results in round order."""
    results: dict[str, list[T]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        measured = i >= warmup
        order = list(runs)
        if alternate and measured and (i - warmup) % 2:
            order.reverse()
        for name in order:
            value = runs[name]()
            if measured:
                results[name].append(value)
    return results


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max."""
    v = list(values)
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def compare(measured: Sequence[float], reference: Sequence[float], name: str) -> dict[str, float]:
    """The cost ratio of two sides timed in the same rounds: ``{name}`` = the median of the per-round ratios
    measured / reference, ``{name}_min`` and ``{name}_max`` their range."""
    if len(measured) != len(reference) or not measured:
        raise ValueError(f"compare needs one value per round on each side, got {len(measured)} and {len(reference)}")
    ratios = spread(m / r for m, r in zip(measured, reference, strict=True))
    return {name: ratios["median"], f"{name}_min": ratios["min"], f"{name}_max": ratios["max"]}


# ---- report -------------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; floats with 3 significant digits, None as an empty cell, strings as they are."""
    def cell(v: object) -> str:
        return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
