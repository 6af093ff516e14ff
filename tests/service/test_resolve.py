"""service.resolve at its own level, without HTTP: every default a request gets from the server's limits and the
chosen model (its T, its variance), and every bound that depends on them, each refusal naming its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from model.progressive import frame_count
from service.resolve import DEFAULT_LAMBDAS, resolve_generate, resolve_interpolate, resolve_likelihood
from service.schemas import (
    MAX_SEED,
    GenerateRequest,
    ImageRef,
    InterpolateRequest,
    LikelihoodRequest,
    Limits,
    RequestInvalid,
)

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"diffusion_config": {"num_timesteps": 40, "variance": "fixedlarge"}, "image_size": 8, "channels": 3},
    "small": {"diffusion_config": {"num_timesteps": 1000, "variance": "fixedsmall"}, "image_size": 8, "channels": 1},
}
LIMITS = Limits(max_num_images=16, max_steps=1000, max_image_steps=16_000, max_frames=100, max_input_pixels=64)
REF = ImageRef(job="0" * 32, index=0)


def _limits(**changes: int) -> Limits:
    return Limits(**{**LIMITS.__dict__, **changes})


def _invalid(call: Any, field: str) -> str:
    with pytest.raises(RequestInvalid) as caught:
        call()
    assert caught.value.field == field, str(caught.value)
    return str(caught.value)


def test_generate_fills_every_default_from_the_model() -> None:
    resolved = resolve_generate(GenerateRequest(), LIMITS, MODELS, "tiny")
    assert (resolved.kind, resolved.model, resolved.num_images, resolved.total_steps) == ("generate", "tiny", 1, 40)
    assert resolved.request == {"num_images": 1, "seed": resolved.seed, "steps": 40, "sampler": "ddpm", "eta": 0.0,
                                "variance": "fixedlarge", "preview_every": 2, "model": "tiny"}
    assert 0 <= resolved.seed <= MAX_SEED and resolved.inputs == ()
    other = resolve_generate(GenerateRequest(model="small", seed=5), LIMITS, MODELS, "tiny")
    assert other.request["variance"] == "fixedsmall" and other.request["steps"] == 1000 and other.seed == 5
    assert other.request["preview_every"] == 50  # about 20 frames by default


def test_the_default_steps_follow_the_servers_cap() -> None:
    resolved = resolve_generate(GenerateRequest(model="small"), _limits(max_steps=100), MODELS, "tiny")
    assert resolved.request["steps"] == 100


@pytest.mark.parametrize(("body", "field", "allowed"), [
    ({"steps": 41}, "steps", "between 1 and 40"),
    ({"num_images": 17}, "num_images", "between 1 and 16"),
    ({"steps": 10, "preview_every": 11}, "preview_every", "between 1 and 10"),
    ({"model": "nope"}, "model", "['small', 'tiny']"),
    ({"model": ""}, "model", "(got '')"),  # "" is not a name, not the default
    ({"start_t": 5}, "start_t", "only means something with init_image"),
    ({"shared_latent": True}, "shared_latent", "only means something with init_image"),
    ({"init_image": REF, "start_t": 41}, "start_t", "between 1 and 40"),
    ({"init_image": REF, "start_t": 10, "steps": 11}, "steps", "between 1 and 10"),
])
def test_generate_bounds_that_need_the_model_or_the_server(body: dict[str, Any], field: str, allowed: str) -> None:
    message = _invalid(lambda: resolve_generate(GenerateRequest(**body), LIMITS, MODELS, "tiny"), field)
    assert allowed in message


def test_a_nan_that_got_past_the_schema_is_still_refused() -> None:
    sneaked = GenerateRequest().model_copy(update={"eta": math.nan})  # pydantic refuses NaN; resolve holds anyway
    assert "between 0 and 1" in _invalid(lambda: resolve_generate(sneaked, LIMITS, MODELS, "tiny"), "eta")


def test_images_times_steps_are_bounded() -> None:
    limits = _limits(max_image_steps=50)
    message = _invalid(lambda: resolve_generate(GenerateRequest(num_images=2, steps=30), limits, MODELS, "tiny"),
                       "num_images")
    assert "num_images x steps must be at most 50 (got 2 x 30 = 60)" in message
    assert resolve_generate(GenerateRequest(num_images=2, steps=25), limits, MODELS, "tiny").total_steps == 25


def test_frames_per_job_are_bounded_and_the_default_keeps_the_bound() -> None:
    limits = _limits(max_frames=10)
    message = _invalid(lambda: resolve_generate(GenerateRequest(steps=40, preview_every=1), limits, MODELS, "tiny"),
                       "preview_every")
    assert "at most 10 frames per job" in message and "at least 5 (got 1)" in message
    for steps in (1, 7, 39, 40):
        every = resolve_generate(GenerateRequest(steps=steps), limits, MODELS, "tiny").request["preview_every"]
        assert 1 <= every <= steps and frame_count(steps, every) <= 10


def test_a_reconstruction_starts_at_start_t_and_counts_steps_from_there() -> None:
    resolved = resolve_generate(GenerateRequest(init_image=REF), LIMITS, MODELS, "tiny")
    assert resolved.request["start_t"] == 20 and resolved.total_steps == 20  # T/2, and steps from there
    assert resolved.inputs == (("init_image", REF),)
    stored = resolved.with_sources([{"job": REF.job, "index": 0}])
    assert stored.request["init_image"] == {"job": REF.job, "index": 0} and "init_image" not in resolved.request


def test_interpolate_defaults_and_bounds() -> None:
    resolved = resolve_interpolate(InterpolateRequest(images=[REF, REF]), LIMITS, MODELS, "tiny")
    assert resolved.request["t"] == 20 and resolved.request["lambdas"] == list(DEFAULT_LAMBDAS)
    assert resolved.num_images == 11 and resolved.total_steps == 20
    assert [name for name, _ in resolved.inputs] == ["images[0]", "images[1]"]
    for lambdas, field in (([0.5, 1.5], "lambdas[1]"), ([math.nan], "lambdas[0]"), ([0.5] * 17, "lambdas")):
        _invalid(lambda lambdas=lambdas: resolve_interpolate(
            InterpolateRequest(images=[REF, REF], lambdas=lambdas), LIMITS, MODELS, "tiny"), field)
    _invalid(lambda: resolve_interpolate(InterpolateRequest(images=[REF, REF], t=10, steps=11), LIMITS, MODELS,
                                         "tiny"), "steps")


def test_likelihood_takes_all_t_steps_and_its_curve_points() -> None:
    resolved = resolve_likelihood(LikelihoodRequest(images=[REF, REF]), LIMITS, MODELS, "tiny")
    assert resolved.total_steps == 40 and resolved.request["rd_points"] == 20 and resolved.num_images == 2
    message = _invalid(lambda: resolve_likelihood(LikelihoodRequest(images=[REF]), _limits(max_steps=39), MODELS,
                                                  "tiny"), "model")
    assert "all T = 40 steps" in message and "DDPM_MAX_STEPS = 39" in message
    _invalid(lambda: resolve_likelihood(LikelihoodRequest(images=[REF], rd_points=41), LIMITS, MODELS, "tiny"),
             "rd_points")
    _invalid(lambda: resolve_likelihood(LikelihoodRequest(images=[REF] * 17), LIMITS, MODELS, "tiny"), "images")
    _invalid(lambda: resolve_likelihood(LikelihoodRequest(images=[REF] * 2), _limits(max_image_steps=79), MODELS,
                                        "tiny"), "images")
