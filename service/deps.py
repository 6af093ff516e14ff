"""The API's dependencies: what a route may take, typed, so mypy checks every use and tests can swap any of them
(``app.dependency_overrides[job_store] = ...``), as the FastAPI documentation's "Testing Dependencies" shows.

    AppSettings    the app's ``Settings`` (without the API keys and webhook secrets)
    Store          the job store of every route; EventStore: the one event streams read with
    Catalog        the served models (``service.catalog.ModelCatalog``); RequestLimits: the bounds of requests
    Keys           the API keys (digests); RefusedKeyCount: the count of wrong keys per client
    Webhooks       what webhooks may do (``service.webhooks.WebhookPolicy``)
    Streams        the event streams each client holds; StreamTiming: how streams wait; StreamThreads: their limiter
    Who            whom the request acts for (``service.auth.Caller``)

Each is read from the app's ``ApiState`` (``service.app_state``), the one object ``create_app`` keeps. Also here:
``require_key`` and ``rate_limit``, the checks every protected route runs first, and ``visible_job``, the one
owner rule of every job route (another key's job answers exactly as an unknown id: 404). This module defines no
routes.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.app_state import ApiState
from service.auth import NOBODY, OPEN, ApiKeys, Caller, RefusedKeys
from service.catalog import ModelCatalog
from service.queue import JobStore, StoreUnavailable, is_valid_job_id
from service.schemas import Limits
from service.settings import Settings
from service.sse import StreamOptions, StreamSlots
from service.web import ApiError, client_id
from service.webhooks import WebhookPolicy

__all__ = ["AppSettings", "Catalog", "EventStore", "Keys", "RefusedKeyCount", "RequestLimits", "State", "Store",
           "StreamThreads", "StreamTiming", "Streams", "Webhooks", "Who", "api_keys", "api_state", "app_settings",
           "caller", "event_store", "job_store", "model_catalog", "not_found", "rate_limit", "refused_keys",
           "request_limits", "require_key", "stream_limiter", "stream_options", "stream_slots", "visible_job",
           "webhook_policy"]


# ---- what the app holds ------------------------------------------------------------------------------------
# Plain accessors are ``async def``: FastAPI runs them on the event loop instead of sending each to a thread.
async def api_state(request: Request) -> ApiState:
    return ApiState.of(request.app.state)


State = Annotated[ApiState, Depends(api_state)]


async def app_settings(state: State) -> Settings:
    return state.settings


async def job_store(state: State) -> JobStore:
    return state.store


async def event_store(state: State) -> JobStore:
    return state.event_store


async def model_catalog(state: State) -> ModelCatalog:
    return state.catalog


async def request_limits(state: State) -> Limits:
    return state.limits


async def api_keys(state: State) -> ApiKeys:
    return state.keys


async def refused_keys(state: State) -> RefusedKeys:
    return state.refused_keys


async def webhook_policy(state: State) -> WebhookPolicy:
    return state.webhook_policy


async def stream_slots(state: State) -> StreamSlots:
    return state.streams


async def stream_options(state: State) -> StreamOptions:
    return state.stream_options


async def stream_limiter(state: State) -> anyio.CapacityLimiter:
    return state.stream_limiter


AppSettings = Annotated[Settings, Depends(app_settings)]
Store = Annotated[JobStore, Depends(job_store)]
EventStore = Annotated[JobStore, Depends(event_store)]
Catalog = Annotated[ModelCatalog, Depends(model_catalog)]
RequestLimits = Annotated[Limits, Depends(request_limits)]
Keys = Annotated[ApiKeys, Depends(api_keys)]
RefusedKeyCount = Annotated[RefusedKeys, Depends(refused_keys)]
Webhooks = Annotated[WebhookPolicy, Depends(webhook_policy)]
Streams = Annotated[StreamSlots, Depends(stream_slots)]
StreamTiming = Annotated[StreamOptions, Depends(stream_options)]
StreamThreads = Annotated[anyio.CapacityLimiter, Depends(stream_limiter)]


# ---- who is asking, and how often --------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (when DDPM_API_KEYS is set)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY (alternative)")


def require_key(request: Request, keys: Keys, refused: RefusedKeyCount, store: Store,
                bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                api_key: Annotated[str | None, Depends(_api_key)]) -> None:
    """When API keys are configured, the request needs one: 401 when none is given, 403 when it is wrong. An
    address with ``auth_failures_per_minute`` such answers in the current minute gets 429 ``rate_limited`` for
    every request until the minute ends, whatever key it sends (so guessing learns nothing meanwhile)."""
    if not keys.enabled:
        return
    blocked = refused.blocked_for(client_id(request))
    if blocked:
        raise ApiError(429, "rate_limited", "too many requests with a missing or wrong API key from this address; "
                                            f"retry in {blocked} s", headers={"Retry-After": str(blocked)})
    given = bearer.credentials if bearer is not None else api_key
    if not given:
        refused.refused(store, client_id(request))
        raise ApiError(401, "unauthorized", "an API key is needed: send 'Authorization: Bearer KEY' or "
                                            "'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
    who = keys.match(given)
    if who is None:
        refused.refused(store, client_id(request))
        raise ApiError(403, "forbidden", "the API key is not valid")
    request.state.caller = who
    request.state.client_id = "key-" + (who.key or "")[:16]  # names the key's digest, never the key


async def caller(request: Request, keys: Keys) -> Caller:
    """Whom the request acts for (set by ``require_key``): ``OPEN`` while keys are off; a route that skipped
    ``require_key`` while keys are on sees no job."""
    known = getattr(request.state, "caller", None)
    if isinstance(known, Caller):
        return known
    return OPEN if not keys.enabled else NOBODY


Who = Annotated[Caller, Depends(caller)]


def rate_limit(request: Request, settings: AppSettings, store: Store) -> None:
    """``settings.rate_limit_per_minute`` requests per client and minute, counted in Redis (shared by every
    API replica): 429 ``rate_limited`` with Retry-After beyond it. Fails open while Redis is unreachable (the
    routes that need Redis answer 503 on their own)."""
    limit = settings.rate_limit_per_minute
    if limit <= 0:
        return
    try:
        count, retry_after = store.count_request(client_id(request))
    except StoreUnavailable:
        return
    if count > limit:
        raise ApiError(429, "rate_limited", f"at most {limit} requests per minute per client; retry in "
                                            f"{retry_after} s", headers={"Retry-After": str(retry_after)})


# ---- the owner rule of job routes --------------------------------------------------------------------------
def not_found(job_id: str, ttl: int) -> ApiError:
    return ApiError(404, "not_found", f"no job {job_id}: the id is unknown or the job expired (jobs and their "
                                      f"frames and images are kept {ttl} s); expired jobs answer 404, not 410")


def visible_job(store: JobStore, job_id: str, who: Caller) -> dict[str, Any] | None:
    """The job record, if it exists and ``who`` may see it; else None (another key's job is indistinguishable
    from an unknown one). An id we could not have made never reaches Redis."""
    if not is_valid_job_id(job_id):
        return None
    job = store.get(job_id)
    if job is None or not who.may_see(job.get("owner")):
        return None
    return job
