"""Every benchmark scenario, at tiny sizes, once: the bench code cannot rot unnoticed.

No timing assertions: each scenario must run to the end and report finite, plausible numbers.
pgqueuer's scenario needs its own virtualenv (``python -m bench pgqueuer`` creates it, which
needs PyPI); without one that test is skipped rather than going to the network.
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit

import pytest

from bench.__main__ import SCENARIOS, run_scenarios
from bench.core import BENCH_DIR, Context, ScenarioResult, Sizes, quiet_progress
from bench.report import format_scenario, format_targets
from dispatcher.postgres import ProvidedPostgres

pytestmark = [pytest.mark.anyio, pytest.mark.bench]

# Metrics that must be > 0 (rates and latencies); everything else just finite.
POSITIVE = {
    "raw": ["drain", "insert_1conn", "insert_10conn", "insert_bulk"],
    "b1": ["emit_rate"],
    "b2": ["emit_rate"],
    "b3": ["rows_fanout10", "rows_fanout1"],
    "b4": ["drain"],
    "b5": ["drain", "retried", "dead_lettered"],
    "b6": ["drain"],
    "b7": ["listen_500_p99", "poll_500_p99"],
    "b8": ["claim_small_p99", "claim_large_p99"],
    "b9": ["emit_10_mean", "emit_many_mean"],
    "b10": ["client_queries_per_s"],
    "b11": ["rss_baseline", "settled"],
    "scaling": ["p1", "p2"],
    "pgqueuer": ["drain", "latency_p50"],
    "hosts": [
        "raw_insert",
        "emit_asyncpg",
        "emit_sync_psycopg",
        "emit_sqlalchemy_async",
        "sql_function",
        "update_captured",
        "update_plain",
        "bulk_emit_many",
        "bulk_sql_function",
        "captured_vs_plain_update",
        "bulk_function_vs_emit_many",
        "tx_raw_insert",
        "tx_emit_asyncpg",
        "tx_update_captured",
        "tx_captured_vs_plain_update",
        "tx_emit_conditional",
        "tx_conditional_cost",
    ],
    "tracing": ["untraced", "traced", "traced_ratio"],
    "loops": [
        "asyncio_drain",
        "uvloop_drain",
        "ratio_drain",
        "asyncio_latency_p99",
        "uvloop_latency_p99",
        "ratio_latency_p99",
    ],
    "keys": [
        "unordered_drain",
        "ordered_drain",
        "ordered_ratio",
        "hot_mutations",
        "hot_calls",
        "hot_coalescing",
        "hot_final_state",
    ],
}
ZERO = {
    "b4": ["drain_duplicates"],
    "b5": ["drain_duplicates"],
    "b6": ["drain_duplicates"],
    "scaling": ["p1_duplicates", "p2_duplicates"],
    "loops": ["asyncio_drain_duplicates", "uvloop_drain_duplicates"],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario_runs(name: str, postgres: ProvidedPostgres, template_dsn: str) -> None:
    venv = BENCH_DIR / ".venv-pgqueuer"
    if name == "pgqueuer" and not (venv / "bin" / "python").exists():
        pytest.skip("no bench/.venv-pgqueuer; `python -m bench pgqueuer` creates it")
    ctx = Context(
        admin_dsn=postgres.dsn,
        sizes=Sizes.smoke(),
        runs=1,
        progress=quiet_progress,
        pgqueuer_upgrade=False,
        # Clone the suite's migrated template instead of migrating another one.
        template_name=urlsplit(template_dsn).path.lstrip("/"),
    )
    results = await run_scenarios(ctx, [name])
    result = results[name]
    assert isinstance(result, ScenarioResult)
    assert result.metrics, f"{name} reported nothing"
    for metric in result.metrics.values():
        assert len(metric.values) >= 1, metric
        assert all(math.isfinite(v) for v in metric.values), (name, metric)
    for key in POSITIVE[name]:
        assert result.metrics[key].median > 0, (name, key, result.metrics[key])
    for key in ZERO.get(name, []):
        assert result.metrics[key].median == 0, (name, key, result.metrics[key])
    assert format_scenario(result)
    assert format_targets({name: result.as_dict()})
