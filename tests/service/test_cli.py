"""`ddpm`'s own behaviour across subcommands: DDPM_LOG_LEVEL sets the logging of every one of them (the worker and
training included, as compose and the ConfigMap set it), checked on real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.service.conftest import WorkerProcess


def _train(tmp_path: Path, level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DDPM_LOG_LEVEL"} | {"OMP_NUM_THREADS": "1"}
    if level is not None:
        env["DDPM_LOG_LEVEL"] = level
    out = tmp_path / f"run-{level}"
    return subprocess.run([sys.executable, "-m", "service.cli", "train", "--preset", "tiny", "--steps", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)


def test_training_logs_at_the_level_ddpm_log_level_names(tmp_path: Path) -> None:
    default = _train(tmp_path, None)
    assert default.returncode == 0, default.stderr
    assert " INFO model.train: " in default.stderr  # the control: INFO lines exist by default
    quiet = _train(tmp_path, "WARNING")
    assert quiet.returncode == 0, quiet.stderr
    assert " INFO " not in quiet.stderr


def test_the_worker_logs_at_the_level_ddpm_log_level_names(
        worker_process: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPM_LOG_LEVEL", "DEBUG")
    verbose = worker_process()
    monkeypatch.setenv("DDPM_LOG_LEVEL", "WARNING")
    quiet = worker_process()
    verbose.stop()
    quiet.stop()
    verbose_log, quiet_log = verbose.log_path.read_text(), quiet.log_path.read_text()
    assert " DEBUG " in verbose_log and " INFO service.worker: worker " in verbose_log
    assert " INFO " not in quiet_log and " DEBUG " not in quiet_log


def test_a_bad_log_level_is_refused_with_the_variable_named() -> None:
    env = os.environ | {"DDPM_LOG_LEVEL": "LOUD"}
    result = subprocess.run([sys.executable, "-m", "service.cli", "train", "--print-config"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "DDPM_LOG_LEVEL" in result.stderr


@pytest.mark.parametrize("module", ["service.serve", "service.stack"])
def test_the_serve_flags_and_ddpm_up_come_without_the_web_stack(module: str) -> None:
    # `ddpm up` (service.stack) takes the flags it shares with `ddpm serve` from service.serve and runs the API as
    # a child process: importing either loads no web framework and no torch
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
