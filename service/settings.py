"""Service configuration: the only place environment variables are read (pydantic-settings, prefix ``DDPM_``).

Every field is settable as ``DDPM_<FIELD>`` (e.g. ``DDPM_REDIS_URL``); the CLI flags of ``ddpm serve``,
``ddpm worker`` and ``ddpm up`` override them, each command naming its flags' fields in one table
(``settings_from_args(args, {flag: field})``). Use ``get_settings()`` (cached), never module-level reads.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEMO_CHECKPOINT", "MAKE_A_KEY", "LogLevel", "Settings", "check_api_keys", "describe_validation_error",
           "get_settings", "log_level", "parse_checkpoints", "settings_from_args"]

# The bundled demo model (trained by `ddpm train --preset digits`, see docs/TRAINING.md), served by default.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "digits.safetensors"


KEY_MIN_LENGTH = 16
MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Words of example values (the k8s Secret ships `REPLACE-ME-with-a-random-key`): a key holding one is no secret.
_PLACEHOLDER_WORDS = ("replace-me", "replace_me", "replaceme", "changeme", "change-me", "change_me", "placeholder",
                      "example", "your-key", "your_key", "yourkey", "your-api-key", "api-key-here")


def check_api_keys(keys: list[str], setting: str = "DDPM_API_KEYS") -> list[str]:
    """Refuse keys that are short, placeholders or plainly not random, saying how to make a good one. The
    message never contains the key."""
    for number, key in enumerate(keys, 1):
        if len(key) < KEY_MIN_LENGTH:
            problem = f"is {len(key)} characters long; at least {KEY_MIN_LENGTH} are needed"
        elif any(word in key.lower() for word in _PLACEHOLDER_WORDS):
            problem = "is a placeholder from an example, not a secret"
        elif len(set(key)) < 8:
            problem = "has fewer than 8 different characters: it is not a random key"
        elif any(c.isspace() or not c.isprintable() for c in key):
            problem = "contains spaces or control characters"
        else:
            continue
        raise ValueError(f"API key #{number} of {setting} {problem}. Make one with: {MAKE_A_KEY}")
    return keys


def describe_validation_error(exc: ValidationError) -> str:
    """``field: message; ...`` without the values given (pydantic's own text repeats them: API keys too)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                     for e in exc.errors(include_input=False, include_url=False))


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def parse_checkpoints(value: str | list[str] | dict[str, str]) -> dict[str, str]:
    """``"name=path,name2=path2"`` (or a list of ``name=path``) -> ordered dict; the first is the default."""
    if isinstance(value, dict):
        return dict(value)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"checkpoint {item!r} must look like NAME=FILE")
        name = name.strip()
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"checkpoint name {name!r} may hold only letters, digits, '-', '_' and '.'")
        if name in out:
            raise ValueError(f"checkpoint name {name!r} given twice")
        out[name] = path.strip()
    return out


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value is never echoed (API keys and webhook secrets are settings too)
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore", hide_input_in_errors=True)

    # Where things are
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoints: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"digits": str(DEMO_CHECKPOINT)},
        description="NAME=FILE[,NAME=FILE...]; the first is the default model",
    )
    queue_name: str = "ddpm"
    store_timeout_seconds: float = Field(1.0, gt=0, le=30, description="the API's Redis connect and command "
                                         "timeout; after one times out, calls fail fast (503) for as long")
    store_high_water: float = Field(0.8, gt=0, le=1, description="the API refuses new jobs (503 store_full) "
                                    "once Redis's used_memory reaches this fraction of its maxmemory, so running "
                                    "jobs can still write; 1 = only when Redis itself is full")

    # API process
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                     description="comma-separated; empty = no auth")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys that also see and cancel every key's jobs")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="addresses or CIDR networks of reverse proxies whose X-Forwarded-For "
                                          "names the client; empty (default): the header is ignored and the "
                                          "client is the connection's peer")
    header_timeout_seconds: float = Field(10.0, gt=0, le=600, description="a request's line and headers must "
                                                                          "arrive within this; else 408, closed")
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="a request's body must arrive within "
                                                                         "this once its headers did; else closed")

    # Worker process
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_metrics_port: int = Field(9100, ge=0, le=65535, description="0 disables the worker's metrics server")
    max_batch_size: int = Field(64, ge=1, le=4096, description="images per U-Net forward pass in the worker")
    # The worker's inference path (model.inference); unset: model.inference.default_options for the device.
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="U-Net precision in the worker; auto: "
                                                                          "bf16 autocast on CUDA and on CPUs with "
                                                                          "bf16 instructions, else fp32")
    channels_last: bool | None = Field(None, description="NHWC layout for the worker's U-Net; unset: on for CUDA")
    compile: bool | None = Field(None, description="torch.compile the worker's U-Net; unset: off")
    cuda_graphs: bool | None = Field(None, description="CUDA graphs per batch bucket in the worker; unset: off")

    # Limits on requests
    max_num_images: int = Field(16, ge=1, le=1024)
    max_steps: int = Field(1000, ge=1)
    max_image_steps: int = Field(16 * 1000, ge=1, description="num_images x steps per job")
    max_queue_length: int = Field(100, ge=1)
    max_body_bytes: int = Field(16 * 1024, ge=256, description="request bodies of every route but the three "
                                                              "below; 413 beyond")
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request bodies of POST /generate, "
                                  "/interpolate and /likelihood, which may carry base64 pictures; 413 beyond")
    max_input_pixels: int = Field(4096 * 4096, ge=64, le=89_478_485, description="pixels (width x height) of one "
                                  "input picture, read from its header before decoding; 413 image_too_large "
                                  "beyond (at most Pillow's own decompression-bomb bound)")
    max_frames_per_job: int = Field(100, ge=2, description="x0-hat preview frames one job may produce")
    max_sse_per_client: int = Field(8, ge=1, description="concurrent SSE streams per client (API key, else "
                                                         "address) in one API process; 429 beyond")
    rate_limit_per_minute: int = Field(0, ge=0, description="requests per minute per API key (per client address "
                                                            "when no keys are set), counted in Redis; 0 = off")
    auth_failures_per_minute: int = Field(30, ge=0, description="401/403 answers per client address and minute "
                                                                "before that address gets 429; 0 = off")

    # Lifetimes (seconds)
    job_ttl_seconds: int = Field(24 * 3600, ge=60, description="how long job records, frames and images live")
    job_timeout_seconds: int = Field(3600, ge=10, description="longest a job may run")
    worker_lease_seconds: int = Field(15, ge=3, le=600, description="a worker not heard from for this long is "
                                                                     "gone: its heartbeat's lifetime, its jobs' "
                                                                     "lease (then they are retried or failed) and "
                                                                     "the API's window for counting live workers; "
                                                                     "it beats every third of it")

    log_level: LogLevel = "INFO"

    # ---- webhooks (service/webhooks/) --------------------------------------------------------------------
    webhook_secret: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Standard Webhooks signing secrets (whsec_ + base64 of 24-64 random "
                                          "bytes), comma-separated; each delivery is signed with every one (list "
                                          "the new and the old while rotating); empty: webhooks are refused (422)")
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts or CIDRs a webhook may reach although they are loopback, private, "
                                          "link-local or metadata addresses; empty by default")
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120, description="one delivery attempt, from connecting "
                                                                           "to the response's status line")
    webhook_retry_window_seconds: float = Field(3600.0, ge=0, description="a delivery is retried for this long "
                                                                          "after its first attempt, then given up")
    webhook_backoff_seconds: float = Field(2.0, gt=0, description="delay before the first retry; doubled per "
                                                                  "attempt, with jitter")
    webhook_backoff_max_seconds: float = Field(600.0, gt=0, description="longest delay between two attempts "
                                                                        "(a longer Retry-After is honoured)")
    webhook_frame_interval_seconds: float = Field(1.0, ge=0, description="at most one `frame` delivery per job "
                                                                         "in this many seconds")
    webhook_concurrency: int = Field(8, ge=0, le=256, description="deliveries in flight per worker (and per "
                                                                  "`ddpm webhooks`); 0: this process delivers none")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _checkpoints(cls, v: object) -> dict[str, str]:
        parsed = parse_checkpoints(v)  # type: ignore[arg-type]
        if not parsed:
            raise ValueError("at least one checkpoint NAME=FILE is needed")
        return parsed

    @field_validator("api_keys", "admin_api_keys", "cors_origins", "trusted_proxies", "webhook_secret",
                     "webhook_allow_hosts", mode="before")
    @classmethod
    def _csv(cls, v: object) -> list[str]:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return list(v)  # type: ignore[call-overload]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {item!r} is not an IP address or CIDR network "
                                 "(e.g. 10.0.0.0/8)") from None
        return v

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secrets(cls, v: list[SecretStr]) -> list[SecretStr]:
        from service.webhooks.signing import secret_bytes

        for i, secret in enumerate(v):  # SecretStr: an error never shows the value
            secret_bytes(secret.get_secret_value(), f"DDPM_WEBHOOK_SECRET entry {i + 1}")
        return v

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _webhook_allow_hosts(cls, v: list[str]) -> list[str]:
        from service.webhooks.urls import AllowList

        AllowList.parse(v)
        return v

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _strong_keys(cls, v: list[str]) -> list[str]:
        return check_api_keys(v)

    @property
    def default_model(self) -> str:
        return next(iter(self.checkpoints))


class _LoggingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore")

    log_level: LogLevel = "INFO"


def log_level() -> LogLevel:
    """``DDPM_LOG_LEVEL`` alone: every ``ddpm`` subcommand sets up logging with it, including those that need no
    other setting (``ddpm train``), so a bad value elsewhere never stops them. Raises ``ValidationError``."""
    return _LoggingSettings().log_level


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_from_args(args: argparse.Namespace, flags: Mapping[str, str]) -> Settings:
    """Settings from the environment with the command-line flags that were given on top (flags win). ``flags``
    maps each flag's ``argparse`` destination to the field it sets (``{"metrics_port": "worker_metrics_port"}``);
    a flag left at ``None`` was not given. Values go through the fields' own validation (``--checkpoint`` given
    twice is a list of ``NAME=FILE``). Raises ``ValidationError``."""
    unknown = sorted(set(flags.values()) - set(Settings.model_fields))
    if unknown:  # a mistake in a command's table, not in what the user typed
        raise ValueError(f"flags name {unknown}, which are not settings")
    overrides = {field: value for flag, field in flags.items() if (value := getattr(args, flag, None)) is not None}
    return Settings(**overrides)
