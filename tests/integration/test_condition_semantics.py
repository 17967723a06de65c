"""Trigger conditions on real Postgres: the compiled jsonpath decides as ``evaluate`` does.

Each case runs ``jsonb_path_match(event, jsonpath, variables, silent => true)`` over the event
document the emit functions build, its ``changed`` flags computed in SQL as they are there:
``(new #> path) IS DISTINCT FROM (old #> path)``. Hand-picked cases pin the semantics the
module documents; Hypothesis draws conditions and events for the rest. No dispatcher schema
is needed, only the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.conditions import (
    MAX_ATOMS,
    MAX_CONDITION_LENGTH,
    MAX_NESTING,
    CompiledCondition,
    compile_condition,
    evaluate,
)
from dispatcher.postgres import ProvidedPostgres

pytestmark = pytest.mark.anyio

# One row per event, in order: the match, and the changed flags the document carried.
MATCH = """
SELECT jsonb_path_match(d.doc, $1::text::jsonpath, $2::jsonb, silent => true) AS matched,
       d.doc -> 'changed' AS changed
FROM jsonb_array_elements($4::jsonb) WITH ORDINALITY AS e(ev, ord)
CROSS JOIN LATERAL (
    SELECT jsonb_build_object(
        'op', e.ev -> 'op', 'key', e.ev -> 'key', 'new', e.ev -> 'new', 'old', e.ev -> 'old',
        'changed', coalesce((
            SELECT jsonb_agg(
                       ((e.ev -> 'new') #> p.path) IS DISTINCT FROM ((e.ev -> 'old') #> p.path)
                       ORDER BY p.i)
            FROM (SELECT c.i,
                         ARRAY(SELECT s.segment
                               FROM jsonb_array_elements_text(c.segments)
                                    WITH ORDINALITY AS s(segment, j)
                               ORDER BY s.j) AS path
                  FROM jsonb_array_elements($3::jsonb) WITH ORDINALITY AS c(segments, i)) AS p),
            '[]'::jsonb)) AS doc
) AS d
ORDER BY e.ord
"""


@pytest.fixture(scope="module")
async def pg(postgres: ProvidedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        yield conn
    finally:
        await conn.close()


def quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def check(
    pg: asyncpg.Connection, condition: CompiledCondition, events: list[Any]
) -> list[bool]:
    """Postgres's answers for ``events`` (Python values, or JSON texts read exactly), after
    checking each against ``evaluate`` and the SQL changed flags against Python's."""
    texts = [e if isinstance(e, str) else json.dumps(e, allow_nan=False) for e in events]
    rows = await pg.fetch(
        MATCH,
        condition.jsonpath,
        json.dumps(condition.variables, allow_nan=False),
        json.dumps([list(path) for path in condition.changed]),
        "[" + ",".join(texts) + "]",
    )
    answers = []
    for text, row in zip(texts, rows, strict=True):
        event = json.loads(text, parse_float=Decimal)
        matched = row["matched"]
        context = f"{condition.source!r} on {text} ({condition.jsonpath})"
        assert matched is not None, f"unknown, not false: {context}"
        assert evaluate(condition, event) is matched, context
        flags = json.loads(row["changed"])
        assert evaluate(condition, {**event, "changed": flags}) is matched, context
        for path, flag in zip(condition.changed, flags, strict=True):
            one = compile_condition("changed(" + ".".join(map(quoted, path)) + ")")
            assert evaluate(one, event) is flag, f"changed{path} on {text}"
        answers.append(matched)
    return answers


def ev(new: Any = None, old: Any = None, op: str = "put", key: str = "k") -> dict[str, Any]:
    return {"op": op, "key": key, "new": new, "old": old}


PAID = "changed(status) and new.status == 'paid'"

CASES: list[tuple[str, Any, bool]] = [
    # Status changed to paid.
    (PAID, ev({"status": "paid"}, {"status": "open"}), True),
    (PAID, ev({"status": "paid", "n": 1}, {"status": "paid"}), False),
    (PAID, ev({"status": "paid"}, {}), True),
    (PAID, ev({"status": "paid"}, None), True),
    (PAID, ev({"status": "open"}, {"status": "paid"}), False),
    (PAID, ev(None, {"status": "paid"}, op="delete"), False),
    (PAID, ev({"status": ["paid"]}, {}), False),
    # Missing fields: false for every comparison, true once negated.
    ("new.a == 1", ev({}), False),
    ("new.a != 1", ev({}), False),
    ("new.a < 1", ev({"b": 0}), False),
    ("not new.a == 1", ev({}), True),
    ("new.a.b == 1", ev({"a": 1}), False),
    ("new.a.b == 1", ev({"a": "b"}), False),
    ("new.a == 1", ev("a"), False),
    ("new.a == 1", ev(None, op="delete"), False),
    ("old.a == 1", ev({"a": 1}, None), False),
    ("new.a == old.a", ev({"a": 1}, {}), False),
    ("new.a != old.a", ev({"a": 1}, {}), False),
    # Nulls.
    ("new.a == null", ev({"a": None}), True),
    ("new.a == null", ev({}), False),
    ("new.a == null", ev({"a": 0}), False),
    ("new.a != null", ev({"a": 0}), True),
    ("new.a != null", ev({"a": {}}), True),
    ("new.a != null", ev({"a": []}), True),
    ("new.a != null", ev({"a": None}), False),
    ("new.a != null", ev({}), False),
    ("new.a != 'x'", ev({"a": None}), True),
    ("new.a == 'x'", ev({"a": None}), False),
    ("new.a == old.a", ev({"a": None}, {"a": None}), True),
    ("new.a <= old.a", ev({"a": None}, {"a": None}), True),
    ("new.a >= old.a", ev({"a": None}, {"a": None}), True),
    ("new.a < old.a", ev({"a": None}, {"a": None}), False),
    ("new.a < old.a", ev({"a": None}, {"a": 1}), False),
    ("new.a != old.a", ev({"a": None}, {"a": [1]}), True),
    ("exists(new.a)", ev({"a": None}), True),
    ("exists(new.a)", ev({}), False),
    ("exists(new.a.b)", ev({"a": None}), False),
    ("new.a in [null, 'x']", ev({"a": None}), True),
    ("new.a in [null, 'x']", ev({"a": {}}), False),
    ("new.a not in ['x', 'y']", ev({"a": None}), True),
    ("new.a not in ['x', null]", ev({"a": None}), False),
    ("new.a not in ['x', null]", ev({"a": [1]}), False),
    ("new.a not in ['x', null]", ev({"a": "z"}), True),
    # Type mismatches.
    ("new.a == 1", ev({"a": "1"}), False),
    ("new.a != 1", ev({"a": "1"}), False),
    ("new.a < 'b'", ev({"a": 1}), False),
    ("new.a == 1", ev({"a": True}), False),
    ("new.a == true", ev({"a": 1}), False),
    ("new.a != true", ev({"a": 1}), False),
    ("new.a == false", ev({"a": 0}), False),
    ("new.a < true", ev({"a": False}), True),
    ("new.a > false", ev({"a": True}), True),
    ("new.a in [1, 2]", ev({"a": "1"}), False),
    ("new.a not in [1, 2]", ev({"a": "1"}), False),
    ("new.a not in [1, 2]", ev({"a": 3}), True),
    # Arrays and objects: never unwrapped, never compared.
    ("new.a == 1", ev({"a": [1]}), False),
    ("new.a != 1", ev({"a": [1]}), False),
    ("new.a == old.a", ev({"a": [1]}, {"a": [1]}), False),
    ("new.a == old.a", ev({"a": {}}, {"a": {}}), False),
    ("new.a in [1]", ev({"a": [1]}), False),
    ("new.a.b == 1", ev({"a": [{"b": 1}]}), False),
    ('new.a."0" == 1', ev({"a": [1]}), False),
    ('exists(new."0")', ev([1]), False),
    ("exists(new.a)", ev({"a": [1, {"b": 2}]}), True),
    ("new.a.b.c == 'deep'", ev({"a": {"b": {"c": "deep"}}}), True),
    # changed(): presence included, JSON equality, and Postgres's #> (arrays indexed).
    ("changed(a)", ev({"a": None}, {}), True),
    ("changed(a)", ev({}, {"a": None}), True),
    ("changed(a)", ev({}, {}), False),
    ("changed(a)", ev({"a": 1}, {"a": 1.0}), False),
    ("changed(a)", ev({"a": 10}, {"a": 1e1}), False),
    ("changed(a)", ev({"a": True}, {"a": 1}), True),
    ("changed(a)", ev({"a": "1"}, {"a": 1}), True),
    ("changed(a)", ev({"a": {"x": 1, "y": [2, {}]}}, {"a": {"y": [2.0, {}], "x": 1}}), False),
    ("changed(a)", ev({"a": [1, 2]}, {"a": [2, 1]}), True),
    ("changed(a.b)", ev({"a": {"b": 1}}, {"a": 5}), True),
    ("changed(a.b)", ev(5, {}), False),
    ("changed(a)", ev(None, {"a": 1}, op="delete"), True),
    ('changed("0")', ev([1], [2]), True),
    ('changed("0")', ev([1], [1, 2]), False),
    ('changed("1")', ev([1], [1, 2]), True),
    ('changed("-1")', ev([1, 2], [1, 3]), True),
    ('changed("-3")', ev([1, 2], [1, 3]), False),
    ('changed("-2")', ev([1, 2], [3, 2]), True),
    ('changed(" +1")', ev([1, 2], [1, 3]), True),
    ('changed("01")', ev([1, 2], [1, 3]), True),
    ('changed("1 ")', ev([1, 2], [1, 3]), False),
    ('changed("0x0")', ev([1], [2]), False),
    ('changed("\u0660")', ev([1], [2]), False),
    ('changed("4294967296")', ev([1], [2]), False),
    ('changed("-2147483648")', ev([1], [2]), False),
    ('changed(a."0".b)', ev({"a": [{"b": 1}]}, {"a": [{"b": 2}]}), True),
    # Unicode: code point order, whatever the database's collation.
    ("new.s > 'z'", ev({"s": "\u00e9"}), True),
    ("new.s < '\U0001f600'", ev({"s": "\uffda"}), True),
    ("new.s == '\u00e9'", ev({"s": "e\u0301"}), False),
    ("new.\"\u00e9t\u00e9\" == '\u2603'", ev({"\u00e9t\u00e9": "\u2603"}), True),
    ('new."\U0001f600"."\u4e2d" == 1', ev({"\U0001f600": {"\u4e2d": 1}}), True),
    # Hostile names: each reaches its own member and nothing else.
    ('new."a\\"b" == 1', ev({'a"b': 1}), True),
    ('new."a\\"b" == 1', ev({"a": 1, "b": 1, 'a\\"b': 1}), False),
    ('new."a\\\\b" == 1', ev({"a\\b": 1}), True),
    ('new."\\" || true || \\"" == 1', ev({'" || true || "': 1}), True),
    ('new."\\" || true || \\"" == 1', ev({}), False),
    ('new."$" == 1 or new."@" == 1', ev({"$": 1}), True),
    ('new."$" == 1', ev({"$": 0, "": 1}), False),
    ('new."\') or true --" == 1', ev({"') or true --": 1}), True),
    ('new."" == 1', ev({"": 1}), True),
    ('exists(new."a.b")', ev({"a": {"b": 1}}), False),
    ('exists(new."a.b")', ev({"a.b": 1}), True),
    ('new."changed" == 1', ev({"changed": 1}), True),
    ("new.a == 'x\\' || true || \\'x'", ev({"a": "x' || true || 'x"}), True),
    ("new.a == 'x\\' || true || \\'x'", ev({"a": "y"}), False),
    # Numbers.
    ("new.n == 1e300", ev({"n": 1e300}), True),
    ("new.n == 1e300", ev({"n": 10**300}), True),
    ("new.n < 1e300", ev({"n": 10**300 - 1}), True),
    ("new.n == 0", ev({"n": -0.0}), True),
    ("new.n == -0.0", ev({"n": 0}), True),
    ("new.n == 10", ev({"n": 10.0}), True),
    ("new.n == 10.0", ev({"n": 10}), True),
    ("new.n > 9.999999999999998", ev({"n": 10}), True),
    ("new.n == 0.1", ev({"n": 0.1}), True),
    ("new.n == 100000000000000000000000", ev({"n": 1e23}), True),
    ("new.n == 1180591620717411303424", ev({"n": 2**70}), True),
    ("new.n > 1180591620717411303424", ev({"n": 2**70 + 1}), True),
    ("new.n == 5e-324", ev({"n": 5e-324}), True),
    ("new.n > 0", ev({"n": 5e-324}), True),
    ("new.n > 0.1", '{"op":"put","key":"k","new":{"n":0.1000000000000000000001},"old":null}', True),
    ("new.n == 0.1", '{"op":"put","key":"k","new":{"n":0.10000000000000000000},"old":null}', True),
    ("new.n == 1", '{"op":"put","key":"k","new":{"n":1e0},"old":null}', True),
    # op and key.
    ("op == 'put'", ev(), True),
    ("op == 'delete'", ev(op="delete"), True),
    ("op in ['delete']", ev(), False),
    ("op != 'delete' and key in ['k', 'j']", ev(key="k"), True),
    ("key > 'a' and key < 'b'", ev(key="ab"), True),
    ("key == '\u00e9'", ev(key="\u00e9"), True),
    ("key == new.owner", ev({"owner": "k"}, key="k"), True),
    # not, and, or over two-valued atoms.
    ("not (new.a == 1 or new.b == 2)", ev({"a": "1"}), True),
    ("not not new.a == 1", ev({}), False),
    ("new.a == 1 and not exists(old.a)", ev({"a": 1}, None), True),
    ("(new.a == 1 or new.a == 'x') and not changed(a)", ev({"a": "x"}, {"a": "x"}), True),
]


@pytest.mark.parametrize(("text", "event", "expected"), CASES)
async def test_postgres_decides_as_evaluate_does(
    pg: asyncpg.Connection, text: str, event: Any, expected: bool
) -> None:
    assert await check(pg, compile_condition(text), [event]) == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            " or ".join(f"new.a == {i}" for i in range(MAX_ATOMS - 1)) + " or changed(b)",
            [True, False],
        ),
        ("not " * MAX_NESTING + "new.a == 7", [True, False]),
        ("not " * (MAX_NESTING - 1) + "new.a == 7", [False, True]),
        ("(" * MAX_NESTING + "new.a == 7" + ")" * MAX_NESTING, [True, False]),
        ("new.a in [" + ", ".join(str(i) for i in range(800)) + "]", [True, False]),
        ("new.a not in [" + ", ".join(str(i) for i in range(800)) + "]", [False, True]),
        ('new."' + '\\"' * 2030 + '" == 1 or new.a == 7', [True, False]),
    ],
)
async def test_the_largest_conditions_run_in_postgres(
    pg: asyncpg.Connection, text: str, expected: list[bool]
) -> None:
    assert len(text) <= MAX_CONDITION_LENGTH
    events = [ev({"a": 7}, {"b": 1}), ev({"a": 7.5}, {})]
    assert await check(pg, compile_condition(text), events) == expected


# Random conditions over a few names, and random events that use the same names.

NAMES = ["a", "b", "x y", 'q"t', "0", "-1", "\u00e9"]
SCALARS = [None, True, False, 0, 1, -1, 10, 10.0, 1.5, -0.0, 1e300, 2**70, "", "a", "b", "\u00e9"]


def literal_text(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value)


def kind(value: Any) -> str:
    if value is None or isinstance(value, bool | str):
        return type(value).__name__
    return "number"


PATHS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=2).map(
    lambda path: ".".join(map(quoted, path))
)
FIELDS = st.tuples(st.sampled_from(["new", "old"]), PATHS).map(lambda f: f"{f[0]}.{f[1]}")
LITERALS = st.sampled_from(SCALARS) | st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def atom(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(["cmp", "cmp", "fields", "in", "exists", "changed", "op", "key"]))
    if form == "exists":
        return f"exists({draw(FIELDS)})"
    if form == "changed":
        return f"changed({draw(PATHS)})"
    if form == "op":
        return f"op == '{draw(st.sampled_from(['put', 'delete']))}'"
    if form == "key":
        op = draw(st.sampled_from(["==", "!=", "<", ">="]))
        return f"key {op} '{draw(st.sampled_from(['a', 'b', 'k']))}'"
    if form == "fields":
        op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">="]))
        return f"{draw(FIELDS)} {op} {draw(FIELDS)}"
    value = draw(LITERALS)
    if form == "in":
        values = draw(
            st.lists(LITERALS.filter(lambda v: v is None or kind(v) == kind(value)), max_size=3)
        )
        negated = "not in" if draw(st.booleans()) else "in"
        listed = ", ".join(literal_text(v) for v in [value, *values])
        return f"{draw(FIELDS)} {negated} [{listed}]"
    op = draw(
        st.sampled_from(["==", "!="] if value is None else ["==", "!=", "<", "<=", ">", ">="])
    )
    return f"{draw(FIELDS)} {op} {literal_text(value)}"


@st.composite
def condition(draw: st.DrawFn, depth: int = 0) -> str:
    form = "atom" if depth == 3 else draw(st.sampled_from(["atom", "atom", "not", "and", "or"]))
    if form == "atom":
        return draw(atom())
    if form == "not":
        return f"not ({draw(condition(depth + 1))})"
    items = draw(st.lists(condition(depth + 1), min_size=2, max_size=3))
    return f" {form} ".join(f"({item})" for item in items)


VALUES = st.recursive(
    st.sampled_from(SCALARS) | st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(NAMES), inner),
    max_leaves=6,
)
DOCS = st.none() | VALUES | st.dictionaries(st.sampled_from([*NAMES, "z"]), VALUES, max_size=5)


@st.composite
def event(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(["put", "put", "delete"]))
    new = None if op == "delete" else draw(DOCS)
    return ev(new, draw(DOCS), op=op, key=draw(st.sampled_from(["a", "b", "k", "", "\u00e9"])))


@given(text=condition(), events=st.lists(event(), min_size=1, max_size=6))
@settings(deadline=None, max_examples=200, database=None)
async def test_random_conditions_decide_in_postgres_as_evaluate_does(
    pg: asyncpg.Connection, text: str, events: list[dict[str, Any]]
) -> None:
    await check(pg, compile_condition(text), events)


NAME = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=30)


@given(name=NAME, other=NAME)
@settings(deadline=None, max_examples=100, database=None)
async def test_any_name_reaches_exactly_its_own_member(
    pg: asyncpg.Connection, name: str, other: str
) -> None:
    q = quoted(name)
    c = compile_condition(f"new.{q} == 'hit' and changed({q}) and exists(new.{q}) and key == 'k'")
    events = [ev({name: "hit"}, {}), ev({name: "hit"}, {name: "hit"})]
    expected = [True, False]
    if other != name:
        events.append(ev({other: "hit"}, {}))
        expected.append(False)
    assert await check(pg, c, events) == expected
