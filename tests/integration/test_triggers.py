from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from dispatcher.core.errors import InvalidInput, LimitExceeded, TriggerExists, TriggerNotFound
from dispatcher.core.models import BackoffKind, Op, RetryPolicy
from dispatcher.triggers import TriggerRegistry

pytestmark = pytest.mark.anyio

REGISTRY = TriggerRegistry()


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scope": "acme",
        "name": "t1",
        "namespace": "users",
        "key_pattern": "users/*",
        "target": "noop",
        "registered_by": "user:1",
    }
    base.update(overrides)
    return base


async def test_register_get_list_enable_disable_delete(conn: asyncpg.Connection) -> None:
    policy = RetryPolicy(kind=BackoffKind.LINEAR, base_delay=2, factor=1, max_delay=10)
    t = await REGISTRY.register(conn, **spec(retry=policy, ops=["put"], execution_timeout=5))
    assert t.retry == policy
    assert t.ops == frozenset({Op.PUT})
    assert t.timeout == 5.0
    assert (await REGISTRY.get(conn, t.id)) == t
    assert (await REGISTRY.get_by_name(conn, "acme", "t1")).id == t.id
    other = await REGISTRY.register(conn, **spec(scope="globex"))
    assert [x.id for x in await REGISTRY.list(conn, scope="acme")] == [t.id]
    assert {x.id for x in await REGISTRY.list(conn)} == {t.id, other.id}
    assert not (await REGISTRY.disable(conn, t.id)).enabled
    assert (await REGISTRY.enable(conn, t.id)).enabled
    await REGISTRY.delete(conn, t.id)
    with pytest.raises(TriggerNotFound):
        await REGISTRY.get(conn, t.id)
    with pytest.raises(TriggerNotFound):
        await REGISTRY.delete(conn, t.id)


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("key_pattern", {"key_pattern": ""}),
    ("key_pattern", {"key_pattern": "k" * 2000}),
    ("key_pattern", {"key_pattern": "users/\x01"}),
    ("key_pattern", {"key_pattern": "a**b"}),
    ("name", {"name": ""}),
    ("name", {"name": "bad\nname"}),
    ("scope", {"scope": ""}),
    ("namespace", {"namespace": "x" * 500}),
    ("target", {"target": ""}),
    ("registered_by", {"registered_by": ""}),
    ("ops", {"ops": ["put", "upsert"]}),
    ("ops", {"ops": []}),
    ("ops", {"ops": "put"}),
    ("execution_timeout", {"execution_timeout": 0}),
    ("execution_timeout", {"execution_timeout": -1}),
    ("execution_timeout", {"execution_timeout": float("nan")}),
]


@pytest.mark.parametrize(("field", "overrides"), INVALID)
async def test_bad_input_raises_typed_error_naming_the_field(
    conn: asyncpg.Connection, field: str, overrides: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput) as info:
        await REGISTRY.register(conn, **spec(**overrides))
    assert info.value.field == field
    assert field in str(info.value)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.triggers") == 0


POLICY_INVALID: list[tuple[str, dict[str, Any]]] = [
    ("retry.base_delay", {"base_delay": -1}),
    ("retry.max_delay", {"base_delay": 10, "max_delay": 5}),
    ("retry.max_delay", {"max_delay": -3}),
    ("retry.jitter", {"jitter": 1.5}),
    ("retry.jitter", {"jitter": -0.1}),
    ("retry.max_attempts", {"max_attempts": 0}),
    ("retry.kind", {"kind": "fibonacci"}),
    ("retry.factor", {"factor": 0.5}),
    ("retry.max_event_age", {"max_event_age": 0}),
    ("retry.park_on", {"park_on": {"handler_error"}}),
    ("retry.park_on", {"park_on": "permission_denied"}),
]


@pytest.mark.parametrize(("field", "kwargs"), POLICY_INVALID)
def test_bad_retry_policy_names_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        RetryPolicy(**kwargs)
    assert info.value.field == field


async def test_duplicate_name_is_a_typed_error(conn: asyncpg.Connection) -> None:
    await REGISTRY.register(conn, **spec())
    with pytest.raises(TriggerExists) as info:
        await REGISTRY.register(conn, **spec(key_pattern="other"))
    assert info.value.field == "name"
    # Same name in another scope is fine.
    await REGISTRY.register(conn, **spec(scope="other"))


async def test_cap_per_scope(conn: asyncpg.Connection) -> None:
    small = TriggerRegistry(max_triggers_per_scope=2)
    await small.register(conn, **spec(name="a"))
    await small.register(conn, **spec(name="b"))
    with pytest.raises(LimitExceeded) as info:
        await small.register(conn, **spec(name="c"))
    assert info.value.setting == "max_triggers_per_scope"
    await small.register(conn, **spec(name="c", scope="elsewhere"))
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.triggers") == 3


async def test_cap_holds_under_concurrent_registration(dsn: str) -> None:
    import anyio

    small = TriggerRegistry(max_triggers_per_scope=5)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            await small.register(c, **spec(name=f"n{i}"))
            outcomes.append("ok")
        except LimitExceeded:
            outcomes.append("capped")
        finally:
            await c.close()

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert outcomes.count("ok") == 5
    assert outcomes.count("capped") == 7
