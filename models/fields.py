"""Loose field types for the ModelsLab wire format (spec section 1.7).

Official clients send numbers as strings ("512"), flags as "yes"/"no" or JSON booleans,
lists as comma-separated strings and `null` for "not set". Every type here accepts all of
those spellings and normalises them to one Python type; the JSON schema they publish says
so, so the OpenAPI page documents what is really accepted.

`null` and blank strings are dropped before validation by `WireModel` (see requests.py), so
they mean "use the default", like Laravel's ConvertEmptyStringsToNull the original runs on.
"""

from __future__ import annotations

import re

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

_TRUE = {"yes", "true", "1", "y", "on"}
_FALSE = {"no", "false", "0", "n", "off"}
_NUMERIC_STRING = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"


def parse_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f'must be "yes" or "no" (true/false and 1/0 are accepted too), got {value!r}')


def parse_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    else:
        raise ValueError(f"must be a number, got {value!r}")
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def parse_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value)
    if not number.is_integer():
        raise ValueError(f"must be a whole number, got {value!r}")
    return int(number)


def parse_text(value: Any) -> str:
    """Free text; numbers are accepted and turned into their decimal spelling (track_id: 7)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"must be a string, got {type(value).__name__}")


def parse_csv(value: Any) -> list[str]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [parse_text(v) for v in value]
    else:
        items = [parse_text(value)]
    return [item.strip() for item in items if item.strip()]


def _in_range(lo: float | None, hi: float | None):
    def check(value):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                raise ValueError(f"must be between {format_number(lo)} and {format_number(hi)}, got {format_number(value)}")
            if lo is not None:
                raise ValueError(f"must be at least {format_number(lo)}, got {format_number(value)}")
            raise ValueError(f"must be at most {format_number(hi)}, got {format_number(value)}")
        return value

    return check


def format_number(number: float) -> str:
    """7.0 -> "7", 0.5 -> "0.5": how numbers are echoed in messages and in `meta` lists."""
    return str(int(number)) if float(number).is_integer() else str(number)


def _number_schema(kind: str, lo: float | None, hi: float | None) -> dict:
    number: dict[str, Any] = {"type": kind}
    if lo is not None:
        number["minimum"] = lo
    if hi is not None:
        number["maximum"] = hi
    return {"anyOf": [number, {"type": "string", "pattern": _NUMERIC_STRING}, {"type": "null"}]}


def LooseInt(lo: int | None = None, hi: int | None = None):  # noqa: N802 - reads like a type
    """An integer sent as 512 or "512", checked against [lo, hi]."""
    return Annotated[
        int,
        BeforeValidator(parse_int),
        AfterValidator(_in_range(lo, hi)),
        WithJsonSchema(_number_schema("integer", lo, hi)),
    ]


def LooseFloat(lo: float | None = None, hi: float | None = None):  # noqa: N802
    """A number sent as 7.5 or "7.5", checked against [lo, hi]."""
    return Annotated[
        float,
        BeforeValidator(parse_number),
        AfterValidator(_in_range(lo, hi)),
        WithJsonSchema(_number_schema("number", lo, hi)),
    ]


def _round_to_8(value: int) -> int:
    return max(8, value - value % 8)


# width / height: 1..1024, rounded down to a multiple of 8 (at least 8) and echoed as such.
Dimension = Annotated[LooseInt(1, 1024), AfterValidator(_round_to_8)]

# "yes"/"no" on the wire, a bool in Python, "yes"/"no" again when serialised into `meta`.
YesNo = Annotated[
    bool,
    BeforeValidator(parse_flag),
    PlainSerializer(lambda flag: "yes" if flag else "no", return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": ["yes", "no", "true", "false", "1", "0"]},
                {"type": "boolean"},
                {"type": "integer", "enum": [0, 1]},
                {"type": "null"},
            ]
        }
    ),
]

Text = Annotated[
    str,
    BeforeValidator(parse_text),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}),
]

# "a,b" or ["a", "b"] -> ["a", "b"]
CsvList = Annotated[
    list[str],
    BeforeValidator(parse_csv),
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
    ),
]

# A job id: 13443927 or "13443927".
JobId = Annotated[
    int,
    BeforeValidator(parse_int),
    AfterValidator(_in_range(0, 2**53 - 1)),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**53 - 1},
                              {"type": "string", "pattern": r"^\s*\d+\s*$"}]}),  # (a string's range: not in a schema)
]


def _each(check):
    def check_all(values):
        return [check(v) for v in values]

    return check_all


def FloatList(lo: float | None = None, hi: float | None = None):
    """One number or several: 0.7, "0.7", "0.45,0.55" or [0.45, 0.55] -> [floats in [lo, hi]]."""
    return Annotated[
        list[float],
        BeforeValidator(lambda value: [parse_number(item) for item in parse_csv(value)]),
        AfterValidator(_each(_in_range(lo, hi))),
        WithJsonSchema(
            {"anyOf": [_number_schema("number", lo, hi), {"type": "array", "items": {"type": "number"}}]}
        ),
    ]


# One image reference or a list of them (never split at commas: data URIs contain one).
ImageList = Annotated[
    list[str],
    BeforeValidator(lambda value: [parse_text(v) for v in value] if isinstance(value, list) else [parse_text(value)]),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]


_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str) -> float:
    """Seconds of a duration header (`Cancel-After`): "30", "30s", "5m", "1h30m", "1.5h", "500ms".
    Raises ValueError for anything else. (Go's duration syntax, as Replicate's header takes it.)"""
    text = value.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
