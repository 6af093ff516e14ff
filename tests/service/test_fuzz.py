"""A property-based fuzz of the API from its own OpenAPI spec (schemathesis 4 engine, the CLI's runner, called
from Python), against the real app served by uvicorn on a real redis-server.

Every operation gets its schema examples, schemathesis's coverage cases (edge values, missing and wrong-typed
fields, methods the spec does not list), random positive and negative cases, and stateful sequences along the
links it infers. Asserted: no server error (5xx) and no failed check (status codes, content types, headers and
bodies conform to the spec; schema-invalid requests get 4xx). The default budget fits CI (well under a minute);
``make fuzz`` runs ``--fuzz-examples=2000`` per operation.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from schemathesis.engine import Status, events, from_schema

from service.queue import JobStore, connect
from service.redis_server import RedisServer
from service.settings import Settings

from .conftest import ApiServer

log = logging.getLogger(__name__)
CI_EXAMPLES = 20  # per operation in the fuzzing phase


@pytest.fixture(scope="module")
def fuzzed_api(redis_server: RedisServer, tiny_checkpoint: Path) -> Iterator[ApiServer]:
    """The API on an emptied Redis, no worker (jobs stay queued), a queue long enough for the whole run."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    settings = Settings(redis_url=redis_server.url, checkpoints={"tiny": str(tiny_checkpoint)},
                        max_queue_length=1_000_000)
    api = ApiServer(settings, sse_block_ms=100, sse_keepalive_s=0.5).start()
    stop = threading.Event()
    beating = threading.Thread(target=_heartbeat, args=(redis_server.url, stop), daemon=True)
    beating.start()
    yield api
    stop.set()
    beating.join()
    api.stop()


def _heartbeat(url: str, stop: threading.Event) -> None:
    """A worker's heartbeat (no worker runs here): /readyz answers 200 rather than its documented 503."""
    store = JobStore(connect(url, timeout=5.0))
    while True:
        store.heartbeat("fuzz-worker", {"name": "fuzz-worker", "models": ["tiny"], "device": "cpu"})
        if stop.wait(3.0):
            break
    store.redis.close()


def _run(api: ApiServer, examples: int, seed: int | None) -> tuple[list[str], collections.Counter[tuple[str, int]]]:
    """Run every phase; the failed checks and errors (described) and the response status counts."""
    config = schemathesis.Config.from_dict({
        "base-url": api.url,
        "request-timeout": 5,
        "max-stream-events": 1,  # an event stream is read up to its first event (a queued job's stream goes on)
        "generation": {"max-examples": examples, "mode": "all", "database": "none"},
        "checks": {
            # Schema-valid is not always acceptable: steps <= the model's T, num_images x steps, frames per
            # job and preview_every <= steps are bounds across fields that JSON Schema cannot state (422s
            # naming the field, tested in test_api.py and test_security.py).
            "positive_data_acceptance": {"enabled": False},
            # DELETE /jobs/{id} cancels a job; its record stays readable (status canceled) until its TTL.
            "use_after_free": {"enabled": False},
        },
        **({"seed": seed} if seed is not None else {}),
    })
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
    problems: list[str] = []
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    for event in from_schema(schema).execute():
        recorder: Any = getattr(event, "recorder", None)
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished) and recorder is not None:
            for interaction in recorder.interactions.values():
                if interaction.response is not None:
                    request = interaction.request
                    statuses[(f"{request.method} {request.uri}", interaction.response.status_code)] += 1
            for checks in recorder.checks.values():
                problems += [f"{recorder.label}: {c.name}: {c.failure_info.failure.title}: "
                             f"{c.failure_info.failure.message[:300]}\n  {c.failure_info.code_sample}"
                             for c in checks if c.status == Status.FAILURE and c.failure_info is not None]
        elif isinstance(event, events.NonFatalError):
            problems.append(f"{event.label}: error: {event.value!r}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            problems += [f"after run: {f.title}: {f.message[:300]}" for f in event.failures]
    return problems, statuses


def test_the_api_survives_its_own_spec(fuzzed_api: ApiServer, request: pytest.FixtureRequest) -> None:
    longer = request.config.getoption("--fuzz-examples")
    problems, statuses = _run(fuzzed_api, longer or CI_EXAMPLES, None if longer else 20260401)
    assert sum(statuses.values()) > 100, statuses  # it did exercise the API
    by_status = collections.Counter(status for (_, status) in statuses.elements())
    log.info("%d requests, by status %s", sum(by_status.values()), dict(sorted(by_status.items())))
    assert not [s for s in by_status if s >= 500], [k for k in statuses if k[1] >= 500][:20]
    unique = sorted(set(problems))
    assert not unique, f"{len(unique)} problems; responses {dict(by_status)}:\n" + "\n".join(unique[:20])
