"""Request and response models of the HTTP API (pydantic v2).

The job-creating requests (``GenerateRequest``, ``InterpolateRequest``, ``LikelihoodRequest``) check types and
model-independent bounds (unknown fields are refused); ``service.resolve`` applies the bounds that depend on
settings and on the chosen model (its T) and fills every default. A bound that fails there raises
``RequestInvalid`` naming the field and the allowed range or values. This module knows no HTTP and no Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from model.config import SamplerName, VarianceType

__all__ = [
    "INPUT_TAGS",
    "JOB_KINDS",
    "MAX_SEED",
    "ErrorBody",
    "ErrorDetail",
    "FrameView",
    "GenerateAccepted",
    "GenerateRequest",
    "ImageRef",
    "ImageView",
    "InputImage",
    "InterpolateRequest",
    "JobKind",
    "JobRequest",
    "JobStatus",
    "JobView",
    "LikelihoodRequest",
    "LikelihoodResult",
    "Limits",
    "ModelInfo",
    "ModelsView",
    "Progress",
    "RatePoint",
    "ReadyView",
    "RequestInvalid",
    "WebhookDeliveryView",
    "WebhookView",
]

MAX_SEED = 2**31 - 1
Sampler = SamplerName
Variance = VarianceType
# A job's state as the API shows it: the values of service.queue.JobState, written out because this module must
# not import the Redis side (tests/service/test_schemas.py holds the two equal).
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
JobKind = Literal["generate", "interpolate", "likelihood"]  # the route that made the job
JOB_KINDS: tuple[str, ...] = get_args(JobKind)
WebhookEvent = Literal["start", "frame", "completed"]  # service.webhooks.outbox.EVENTS


class RequestInvalid(ValueError):
    """A request field outside its allowed range or values (the API answers 422)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# ---- requests ----------------------------------------------------------------------------------------------
class ImageRef(BaseModel):
    """A finished job's final image as an input: image ``index`` of job ``job`` (the caller must be allowed to
    see that job)."""

    model_config = ConfigDict(extra="forbid")

    job: str = Field(max_length=64, description="the id of a succeeded job")
    index: int = Field(ge=0, description="which of its images (0-based)")

    @field_validator("index", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        return _no_bool(value)


def _input_kind(value: object) -> str | None:
    if isinstance(value, str):
        return "picture"
    return "reference" if isinstance(value, dict | ImageRef) else None


INPUT_TAGS = ("picture", "reference")  # the members of InputImage: validation errors name the field without them
InputImage = Annotated[
    Annotated[str, Tag("picture")] | Annotated[ImageRef, Tag("reference")],
    Discriminator(_input_kind, custom_error_type="input_image", custom_error_message=(
        'must be a base64 PNG or JPEG (a string) or a reference {"job": "<id>", "index": i}')),
    Field(description="a picture: base64 PNG or JPEG (or a data: URL of one, e.g. data:image/png;base64,...), or "
                      'a finished job\'s image {"job": "<id>", "index": i}. Fitted to the model: converted to L or '
                      "RGB, the shorter side resized to the model's size (bicubic), the longer centre-cropped"),
]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description=f"0..{MAX_SEED}; random when omitted. Image i "
                                                                  "of seed s is the same whatever the batch")]
Steps = Annotated[int | None, Field(ge=1, description="denoising steps, 1..min(DDPM_MAX_STEPS, the model's T); "
                                                      "fewer than T respaces the schedule; default T")]
Eta = Annotated[float, Field(ge=0.0, le=1.0, description="DDIM noise scale, 0..1 (ignored by ddpm)")]
SamplerOption = Annotated[Sampler, Field(description="ddpm (ancestral) or ddim")]
VarianceOption = Annotated[Variance | None, Field(description="reverse variance for ddpm; default: the model's")]
PreviewEvery = Annotated[int | None, Field(ge=1, description="an x0-hat frame every this many steps (1..steps); "
                                                             "default about 20 frames per job")]
ModelName = Annotated[str | None, Field(description="a name from GET /models; default: the first served model")]
WebhookUrl = Annotated[str | None, Field(max_length=2048, description=(
    "an http(s) URL that receives the job record (as GET /jobs/{id} returns it) on the events of "
    "webhook_events_filter, signed per Standard Webhooks; loopback, private and link-local addresses are refused "
    "unless the server allows them"))]
WebhookEvents = Annotated[list[WebhookEvent] | None, Field(min_length=1, max_length=3, description=(
    "which events are delivered: start (a worker started the job), frame (a new x0-hat frame; throttled), "
    "completed (succeeded, failed or canceled; images readable); default start and completed"))]


def _no_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic would read true/false as 1/0
        raise ValueError("must be a number, not true or false")
    return value


class GenerateRequest(BaseModel):
    """``POST /generate``: samples, or (with ``init_image``) reconstructions and variations of a picture.
    Omitted options get defaults (see ``service.resolve``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"num_images": 4, "seed": 42}]})

    num_images: int = Field(1, ge=1, description="images to generate (1..DDPM_MAX_NUM_IMAGES)")
    seed: Seed = None
    steps: Steps = None
    sampler: SamplerOption = "ddpm"
    eta: Eta = 0.0
    variance: VarianceOption = None
    preview_every: PreviewEvery = None
    model: ModelName = None
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None
    init_image: InputImage | None = Field(None, description=(
        "reconstruct or vary this picture: x_t is drawn from q(x_t | x_0) at start_t with the job's seed, then "
        "the reverse chain runs from start_t to 0 (small start_t gives the picture back, T ignores it). Without "
        "it the job samples from noise"))
    start_t: int | None = Field(None, ge=1, description="with init_image: the timestep to start from, 1..T "
                                                        "(default T/2); steps then counts from start_t down "
                                                        "(default start_t)")
    shared_latent: bool = Field(False, description="with init_image: every image decodes the same x_t (the "
                                                   "paper's Fig. 7); default each image encodes with its own "
                                                   "noise")

    @field_validator("num_images", "seed", "steps", "eta", "preview_every", "start_t", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        return _no_bool(value)


class InterpolateRequest(BaseModel):
    """``POST /interpolate``: encode two pictures at t, decode (1 - lambda) x_t + lambda x'_t for each lambda."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": [{"job": "<id>", "index": 0}, {"job": "<id>", "index": 1}], "t": 500, "seed": 1}]})

    images: list[InputImage] = Field(min_length=2, max_length=2, description="the two pictures A and B")
    seed: Seed = None
    t: int | None = Field(None, ge=1, description="the timestep both are encoded at, 1..T (default T/2: 500 of "
                                                  "1000)")
    lambdas: list[float] | None = Field(None, min_length=1, max_length=1024, description=(
        "mixing weights in [0, 1], one output image each, in this order (default 0, 0.1, ..., 1; at most "
        "DDPM_MAX_NUM_IMAGES); 0 is the reconstruction of A, 1 that of B from the same noise"))
    steps: int | None = Field(None, ge=1, description="reverse steps from t down (1..min(DDPM_MAX_STEPS, t), "
                                                      "default t)")
    sampler: SamplerOption = "ddpm"
    eta: Eta = 0.0
    variance: VarianceOption = None
    preview_every: PreviewEvery = None
    model: ModelName = None
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None

    @field_validator("seed", "t", "steps", "eta", "preview_every", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        return _no_bool(value)

    @field_validator("lambdas", mode="before")
    @classmethod
    def _lambdas_not_booleans(cls, value: object) -> object:
        if isinstance(value, list):
            for item in value:
                _no_bool(item)
        return value


class LikelihoodRequest(BaseModel):
    """``POST /likelihood``: the variational bound of each picture in bits/dim, every term, and its
    rate-distortion curve; T network calls per picture."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": ["<base64 PNG>"],
                                                                                 "seed": 0}]})

    images: list[InputImage] = Field(min_length=1, max_length=1024, description=(
        "the pictures to measure (1..DDPM_MAX_NUM_IMAGES, and pictures x T <= DDPM_MAX_IMAGE_STEPS)"))
    seed: Seed = None
    variance: Variance | None = Field(None, description="p's reverse variance in the bound; default: the model's")
    rd_points: int | None = Field(None, ge=1, le=100, description="timesteps of the rate-distortion curve, "
                                                                  "spread evenly over 1..T with 1 and T (1..min(100, "
                                                                  "T); default min(20, T))")
    preview_every: PreviewEvery = None
    model: ModelName = None
    webhook: WebhookUrl = None
    webhook_events_filter: WebhookEvents = None

    @field_validator("seed", "rd_points", "preview_every", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        return _no_bool(value)


JobRequest = GenerateRequest | InterpolateRequest | LikelihoodRequest


@dataclass(frozen=True)
class Limits:
    """The bounds a request is checked against (from settings)."""

    max_num_images: int
    max_steps: int
    max_image_steps: int
    max_frames: int
    max_input_pixels: int

    def ranges(self) -> dict[str, tuple[float, float | str]]:
        """Each bounded field's allowed (min, max), for messages and the OpenAPI schema."""
        steps_max = f"min({self.max_steps}, the model's T; see GET /models)"
        return {"num_images": (1, self.max_num_images), "seed": (0, MAX_SEED), "steps": (1, steps_max),
                "eta": (0, 1), "preview_every": (1, "steps"), "start_t": (1, "the model's T"),
                "t": (1, "the model's T"), "rd_points": (1, 100)}


# ---- responses ---------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. invalid_request, not_found, queue_full")
    message: str = Field(description="what went wrong and what to do, for a person")


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


class GenerateAccepted(BaseModel):
    """What every job-creating route answers (202, or 200 for an Idempotency-Key replay)."""

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
    seed: int = Field(description="the request seed; image `index` of this seed is reproducible (for an "
                                  "interpolation, image `index` is the interpolant of lambdas[index])")
    url: str
    data: str | None = Field(None, description="base64 PNG, only with ?inline=1")


class WebhookDeliveryView(BaseModel):
    id: str = Field(description="the webhook-id header: the same for every attempt, so receivers de-duplicate")
    event: WebhookEvent
    status: Literal["pending", "delivered", "failed"] = Field(description="pending: waiting for an attempt or "
                                                                          "being retried; failed: given up")
    attempts: int
    last_error: str | None = Field(description="what went wrong in the last failed attempt")
    response_status: int | None = Field(description="the HTTP status of the last response, if any")


class WebhookView(BaseModel):
    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDeliveryView] = Field(description="in the order they were created")


class RatePoint(BaseModel):
    """One timestep of the rate-distortion curve, for each picture of the job (in the request's order)."""

    t: int = Field(description="the paper's timestep, 1..T: a receiver holding x_t")
    rate_bits_per_dim: list[float] = Field(description="L_T + ... + L_t: the bits/dim received once x_t is")
    distortion_rmse: list[float] = Field(description="RMSE(x_0, x0-hat(x_t)) on the [0, 255] scale")


class LikelihoodResult(BaseModel):
    """A likelihood job's measurement (docs/OPERATIONS.md: the bound, rate and distortion)."""

    bits_per_dim: list[float] = Field(description="the variational bound of each picture (Eq. 5), bits/dim: its "
                                                  "lossless code length")
    terms: list[list[float]] = Field(description="per picture, T + 1 values: terms[i][s] = L_s in bits/dim, "
                                                 "s = 0 (the discretized decoder -log p(x_0 | x_1)) .. T (the prior "
                                                 "KL(q(x_T | x_0) || N(0, I))); they sum to bits_per_dim[i]")
    rate_distortion: list[RatePoint] = Field(description="rd_points timesteps, ascending")
    num_timesteps: int = Field(description="the model's T")
    clip_denoised: bool = Field(description="whether p's mean used the clipped x0-hat (the official evaluation's "
                                            "choice for the paper's models)")
    precision: Literal["fp32", "bf16"] = Field(description="the U-Net precision of the worker that measured it")


class JobView(BaseModel):
    id: str
    kind: JobKind = Field("generate", description="the route that made the job: generate (with or without "
                                                  "init_image), interpolate or likelihood")
    status: JobStatus
    model: str | None
    request: dict[str, Any] | None
    progress: Progress
    queue_position: int | None = Field(description="1 = the next job a worker takes; null unless queued")
    frames: list[FrameView]
    images: list[ImageView] = Field(description="final images, only once succeeded (none for likelihood jobs)")
    result: LikelihoodResult | None = Field(None, description="a succeeded likelihood job's measurement; null "
                                                              "otherwise")
    error: ErrorDetail | None
    cancel_requested: bool = False
    attempt: int = Field(0, description="times a worker started this job; above 1 it was retried after its "
                                        "worker stopped or died")
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    webhook: WebhookView | None = Field(None, description="the job's webhook and what happened to each delivery; "
                                                          "null without one")


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
