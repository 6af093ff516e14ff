"""RQ's undocumented names that the worker drives (``service.rq_internals``) are all there, with the parameters we
pass: an RQ release that renames or reshapes one fails here, by name. (What they do: tests/service/test_queue.py.)"""

from __future__ import annotations

import pytest

from service import rq_internals


def test_the_installed_rq_has_every_name_the_worker_relies_on() -> None:
    assert rq_internals.missing() == []


def test_the_private_ones_are_among_them() -> None:
    paths = {f"{module}.{path}" for module, path, _params in rq_internals.USED}
    assert {"rq.worker.SimpleWorker._finalize_success", "rq.job.Job()._status"} <= paths


def test_a_renamed_or_reshaped_name_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rq_internals, "USED", (
        ("rq.worker", "SimpleWorker._finalise_success", ()),  # renamed
        ("rq.worker", "SimpleWorker.handle_job_failure", ("job", "queue", "exception_text")),  # a parameter renamed
        ("rq.job", "Job()._state", ()),  # an instance attribute gone
        ("rq.not_a_module", "Anything", ()),
    ))
    problems = rq_internals.missing()
    assert len(problems) == 4
    assert problems[0].startswith("rq.worker.SimpleWorker._finalise_success: not found")
    assert problems[1] == "rq.worker.SimpleWorker.handle_job_failure: no parameter exception_text"
    assert problems[2].startswith("rq.job.Job()._state: not found")
    assert problems[3].startswith("rq.not_a_module.Anything: not found")
