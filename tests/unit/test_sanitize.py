from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import JsonValue
from dispatcher.core.sanitize import (
    CIRCULAR,
    CUT_MARKER,
    MAX_DEPTH_LIMIT,
    OMITTED_KEY,
    TOO_DEEP,
    describe_exception,
    sanitize_json,
    sanitize_text,
)

PROPERTY = settings(database=None, deadline=None, max_examples=300)
MARKER = re.compile(r"…\[(\d+) characters omitted\]…")
any_text = st.text(st.characters(exclude_categories=()))


def assert_storable(text: str) -> None:
    assert "\x00" not in text
    text.encode("utf-8")  # raises on a lone surrogate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("", ""),
        ("a\x00b\x00", "ab"),
        ("\x00" * 10, ""),
        ("high \ud800 alone", "high \ufffd alone"),
        ("low \udc00 alone", "low \ufffd alone"),
        ("ends high \udbff", "ends high \ufffd"),
        ("two highs \ud83d\ud83d", "two highs \ufffd\ufffd"),
        ("reversed \ude00\ud83d", "reversed \ufffd\ufffd"),
        # A pair spelled as two code points is the character it encodes.
        ("pair \ud83d\ude00", "pair \U0001f600"),
        ("pair then lone \ud83d\ude00\udc00", "pair then lone \U0001f600\ufffd"),
        ("astral \U0001f600 kept", "astral \U0001f600 kept"),
        ("nul inside a pair \ud83d\x00\ude00", "nul inside a pair \U0001f600"),
        ("control\tand\nnewline kept", "control\tand\nnewline kept"),
    ],
)
def test_sanitize_text_cleans(text: str, expected: str) -> None:
    assert sanitize_text(text) == expected


def test_text_at_the_limit_is_unchanged() -> None:
    text = "y" * 8192
    assert sanitize_text(text) == text


def test_text_over_the_limit_keeps_head_and_tail() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(8193))
    result = sanitize_text(text)
    assert len(result) <= 8192
    match = MARKER.search(result)
    assert match is not None
    head, tail = result[: match.start()], result[match.end() :]
    assert text.startswith(head)
    assert text.endswith(tail)
    assert len(head) + int(match.group(1)) + len(tail) == len(text)
    # Half and half, give or take one.
    assert abs(len(head) - len(tail)) <= 1


def test_one_megabyte_is_bounded() -> None:
    text = ("ab\x00\ud800" * 262_144) + "END"
    result = sanitize_text(text)
    assert len(result) <= 8192
    assert result.endswith("END")
    assert_storable(result)
    match = MARKER.search(result)
    assert match is not None
    # NULs are removed before the length is counted: 3 characters per group remain.
    assert len(result) - len(match.group(0)) + int(match.group(1)) == 3 * 262_144 + 3


def test_one_megabyte_of_nul_is_empty() -> None:
    assert sanitize_text("\x00" * 1_048_576) == ""


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 20, 31, 32, 33, 100])
def test_any_limit_is_respected(limit: int) -> None:
    text = "z" * 1000
    result = sanitize_text(text, limit)
    assert len(result) <= limit
    assert result == text[:limit] or MARKER.search(result) is not None


def test_marker_count_is_exact_when_its_digits_shrink() -> None:
    # 10_000 characters into 40: the marker for "9981" is one digit shorter than for
    # "10000"; the count must still be what was left out.
    result = sanitize_text("q" * 10_000, 40)
    match = MARKER.search(result)
    assert match is not None
    assert len(result) - len(match.group(0)) + int(match.group(1)) == 10_000


@PROPERTY
@given(length=st.integers(41, 100_000))
def test_cut_marker_finds_every_cut_sanitize_text_makes(length: int) -> None:
    # Redaction relies on it to find secrets cut in half (dispatcher.core.redact).
    result = sanitize_text("q" * length, 40)
    [marker] = CUT_MARKER.findall(result)
    assert result.replace(marker, "") == "q" * (len(result) - len(marker))


@pytest.mark.parametrize("limit", [-1, True, 1.5])
def test_bad_limit_is_rejected(limit: Any) -> None:
    with pytest.raises(InvalidInput, match="limit"):
        sanitize_text("x", limit)


@PROPERTY
@given(text=any_text, limit=st.integers(0, 300))
def test_sanitize_text_is_storable_bounded_and_idempotent(text: str, limit: int) -> None:
    result = sanitize_text(text, limit)
    assert_storable(result)
    assert len(result) <= limit
    assert sanitize_text(result, limit) == result


@PROPERTY
@given(text=st.text())
def test_clean_short_text_is_unchanged(text: str) -> None:
    clean = text.replace("\x00", "")
    assert sanitize_text(clean) == clean


class Color(enum.IntEnum):
    RED = 1


class Mood(enum.StrEnum):
    CALM = "calm"


class Sneaky(str):
    def __str__(self) -> str:
        return "not me"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class NulRepr:
    def __repr__(self) -> str:
        return "<nul\x00repr \ud800>"


class BadItems(dict[str, int]):
    def items(self) -> Any:
        raise RuntimeError("cannot list")


class Endless(list[int]):
    def __iter__(self) -> Iterator[int]:
        while True:
            yield 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (False, False),
        (0, 0),
        (-17, -17),
        (1.5, 1.5),
        (-0.0, -0.0),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (2**63 - 1, 2**63 - 1),
        (-(2**63), -(2**63)),
        (2**63, "9223372036854775808"),
        (-(2**63) - 1, "-9223372036854775809"),
        ("a\x00b\ud800", "ab\ufffd"),
        ((1, "two", (3,)), [1, "two", [3]]),
        ([], []),
        ({}, {}),
        ({"a": {"b": [None]}}, {"a": {"b": [None]}}),
        (
            {1: "one", None: 0, 2.5: 2, (1, 2): 3},
            {"1": "one", "None": 0, "2.5": 2, "(1, 2)": 3},
        ),
        ({True: 1, False: 0}, {"True": 1, "False": 0}),
        ({"k\x00ey": math.nan}, {"key": None}),
        (Color.RED, 1),
        (Mood.CALM, "calm"),
        (Sneaky("real"), "real"),
        ({Mood.CALM: 1, Color.RED: 2}, {"calm": 1, "1": 2}),
        ({1, 2}, "{1, 2}"),
        (b"\x00\xff", "b'\\x00\\xff'"),
        (NulRepr(), "<nulrepr \ufffd>"),
        (BadRepr(), "<unrepresentable BadRepr>"),
        ([1, BadRepr(), 3], [1, "<unrepresentable BadRepr>", 3]),
        (BadItems(a=1), "<unrepresentable BadItems>"),
    ],
    ids=lambda value: type(value).__name__,
)
def test_sanitize_json_values(value: object, expected: JsonValue) -> None:
    result = sanitize_json(value)
    assert result == expected
    assert type(result) is type(expected)


def test_negative_zero_keeps_its_sign() -> None:
    result = sanitize_json(-0.0)
    assert isinstance(result, float)
    assert math.copysign(1.0, result) == -1.0


def test_integer_too_long_to_print_becomes_a_bounded_placeholder() -> None:
    # Python refuses str() of integers with more than 4300 digits.
    result = sanitize_json([10**5000, -(10**5000)])
    assert result == ["…[integer of 16610 bits]", "…[integer of 16610 bits]"]
    assert sanitize_json({10**5000: 1}) == {"…[integer of 16610 bits]": 1}


def test_long_integer_string_is_bounded_by_text_limit() -> None:
    result = sanitize_json(10**200, text_limit=50)
    assert isinstance(result, str)
    assert len(result) <= 50
    assert result.startswith("1000")


def test_long_strings_and_keys_are_bounded() -> None:
    result = sanitize_json({"k" * 100: "v" * 100}, text_limit=40)
    assert isinstance(result, dict)
    [(key, value)] = result.items()
    assert len(key) <= 40
    assert isinstance(value, str)
    assert len(value) <= 40


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(item) for item in value.values()), default=0)
    return 0


def innermost(value: object) -> object:
    while isinstance(value, list) and value:
        value = value[0]
    return value


@pytest.mark.parametrize("levels", [63, 64])
def test_nesting_up_to_the_limit_is_kept(levels: int) -> None:
    # nested(n) has n + 1 lists; 64 is the default limit.
    assert sanitize_json(nested(levels - 1)) == nested(levels - 1)


def test_nesting_beyond_the_limit_is_cut() -> None:
    result = sanitize_json(nested(100))
    assert depth_of(result) == 64
    assert innermost(result) == TOO_DEEP


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_depth_limit_argument(limit: int) -> None:
    result = sanitize_json({"a": nested(10)}, depth_limit=limit)
    assert depth_of(result) == limit
    assert sanitize_json(42, depth_limit=0) == 42


def test_very_deep_input_does_not_exhaust_the_stack() -> None:
    result = sanitize_json(nested(100_000), depth_limit=MAX_DEPTH_LIMIT)
    assert depth_of(result) == MAX_DEPTH_LIMIT
    json.dumps(result)


def test_cycles_are_cut() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    table: dict[str, Any] = {"x": 1}
    table["self"] = table
    assert sanitize_json(loop) == [1, CIRCULAR]
    assert sanitize_json(table) == {"x": 1, "self": CIRCULAR}


def test_shared_but_acyclic_values_are_repeated() -> None:
    shared = [1, 2]
    assert sanitize_json([shared, shared]) == [[1, 2], [1, 2]]


def test_exponential_sharing_is_bounded_by_the_item_limit() -> None:
    # 2 ** 60 leaves if expanded; the item limit stops the walk.
    value: list[Any] = []
    for _ in range(60):
        value = [value, value]
    result = sanitize_json(value, item_limit=1000)
    assert len(json.dumps(result)) < 200_000


def test_item_limit_reports_what_it_left_out() -> None:
    assert sanitize_json(list(range(10)), item_limit=4) == [0, 1, 2, "…[7 more items omitted]"]
    assert sanitize_json({"a": 1, "b": 2, "c": 3}, item_limit=2) == {
        "a": 1,
        OMITTED_KEY: "…[2 more entries omitted]",
    }


def test_endless_iterator_is_bounded() -> None:
    result = sanitize_json(Endless(), item_limit=100)
    assert isinstance(result, list)
    assert result == [1] * 99 + ["…[more items omitted]"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"text_limit": -1},
        {"depth_limit": -1},
        {"depth_limit": MAX_DEPTH_LIMIT + 1},
        {"item_limit": -1},
    ],
)
def test_bad_json_limits_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidInput):
        sanitize_json([], **kwargs)


def walk_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from walk_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from walk_strings(item)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.binary(max_size=8),
    st.sets(st.integers(), max_size=3),
    st.builds(BadRepr),
    st.builds(NulRepr),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(any_text | st.integers() | st.none(), children, max_size=4),
    ),
    max_leaves=30,
)


@PROPERTY
@given(value=values)
def test_sanitize_json_output_is_storable(value: object) -> None:
    result = sanitize_json(value, text_limit=64)
    encoded = json.dumps(result, allow_nan=False, ensure_ascii=False)
    encoded.encode("utf-8")
    assert json.loads(encoded) == result
    for text in walk_strings(result):
        assert_storable(text)
        assert len(text) <= 64


@PROPERTY
@given(value=values)
def test_sanitize_json_is_idempotent(value: object) -> None:
    once = sanitize_json(value)
    assert sanitize_json(once) == once


@PROPERTY
@given(value=values, depth_limit=st.integers(0, 5))
def test_sanitize_json_respects_depth_limit(value: object, depth_limit: int) -> None:
    assert depth_of(sanitize_json(value, depth_limit=depth_limit)) <= depth_limit


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("broken")


class Custom(Exception):
    pass


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ValueError("bad input"), "ValueError: bad input"),
        (TimeoutError(), "TimeoutError"),
        (KeyError("k"), "KeyError: 'k'"),
        (Custom("with\x00nul \ud800"), "Custom: withnul \ufffd"),
        (BrokenStr("x"), "BrokenStr: <str() of the exception raised RuntimeError>"),
        (KeyboardInterrupt("stop"), "KeyboardInterrupt: stop"),
    ],
    ids=repr,
)
def test_describe_exception(exc: BaseException, expected: str) -> None:
    assert describe_exception(exc) == expected


def test_describe_exception_is_bounded() -> None:
    result = describe_exception(RuntimeError("e" * 1_000_000), limit=100)
    assert len(result) <= 100
    assert result.startswith("RuntimeError: eee")
    assert MARKER.search(result) is not None
