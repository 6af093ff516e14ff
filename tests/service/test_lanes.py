"""Work off the denoising thread: one job's tasks in order, jobs in parallel, a failing task contained."""

from __future__ import annotations

import threading
import time

from service.lanes import Lanes


def test_a_jobs_tasks_run_in_submission_order_while_jobs_run_in_parallel() -> None:
    done: dict[str, list[int]] = {"a": [], "b": []}
    a_started = threading.Event()
    b_ran = threading.Event()

    def slow_a(i: int) -> None:
        a_started.set()
        b_ran.wait(5)  # "a" holds its lane until "b" has run on the other thread
        done["a"].append(i)

    lanes = Lanes(threads=2)
    lanes.submit("a", lambda: slow_a(0))
    for i in range(1, 20):
        lanes.submit("a", lambda i=i: done["a"].append(i))
    a_started.wait(5)
    lanes.submit("b", lambda: (done["b"].append(0), b_ran.set()))
    lanes.close()
    assert done == {"a": list(range(20)), "b": [0]}


def test_a_failing_task_is_reported_and_its_lane_goes_on() -> None:
    errors: list[BaseException] = []
    ran: list[str] = []
    lanes = Lanes(threads=1, on_error=errors.append)
    lanes.submit("job", lambda: 1 / 0)
    lanes.submit("job", lambda: ran.append("after"))
    assert lanes.drain("job", timeout=5)
    lanes.close()
    assert ran == ["after"] and isinstance(errors[0], ZeroDivisionError)


def test_drain_of_an_unknown_lane_returns_at_once() -> None:
    lanes = Lanes()
    start = time.monotonic()
    assert lanes.drain("nothing", timeout=5) and time.monotonic() - start < 1
    lanes.close()
