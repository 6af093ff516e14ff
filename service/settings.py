"""Service configuration: the only place environment variables are read (pydantic-settings, prefix ``DDPM_``).

Every field is settable as ``DDPM_<FIELD>`` (e.g. ``DDPM_REDIS_URL``); the CLI flags of ``ddpm serve``,
``ddpm worker`` and ``ddpm up`` override them. Use ``get_settings()`` (cached), never module-level reads.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEMO_CHECKPOINT", "LogLevel", "Settings", "get_settings", "log_level", "parse_checkpoints"]

# The bundled demo model (trained by `ddpm train --preset digits`, see README), served by default.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "digits.safetensors"


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
    model_config = SettingsConfigDict(env_prefix="DDPM_", extra="ignore")

    # Where things are
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoints: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"digits": str(DEMO_CHECKPOINT)},
        description="NAME=FILE[,NAME=FILE...]; the first is the default model",
    )
    queue_name: str = "ddpm"

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
    max_body_bytes: int = Field(16 * 1024, ge=256)
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

    log_level: LogLevel = "INFO"

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _checkpoints(cls, v: object) -> dict[str, str]:
        parsed = parse_checkpoints(v)  # type: ignore[arg-type]
        if not parsed:
            raise ValueError("at least one checkpoint NAME=FILE is needed")
        return parsed

    @field_validator("api_keys", "admin_api_keys", "cors_origins", "trusted_proxies", mode="before")
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
