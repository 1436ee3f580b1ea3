"""Loose typing of request fields (spec 1.7), table-driven, on the request models themselves."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.requests import FetchRequest, InpaintRequest, Text2ImgRequest

BASE = {"prompt": "a cat"}


@pytest.mark.parametrize(
    ("field", "sent", "parsed"),
    [
        ("width", "512", 512),
        ("width", 512, 512),
        ("width", 512.0, 512),
        ("width", " 768 ", 768),
        ("width", "513", 512),  # rounded down to a multiple of 8
        ("width", 1023, 1016),
        ("width", "1", 8),  # never below 8
        ("height", "1024", 1024),
        ("samples", "4", 4),
        ("samples", 1, 1),
        ("num_inference_steps", "30", 30),
        ("steps", "31", 31),  # alias of num_inference_steps
        ("steps", 50, 50),
        ("guidance_scale", "7.5", 7.5),
        ("guidance_scale", 20, 20.0),
        ("seed", "12345", 12345),
        ("seed", None, None),
        ("seed", "", None),  # blank = unset
        ("clip_skip", "2", 2),
        ("clip_skip", 8, 8),
        ("negative_prompt", None, None),
        ("track_id", 17, "17"),
        ("lora_model", "more_details,animie", ["more_details", "animie"]),
        ("lora_model", " a , b ,", ["a", "b"]),
        ("lora_model", ["a", "b"], ["a", "b"]),
        ("lora_strength", "0.45,0.55", [0.45, 0.55]),
        ("lora_strength", 0.7, [0.7]),
        ("lora_strength", ["0.5", 1], [0.5, 1.0]),
        ("lora_model", None, None),
    ],
)
def test_loose_values_are_parsed(field, sent, parsed):
    request = Text2ImgRequest.model_validate({**BASE, field: sent})
    attribute = "num_inference_steps" if field == "steps" else field
    assert getattr(request, attribute) == parsed


@pytest.mark.parametrize(
    ("sent", "parsed"),
    [("yes", True), ("no", False), ("YES", True), (True, True), (False, False), ("true", True),
     ("false", False), (1, True), (0, False), ("1", True), ("0", False)],
)
def test_flags_accept_every_documented_spelling(sent, parsed):
    request = Text2ImgRequest.model_validate({**BASE, "enhance_prompt": sent, "instant_response": sent})
    assert request.enhance_prompt is parsed and request.instant_response is parsed


def test_flags_serialise_back_to_yes_no():
    dumped = Text2ImgRequest.model_validate({**BASE, "enhance_prompt": True, "tomesd": 0}).model_dump()
    assert dumped["enhance_prompt"] == "yes" and dumped["tomesd"] == "no"


def test_null_means_default():
    request = Text2ImgRequest.model_validate({**BASE, "samples": None, "guidance_scale": None, "enhance_prompt": None})
    assert (request.samples, request.guidance_scale, request.enhance_prompt) == (1, 7.5, True)


def test_unknown_fields_are_ignored():
    request = Text2ImgRequest.model_validate({**BASE, "deploy_type": "x", "some_future_field": {"a": 1}})
    assert not hasattr(request, "some_future_field")


@pytest.mark.parametrize(
    ("field", "sent", "says"),
    [
        ("width", 0, "between 1 and 1024"),
        ("width", -512, "between 1 and 1024"),
        ("width", "1025", "between 1 and 1024"),
        ("width", "abc", "must be a number"),
        ("width", True, "must be a number"),
        ("width", "512.5", "whole number"),
        ("samples", 0, "between 1 and 4"),
        ("samples", "9", "between 1 and 4"),
        ("num_inference_steps", 0, "between 1 and 50"),
        ("steps", 500, "between 1 and 50"),
        ("guidance_scale", 0.5, "between 1 and 20"),
        ("guidance_scale", "21", "between 1 and 20"),
        ("guidance_scale", "nan", "finite"),
        ("clip_skip", 0, "between 1 and 8"),
        ("clip_skip", "9", "between 1 and 8"),
        ("seed", -1, "between 0 and"),
        ("enhance_prompt", "maybe", '"yes" or "no"'),
        ("enhance_prompt", 2, '"yes" or "no"'),
        ("safety_checker_type", "sepia", "sensitive_content_text"),
    ],
)
def test_out_of_range_and_wrong_types_are_rejected(field, sent, says):
    with pytest.raises(ValidationError) as raised:
        Text2ImgRequest.model_validate({**BASE, field: sent})
    assert says in str(raised.value)


@pytest.mark.parametrize(("sent", "says"), [(-0.1, "between 0 and 1"), ("1.5", "between 0 and 1"), ("x", "number")])
def test_strength_range(sent, says):
    with pytest.raises(ValidationError) as raised:
        InpaintRequest.model_validate({**BASE, "init_image": "a", "mask_image": "b", "strength": sent})
    assert says in str(raised.value)


def test_required_fields_are_named():
    with pytest.raises(ValidationError) as raised:
        InpaintRequest.model_validate({"prompt": ""})
    missing = {e["loc"][0] for e in raised.value.errors() if e["type"] == "missing"}
    assert missing == {"prompt", "init_image", "mask_image"}


@pytest.mark.parametrize("sent", [13443927, "13443927", " 13443927 "])
def test_fetch_ids_as_integer_or_string(sent):
    assert FetchRequest.model_validate({"request_id": sent}).request_id == 13443927
