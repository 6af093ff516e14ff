"""Request and response models of the HTTP API (pydantic v2), and the resolution of a request's defaults.

``GenerateRequest`` checks types and model-independent bounds (unknown fields are refused); ``resolve_request``
applies the bounds that depend on settings and on the chosen model (its T) and fills every default, giving the
``ResolvedRequest`` the API stores with the job and the worker runs. A bound that fails raises
``RequestInvalid`` naming the field and the allowed range or values. This module knows no HTTP and no Redis.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_SEED",
    "ErrorBody",
    "ErrorDetail",
    "FrameView",
    "GenerateAccepted",
    "GenerateRequest",
    "ImageView",
    "JobView",
    "Limits",
    "ModelInfo",
    "ModelsView",
    "Progress",
    "ReadyView",
    "RequestInvalid",
    "ResolvedRequest",
    "frame_count",
    "resolve_request",
]

MAX_SEED = 2**31 - 1
Sampler = Literal["ddpm", "ddim"]
Variance = Literal["fixedlarge", "fixedsmall"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class RequestInvalid(ValueError):
    """A request field outside its allowed range or values (the API answers 422)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# ---- requests ----------------------------------------------------------------------------------------------
class GenerateRequest(BaseModel):
    """``POST /generate``. Omitted options get defaults (see ``resolve_request``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"num_images": 4, "seed": 42}]})

    num_images: int = Field(1, ge=1, description="images to generate (1..DDPM_MAX_NUM_IMAGES)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"0..{MAX_SEED}; random when omitted. Image i "
                                                                   "of seed s is the same whatever num_images is")
    steps: int | None = Field(None, ge=1, description="denoising steps, 1..min(DDPM_MAX_STEPS, the model's T); "
                                                      "fewer than T respaces the schedule; default T")
    sampler: Sampler = Field("ddpm", description="ddpm (ancestral) or ddim")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM noise scale, 0..1 (ignored by ddpm)")
    variance: Variance | None = Field(None, description="reverse variance for ddpm; default: the model's")
    preview_every: int | None = Field(None, ge=1, description="an x0-hat frame every this many steps "
                                                              "(1..steps); default about 20 frames per job")
    model: str | None = Field(None, description="a name from GET /models; default: the first served model")

    @field_validator("num_images", "seed", "steps", "eta", "preview_every", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would read true/false as 1/0
            raise ValueError("must be a number, not true or false")
        return value


@dataclass(frozen=True)
class Limits:
    """The bounds a request is checked against (from settings)."""

    max_num_images: int
    max_steps: int
    max_image_steps: int
    max_frames: int = 100

    def ranges(self) -> dict[str, tuple[float, float | str]]:
        """Each bounded field's allowed (min, max), for messages and the OpenAPI schema."""
        steps_max = f"min({self.max_steps}, the model's T; see GET /models)"
        return {"num_images": (1, self.max_num_images), "seed": (0, MAX_SEED), "steps": (1, steps_max),
                "eta": (0, 1), "preview_every": (1, "steps")}


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in: what the job record stores and the worker runs."""

    num_images: int
    seed: int
    steps: int
    sampler: str
    eta: float
    variance: str
    preview_every: int
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bounded(field: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise RequestInvalid(field, f"must be between {lo} and {hi} (got {value})")


def frame_count(steps: int, preview_every: int) -> int:
    """Frames a job of ``steps`` steps makes with one every ``preview_every`` steps: steps 0, every, 2 every...
    and always the last one (the worker's rule)."""
    return math.ceil(steps / preview_every) + (0 if (steps - 1) % preview_every == 0 else 1)


def resolve_request(req: GenerateRequest, limits: Limits, models: dict[str, dict[str, Any]],
                    default_model: str) -> ResolvedRequest:
    """Check ``req`` against ``limits`` and the chosen model's metadata; fill defaults.

    ``models`` maps served model names to their checkpoint metadata (``diffusion_config.num_timesteps`` and
    ``diffusion_config.variance`` are used). Raises ``RequestInvalid``.
    """
    model = default_model if req.model is None else req.model  # "" is not a name: 422, as the spec says
    if model not in models:
        raise RequestInvalid("model", f"must be one of {sorted(models)} (got {model!r})")
    diffusion = models[model]["diffusion_config"]
    T = int(diffusion["num_timesteps"])
    _bounded("num_images", req.num_images, 1, limits.max_num_images)
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    _bounded("seed", seed, 0, MAX_SEED)
    max_steps = min(limits.max_steps, T)
    steps = T if req.steps is None else req.steps
    if req.steps is None and steps > max_steps:
        steps = max_steps  # the model's T exceeds the server's cap: the default follows the cap
    _bounded("steps", steps, 1, max_steps)
    if req.num_images * steps > limits.max_image_steps:
        raise RequestInvalid("num_images", f"num_images x steps must be at most {limits.max_image_steps} "
                                           f"(got {req.num_images} x {steps} = {req.num_images * steps})")
    if not 0.0 <= req.eta <= 1.0 or math.isnan(req.eta):
        raise RequestInvalid("eta", f"must be between 0 and 1 (got {req.eta})")
    preview_every = max(1, math.ceil(steps / 20)) if req.preview_every is None else req.preview_every
    _bounded("preview_every", preview_every, 1, steps)
    least = next((e for e in range(1, steps + 1) if frame_count(steps, e) <= limits.max_frames), steps)
    if req.preview_every is None:
        preview_every = max(preview_every, least)  # the default respects the frame bound too
    if preview_every < least:
        raise RequestInvalid("preview_every", f"at most {limits.max_frames} frames per job: with {steps} steps "
                                              f"preview_every must be at least {least} (got {preview_every})")
    return ResolvedRequest(num_images=req.num_images, seed=seed, steps=steps, sampler=req.sampler,
                           eta=float(req.eta), variance=req.variance or str(diffusion.get("variance", "fixedlarge")),
                           preview_every=preview_every, model=model)


# ---- responses ---------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, not_found, queue_full")
    message: str = Field(description="what went wrong and what to do, for a person")


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


class GenerateAccepted(BaseModel):
    id: str
    status: JobStatus
    status_url: str
    events_url: str


class Progress(BaseModel):
    step: int = Field(description="denoising steps done")
    total: int = Field(description="steps of the job")
    t: int | None = Field(description="the model timestep of the last step done; null before the first")


class FrameView(BaseModel):
    index: int
    step: int = Field(description="denoising steps done when this x0-hat was taken (1..total)")
    t: int = Field(description="the model timestep of that step")
    url: str
    data: str | None = Field(None, description="base64 PNG, only with ?inline=1")


class ImageView(BaseModel):
    index: int
    seed: int = Field(description="the request seed; image `index` of this seed is reproducible")
    url: str
    data: str | None = Field(None, description="base64 PNG, only with ?inline=1")


class JobView(BaseModel):
    id: str
    status: JobStatus
    model: str | None
    request: dict[str, Any] | None
    progress: Progress
    queue_position: int | None = Field(description="1 = the next job a worker takes; null unless queued")
    frames: list[FrameView]
    images: list[ImageView] = Field(description="final images, only once succeeded")
    error: ErrorDetail | None
    cancel_requested: bool = False
    attempt: int = Field(0, description="times a worker started this job; above 1 it was retried after its "
                                        "worker stopped or died")
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None


class ModelInfo(BaseModel):
    name: str
    default: bool
    available: bool = Field(description="false when the checkpoint file cannot be read by the API")
    workers: int | None = Field(None, description="live workers serving this model now (0: its jobs wait in the "
                                                  "queue until one starts); null when the job store is unreachable")
    image_size: int | None = None
    channels: int | None = None
    num_timesteps: int | None = None
    variance: str | None = None
    dataset: str | None = None
    metadata: dict[str, Any] | None = Field(None, description="the checkpoint's metadata")
    error: str | None = None


class ModelsView(BaseModel):
    default: str
    models: list[ModelInfo]


class ReadyView(BaseModel):
    """``/readyz`` (no key needed): ready when the job store answers; whether a worker serves the default model,
    and nothing more."""

    status: Literal["ready"]
    worker: Literal["serving", "none"] = Field(description="none: no live worker serves the default model; jobs "
                                                           "are accepted and wait in the queue")
    message: str
