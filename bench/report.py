"""Print results as tables and keep them in a JSON file (merged per scenario, so running one
scenario updates its entry and leaves the others)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.core import ScenarioResult
from bench.targets import evaluate


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_scenario(result: ScenarioResult) -> str:
    others = result.extra.get("others_cores_mean")
    noise = f", others on the machine: {others:.2f} cores" if others is not None else ""
    lines = [f"== {result.name}: {result.title}  ({result.seconds:.0f}s{noise})"]
    width = max((len(k) for k in result.metrics), default=10)
    for name, m in result.metrics.items():
        runs = ", ".join(_fmt(v) for v in m.values)
        lines.append(f"  {name:<{width}}  median {_fmt(m.median):>10} {m.unit:<12} runs [{runs}]")
    lines.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(lines)


def format_targets(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = evaluate(results)
    width = max(len(r["target"]) for r in rows)
    lines = ["== targets (medians)"]
    for r in rows:
        status = {True: "met", False: "MISSED", None: "-"}[r["met"]]
        lines.append(f"  {r['target']:<{width}}  {r['measured']:>24}  {status}")
    return "\n".join(lines)


def merge_json(
    path: Path, environment: Mapping[str, Any], results: Mapping[str, ScenarioResult]
) -> dict[str, Any]:
    """Write ``results`` into ``path``, keeping entries of scenarios not run this time."""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    scenarios = dict(data.get("scenarios", {}))
    for name, r in results.items():
        entry = r.as_dict()
        entry["environment"] = environment
        scenarios[name] = entry
    data = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment,
        "scenarios": scenarios,
        "targets": evaluate(scenarios),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def markdown(data: Mapping[str, Any]) -> str:
    """The results file as Markdown tables (targets, then every metric), for docs."""
    scenarios = data["scenarios"]
    out = ["| target | measured (medians) | met |", "| --- | --- | --- |"]
    for r in evaluate(scenarios):
        status = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        out.append(f"| {r['target']} | {r['measured']} | {status} |")
    out += [
        "",
        "| scenario | metric | median | runs | others' CPU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in scenarios.items():
        others = s.get("extra", {}).get("others_cores_mean")
        noise = f"{others:.2f} cores" if others is not None else "n/a"
        for metric, m in s["metrics"].items():
            runs = ", ".join(_fmt(v) for v in m["values"])
            out.append(
                f"| {name} | {metric} | {_fmt(m['median'])} {m['unit']} | {runs} | {noise} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("json", nargs="?", type=Path, default=Path("bench/results/latest.json"))
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
