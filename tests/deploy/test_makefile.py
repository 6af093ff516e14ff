"""The Makefile's torch choice, run for real (`make torch-choice`) with a stand-in `nvidia-smi` first on PATH: a
machine with an NVIDIA GPU gets the CUDA build, one without (or with a driver that does not answer) the CPU build,
the choice is printed and can be overridden, and the CUDA build is the one docker/Dockerfile's CUDA base holds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy import files

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")

SMI = {
    "gpu": 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d1c2a10-0000-0000-0000-000000000000)"',
    "no-driver": 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2; exit 9',
    "no-gpu": 'echo "No devices were found"; exit 6',
}


def choice(tmp_path: Path, smi: str, **variables: str) -> str:
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{SMI[smi]}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    env["PATH"] = f"{tmp_path}:{env.get('PATH', '/usr/bin:/bin')}"
    argv = [str(MAKE), "-s", "--no-print-directory", "torch-choice", *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(argv, cwd=files.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _version() -> str:
    match = re.search(r"^TORCH_VERSION := (\S+)$", (files.ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile has no TORCH_VERSION"
    return match.group(1)


def test_a_machine_without_an_nvidia_gpu_installs_the_cpu_build(tmp_path: Path) -> None:
    for smi in ("no-driver", "no-gpu"):
        line = choice(tmp_path, smi)
        assert f"torch=={_version()}+cpu" in line and "CPU build" in line, line
        assert "cu1" not in line
        assert f"pip install torch=={_version()}+cpu ||" in line, "a local CPU wheel first (no download)"
        assert "download.pytorch.org/whl/cpu" in line


def test_a_machine_with_one_installs_the_cuda_build_the_image_uses(tmp_path: Path) -> None:
    line = choice(tmp_path, "gpu")
    cuda = re.search(r"torch==[\d.]+\+cu(\d+)(\d) --extra-index-url https://download.pytorch.org/whl/cu\1\2", line)
    assert cuda and "CUDA build" in line, line
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\S+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime$",
                     files.DOCKERFILE.read_text(), re.M)
    assert base, "docker/Dockerfile's default base is PyTorch's CUDA runtime image"
    assert base.group(1) == _version(), "the CUDA image holds the torch the Makefile installs"
    assert (base.group(2), base.group(3)) == (cuda.group(1), cuda.group(2)), "one CUDA version for both"
    # PyTorch 2.13 ships CUDA 12.6 and 13.0 builds (13.2 experimental); 12.8 stopped with 2.11 (README, "Which torch").
    assert f"{base.group(2)}.{base.group(3)}" in {"12.6", "13.0"}


def test_the_choice_can_be_forced_either_way(tmp_path: Path) -> None:
    assert "+cpu" in choice(tmp_path, "gpu", TORCH_DEVICE="cpu")
    assert "+cu" in choice(tmp_path, "no-gpu", TORCH_DEVICE="cuda")
    assert choice(tmp_path, "gpu", TORCH_SPEC="torch==2.9.1") == "torch: TORCH_SPEC given: pip install torch==2.9.1"
