"""``python -m bench all`` or ``python -m bench <scenario> [<scenario> …]``.

Scenarios: raw, pgqueuer, b1 … b11, scaling, hosts (emitting from each host, table capture
and bulk, side by side), keys (an ordered trigger's drain against an unordered one's; a hot
key's latest-state coalescing), tracing, loops (B4's drain and B7's LISTEN latency with the
dispatcher on uvloop and on asyncio, alternately). Each runs its measurement 3 times back to
back (``--runs``) and reports medians; results are merged into ``bench/results/latest.json``
and a chart is written to ``docs/benchmarks.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench import hosts, keys, loops, pgq, raw, scenarios
from bench.core import (
    DEFAULT_DSN,
    REPO_DIR,
    Context,
    NoiseMeter,
    ScenarioResult,
    Sizes,
    environment,
    quiet_progress,
    stderr_progress,
    tree_digest,
)
from bench.report import format_scenario, format_targets, merge_json

Scenario = Callable[[Context], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "raw": raw.run,
    "pgqueuer": pgq.run,
    "b1": scenarios.b1,
    "b2": scenarios.b2,
    "b3": scenarios.b3,
    "b4": scenarios.b4,
    "b5": scenarios.b5,
    "b6": scenarios.b6,
    "b7": scenarios.b7,
    "b8": scenarios.b8,
    "b9": scenarios.b9,
    "b10": scenarios.b10,
    "scaling": scenarios.scaling,
    "b11": scenarios.b11,
    "hosts": hosts.run,
    "keys": keys.run,
    "tracing": scenarios.tracing,
    "loops": loops.run,
}


async def run_scenarios(
    ctx: Context, names: Sequence[str], *, b11_runs: int = 1
) -> dict[str, ScenarioResult]:
    """Run ``names`` in order; returns their results. Databases are cleaned up on exit."""
    results: dict[str, ScenarioResult] = {}
    noise = NoiseMeter()
    sampler = asyncio.create_task(noise.run())
    try:
        for name in names:
            ctx.progress(f"--- {name}")
            started = time.monotonic()
            if name == "b11":
                result = await scenarios.b11(ctx, runs=b11_runs)
            else:
                result = await SCENARIOS[name](ctx)
            result.seconds = time.monotonic() - started
            result.extra["loadavg_after"] = list(os.getloadavg())
            result.extra.update(noise.others(started, time.monotonic()))
            results[name] = result
            others = result.extra.get("others_cores_mean", float("nan"))
            ctx.progress(
                f"--- {name} done in {result.seconds:.0f}s (other processes on the machine: "
                f"{others:.2f} cores on average)"
            )
    finally:
        sampler.cancel()
        await ctx.close()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("scenarios", nargs="+", choices=["all", *SCENARIOS], metavar="SCENARIO")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("BENCH_DSN", DEFAULT_DSN),
        help="server to benchmark on (it creates and drops bench_* databases); "
        "default $BENCH_DSN or %(default)s",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per scenario")
    parser.add_argument("--b11-seconds", type=float, default=None, help="B11 duration (300)")
    parser.add_argument("--b11-runs", type=int, default=1, help="B11 repetitions (1)")
    parser.add_argument("--json", type=Path, default=REPO_DIR / "bench" / "results" / "latest.json")
    parser.add_argument("--chart", type=Path, default=REPO_DIR / "docs" / "benchmarks.png")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--profile", type=Path, default=None, help="pyinstrument profiles of drain workers here"
    )
    parser.add_argument(
        "--no-pgqueuer-upgrade", action="store_true", help="use the installed pgqueuer as is"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.b11_seconds is not None:
        sizes = dataclasses.replace(sizes, steady_seconds=args.b11_seconds)
    ctx = Context(
        admin_dsn=args.dsn,
        sizes=sizes,
        runs=args.runs,
        progress=quiet_progress if args.quiet else stderr_progress,
        pgqueuer_upgrade=not args.no_pgqueuer_upgrade,
        profile_dir=args.profile,
    )
    env = await environment(args.dsn)
    settings = env["settings"]
    print(
        f"postgres {env['postgres']}: fsync={settings['fsync']} "
        f"synchronous_commit={settings['synchronous_commit']} "
        f"full_page_writes={settings['full_page_writes']} autovacuum={settings['autovacuum']}; "
        f"{env['machine']['cores']} cores, load {env['machine']['loadavg_at_start']}",
        flush=True,
    )
    if settings["fsync"] != "on" or settings["synchronous_commit"] != "on":
        print("WARNING: durability is not at its defaults; numbers are not comparable", flush=True)
    if settings["autovacuum"] != "on":
        print(
            "note: autovacuum is off on this server; seeded tables are VACUUM ANALYZEd", flush=True
        )
    results = await run_scenarios(ctx, names, b11_runs=args.b11_runs)
    env["dispatcher_tree_sha256_end"] = tree_digest()
    if env["dispatcher_tree_sha256_end"] != env["dispatcher_tree_sha256"]:
        print("WARNING: dispatcher/ or migrations/ changed on disk during the run", flush=True)
    for r in results.values():
        print(format_scenario(r), flush=True)
    data = merge_json(args.json, env, results)
    print(format_targets(data["scenarios"]))
    print(f"results: {args.json}")
    if not args.no_chart:
        try:
            from bench.chart import write_chart
        except ImportError:
            print("no chart: install matplotlib (the bench extra)", file=sys.stderr)
        else:
            try:
                print(f"chart: {write_chart(data['scenarios'], args.chart)}")
            except ImportError:
                print("no chart: install matplotlib (the bench extra)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
