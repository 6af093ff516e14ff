"""A job request resolved against the server's limits and the chosen model: every bound checked, every default
filled. What the API stores with the job (``Resolved.request``) is what the worker runs.

    resolve_generate      POST /generate: samples, or reconstructions / variations of ``init_image``
    resolve_interpolate   POST /interpolate
    resolve_likelihood    POST /likelihood

``models`` maps served model names to their checkpoint metadata (``diffusion_config.num_timesteps`` and
``diffusion_config.variance``, ``image_size``, ``channels``). A bound that fails raises ``RequestInvalid`` naming
the field and the allowed range. The input images are not decoded here (``service.inputs`` does that, in the
API's thread pool): ``Resolved.inputs`` lists them with their field names, and ``with_sources`` records where
each came from once fitted. Timesteps in requests are the paper's, 1..T. This module knows no HTTP, no Redis and
no torch (the API process never imports it).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from model.progressive import frame_count
from service.schemas import (
    MAX_SEED,
    GenerateRequest,
    ImageRef,
    InterpolateRequest,
    JobKind,
    LikelihoodRequest,
    Limits,
    RequestInvalid,
)

__all__ = ["DEFAULT_LAMBDAS", "DEFAULT_RD_POINTS", "Resolved", "resolve_generate",
           "resolve_interpolate", "resolve_likelihood"]

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(i / 10 for i in range(11))  # model.latents.DEFAULT_LAMBDAS (tested)
DEFAULT_RD_POINTS = 20
FRAMES_BY_DEFAULT = 20  # preview_every's default makes about this many frames


@dataclass(frozen=True)
class Resolved:
    """A resolved job request: its kind, model and seed, its rows (``num_images``: images made, or pictures
    measured), its steps (progress counts them), what the record stores, and the input images still to fit."""

    kind: JobKind
    model: str
    seed: int
    num_images: int
    total_steps: int
    request: dict[str, Any]
    inputs: tuple[tuple[str, str | ImageRef], ...] = field(default=())

    def with_sources(self, sources: Sequence[dict[str, Any]]) -> Resolved:
        """The request as stored, with where each input image came from (an upload's format, size and digest,
        or the job and index it references) in place of the image data."""
        request = dict(self.request)
        if self.kind == "generate":
            request["init_image"] = sources[0]
        else:
            request["images"] = list(sources)
        return replace(self, request=request)


def _bounded(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise RequestInvalid(name, f"must be between {lo} and {hi} (got {value})")


def _model(name: str | None, models: dict[str, dict[str, Any]], default_model: str) -> tuple[str, int, str]:
    """The chosen model's name, T and default variance."""
    model = default_model if name is None else name  # "" is not a name: 422, as the spec says
    if model not in models:
        raise RequestInvalid("model", f"must be one of {sorted(models)} (got {model!r})")
    diffusion = models[model]["diffusion_config"]
    return model, int(diffusion["num_timesteps"]), str(diffusion.get("variance", "fixedlarge"))


def _seed(seed: int | None) -> int:
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    _bounded("seed", seed, 0, MAX_SEED)
    return seed


def _steps(requested: int | None, top: int, limits: Limits, name: str = "steps") -> int:
    """Steps from timestep ``top`` down: default ``top`` (capped by the server), 1..min(max_steps, top)."""
    most = min(limits.max_steps, top)
    steps = min(top, most) if requested is None else requested  # the default follows the server's cap
    _bounded(name, steps, 1, most)
    return steps


def _timestep(requested: int | None, T: int, name: str) -> int:
    t = max(1, T // 2) if requested is None else requested
    _bounded(name, t, 1, T)
    return t


def _budget(rows: int, steps: int, limits: Limits, name: str, what: str) -> None:
    if rows * steps > limits.max_image_steps:
        raise RequestInvalid(name, f"{what} x steps must be at most {limits.max_image_steps} (got {rows} x {steps} "
                                   f"= {rows * steps})")


def _eta(eta: float) -> float:
    if not 0.0 <= eta <= 1.0 or math.isnan(eta):
        raise RequestInvalid("eta", f"must be between 0 and 1 (got {eta})")
    return float(eta)


def _preview_every(requested: int | None, steps: int, limits: Limits) -> int:
    """``requested`` checked (1..steps, at most ``limits.max_frames`` frames), or the default: about
    ``FRAMES_BY_DEFAULT`` frames, within the frame bound too."""
    every = max(1, math.ceil(steps / FRAMES_BY_DEFAULT)) if requested is None else requested
    _bounded("preview_every", every, 1, steps)
    least = next((e for e in range(1, steps + 1) if frame_count(steps, e) <= limits.max_frames), steps)
    if requested is None:
        return max(every, least)
    if every < least:
        raise RequestInvalid("preview_every", f"at most {limits.max_frames} frames per job: with {steps} steps "
                                              f"preview_every must be at least {least} (got {every})")
    return every


def _check_count(items: Sequence[object], limits: Limits, name: str) -> None:
    if len(items) > limits.max_num_images:
        raise RequestInvalid(name, f"at most {limits.max_num_images} (DDPM_MAX_NUM_IMAGES) items (got {len(items)})")


def resolve_generate(req: GenerateRequest, limits: Limits, models: dict[str, dict[str, Any]],
                     default_model: str) -> Resolved:
    """``POST /generate``: samples, or with ``init_image`` the reverse chain from ``start_t`` (default T/2)."""
    model, T, variance = _model(req.model, models, default_model)
    _bounded("num_images", req.num_images, 1, limits.max_num_images)
    seed = _seed(req.seed)
    request: dict[str, Any] = {}
    top = T
    if req.init_image is None:
        for name, given in (("start_t", req.start_t is not None), ("shared_latent", req.shared_latent)):
            if given:
                raise RequestInvalid(name, "only means something with init_image")
    else:
        top = _timestep(req.start_t, T, "start_t")
        request = {"start_t": top, "shared_latent": req.shared_latent}
    steps = _steps(req.steps, top, limits)
    _budget(req.num_images, steps, limits, "num_images", "num_images")
    request = {"num_images": req.num_images, "seed": seed, "steps": steps, "sampler": req.sampler,
               "eta": _eta(req.eta), "variance": req.variance or variance,
               "preview_every": _preview_every(req.preview_every, steps, limits), "model": model, **request}
    inputs = () if req.init_image is None else (("init_image", req.init_image),)
    return Resolved("generate", model, seed, req.num_images, steps, request, inputs)


def resolve_interpolate(req: InterpolateRequest, limits: Limits, models: dict[str, dict[str, Any]],
                        default_model: str) -> Resolved:
    """``POST /interpolate``: one output image per lambda, the reverse chain from ``t`` (default T/2)."""
    model, T, variance = _model(req.model, models, default_model)
    seed = _seed(req.seed)
    t = _timestep(req.t, T, "t")
    lambdas = list(DEFAULT_LAMBDAS if req.lambdas is None else req.lambdas)
    _check_count(lambdas, limits, "lambdas")
    for k, value in enumerate(lambdas):
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise RequestInvalid(f"lambdas[{k}]", f"must be between 0 and 1 (got {value}): extrapolated latents "
                                                  "leave the data's noise level")
    steps = _steps(req.steps, t, limits)
    _budget(len(lambdas), steps, limits, "lambdas", "len(lambdas)")
    request = {"num_images": len(lambdas), "seed": seed, "t": t, "lambdas": lambdas, "steps": steps,
               "sampler": req.sampler, "eta": _eta(req.eta), "variance": req.variance or variance,
               "preview_every": _preview_every(req.preview_every, steps, limits), "model": model}
    inputs = tuple((f"images[{i}]", item) for i, item in enumerate(req.images))
    return Resolved("interpolate", model, seed, len(lambdas), steps, request, inputs)


def resolve_likelihood(req: LikelihoodRequest, limits: Limits, models: dict[str, dict[str, Any]],
                       default_model: str) -> Resolved:
    """``POST /likelihood``: all T terms of the bound per picture (T steps, every picture in each)."""
    model, T, variance = _model(req.model, models, default_model)
    seed = _seed(req.seed)
    _check_count(req.images, limits, "images")
    if limits.max_steps < T:
        raise RequestInvalid("model", f"the bound takes all T = {T} steps of model {model!r}, above this server's "
                                      f"DDPM_MAX_STEPS = {limits.max_steps}")
    _budget(len(req.images), T, limits, "images", "len(images)")
    rd_points = min(DEFAULT_RD_POINTS, T) if req.rd_points is None else req.rd_points
    _bounded("rd_points", rd_points, 1, min(100, T))
    request = {"num_images": len(req.images), "seed": seed, "steps": T, "variance": req.variance or variance,
               "preview_every": _preview_every(req.preview_every, T, limits), "rd_points": rd_points,
               "model": model}
    inputs = tuple((f"images[{i}]", item) for i, item in enumerate(req.images))
    return Resolved("likelihood", model, seed, len(req.images), T, request, inputs)
