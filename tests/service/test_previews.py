"""Work off the denoising thread: one job's tasks in order, jobs in parallel, a failing task contained."""

from __future__ import annotations

import io
import threading
import time

import torch
from PIL import Image

from service.previews import Lanes, encode_frame, encode_images


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


def test_frames_are_grids_and_final_images_one_png_each() -> None:
    x = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    assert Image.open(io.BytesIO(encode_frame(x))).size == (22, 22)  # 2x2 grid, 2-pixel padding
    assert Image.open(io.BytesIO(encode_frame(x[:1]))).size == (8, 8)
    pngs = encode_images(x)
    assert len(pngs) == 4 and all(Image.open(io.BytesIO(p)).size == (8, 8) for p in pngs)
