"""The preview-frame rule (model/progressive.py), the one the sampler, the engine and the API's frame budget use."""

from __future__ import annotations

import pytest

from model.progressive import frame_count, is_preview_step


def test_the_official_codes_schedule_is_twenty_frames_of_a_thousand_steps() -> None:
    shown = [i for i in range(1000) if is_preview_step(i, 1000, 50)]
    assert shown == [*range(0, 1000, 50), 999] and frame_count(1000, 50) == 21


@pytest.mark.parametrize("total", [1, 2, 7, 40, 99, 100])
def test_frames_are_every_nth_step_and_always_the_last(total: int) -> None:
    for every in range(1, total + 2):
        shown = [i for i in range(total) if is_preview_step(i, total, every)]
        assert shown == sorted({*range(0, total, every), total - 1})
        assert frame_count(total, every) == len(shown)
    assert [i for i in range(total) if is_preview_step(i, total, 0)] == [total - 1] and frame_count(total, 0) == 1
