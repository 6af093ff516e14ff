"""The chaos suite: attacks and faults against the real stack (real redis-server, uvicorn, worker processes),
on loopback only, each recorded as one row of an *attack -> expected -> observed* table printed at the end.

``make test`` runs it at the ``ci`` scale (small, bounded load); ``make chaos`` at the ``full`` scale (the
loads the audit used: 50 concurrent clients, 5,500 hostile requests...). A test sizes its load with
``chaos.n(ci, full)`` and records what it saw with ``chaos.record(...)`` before asserting it, so the table
shows observed figures even for a failing row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# The real-process fixtures of tests/service (redis-server, the API under uvicorn, worker processes).
from tests.service.conftest import make_api, redis_server, redis_url, tiny_checkpoint, worker_process  # noqa: F401

_ROWS: list[tuple[str, str, str, str, bool]] = []  # (test, attack, expected, observed, ok)


@dataclass
class Chaos:
    scale: str
    test: str

    def n(self, ci: int, full: int) -> int:
        """A load size: ``ci`` in ``make test``, ``full`` in ``make chaos``."""
        return full if self.scale == "full" else ci

    def record(self, attack: str, expected: str, observed: str, ok: bool) -> None:
        _ROWS.append((self.test, attack, expected, observed, ok))


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Iterator[Chaos]:
    yield Chaos(request.config.getoption("--chaos-scale"), request.node.nodeid.split("::")[-1])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("chaos: attack -> expected -> observed")
    widths = [max(len(r[i]) for r in _ROWS) for i in (1, 2, 3)]
    widths = [min(w, 60) for w in widths]
    head = ("attack", "expected", "observed")
    tr.write_line("   " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for _test, attack, expected, observed, ok in _ROWS:
        cells = [attack, expected, observed]
        tr.write_line(("ok " if ok else "NO ") + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
