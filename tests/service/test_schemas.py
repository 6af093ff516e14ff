"""service.schemas at its own level, without HTTP: what the request models refuse before any setting or model is
known (unknown fields, booleans as numbers, model-independent bounds, the two kinds of input picture), the names
the API's states and options share with the rest of the code, and the component names generated clients use."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from pydantic import ValidationError

from model.config import SAMPLERS, VARIANCE_TYPES
from service.queue import TERMINAL_STATES, JobState
from service.schemas import (
    JOB_KINDS,
    MAX_SEED,
    GenerateRequest,
    ImageRef,
    InterpolateRequest,
    JobStatus,
    JobView,
    LikelihoodRequest,
    Limits,
    RequestInvalid,
)

REF = {"job": "0" * 32, "index": 0}


def _refused(model: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return caught.value.errors()


def test_the_api_states_are_the_queue_states() -> None:
    # schemas must not import the Redis side, so the Literal is written out: held equal here
    assert set(get_args(JobStatus)) == {state.value for state in JobState}
    assert set(JobState) > TERMINAL_STATES


def test_options_are_the_models_names() -> None:
    props = GenerateRequest.model_json_schema()["properties"]
    assert tuple(props["sampler"]["enum"]) == SAMPLERS
    assert tuple(next(o for o in props["variance"]["anyOf"] if "enum" in o)["enum"]) == VARIANCE_TYPES
    assert JOB_KINDS == ("generate", "interpolate", "likelihood")


@pytest.mark.parametrize("model", [GenerateRequest, InterpolateRequest, LikelihoodRequest, ImageRef])
def test_unknown_fields_are_refused(model: Any) -> None:
    assert [e["type"] for e in _refused(model, {"prompt": "a cat"}) if e["loc"] == ("prompt",)] == ["extra_forbidden"]


@pytest.mark.parametrize(("model", "body", "field"), [
    (GenerateRequest, {"num_images": True}, "num_images"),
    (GenerateRequest, {"seed": False}, "seed"),
    (GenerateRequest, {"steps": True}, "steps"),
    (GenerateRequest, {"eta": True}, "eta"),
    (GenerateRequest, {"preview_every": True}, "preview_every"),
    (GenerateRequest, {"init_image": REF, "start_t": True}, "start_t"),
    (InterpolateRequest, {"images": [REF, REF], "t": True}, "t"),
    (InterpolateRequest, {"images": [REF, REF], "lambdas": [0.5, True]}, "lambdas"),
    (LikelihoodRequest, {"images": [REF], "rd_points": True}, "rd_points"),
    (ImageRef, {"job": "0" * 32, "index": True}, "index"),
])
def test_booleans_are_not_numbers(model: Any, body: dict[str, Any], field: str) -> None:
    errors = _refused(model, body)
    assert errors[0]["loc"][0] == field and "not true or false" in errors[0]["msg"]


@pytest.mark.parametrize(("model", "body", "field"), [
    (GenerateRequest, {"num_images": 0}, "num_images"),
    (GenerateRequest, {"seed": -1}, "seed"),
    (GenerateRequest, {"seed": MAX_SEED + 1}, "seed"),
    (GenerateRequest, {"steps": 0}, "steps"),
    (GenerateRequest, {"eta": 1.01}, "eta"),
    (GenerateRequest, {"sampler": "euler"}, "sampler"),
    (GenerateRequest, {"variance": "learned"}, "variance"),
    (GenerateRequest, {"webhook_events_filter": []}, "webhook_events_filter"),
    (GenerateRequest, {"webhook_events_filter": ["done"]}, "webhook_events_filter"),
    (GenerateRequest, {"webhook": "https://x/" + "a" * 2048}, "webhook"),
    (InterpolateRequest, {"images": [REF]}, "images"),
    (InterpolateRequest, {"images": [REF, REF, REF]}, "images"),
    (InterpolateRequest, {"images": [REF, REF], "lambdas": []}, "lambdas"),
    (LikelihoodRequest, {"images": []}, "images"),
    (LikelihoodRequest, {"images": [REF], "rd_points": 101}, "rd_points"),
    (ImageRef, {"job": "0" * 65, "index": 0}, "job"),
    (ImageRef, {"job": "0" * 32, "index": -1}, "index"),
])
def test_model_independent_bounds_are_checked_by_the_schema(model: Any, body: dict[str, Any], field: str) -> None:
    assert _refused(model, body)[0]["loc"][0] == field


def test_an_input_picture_is_a_string_or_a_reference_and_nothing_else() -> None:
    upload = GenerateRequest.model_validate({"init_image": "iVBORw0KGgo="})
    assert upload.init_image == "iVBORw0KGgo="
    reference = GenerateRequest.model_validate({"init_image": REF})
    assert reference.init_image == ImageRef(job="0" * 32, index=0)
    for wrong in (7, ["a"], 1.5, True):
        errors = _refused(GenerateRequest, {"init_image": wrong})
        assert errors[0]["type"] == "input_image" and "base64 PNG or JPEG" in errors[0]["msg"]
    errors = _refused(InterpolateRequest, {"images": [REF, {"job": "0" * 32, "index": 0, "x": 1}]})
    assert errors[0]["loc"][:2] == ("images", 1)  # a reference with an unknown field, at its place in the list


def test_defaults_are_left_to_the_resolution() -> None:
    request = GenerateRequest()
    assert (request.num_images, request.sampler, request.eta) == (1, "ddpm", 0.0)
    assert request.seed is request.steps is request.variance is request.preview_every is request.model is None


def test_limits_name_the_ranges_messages_and_the_document_show() -> None:
    ranges = Limits(max_num_images=4, max_steps=50, max_image_steps=100, max_frames=10, max_input_pixels=64).ranges()
    assert ranges["num_images"] == (1, 4) and ranges["seed"] == (0, MAX_SEED)
    assert ranges["steps"] == (1, "min(50, the model's T; see GET /models)")


def test_request_invalid_names_the_field() -> None:
    exc = RequestInvalid("images[1].job", "no job x")
    assert exc.field == "images[1].job" and str(exc) == "images[1].job: no job x"


def test_the_response_components_generated_clients_use_keep_their_names() -> None:
    from service.api import create_app
    from service.settings import Settings

    schemas = create_app(Settings(checkpoints={"tiny": "tiny.safetensors"})).openapi()["components"]["schemas"]
    assert sorted(schemas) == [
        "ErrorBody", "ErrorDetail", "FrameView", "GenerateAccepted", "GenerateRequest", "ImageRef", "ImageView",
        "InterpolateRequest", "JobView", "LikelihoodRequest", "LikelihoodResult", "ModelInfo", "ModelsView",
        "Progress", "RatePoint", "ReadyView", "WebhookDeliveryView", "WebhookView"]
    assert schemas["JobView"]["properties"]["progress"] == {"$ref": "#/components/schemas/Progress"}
    assert set(JobView.model_fields) == set(schemas["JobView"]["properties"])
