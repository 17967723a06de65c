"""The shipped dashboard and alert rules: valid, parsed by promtool, unit-tested with
``promtool test rules``, and naming only series a real dispatcher exports (checked against a
scrape of one, over HTTP, after a success and a dead letter).

promtool comes from Debian's ``prometheus`` package; ``.ci/run`` installs it and sets
``DISPATCHER_REQUIRE_PROMTOOL=1``, so these tests run in CI and skip only on a machine
without it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import Dispatcher, DispatcherConfig, Mutation, Op, TriggerRegistry, emit
from dispatcher.metrics import PrometheusRecorder, instrument, start_metrics_server
from dispatcher.testing import RecordingHandlers, instant_retries

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "alerts.yml"
ALERT_TESTS = DOCS / "alerts_test.yml"
METRIC = re.compile(r"\bdispatcher_[a-z_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("DISPATCHER_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (DISPATCHER_REQUIRE_PROMTOOL) but missing")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]]


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 5 rules found" in run_promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in run_promtool("test", "rules", str(ALERT_TESTS))


def test_the_dashboard_is_well_formed(tmp_path: Path) -> None:
    board = dashboard()
    assert board["uid"] == "dispatcher-overview"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job"}
    for p in panels(board):
        assert p["title"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for t in p["targets"]:
            assert '{job=~"$job"' in t["expr"], (p["title"], t["expr"])
    # No two panels share a cell of the grid (Grafana would push one down).
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[x, y] = p["title"]
    # Every query parses as PromQL: promtool checks them as recording rules, with the
    # dashboard's variables replaced as Grafana would.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{i}",
                        "expr": e.replace("$__rate_interval", "5m").replace("$job", ".*"),
                    }
                    for i, e in enumerate(exprs(board))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert f"SUCCESS: {len(exprs(board))} rules found" in run_promtool("check", "rules", str(path))


async def scraped_names(dsn: str, conn: asyncpg.Connection) -> set[str]:
    """The sample names a real dispatcher serves, per-trigger series on, after a success and
    a dead letter."""
    for name, pattern in (("ok", "users/1"), ("broken", "users/2")):
        await TriggerRegistry().register(
            conn,
            scope="acme",
            name=name,
            namespace="users",
            key_pattern=pattern,
            target=name,
            registered_by="user:1",
            retry=instant_retries(1),
        )
    for key in ("users/1", "users/2"):
        await emit(conn, Mutation("acme", "users", key, Op.PUT, {}), autocommit=True)
    handlers = RecordingHandlers()
    handlers.succeed("ok")
    handlers.fail("broken")
    recorder = PrometheusRecorder(CollectorRegistry(), per_trigger=10)
    d = Dispatcher(dsn, handlers, config=DispatcherConfig(poll_interval=0.05))
    instrument(d, recorder=recorder)
    with start_metrics_server(0, recorder=recorder) as server:
        stats = await d.run_until_idle(time_limit=30, include_scheduled=True)
        assert stats.dead_lettered == 1

        def get() -> str:
            with urllib.request.urlopen(server.url, timeout=10) as response:
                body: bytes = response.read()
                return body.decode()

        text = await anyio.to_thread.run_sync(get)
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.anyio
async def test_dashboard_and_alerts_name_only_exported_series(
    dsn: str, conn: asyncpg.Connection
) -> None:
    exported = await scraped_names(dsn, conn)
    wanted = {m for e in exprs(dashboard()) for m in METRIC.findall(e)}
    wanted |= set(METRIC.findall(ALERTS.read_text()))
    assert wanted, "no series found in the dashboard"
    missing = wanted - exported
    assert not missing, f"not exported: {sorted(missing)}"
    # The alerts' test series are the same names (a rename caught in both places).
    assert set(METRIC.findall(ALERT_TESTS.read_text())) <= exported
