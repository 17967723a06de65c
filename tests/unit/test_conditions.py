"""Trigger conditions, the pure part: parsing, the normalised text, errors, limits, the
jsonpath's shape and the reference semantics (tests/integration/test_condition_semantics.py
checks the jsonpath against Postgres)."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.conditions import (
    MAX_ATOMS,
    MAX_CONDITION_LENGTH,
    MAX_NESTING,
    CompiledCondition,
    ConditionError,
    compile_condition,
    evaluate,
)
from dispatcher.core.errors import InvalidInput


def fingerprint(c: CompiledCondition) -> tuple[str, str, str, tuple[tuple[str, ...], ...]]:
    # json.dumps keeps 1, 1.0 and true apart, which == on the dicts does not.
    return c.source, c.jsonpath, json.dumps(c.variables), c.changed


@pytest.mark.parametrize(
    ("text", "source"),
    [
        (
            "changed(status) and NEW.status == 'paid'",
            "changed(status) and new.status == 'paid'",
        ),
        ("new.a==1", "new.a == 1"),
        (
            "(new.a == 1) AND ((new.b == 2) and new.c == 3)",
            "new.a == 1 and new.b == 2 and new.c == 3",
        ),
        ("new.a == 1 and (new.b == 2 or new.c == 3)", "new.a == 1 and (new.b == 2 or new.c == 3)"),
        ("(new.a == 1 or new.b == 2) Or new.c == 3", "new.a == 1 or new.b == 2 or new.c == 3"),
        ("(new.a == 1 and new.b == 2) or new.c == 3", "new.a == 1 and new.b == 2 or new.c == 3"),
        ("NOT (NOT (new.a == 1))", "not not new.a == 1"),
        ("not (new.a == 1 and new.b == 2)", "not (new.a == 1 and new.b == 2)"),
        ("not (new.a == 1) and new.b == 2", "not new.a == 1 and new.b == 2"),
        ('new."a".b == 1', "new.a.b == 1"),
        ('new."a b"."c\\"d"."e\\\\f" == 1', 'new."a b"."c\\"d"."e\\\\f" == 1'),
        ('new."" == 1', 'new."" == 1'),
        ("new.and.in.NULL.op == 1", "new.and.in.NULL.op == 1"),
        ('changed("new")', 'changed("new")'),
        ('changed("New".x)', 'changed("New".x)'),
        ('changed(a."new")', "changed(a.new)"),
        ("changed(op.key)", "changed(op.key)"),
        ("new.n == 1E2", "new.n == 100.0"),
        ("new.n == 1e300", "new.n == 1e+300"),
        ("new.n == 1.5e-7", "new.n == 1.5e-07"),
        ("new.n == -0", "new.n == 0"),
        ("new.n == -0.0", "new.n == -0.0"),
        ("new.n == 10.0", "new.n == 10.0"),
        ("new.n > 123456789012345678901234567890", "new.n > 123456789012345678901234567890"),
        ("new.s == 'it\\'s'", "new.s == 'it\\'s'"),
        ("new.s == 'a\\\\b'", "new.s == 'a\\\\b'"),
        ("new.s == 'say \"hi\"'", "new.s == 'say \"hi\"'"),
        ("new.t in [TRUE,false , NULL]", "new.t in [true, false, null]"),
        ("new.t NOT IN ['a']", "new.t not in ['a']"),
        ("'paid' == new.status", "'paid' == new.status"),
        ("Op == 'put'", "op == 'put'"),
        ("key\n>=\t'a'\r\n", "key >= 'a'"),
        ("exists ( new . a )", "exists(new.a)"),
        ("new.a == old.a", "new.a == old.a"),
        ("new.\"\u00e9\u00e8\" == '\U0001f600'", "new.\"\u00e9\u00e8\" == '\U0001f600'"),
    ],
)
def test_the_normalised_source(text: str, source: str) -> None:
    compiled = compile_condition(text)
    assert compiled.source == source
    assert fingerprint(compile_condition(source)) == fingerprint(compiled)


def test_status_changed_to_paid_compiles_to_a_jsonpath_with_no_user_text() -> None:
    c = compile_condition("changed(status) and new.status == 'paid'")
    unknown_false = "(!(({p}) is unknown) && ({p}))"
    assert c.jsonpath == "strict ({} && {})".format(
        unknown_false.format(p='$."changed"[0] == true'),
        unknown_false.format(p='$."new"."status" == $v1'),
    )
    assert c.variables == {"v1": "paid"}
    assert c.changed == (("status",),)


def test_changed_paths_are_listed_once_in_order_of_appearance() -> None:
    c = compile_condition('changed(b) or changed(a.x) or not changed(b) or changed("a".x)')
    assert c.changed == (("b",), ("a", "x"))
    assert '$."changed"[1]' in c.jsonpath
    assert '$."changed"[2]' not in c.jsonpath


def test_every_literal_is_a_variable_in_order() -> None:
    c = compile_condition(
        "new.a in ['x', null] and op == 'put' and key != 'k' and new.b not in [1, 2.5, 2]"
        " and new.c == true"
    )
    # A list is one array variable.
    assert c.variables == {"v1": ["x", None], "v2": "put", "v3": "k", "v4": [1, 2.5, 2], "v5": True}
    assert json.dumps(c.variables) == (
        '{"v1": ["x", null], "v2": "put", "v3": "k", "v4": [1, 2.5, 2], "v5": true}'
    )
    assert "$v5" in c.jsonpath
    assert "$v6" not in c.jsonpath


def test_a_list_is_filtered_with_the_subject_written_once() -> None:
    def two_valued(p: str) -> str:
        return f"(!(({p}) is unknown) && ({p}))"

    a, b = '$."new"."a"', '$."new"."b"'
    c = compile_condition("new.a in [1, 2] and new.b not in ['x', 'y']")
    differs = f"@ != {b}"
    assert c.jsonpath == "strict ({} && !{})".format(
        two_valued(f"exists($v1[*] ? (@ == {a}))"),
        two_valued(f"exists($v2[*] ? (({differs}) is unknown || !({differs})))"),
    )


@pytest.mark.parametrize(
    "text",
    [
        'new."' + '\\"' * 2040 + '" == 1',
        " or ".join(["exists(new.a)"] * MAX_ATOMS),
        " or ".join([f"changed(a{i})" for i in range(MAX_ATOMS)]),
        "new.a in [" + ", ".join(["1"] * 1350) + "]",
        'new."' + "x" * 1000 + '" not in [' + ", ".join(["1"] * 1000) + "]",
        " or ".join(['new."' + '\\"' * 10 + '" not in [1]'] * MAX_ATOMS),
        "not " * MAX_NESTING + "new.a == 1",
    ],
)
def test_the_jsonpath_grows_linearly_with_the_text(text: str) -> None:
    assert len(text) <= MAX_CONDITION_LENGTH
    assert len(compile_condition(text).jsonpath) <= 8 * MAX_CONDITION_LENGTH


# (text, position of the problem, words the message must contain)
BAD: list[tuple[str, int, str]] = [
    ("new.status == ", 14, "expected a value after '=='"),
    ("new.status = 'paid'", 11, "write '=='"),
    ("new.a <> 1", 6, "write '!='"),
    ("new.a == 1 && new.b == 2", 11, "write 'and'"),
    ("new.a == 1 || new.b == 2", 11, "write 'or'"),
    ("!new.a == 1", 0, "write 'not'"),
    ("status == 'paid'", 0, "unknown name 'status'"),
    ("lower(new.a) == 'x'", 0, "unknown function 'lower'"),
    ('new.a == "paid"', 9, "write a string in single quotes: 'paid'"),
    ("new.a", 5, "write new.a == true"),
    ("new.a == 1 and", 14, "expected a condition after 'and'"),
    ("new.a == 1 or or new.b == 1", 14, "expected a condition after 'or'"),
    ("(new.a == 1", 11, "expected ')' to close the '(' at column 1"),
    ("new.a == 1)", 10, "closes no '('"),
    ("new.a == 1 new.b == 2", 11, "expected 'and', 'or' or the end"),
    ("new.a not 1", 10, "expected 'in' after 'not'"),
    ("new.a in 1", 9, "expected '['"),
    ("new.a in []", 10, "the list is empty"),
    ("new.a in [1,]", 12, "expected a literal after ','"),
    ("new.a in [1 2]", 12, "expected ',' or ']'"),
    ("new.a in [1, 'a']", 13, "the list mixes numbers and strings"),
    ("new.a in [null, 1, true]", 19, "the list mixes numbers and booleans"),
    ("new.a in [new.b]", 10, "literals only"),
    ("'a' in ['a']", 0, "test op, key or a field"),
    ("1 == 1", 0, "two literals"),
    ("null == new.a and 'x' != 'y'", 18, "two literals"),
    ("new.a < null", 8, "null can only be compared with == or !="),
    ("null >= old.a", 0, "null can only be compared with == or !="),
    ("op == 'insert'", 6, "op is 'put' or 'delete'"),
    ("'PUT' != op", 0, "op is 'put' or 'delete'"),
    ("op in ['put', 'upsert']", 14, "op is 'put' or 'delete'"),
    ("op == null", 6, "op is 'put' or 'delete'"),
    ("op < 'put'", 3, "op can only be compared with ==, != or in"),
    ("key == 1", 7, "key is a string"),
    ("key in ['a', null]", 13, "key is a string"),
    ("changed(new.a)", 8, "changed() takes the path without new. or old."),
    ("changed(OLD)", 8, "changed() takes the path without new. or old."),
    ("changed(a", 9, "expected ')' to close changed("),
    ("changed(a.)", 10, "expected a field name after '.'"),
    ("exists(op)", 7, "expected a field"),
    ("exists new.a", 0, "expected '(' after 'exists'"),
    ("changed == true", 0, "expected '(' after 'changed'"),
    ("new.a == exists", 9, "expected '(' after 'exists'"),
    ("exists(new)", 10, "expected '.' and a field name after 'new'"),
    ("exists(new.a", 12, "expected ')' to close exists("),
    ("new. == 1", 5, "expected a field name after '.'"),
    ("new.0 == 1", 4, 'double-quoted: "0"'),
    ("new.a.-1 == 1", 6, 'double-quoted: "-1"'),
    ("new.caf\u00e9 == 1", 7, "is double-quoted"),
    ("new.a == 01", 9, "invalid number '01'"),
    ("new.a == 1.", 9, "invalid number '1.'"),
    ("new.a == 1e5x", 9, "invalid number '1e5x'"),
    ("new.a == .5", 9, "as in 0.5"),
    ("new.a == -x", 9, "'-' must start a number"),
    ("new.a == +1", 9, "unexpected character '+'"),
    ("new.a == 1e400", 9, "out of range"),
    ("new.a == 1e-400", 9, "would be read as 0.0"),
    ("new.a == 0.30000000000000001", 9, "would be read as 0.3"),
    ("new.a == 'x", 9, "unterminated string"),
    ('new."x == 1', 4, "unterminated quoted name"),
    ("new.a == 'x\\n'", 11, "unknown escape '\\n'"),
    ('new."x\\y" == 1', 6, "unknown escape '\\y'"),
    ("new.a == 'a\tb'", 11, "U+0009 is not allowed inside quotes"),
    ("new.a == 'a\nb'", 11, "U+000A is not allowed inside quotes"),
    ("new.a == 1\x00", 10, "control character U+0000"),
    ("new.a\x1b == 1", 5, "control character U+001B"),
    ("new.a == '\x7f'", 10, "control character U+007F"),
    ("new.a == '\x85'", 10, "control character U+0085"),
    ("new.a == '\ud800'", 10, "lone surrogate U+D800"),
    ("new.a\u00a0== 1", 5, "NO-BREAK SPACE"),
    ("", 0, "the condition is empty"),
    (" \n\t", 0, "the condition is empty"),
    ("not", 3, "expected a condition after 'not'"),
    ("not in ['a']", 4, "expected a condition after 'not'"),
    ("and new.a == 1", 0, "expected a condition"),
    ("new.a == 1 and ()", 16, "expected a condition after '('"),
    ("new.a == == 1", 9, "expected a value after '=='"),
]


@pytest.mark.parametrize(("text", "position", "words"), BAD)
def test_errors_point_at_the_problem(text: str, position: int, words: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    error = caught.value
    assert (error.position, words in error.problem) == (position, True), str(error)
    first, excerpt, caret = str(error).split("\n")
    assert first.startswith(f"invalid when={text!r}: ")
    assert first.endswith(f"{error.problem} at column {position + 1}")
    # The caret sits under the character at the position (or just past the end).
    assert caret == " " * (4 + position) + "^"
    assert len(excerpt) == 4 + len(text)


def test_a_condition_error_is_an_invalid_input_naming_the_field() -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition("new.a = 1", field="condition")
    assert isinstance(caught.value, InvalidInput)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == "condition"
    assert caught.value.value == "new.a = 1"
    assert str(caught.value).startswith("invalid condition='new.a = 1': ")
    with pytest.raises(InvalidInput, match="must be a string"):
        compile_condition(42)  # type: ignore[arg-type]


def test_the_excerpt_of_a_long_condition_is_a_window_around_the_problem() -> None:
    text = " or ".join(["new.a == 'x'"] * 40) + " or new.a === 1 or " + "new.b == 1"
    position = text.index("=== 1") + 2
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    assert caught.value.position == position
    _, excerpt, caret = str(caught.value).split("\n")
    assert excerpt.startswith("    ...")
    assert excerpt[caret.index("^") :].startswith("= 1 or new.b")
    assert len(excerpt) < 140


def test_an_excerpt_shows_invisible_characters_as_one_cell_each() -> None:
    text = "new.a == 1\tand\nnew.b\x01 == 1"
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    _, excerpt, caret = str(caught.value).split("\n")
    assert excerpt == "    new.a == 1 and new.b? == 1"
    assert caret.index("^") == 4 + text.index("\x01")


def test_length_limit() -> None:
    head = "new.a == '"
    at_limit = head + "x" * (MAX_CONDITION_LENGTH - len(head) - 1) + "'"
    assert len(at_limit) == MAX_CONDITION_LENGTH
    assert compile_condition(at_limit).source == at_limit
    with pytest.raises(ConditionError) as caught:
        compile_condition(at_limit + " ")
    assert caught.value.position == MAX_CONDITION_LENGTH
    assert f"{MAX_CONDITION_LENGTH + 1} characters long; the limit is 4096" in str(caught.value)


def test_the_normalised_source_must_fit_the_length_limit_too() -> None:
    # Within the limit as written, past it once spaces surround each '=='.
    text = " or ".join(["new.a=='" + "x" * 60 + "'"] * 56)
    assert len(text) <= MAX_CONDITION_LENGTH
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    assert "normalised" in caught.value.problem
    assert caught.value.position == len(text)


@pytest.mark.parametrize(
    ("opening", "closing", "levels"),
    [("not ", "", 1), ("(", ")", 1), ("not (", ")", 2), ("(not ", ")", 2)],
)
def test_nesting_limit(opening: str, closing: str, levels: int) -> None:
    def nested(reps: int) -> str:
        return opening * reps + "new.a == 1" + closing * reps

    reps = MAX_NESTING // levels
    assert compile_condition(nested(reps)).source.endswith("new.a == 1")
    with pytest.raises(ConditionError, match="nesting deeper than 32 levels") as caught:
        compile_condition(nested(reps + 1))
    # At the first token past the limit.
    assert caught.value.position == len(opening) * reps


def test_nesting_counts_levels_not_parentheses_in_a_row() -> None:
    deep_but_wide = " and ".join(["(" * 30 + "new.a == 1" + ")" * 30] * 3)
    assert compile_condition(deep_but_wide).source == "new.a == 1 and new.a == 1 and new.a == 1"


def test_atom_limit() -> None:
    atoms = ["new.a == 1", "changed(a)", "exists(old.b)", "key in ['x', 'y']"] * (MAX_ATOMS // 4)
    assert len(compile_condition(" or ".join(atoms)).changed) == 1
    text = " or ".join([*atoms, "new.b == 2"])
    with pytest.raises(ConditionError, match="more than 100 comparisons") as caught:
        compile_condition(text)
    assert caught.value.position == text.index("new.b == 2")


def test_a_long_list_is_one_atom() -> None:
    c = compile_condition("new.n in [" + ", ".join(str(i) for i in range(800)) + "]")
    assert c.variables == {"v1": list(range(800))}


def test_the_normalised_source_of_the_deepest_and_widest_conditions_compiles_again() -> None:
    deepest = "not (" * 16 + "new.a == 1 or new.b == 2" + ")" * 16
    widest = " and ".join(f"(new.a == {i} or not new.b == {i})" for i in range(50))
    for text in (deepest, widest):
        c = compile_condition(text)
        assert fingerprint(compile_condition(c.source)) == fingerprint(c)


# Random conditions, as text written any way the grammar allows.

NAMES = st.sampled_from(
    ["a", "b", "status", "x y", 'q"t', "back\\slash", "0", "-1", "new", "OLD", "and", "\u00e9", ""]
) | st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=6)
STRINGS = st.sampled_from(["", "paid", "it's", "a\\b", '"', "\u00e9", "\U0001f600"]) | st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=6
)
NUMBERS = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e300, 10.0, 0.1, 5e-324])
)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@st.composite
def spaced(draw: st.DrawFn, *parts: str) -> str:
    out = []
    for part in parts:
        out.append(part)
        out.append(draw(st.sampled_from([" ", "  ", "\n", "\t ", " \r\n"])))
    return "".join(out)


@st.composite
def keyword(draw: st.DrawFn, word: str) -> str:
    return draw(st.sampled_from([word, word.upper(), word.title()]))


@st.composite
def segment(draw: st.DrawFn, first_of_changed: bool = False) -> str:
    name = draw(NAMES)
    bare_ok = IDENT.fullmatch(name) and not (first_of_changed and name.lower() in ("new", "old"))
    if bare_ok and draw(st.booleans()):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def path(draw: st.DrawFn, changed: bool = False) -> str:
    count = draw(st.integers(1, 3))
    segments = [draw(segment(first_of_changed=changed and i == 0)) for i in range(count)]
    return draw(st.sampled_from([".", " . "])).join(segments)


@st.composite
def field(draw: st.DrawFn) -> str:
    return draw(keyword(draw(st.sampled_from(["new", "old"])))) + "." + draw(path())


def number_text(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(value)
    return text.upper() if "e" in text and len(text) % 2 else text


@st.composite
def literal(draw: st.DrawFn, kind: str) -> str:
    if kind == "string":
        text = draw(STRINGS)
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind == "number":
        return number_text(draw(NUMBERS))
    if kind == "boolean":
        return draw(keyword(draw(st.sampled_from(["true", "false"]))))
    return draw(keyword("null"))


@st.composite
def atom(draw: st.DrawFn) -> str:
    choice = draw(st.sampled_from(["cmp", "cmp", "in", "exists", "changed", "op", "key"]))
    if choice == "exists":
        return draw(keyword("exists")) + "(" + draw(field()) + ")"
    if choice == "changed":
        return draw(keyword("changed")) + "(" + draw(path(changed=True)) + ")"
    if choice == "op":
        values = [f"'{v}'" for v in draw(st.lists(st.sampled_from(["put", "delete"]), min_size=1))]
        if draw(st.booleans()):
            return draw(spaced("op", draw(st.sampled_from(["==", "!="])), values[0]))
        return draw(spaced("op", "in")) + "[" + ", ".join(values) + "]"
    kind = draw(st.sampled_from(["string", "number", "boolean", "null"]))
    if choice == "key":
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        return draw(spaced(draw(keyword("key")), op, draw(literal("string"))))
    subject = draw(field())
    if choice == "in":
        values = draw(st.lists(literal(kind) | literal("null"), min_size=1, max_size=4))
        negated = draw(st.booleans())
        words = [draw(keyword("not")), draw(keyword("in"))] if negated else [draw(keyword("in"))]
        return draw(spaced(subject, *words)) + "[" + " , ".join(values) + "]"
    ops = ["==", "!="] if kind == "null" else ["==", "!=", "<", "<=", ">", ">="]
    op = draw(st.sampled_from(ops))
    other = draw(field()) if draw(st.booleans()) else draw(literal(kind))
    left, right = (subject, other) if draw(st.booleans()) else (other, subject)
    return draw(spaced(left, op, right))


@st.composite
def condition(draw: st.DrawFn, depth: int = 0) -> str:
    # At most 4 levels of not, parentheses and and/or: well inside the nesting limit.
    form = "atom" if depth == 4 else draw(st.sampled_from(["atom", "not", "()", "and", "or"]))
    if form == "atom":
        return draw(atom())
    if form == "not":
        return draw(keyword("not")) + " " + draw(condition(depth + 1))
    if form == "()":
        return "(" + draw(condition(depth + 1)) + ")"
    items = draw(st.lists(condition(depth + 1), min_size=2, max_size=3))
    # Unparenthesised items make for and/or/not mixes whose precedence the parser decides.
    return f" {draw(keyword(form))} ".join(f"({i})" if draw(st.booleans()) else i for i in items)


@given(text=condition())
@settings(deadline=None, max_examples=300)
def test_the_normalised_source_compiles_to_the_same_condition(text: str) -> None:
    compiled = compile_condition(text)
    again = compile_condition(compiled.source)
    assert fingerprint(again) == fingerprint(compiled)
    assert again.source == compiled.source


# The jsonpath is the skeleton the compiler writes, plus field names as jsonpath strings.
JSONPATH_TOKEN = re.compile(
    r"\s+|strict|is|unknown|exists|true|\$v[1-9][0-9]*|\$|@|\?|\[\*\]|\[[0-9]+\]|"
    r'==|!=|<=|>=|<|>|&&|\|\||!|\(|\)|\.|"(?:[^"\\]|\\.)*"'
)


def jsonpath_strings(jsonpath: str) -> list[str]:
    """The decoded string literals of ``jsonpath``; fails if anything else is not skeleton."""
    strings = []
    position = 0
    while position < len(jsonpath):
        match = JSONPATH_TOKEN.match(jsonpath, position)
        assert match, f"unexpected jsonpath text at {position}: {jsonpath[position:]!r}"
        token = match.group()
        if token.startswith('"'):
            strings.append(re.sub(r"\\(.)", r"\1", token[1:-1]))
        position = match.end()
    return strings


@given(
    names=st.lists(
        st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=40),
        min_size=1,
        max_size=5,
    ),
    value=st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=40),
)
@settings(deadline=None, max_examples=300)
def test_no_name_or_literal_escapes_its_place_in_the_jsonpath(names: list[str], value: str) -> None:
    def quoted(name: str) -> str:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'

    fields = ".".join(quoted(n) for n in names)
    literal = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    c = compile_condition(
        f"new.{fields} == {literal} or changed({fields}) or exists(old.{fields})"
        f" or key in [{literal}] or new.{fields} not in [{literal}]"
    )
    assert jsonpath_strings(c.jsonpath) == [
        *(["new", *names] * 2),
        "changed",
        "changed",
        *(["old", *names] * 2),
        "key",
        "key",
        *(["new", *names] * 4),
    ]
    assert c.variables == {"v1": value, "v2": [value], "v3": [value]}
    assert c.changed == (tuple(names),)


# The reference semantics (the database's answers are checked against it in
# tests/integration/test_condition_semantics.py).


def event(new: Any = None, old: Any = None, op: str = "put", key: str = "k") -> dict[str, Any]:
    return {"op": op, "key": key, "new": new, "old": old}


@pytest.mark.parametrize(
    ("text", "ev", "expected"),
    [
        ("changed(status) and new.status == 'paid'", event({"status": "paid"}, {}), True),
        ("changed(status) and new.status == 'paid'", event({"status": "paid"}, None), True),
        (
            "changed(status) and new.status == 'paid'",
            event({"status": "paid"}, {"status": "paid"}),
            False,
        ),
        ("changed(status) and new.status == 'paid'", event(None, {"status": "paid"}), False),
        ("new.n == 1", event({}), False),
        ("new.n != 1", event({}), False),
        ("not new.n == 1", event({}), True),
        ("new.n != 1", event({"n": "1"}), False),
        ("new.n == 1", event({"n": True}), False),
        ("new.n == true", event({"n": 1}), False),
        ("new.n == 1", event({"n": [1]}), False),
        ("new.n.m == 1", event({"n": [{"m": 1}]}), False),
        ("new.n == null", event({"n": None}), True),
        ("new.n != null", event({"n": {}}), True),
        ("new.n != null", event({"n": None}), False),
        ("new.n != 'a'", event({"n": None}), True),
        ("new.n <= old.n", event({"n": None}, {"n": None}), True),
        ("new.n < old.n", event({"n": None}, {"n": None}), False),
        ("new.n < old.n", event({"n": None}, {"n": 1}), False),
        ("new.n in [null, 1]", event({"n": None}), True),
        ("new.n not in [1, 2]", event({"n": None}), True),
        ("new.n not in [1, 2]", event({}), False),
        ("new.n not in [1, 2]", event({"n": "x"}), False),
        ("new.n not in [1, 2]", event({"n": 3}), True),
        ("exists(new.n)", event({"n": None}), True),
        ("exists(new.n)", event([1]), False),
        ("new.n == 10", event({"n": 10.0}), True),
        ("new.n == 0", event({"n": -0.0}), True),
        ("new.n == 1e300", event({"n": 10**300}), True),
        # 1e23 is 99999999999999991611392 as a double, but JSON (and so Postgres) carries
        # the text 1e+23.
        ("new.n == 100000000000000000000000", event({"n": 1e23}), True),
        ("new.n > 0.1", event({"n": Decimal("0.1000000000000000000001")}), True),
        ("new.s > 'z'", event({"s": "\u00e9"}), True),
        # Code point order, not UTF-16's: U+FFDA sorts before U+1F600.
        ("new.s < '\U0001f600'", event({"s": "\uffda"}), True),
        ("new.b < true", event({"b": False}), True),
        ("op == 'delete'", event(op="delete"), True),
        ("key > 'a'", event(key="b"), True),
        ("changed(a)", event({"a": None}, {}), True),
        ("changed(a)", event({}, {}), False),
        ("changed(a)", event({"a": 1}, {"a": 1.0}), False),
        ("changed(a)", event({"a": True}, {"a": 1}), True),
        ("changed(a)", event({"a": {"x": 1, "y": [2]}}, {"a": {"y": [2.0], "x": 1}}), False),
        ("changed(a.b)", event(5, {}), False),
        # changed() follows Postgres's #>, which indexes arrays.
        ('changed("0")', event([1], [2]), True),
        ('changed("0")', event([1], [1, 2]), False),
        ('changed("-1")', event([1, 2], [1, 3]), True),
        ('changed(" +1")', event([1, 2], [1, 3]), True),
        ('changed("1 ")', event([1, 2], [1, 3]), False),
        ('changed("-3")', event([1, 2], [1, 3]), False),
        ('changed(a."0")', event({"a": [1]}, {"a": [2]}), True),
        ('changed("\u0660")', event([1, 2], [3, 2]), False),
        ('changed("4294967296")', event([1], [2]), False),
    ],
)
def test_evaluate(text: str, ev: dict[str, Any], expected: bool) -> None:
    assert evaluate(compile_condition(text), ev) is expected


def test_evaluate_reads_the_changed_flags_of_the_document_when_given() -> None:
    c = compile_condition("changed(a) and not changed(b)")
    unchanged = event({"a": 1}, {"a": 1})
    assert evaluate(c, unchanged) is False
    assert evaluate(c, {**unchanged, "changed": [True, False]}) is True
    assert evaluate(c, {**unchanged, "changed": [True, "yes"]}) is True
    assert evaluate(c, {**unchanged, "changed": [1, False]}) is False
    assert evaluate(c, {**unchanged, "changed": [True]}) is True


def test_evaluate_uses_the_source_of_the_condition_it_is_given() -> None:
    c = compile_condition("new.a == 1")
    stored = CompiledCondition(c.source, c.jsonpath, dict(c.variables), c.changed)
    assert evaluate(stored, event({"a": 1})) is True


@pytest.mark.parametrize("bad", [math.nan, math.inf, Decimal("NaN"), {1, 2}])
def test_evaluate_refuses_what_json_cannot_carry(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        evaluate(compile_condition("new.a == 1"), event({"a": bad}))
