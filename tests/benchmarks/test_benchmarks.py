"""The benchmarks' shared plumbing (``benchmarks.common``, ``benchmarks.up``) and that every script still loads.

Timings are never asserted here: the figures live in benchmarks/README.md. What is held: every ``bench_*`` module
imports and parses its defaults; a run's result file is named and filled as the README says and never overwrites
another; interleaved rounds drop the warm-up and alternate the order; a ratio is measured / reference per round;
and one stack benchmark runs end to end at its smallest size against a real ``ddpm up``, leaving no process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.common import ROOT, Run, compare, interleaved, markdown_table
from benchmarks.models import random_checkpoint
from benchmarks.up import Up, child_pids

SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_there_are_benchmarks_to_check() -> None:
    assert len(SCRIPTS) >= 9


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_imports_and_parses_its_defaults(script: str) -> None:
    module = importlib.import_module(f"benchmarks.{script}")
    assert isinstance(module.parse_args([]), argparse.Namespace)
    assert callable(module.main)
    assert "sys.path" not in (ROOT / "benchmarks" / f"{script}.py").read_text()  # run as `python -m benchmarks.X`


def test_a_run_writes_its_result_file_with_the_run_described(tmp_path: Path) -> None:
    args = argparse.Namespace(out=tmp_path, steps=3, checkpoint=Path("/x/y.safetensors"))
    run = Run("bench_example", args, "cuda:1", argv=["--steps", "3", "--out", str(tmp_path)])
    first = run.write({"rows": [{"batch": 1, "ours_over_reference": 0.5}], "likelihood_over_forwards": 1.0})
    second = run.write({"rows": []})

    assert re.fullmatch(r"bench_example-cuda-\d{8}T\d{6}Z\.json", first.name)
    assert second != first and second.parent == tmp_path  # a second run in the same second gets its own file
    assert re.fullmatch(r"bench_example-cuda-\d{8}T\d{6}Z(-2)?\.json", second.name)
    data = json.loads(first.read_text())
    assert data["script"] == "bench_example"
    assert data["command"] == f"python -m benchmarks.bench_example --steps 3 --out {tmp_path}"
    assert data["args"] == {"out": str(tmp_path), "steps": 3, "checkpoint": "/x/y.safetensors"}
    assert data["started_utc"] <= data["finished_utc"]
    assert {"platform", "python", "cpu", "cpus", "load_average", "load_average_at_start", "git"} <= set(
        data["machine"])
    assert data["rows"] == [{"batch": 1, "ours_over_reference": 0.5}]  # the script's figures stay at the top level
    assert data["likelihood_over_forwards"] == 1.0
    with pytest.raises(ValueError, match="machine"):
        run.write({"machine": "mine"})


def test_a_run_without_out_writes_to_dollar_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    path = Run("bench_example", argparse.Namespace(out=None), "cpu", argv=[]).write({})
    assert path.parent == tmp_path / "device-out" and path.name.startswith("bench_example-cpu-")


def test_interleaved_rounds_drop_the_warm_up_and_can_alternate_the_order() -> None:
    calls: list[str] = []

    def side(name: str) -> Callable[[], int]:
        def call() -> int:
            calls.append(name)
            return len(calls)
        return call

    results = interleaved({"a": side("a"), "b": side("b")}, 3, warmup=1, alternate=True)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert results == {"a": [3, 6, 7], "b": [4, 5, 8]}
    calls.clear()
    assert interleaved({"a": side("a")}, 2, warmup=0) == {"a": [1, 2]}


def test_a_ratio_is_measured_over_reference_per_round() -> None:
    # per round: 2/1, 3/1, 1/2 -> median 2 (the ratio of the medians, 2/1, happens to agree here; 4/1 would not)
    assert compare([2.0, 3.0, 1.0], [1.0, 1.0, 2.0], "ours_over_ref") == {
        "ours_over_ref": 2.0, "ours_over_ref_min": 0.5, "ours_over_ref_max": 3.0}
    with pytest.raises(ValueError):
        compare([1.0], [1.0, 2.0], "x")


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, 0.123456], ["x", None]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | 0.123 |", "| x |  |"]


def test_bench_stack_runs_end_to_end_against_ddpm_up(tmp_path: Path) -> None:
    """The smallest bench_stack run: the launcher starts the real stack, the script measures, writes, stops it."""
    from benchmarks import bench_stack

    checkpoint = random_checkpoint(tmp_path / "tiny.safetensors", "tiny")
    before = set(child_pids(os.getpid()))
    assert bench_stack.main(["--checkpoint", str(checkpoint), "--steps", "2", "--num-images", "1", "--repeats", "1",
                             "--requests", "10", "--concurrency", "2", "--out", str(tmp_path)]) == 0

    (result,) = tmp_path.glob("bench_stack-cpu-*.json")
    data = json.loads(result.read_text())
    assert data["stack_over_direct"] > 0 and len(data["stack_s"]) == len(data["direct_s"]) == 1
    assert data["stack_phases"][0]["run_s"] > 0  # the job's own record, from the stack's Redis
    assert data["get_job_latency"]["requests"] == 10 and data["get_job_latency"]["errors"] == 0
    assert set(child_pids(os.getpid())) <= before  # ddpm up stopped (it stops its worker, API and Redis)


def test_a_stack_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    up = Up(tmp_path / "missing.safetensors", tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with status 2 before it was ready(.|\n)*missing\.safetensors"):
        up.start()
