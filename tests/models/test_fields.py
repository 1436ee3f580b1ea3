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


# --------------------------------------------------------------------------- the schema says what is accepted

NUMBER_FIELDS = ["width", "samples", "num_inference_steps", "guidance_scale", "seed", "clip_skip", "lora_strength",
                 "ip_adapter_scale", "deadline_seconds"]
SPELLINGS = ["512", " 512 ", "0512", "512.0", "512.", "512.5", "1e3", "+5", "-5", "-0", "0", "1", "4", "5", "0.1",
             ".5", "0.05", "20", "20.0", "20.5", "21", "1024", "1025", "4294967295", "4294967296", "7.", "", "abc",
             "1,2", "0.5,0.6", "\f5", "٣", "1_000", "0x10", "inf", "nan", "604800", "604801"]


def string_schema(field: str) -> dict:
    schema = Text2ImgRequest.model_json_schema()["properties"][field]
    options = [option for option in schema["anyOf"] if "anyOf" not in option]
    options += [inner for option in schema["anyOf"] for inner in option.get("anyOf", [])]
    (string,) = [option for option in options if option.get("type") == "string"]
    return string


@pytest.mark.parametrize("field", NUMBER_FIELDS)
def test_a_number_fields_string_pattern_is_exactly_what_it_accepts(field):
    """A client generated from the OpenAPI document sends numbers as strings only in the spellings
    and the range the schema's pattern allows, and the API takes exactly those (a string the
    pattern refuses is refused, with a message)."""
    import re

    pattern = string_schema(field)["pattern"]
    for sent in SPELLINGS:
        try:
            Text2ImgRequest.model_validate({**BASE, field: sent})
            accepted = True
        except ValidationError:
            accepted = False
        blank = not sent.strip()  # blank means unset: dropped before the field is read
        assert blank or accepted == bool(re.fullmatch(pattern, sent)), (field, sent, accepted)


def test_number_spellings_the_schema_does_not_take_are_refused_with_the_reason():
    for sent, says in [("1e3", "plain decimal"), ("+5", "plain decimal"), ("5000", "between 1 and 1024"),
                       ("512.5", "whole number")]:
        with pytest.raises(ValidationError) as raised:
            Text2ImgRequest.model_validate({**BASE, "width": sent})
        assert says in str(raised.value), sent


def test_flags_are_taken_in_any_letter_case_as_the_schema_says():
    import re

    from models.fields import FLAG_PATTERN

    for sent in ["Yes", "NO", " true ", "On", "y", "maybe", "yess", "1", "2"]:
        try:
            Text2ImgRequest.model_validate({**BASE, "tomesd": sent})
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == bool(re.fullmatch(FLAG_PATTERN, sent)), sent


@pytest.mark.parametrize(("lo", "hi"), [(0, 0), (1, 4), (1, 1024), (0, 999), (7, 300), (10, 99), (95, 1105)])
def test_range_patterns_match_exactly_the_numbers_in_range(lo, hi):
    """Every integer spelling up to twice the bound (and the decimal ones for floats) against the
    pattern: the pattern is the range, with no gap and no excess."""
    import re

    from models.fields import number_pattern

    integers, decimals = re.compile(number_pattern(True, lo, hi)), re.compile(number_pattern(False, lo, hi))
    for value in range(0, 2 * hi + 20):
        assert bool(integers.fullmatch(str(value))) == (lo <= value <= hi), value
        for text in (f"{value}.0", f"{value / 10:.1f}", f"{value / 100:.2f}", f"{value + 0.5}"):
            assert bool(decimals.fullmatch(text)) == (lo <= float(text) <= hi), text
    assert bool(re.fullmatch(number_pattern(False, 0.1, 1), "0.1")) and not re.fullmatch(number_pattern(False, 0.1, 1), "0.09")


def test_the_duration_header_takes_exactly_what_its_pattern_says():
    import re

    from models.fields import DURATION_PATTERN, parse_duration

    assert parse_duration("1h30m") == 5400 and parse_duration(" 500MS ") == 0.5 and parse_duration("30") == 30
    for sent in ["5m", "1.5h", "30", "1h30m", "2S", "soon", "5 m", "1e3", "٣s", "-5s", "", "m", "5m3"]:
        try:
            parse_duration(sent)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == bool(re.fullmatch(DURATION_PATTERN, sent)), sent
