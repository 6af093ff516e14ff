"""Progressive generation (Sec. 4.3, Fig. 6): which steps of a chain show their x0-hat as a preview frame.

The one rule, used by the sampler's plain loop, the service's engine and the API's frame budget: with one frame
every ``every`` steps, a chain of ``total`` steps shows x0-hat at its steps 0, every, 2 every, ... (0-based) and
always at its last step; ``every`` 0 (or None) shows the last step only. The official code records x0-hat every
50 of 1000 steps (20 frames). Pure Python: the API process uses it without torch.
"""

from __future__ import annotations

__all__ = ["frame_count", "is_preview_step"]


def is_preview_step(index: int, total: int, every: int | None) -> bool:
    """Whether step ``index`` (0-based) of a ``total``-step chain makes a frame with one every ``every`` steps."""
    return index == total - 1 or (bool(every) and index % every == 0)  # type: ignore[operator]


def frame_count(total: int, every: int | None) -> int:
    """How many frames a ``total``-step chain makes with one every ``every`` steps (``is_preview_step`` counted)."""
    if not every:
        return 1 if total > 0 else 0
    return -(-total // every) + (0 if (total - 1) % every == 0 else 1)
