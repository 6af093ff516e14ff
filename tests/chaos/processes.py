"""What the chaos tests start: a long-running test checkpoint and ``ddpm up`` as a terminal runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import DiffusionConfig
from model.unet import UNet
from tests.tiny_model import TINY_UNET

ROOT = Path(__file__).resolve().parents[2]


def write_long_checkpoint(path: Path) -> Path:
    """The tests' tiny 8x8 U-Net (random weights) with T=1000, so a job can run long enough to be caught
    mid-way (about 2-4 s for 16 images and 1000 steps on one CPU thread)."""
    gen = torch.Generator().manual_seed(7)
    unet = UNet(TINY_UNET)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_checkpoint(path, unet, TINY_UNET, DiffusionConfig(num_timesteps=1000), dataset="random", step=0, ema=True)
    return path


class Up:
    """``ddpm up`` in a session of its own (as a terminal runs a foreground job: the test is not in its process
    group, so ``interrupt()`` is exactly a terminal's Ctrl-C). Its stderr is collected as it comes."""

    def __init__(self, *args: str, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", *args], cwd=ROOT, env=env,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._collect, daemon=True).start()
        self.ready_line = ""

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("DDPM service ready"):
                self.ready_line = line
                return line
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"ddpm up exited {self.proc.returncode}:\n{self.log[-4000:]}")
        raise AssertionError(f"ddpm up never said it was ready:\n{self.log[-4000:]}")

    def ready_field(self, pattern: str) -> str:
        found = re.search(pattern, self.ready_line)
        assert found, (pattern, self.ready_line)
        return found.group(1)

    def children(self) -> dict[str, int]:
        """``{"worker": pid, "api": pid, "redis": pid}`` of the live children."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            rest = stat.rsplit(")", 1)[1].split()
            if int(rest[1]) != self.proc.pid or rest[0] == "Z":
                continue
            name = "redis" if "redis-server" in cmd else "worker" if " worker " in cmd else "api"
            out[name] = int(entry.name)
        return out

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
        os.killpg(os.getpgid(self.proc.pid), signal.SIGINT)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
