"""The issue's targets, evaluated on medians. Ratios use whatever the same results file holds
for the other scenario (normally the same ``all`` run)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Results = Mapping[str, Mapping[str, Any]]


def med(results: Results, scenario: str, metric: str) -> float | None:
    """The median of ``scenario.metric``, or None when it was not measured."""
    try:
        value = float(results[scenario]["metrics"][metric]["median"])
    except (KeyError, TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def worst(results: Results, scenario: str, metric: str) -> float | None:
    try:
        return max(float(v) for v in results[scenario]["metrics"][metric]["values"])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Target:
    id: str
    text: str
    # Returns (measured value as shown, met?) or None when an input is missing.
    check: Callable[[Results], tuple[str, bool] | None]


def _ratio(
    a: tuple[str, str],
    b: tuple[str, str],
    at_least: float | None = None,
    at_most: float | None = None,
) -> Callable[[Results], tuple[str, bool] | None]:
    def check(results: Results) -> tuple[str, bool] | None:
        x, y = med(results, *a), med(results, *b)
        if x is None or y is None or y == 0:
            return None
        r = x / y
        ok = (at_least is None or r >= at_least) and (at_most is None or r <= at_most)
        return f"{r:.2f}x", ok

    return check


def _at_most(
    scenario: str, metric: str, limit: float, unit: str
) -> Callable[[Results], tuple[str, bool] | None]:
    def check(results: Results) -> tuple[str, bool] | None:
        v = med(results, scenario, metric)
        return None if v is None else (f"{v:,.2f} {unit}", v <= limit)

    return check


def _at_least(
    scenario: str, metric: str, limit: float, unit: str
) -> Callable[[Results], tuple[str, bool] | None]:
    def check(results: Results) -> tuple[str, bool] | None:
        v = med(results, scenario, metric)
        return None if v is None else (f"{v:,.0f} {unit}", v >= limit)

    return check


def _ratio_at_least(
    scenario: str, metric: str, limit: float
) -> Callable[[Results], tuple[str, bool] | None]:
    """A ratio the scenario measured itself (per run, between interleaved variants)."""

    def check(results: Results) -> tuple[str, bool] | None:
        v = med(results, scenario, metric)
        return None if v is None else (f"{v:.2f}x", v >= limit)

    return check


def _ratio_at_most(
    scenario: str, metric: str, limit: float
) -> Callable[[Results], tuple[str, bool] | None]:
    """A cost ratio the scenario measured itself (lower is better)."""

    def check(results: Results) -> tuple[str, bool] | None:
        v = med(results, scenario, metric)
        return None if v is None else (f"{v:.2f}x", v <= limit)

    return check


def _no_duplicates(results: Results) -> tuple[str, bool] | None:
    v = worst(results, "b6", "drain_duplicates")
    return None if v is None else (f"{v:.0f} (worst run)", v == 0)


TARGETS: list[Target] = [
    Target(
        "B4/pgq", "B4 drain ≥ 2.5x pgqueuer", _ratio(("b4", "drain"), ("pgqueuer", "drain"), 2.5)
    ),
    Target("B4/raw", "B4 drain ≥ 0.7x raw ceiling", _ratio(("b4", "drain"), ("raw", "drain"), 0.7)),
    Target(
        "B4 client",
        "B4 dispatcher CPU per drained row ≤ 25 µs",
        _at_most("b4", "drain_dispatcher_cpu_us_per_row", 25, "µs"),
    ),
    Target(
        "B4 postgres",
        "B4 Postgres CPU per drained row ≤ 32 µs",
        _at_most("b4", "drain_postgres_cpu_us_per_row", 32, "µs"),
    ),
    Target("B5/B4", "B5 ≥ 0.9x B4", _ratio(("b5", "drain"), ("b4", "drain"), 0.9)),
    Target("B6/B4", "B6 (2 processes) ≥ 1.5x B4", _ratio(("b6", "drain"), ("b4", "drain"), 1.5)),
    Target("B6 dup", "B6 zero duplicate executions", _no_duplicates),
    Target(
        "B1/raw",
        "B1 ≥ 0.95x raw single insert",
        _ratio(("b1", "emit_rate"), ("raw", "insert_1conn"), 0.95),
    ),
    Target(
        "B2/raw",
        "B2 ≥ 0.8x raw 10-connection insert",
        _ratio(("b2", "emit_rate"), ("raw", "insert_10conn"), 0.8),
    ),
    Target(
        "B3",
        "B3 bulk emit ≥ 100,000 rows/s (fan-out 10)",
        _at_least("b3", "rows_fanout10", 100_000, "rows/s"),
    ),
    Target(
        "B3 f1",
        "B3 bulk emit ≥ 100,000 rows/s (fan-out 1)",
        _at_least("b3", "rows_fanout1", 100_000, "rows/s"),
    ),
    Target("B7 p50", "B7 LISTEN, 500/s: p50 ≤ 1.0 ms", _at_most("b7", "listen_500_p50", 1.0, "ms")),
    Target("B7 p99", "B7 LISTEN, 500/s: p99 ≤ 3.0 ms", _at_most("b7", "listen_500_p99", 3.0, "ms")),
    Target(
        "B7 poll p50", "B7 poll-only, 500/s: p50 ≤ 60 ms", _at_most("b7", "poll_500_p50", 60, "ms")
    ),
    Target(
        "B7 poll p99",
        "B7 poll-only, 500/s: p99 ≤ 115 ms",
        _at_most("b7", "poll_500_p99", 115, "ms"),
    ),
    Target(
        "B8",
        "B8 claim p99 at 1M due ≤ 2x at 10k",
        _ratio(("b8", "claim_large_p99"), ("b8", "claim_small_p99"), at_most=2.0),
    ),
    Target(
        "B9",
        "B9 emit with 10,000 triggers ≤ 2x with 10",
        _ratio(("b9", "emit_many_mean"), ("b9", "emit_10_mean"), at_most=2.0),
    ),
    Target(
        "B10", "B10 idle ≤ 10 queries/s", _at_most("b10", "client_queries_per_s", 10, "queries/s")
    ),
    Target(
        "B11",
        "B11 RSS flat within ±10%",
        _at_most("b11", "rss_max_deviation", 10, "% max deviation"),
    ),
    Target(
        "hosts B1",
        "hosts: asyncpg emit ≥ 0.9x raw single insert",
        _ratio_at_least("hosts", "emit_asyncpg_vs_raw", 0.9),
    ),
    Target(
        "hosts capture",
        "hosts: captured UPDATE ≥ 0.8x plain UPDATE",
        _ratio_at_least("hosts", "captured_vs_plain_update", 0.8),
    ),
    Target(
        "hosts conditional",
        "hosts: a conditional trigger's emit ≤ 1.2x the cost of an unconditional one",
        _ratio_at_most("hosts", "tx_conditional_cost", 1.2),
    ),
    Target(
        "keys order",
        "keys: an ordered trigger drains ≥ 0.7x an unordered one (10,000 keys)",
        _ratio_at_least("keys", "ordered_ratio", 0.7),
    ),
    Target(
        "keys latest",
        "keys: a hot key (30 s) makes ≥ 100x fewer latest-state handler calls than mutations",
        _ratio_at_least("keys", "hot_coalescing", 100.0),
    ),
    Target(
        "hosts bulk",
        "hosts: SQL emit_many() ≥ 1.0x emit_many",
        _ratio_at_least("hosts", "bulk_function_vs_emit_many", 1.0),
    ),
]


def evaluate(results: Results) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        outcome = t.check(results)
        rows.append(
            {
                "id": t.id,
                "target": t.text,
                "measured": outcome[0] if outcome else "not measured",
                "met": outcome[1] if outcome else None,
            }
        )
    return rows
