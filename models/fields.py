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

_TRUE = ("yes", "true", "1", "y", "on")
_FALSE = ("no", "false", "0", "n", "off")
_SPACE = "[ \\t\\r\\n]*"  # the blanks around a string value (explicit: ECMAScript's and Python's `\s` differ)


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)


def words_pattern(words, blanks: bool = False) -> str:
    """A pattern matching one of `words` in any letter case (and blanks around it, if `blanks`)."""
    space = _SPACE if blanks else ""
    return f"^{space}(?:{'|'.join(_any_case(word) for word in words)}){space}$"


# what a flag may be as a string, in any letter case: the schema's pattern and the parser's rule
FLAG_PATTERN = words_pattern(_TRUE + _FALSE, blanks=True)


def is_unset(value: Any) -> bool:
    """null or a blank string: "not set", the default applies (requests.WireModel drops them)."""
    return value is None or (isinstance(value, str) and not strip_blanks(value))


def strip_blanks(text: str) -> str:
    """The blanks `_SPACE` allows, off both ends (str.strip() would take more than the schema says)."""
    return text.strip(" \t\r\n")


# --------------------------------------------------------------------------- numbers as strings
# JSON Schema cannot compare a string's value to a range, but a regular expression can match the
# decimal spellings of the numbers in one. Written here because no library on our list builds one:
# each bounded number field's schema carries the pattern of its range, and its parser accepts
# exactly the strings that pattern matches (so the schema says what is accepted, no more, no less).


def _same_length(lo: str, hi: str) -> list[str]:
    """Patterns matching the decimal integers in [lo, hi], both of the same number of digits."""
    if lo == hi:
        return [lo]
    rest = len(lo) - 1
    if rest == 0:
        return [f"[{lo}-{hi}]"]
    repeat = f"{{{rest}}}" if rest > 1 else ""
    if lo[0] == hi[0]:
        return [lo[0] + tail for tail in _same_length(lo[1:], hi[1:])]
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return [f"[{lo[0]}-{hi[0]}][0-9]{repeat}"]
    parts = [lo[0] + tail for tail in _same_length(lo[1:], "9" * rest)]
    if int(hi[0]) - int(lo[0]) > 2:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{repeat}")
    elif int(hi[0]) - int(lo[0]) == 2:
        parts.append(f"{int(lo[0]) + 1}[0-9]{repeat}")
    return parts + [hi[0] + tail for tail in _same_length("0" * rest, hi[1:])]


def integer_range_pattern(lo: int, hi: int) -> str:
    """A group matching the integers lo..hi (0 <= lo <= hi) written without leading zeros."""
    parts = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        first, last = max(lo, 10 ** (digits - 1) if digits > 1 else 0), min(hi, 10**digits - 1)
        if first <= last:
            parts += _same_length(str(first), str(last))
    return f"(?:{'|'.join(parts)})"


def _number_body(integer: bool, lo: float | None, hi: float | None) -> str:
    """The decimal spellings of the numbers in [lo, hi] (leading zeros allowed; no exponent, no
    "+"); integers may end in ".0". Unbounded: any such spelling, with a "-" only when there is no
    lower bound."""
    if lo is None or hi is None:
        sign = "-?" if lo is None else ""
        assert lo is None or lo == 0, lo  # the unbounded fields of models/requests.py
        return f"{sign}[0-9]+(?:\\.0*)?" if integer else f"{sign}(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)"
    assert 0 <= lo <= hi and float(hi).is_integer(), (lo, hi)  # the ranges of models/requests.py
    hi = int(hi)
    if integer:
        return f"0*{integer_range_pattern(int(lo), hi)}(?:\\.0*)?"
    whole, tenths = int(lo), round((lo - int(lo)) * 10)
    assert abs(lo - (whole + tenths / 10)) < 1e-9, lo  # a lower bound of at most one decimal
    parts = [f"{hi}(?:\\.0*)?"]  # the upper bound itself
    if tenths:  # e.g. lo = 0.1: 0.1 .. 0.999...
        parts.append(f"{whole if whole else ''}\\.[{tenths}-9][0-9]*")
        whole += 1
    if whole <= hi - 1:
        parts.append(f"{integer_range_pattern(whole, hi - 1)}(?:\\.[0-9]*)?")
        if whole == 0:
            parts.append("\\.[0-9]+")  # ".5"
    return f"0*(?:{'|'.join(parts)})"


def number_pattern(integer: bool, lo: float | None, hi: float | None) -> str:
    """The strings a number field takes (see `_number_body`), blanks around allowed."""
    return f"^{_SPACE}{_number_body(integer, lo, hi)}{_SPACE}$"


def number_list_pattern(lo: float | None, hi: float | None) -> str:
    """A comma list of such numbers ("0.45,0.55"); empty items are skipped, as parse_csv does."""
    item = f"{_SPACE}(?:{_number_body(False, lo, hi)}{_SPACE})?"
    return f"^{item}(?:,{item})*$"


def parse_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and re.fullmatch(FLAG_PATTERN, value):
        return strip_blanks(value).lower() in _TRUE
    raise ValueError(f'must be "yes" or "no" (true/false and 1/0 are accepted too), got {value!r}')


def _finite(number: float, value: Any) -> float:
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def parse_number(value: Any, pattern: str | None = None, lo: float | None = None, hi: float | None = None,
                 integer: bool = False) -> float:
    """A JSON number, or a string that `pattern` (the field's number_pattern) matches. A string
    outside it gets the message that says why: not a number, out of range, not whole, or spelled
    in a form not taken (an exponent, a "+")."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return _finite(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"must be a number, got {value!r}")
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None
    number = _finite(number, value)
    if pattern is not None and not re.fullmatch(pattern, value):
        _in_range(lo, hi)(number)
        if integer and not number.is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        raise ValueError(f"must be written as a plain decimal number (like 7.5), got {value!r}")
    return number


def parse_int(value: Any, pattern: str | None = None, lo: float | None = None, hi: float | None = None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value, pattern, lo, hi, integer=True)
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
    return [strip_blanks(item) for item in items if strip_blanks(item)]


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


def _bounded(kind: str, lo: float | None, hi: float | None) -> dict:
    number: dict[str, Any] = {"type": kind}
    if lo is not None:
        number["minimum"] = lo
    if hi is not None:
        number["maximum"] = hi
    return number


def _number_schema(kind: str, lo: float | None, hi: float | None) -> dict:
    pattern = number_pattern(kind == "integer", lo, hi)
    return {"anyOf": [_bounded(kind, lo, hi), {"type": "string", "pattern": pattern}, {"type": "null"}]}


def LooseInt(lo: int | None = None, hi: int | None = None):  # noqa: N802 - reads like a type
    """An integer sent as 512 or "512", checked against [lo, hi]."""
    pattern = number_pattern(True, lo, hi)
    return Annotated[
        int,
        BeforeValidator(lambda value: parse_int(value, pattern, lo, hi)),
        AfterValidator(_in_range(lo, hi)),
        WithJsonSchema(_number_schema("integer", lo, hi)),
    ]


def LooseFloat(lo: float | None = None, hi: float | None = None):  # noqa: N802
    """A number sent as 7.5 or "7.5", checked against [lo, hi]."""
    pattern = number_pattern(False, lo, hi)
    return Annotated[
        float,
        BeforeValidator(lambda value: parse_number(value, pattern, lo, hi)),
        AfterValidator(_in_range(lo, hi)),
        WithJsonSchema(_number_schema("number", lo, hi)),
    ]


def _round_to_8(value: int) -> int:
    return max(8, value - value % 8)


# width / height: 1..1024, rounded down to a multiple of 8 (at least 8) and echoed as such.
Dimension = Annotated[LooseInt(1, 1024), AfterValidator(_round_to_8)]
# outpaint's canvas (spec §4.2): the same, up to 1440
CanvasDimension = Annotated[LooseInt(1, 1440), AfterValidator(_round_to_8)]

# "yes"/"no" on the wire, a bool in Python, "yes"/"no" again when serialised into `meta`.
YesNo = Annotated[
    bool,
    BeforeValidator(parse_flag),
    PlainSerializer(lambda flag: "yes" if flag else "no", return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": FLAG_PATTERN, "examples": ["yes", "no"]},
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

# "a,b" or ["a", "b"] -> ["a", "b"] (numbers are taken as their spelling, like Text)
CsvList = Annotated[
    list[str],
    BeforeValidator(parse_csv),
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "number"},
                   {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}]}}, {"type": "null"}]}
    ),
]

def OneOf(words, blanks: bool = False):  # noqa: N802
    """Free text the API then looks up among `words` (any letter case; the lookup says what is
    wrong): the schema names them, as a pattern, so generated clients and fuzzers send those."""
    return Annotated[str, BeforeValidator(parse_text),
                     WithJsonSchema({"type": "string", "pattern": words_pattern(words, blanks),
                                     "examples": list(words[:3])})]


def ListOf(words):  # noqa: N802
    """A comma list of `words` (exactly as written), or a JSON list of them."""
    item = "|".join(re.escape(word) for word in words)
    blank_item = f"{_SPACE}(?:(?:{item}){_SPACE})?"
    return Annotated[list[str], BeforeValidator(parse_csv),
                     WithJsonSchema({"anyOf": [{"type": "string", "pattern": f"^{blank_item}(?:,{blank_item})*$"},
                                               {"type": "array", "items": {"type": "string", "enum": list(words)}},
                                               {"type": "null"}]})]


MAX_JOB_ID = 2**53 - 1  # the largest integer every JSON client reads exactly
_JOB_ID_PATTERN = number_pattern(True, 0, MAX_JOB_ID)

# A job id: 13443927 or "13443927".
JobId = Annotated[
    int,
    BeforeValidator(lambda value: parse_int(value, _JOB_ID_PATTERN, 0, MAX_JOB_ID)),
    AfterValidator(_in_range(0, MAX_JOB_ID)),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_JOB_ID},
                              {"type": "string", "pattern": _JOB_ID_PATTERN}]}),
]


def _each(check):
    def check_all(values):
        return [check(v) for v in values]

    return check_all


def FloatList(lo: float | None = None, hi: float | None = None):  # noqa: N802
    """One number or several: 0.7, "0.7", "0.45,0.55" or [0.45, "0.55"] -> [floats in [lo, hi]]."""
    item = number_pattern(False, lo, hi)

    def parse(value: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, str):
            items = [part for part in value.split(",") if strip_blanks(part)]
        else:
            items = [value]
        return [parse_number(one, item, lo, hi) for one in items]

    return Annotated[
        list[float],
        BeforeValidator(parse),
        AfterValidator(_each(_in_range(lo, hi))),
        WithJsonSchema(
            {"anyOf": [_bounded("number", lo, hi), {"type": "string", "pattern": number_list_pattern(lo, hi)},
                       {"type": "array", "items": {"anyOf": [_bounded("number", lo, hi),
                                                             {"type": "string", "pattern": item}]}},
                       {"type": "null"}]}
        ),
    ]


# One image reference or a list of them (never split at commas: data URIs contain one).
ImageList = Annotated[
    list[str],
    BeforeValidator(lambda value: [parse_text(v) for v in value] if isinstance(value, list) else [parse_text(value)]),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"},
                              {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}]}}]}),
]


_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_AMOUNT = "[0-9]+(?:\\.[0-9]+)?"
# the duration header's syntax, any letter case: its schema's pattern and parse_duration's rule
DURATION_PATTERN = f"^[ \\t]*(?:{_AMOUNT}|(?:{_AMOUNT}(?:[Mm][Ss]|[HhMmSs]))+)[ \\t]*$"


def parse_duration(value: str) -> float:
    """Seconds of a duration header (`Cancel-After`): "30", "30s", "5m", "1h30m", "1.5h", "500ms".
    Raises ValueError for anything else. (Go's duration syntax, as Replicate's header takes it.)"""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
    text = value.strip(" \t").lower()
    if re.fullmatch(_AMOUNT, text):
        return float(text)
    parts = re.findall(f"({_AMOUNT})(ms|h|m|s)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
