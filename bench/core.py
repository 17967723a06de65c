"""What every scenario shares: results, repetition, progress output, databases, the machine.

A scenario is an async function taking a :class:`Context` and returning a
:class:`ScenarioResult`; it runs its measurement ``ctx.runs`` times back to back and records
one value per run for each metric. Medians are taken over runs.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from dispatcher.migrate import migrate
from dispatcher.postgres import with_database

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1/postgres"
DB_PREFIX = "bench_"


@dataclass
class Metric:
    """One measured quantity: a value per run, reported by its median."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""

    @property
    def median(self) -> float:
        return float(statistics.median(self.values)) if self.values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "values": [round(v, 6) for v in self.values],
            "median": round(self.median, 6),
            "higher_is_better": self.higher_is_better,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    name: str
    title: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, name: str, unit: str, *, higher_is_better: bool = True) -> Metric:
        """The metric ``name``, created on first use."""
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit, higher_is_better=higher_is_better)
        return self.metrics[name]

    def add(self, name: str, unit: str, value: float, *, higher_is_better: bool = True) -> None:
        self.metric(name, unit, higher_is_better=higher_is_better).values.append(float(value))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": {k: m.as_dict() for k, m in self.metrics.items()},
            "notes": self.notes,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``--quick`` shrinks every one of them."""

    drain_rows: int = 20_000
    scaling_rows: int = 40_000
    scaling_processes: tuple[int, ...] = (1, 2, 4)
    emit_seconds: float = 5.0
    bulk_rows: int = 200_000
    bulk_mutations_per_call: int = 1_000
    bulk_fanout: int = 10
    latency_rates: tuple[float, ...] = (100.0, 500.0)
    latency_seconds: float = 10.0
    latency_warmup_seconds: float = 1.0
    claim_small: int = 10_000
    claim_large: int = 1_000_000
    claims_per_run: int = 300
    many_triggers: int = 10_000
    emits_per_run: int = 2_000
    idle_seconds: float = 20.0
    idle_warmup_seconds: float = 2.0
    steady_seconds: float = 300.0
    steady_rate: float = 500.0
    # B5's one time-boxed run with the default circuit breaker.
    breaker_probe_seconds: float = 15.0
    # The keys scenario: the ordered drain's distinct keys, and how long one key is hot
    # (issue 14: 10,000 keys, 30 s).
    ordered_keys: int = 10_000
    hot_key_seconds: float = 30.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            drain_rows=600,
            scaling_rows=600,
            emit_seconds=0.4,
            bulk_rows=4_000,
            bulk_mutations_per_call=200,
            bulk_fanout=10,
            latency_seconds=0.6,
            latency_warmup_seconds=0.2,
            claim_small=500,
            claim_large=5_000,
            claims_per_run=20,
            many_triggers=300,
            emits_per_run=100,
            idle_seconds=1.0,
            idle_warmup_seconds=1.0,
            steady_seconds=3.0,
            steady_rate=100.0,
            breaker_probe_seconds=3.0,
            ordered_keys=100,
            hot_key_seconds=1.0,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        """Smaller still: the test suite's run of every scenario (no timing meaning)."""
        return dataclasses.replace(
            cls.quick(),
            drain_rows=300,
            scaling_rows=200,
            scaling_processes=(1, 2),
            latency_rates=(500.0,),
            emit_seconds=0.2,
            bulk_rows=1_000,
            bulk_mutations_per_call=50,
            latency_seconds=0.3,
            latency_warmup_seconds=0.1,
            claim_small=200,
            claim_large=1_000,
            claims_per_run=5,
            many_triggers=60,
            emits_per_run=20,
            idle_seconds=0.5,
            idle_warmup_seconds=0.3,
            steady_seconds=1.5,
            steady_rate=50.0,
            breaker_probe_seconds=1.0,
            ordered_keys=50,
            hot_key_seconds=0.5,
        )


Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet_progress(message: str) -> None:
    pass


@dataclass
class Context:
    """Where and how big to run. ``admin_dsn`` points at a database we may create others
    from; every database the bench creates is named ``bench_*`` and dropped afterwards."""

    admin_dsn: str
    sizes: Sizes
    runs: int = 3
    progress: Progress = stderr_progress
    pgqueuer_venv: Path = BENCH_DIR / ".venv-pgqueuer"
    pgqueuer_upgrade: bool = True
    profile_dir: Path | None = None
    # A migrated database to clone from; made (and dropped by close()) when not given.
    template_name: str | None = None
    _made_template: bool = False

    async def template(self) -> str:
        """A migrated database to clone; created once per bench process."""
        if self.template_name is None:
            name = f"{DB_PREFIX}tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            await create_database(self.admin_dsn, name)
            await migrate(with_database(self.admin_dsn, name))
            self.template_name, self._made_template = name, True
        return self.template_name

    async def close(self) -> None:
        if self._made_template and self.template_name is not None:
            await drop_database(self.admin_dsn, self.template_name)
            self.template_name, self._made_template = None, False

    @asynccontextmanager
    async def database(self, label: str, *, migrated: bool = True) -> AsyncIterator[str]:
        """A fresh database (a clone of the migrated template, or empty), dropped on exit."""
        name = f"{DB_PREFIX}{label}_{uuid.uuid4().hex[:8]}"
        template = await self.template() if migrated else None
        await create_database(self.admin_dsn, name, template)
        try:
            yield with_database(self.admin_dsn, name)
        finally:
            await drop_database(self.admin_dsn, name)


async def create_database(admin_dsn: str, name: str, template: str | None = None) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def repeat(
    ctx: Context,
    result: ScenarioResult,
    once: Callable[[int], Awaitable[str]],
) -> None:
    """Run ``once(run_index)`` ``ctx.runs`` times back to back; each returns a progress line."""
    for i in range(ctx.runs):
        started = time.perf_counter()
        line = await once(i)
        ctx.progress(
            f"{result.name} run {i + 1}/{ctx.runs}: {line} ({time.perf_counter() - started:.1f}s)"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


# The machine's CPU time by kind, as the first line of /proc/stat counts it.
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """The machine's CPU time by kind since boot, in clock ticks ({} where /proc is not)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        return dict(zip(STAT_FIELDS, (int(x) for x in first), strict=False))
    except (OSError, ValueError):
        return {}


def busy_ticks(ticks: dict[str, int]) -> int:
    """Of ``machine_ticks()``, the time not idle (idle and iowait left out)."""
    return sum(v for k, v in ticks.items() if k not in ("idle", "iowait"))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc: the bench's meters are Linux-only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class CpuMeter:
    """CPU seconds used by given processes, by Postgres and by the whole machine, between
    :meth:`start` and :meth:`stop`.

    Linux only (reads /proc); elsewhere readings are NaN. Postgres backends are found as
    children of the postmaster (the parent of our own backend), so the database's share of
    the machine shows next to the dispatcher's. Per process, only CPU used after ``start``
    counts; a backend that exits before ``stop`` takes its share with it (an undercount).
    """

    def __init__(self, postmaster_pid: int | None) -> None:
        self._postmaster = postmaster_pid
        self._tick = os.sysconf("SC_CLK_TCK")
        self._pids: list[int] = []
        self._t0 = 0.0
        self._busy0 = 0.0
        self._procs0: dict[int, float] = {}
        self._pg0: dict[int, float] = {}

    def start(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self._t0 = time.monotonic()
        self._busy0 = self._machine_busy()
        self._procs0 = {p: self._proc_cpu(p) for p in self._pids}
        self._pg0 = self._postgres()

    def stop(self) -> dict[str, float]:
        """CPU seconds since :meth:`start` (``processes``, ``postgres``, ``machine_busy``)
        plus ``wall`` seconds and the machine's ``cores``."""
        procs = sum(self._proc_cpu(p) - self._procs0.get(p, 0.0) for p in self._pids)
        if self._postmaster is None:
            pg = float("nan")
        else:
            pg = sum(cpu - self._pg0.get(pid, 0.0) for pid, cpu in self._postgres().items())
        return {
            "wall": time.monotonic() - self._t0,
            "machine_busy": self._machine_busy() - self._busy0,
            "postgres": pg,
            "processes": procs,
            "cores": float(os.cpu_count() or 1),
        }

    def _machine_busy(self) -> float:
        ticks = machine_ticks()
        return busy_ticks(ticks) / self._tick if ticks else float("nan")

    def _stat(self, pid: int | str) -> list[str] | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    def _proc_cpu(self, pid: int) -> float:
        # After the command name: state, ppid, ... utime and stime are at offsets 11 and 12.
        parts = self._stat(pid)
        return (int(parts[11]) + int(parts[12])) / self._tick if parts else 0.0

    def _postgres(self) -> dict[int, float]:
        if self._postmaster is None:
            return {}
        cpu = {self._postmaster: self._proc_cpu(self._postmaster)}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                parts = self._stat(entry.name)
                if parts and int(parts[1]) == self._postmaster:
                    cpu[int(entry.name)] = (int(parts[11]) + int(parts[12])) / self._tick
        return cpu


class NoiseMeter:
    """Samples, once a second, how much CPU the rest of the machine takes from the bench.

    "Ours" is this process and its descendants (workers, pgqueuer, py-spy) plus the Postgres
    backends serving ``bench_*`` databases (their process title names the database);
    everything else busy on the machine is noise the numbers of that moment carry.
    Linux only; elsewhere it records nothing.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float, float]] = []  # (time, busy cores, our cores)

    async def run(self, interval: float = 1.0) -> None:
        import asyncio

        prev = self._snapshot()
        while True:
            await asyncio.sleep(interval)
            cur = self._snapshot()
            if prev is not None and cur is not None:
                dt = cur[0] - prev[0]
                busy = (cur[1] - prev[1]) / dt
                ours = sum(c - prev[2].get(pid, 0.0) for pid, c in cur[2].items()) / dt
                self.samples.append((cur[0], busy, ours))
            prev = cur

    def others(self, since: float, until: float) -> dict[str, float]:
        """Mean and max cores used by others between two ``time.monotonic()`` marks."""
        window = [max(0.0, b - o) for t, b, o in self.samples if since < t <= until]
        if not window:
            return {}
        return {
            "others_cores_mean": round(sum(window) / len(window), 2),
            "others_cores_max": round(max(window), 2),
        }

    def _snapshot(self) -> tuple[float, float, dict[int, float]] | None:
        ticks = machine_ticks()
        if not ticks:
            return None
        busy = busy_ticks(ticks) / self._tick
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        bench_backends: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            command, _, rest = stat.rpartition(")")
            parts = rest.split()
            parents[pid] = int(parts[1])
            cpu[pid] = (int(parts[11]) + int(parts[12])) / self._tick
            if command.endswith("(postgres"):
                try:
                    title = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b" bench_" in title:
                    bench_backends.add(pid)
        me = os.getpid()
        ours: dict[int, float] = {}
        for pid, c in cpu.items():
            p, hops = pid, 0
            while p not in (0, 1, me) and hops < 64:
                p, hops = parents.get(p, 0), hops + 1
            if p == me or pid in bench_backends:
                ours[pid] = c
        return time.monotonic(), busy, ours


async def postmaster_pid(dsn: str) -> int | None:
    """The postmaster's pid when the server runs on this machine and /proc is readable."""
    conn = await asyncpg.connect(dsn)
    try:
        # Read while the backend lives: its /proc entry goes with it.
        return _parent_pid(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_summary(cpu: dict[str, float]) -> dict[str, float]:
    """Cores in use on average during a measurement, per consumer."""
    wall = cpu.get("wall") or float("nan")
    nan = float("nan")
    procs, pg = cpu.get("processes", nan), cpu.get("postgres", nan)
    busy = cpu.get("machine_busy", nan)
    return {
        "dispatcher_cores": round(procs / wall, 3),
        "postgres_cores": round(pg / wall, 3),
        "machine_busy_cores": round(busy / wall, 3),
        # Everything else on the machine (the bench's own process, other users): noise.
        "other_cores": round((busy - procs - pg) / wall, 3),
        "machine_cores": cpu.get("cores", nan),
        "wall_s": round(wall, 3),
    }


async def environment(admin_dsn: str) -> dict[str, Any]:
    """Machine, versions and the server settings that decide the numbers."""
    import asyncpg as apg

    import dispatcher

    conn = await asyncpg.connect(admin_dsn)
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in (
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "wal_sync_method",
                "autovacuum",
                "shared_buffers",
                "max_connections",
                "commit_delay",
            )
        }
        server = await conn.fetchval("SHOW server_version")
        stat_statements = bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
            )
        ) and "pg_stat_statements" in str(await conn.fetchval("SHOW shared_preload_libraries"))
    finally:
        await conn.close()
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gb": round(_memory_bytes() / 2**30, 1),
            "loadavg_at_start": list(os.getloadavg()),
        },
        "python": sys.version.split()[0],
        "asyncpg": apg.__version__,
        "dispatcher": getattr(dispatcher, "__version__", _package_version("dispatcher")),
        "dispatcher_git": _git_revision(),
        # Others edit the working tree while benchmarks run: this names the exact code.
        "dispatcher_tree_sha256": tree_digest(),
        "postgres": server,
        "settings": settings,
        "pg_stat_statements": stat_statements,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
    }


def tree_digest() -> str:
    """A digest of dispatcher/ and migrations/ as they are on disk (first 16 hex digits)."""
    import hashlib

    digest = hashlib.sha256()
    for folder in ("dispatcher", "migrations"):
        for path in sorted((REPO_DIR / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _git_revision() -> str:
    # Set when the bench runs from an exported copy of a commit (no .git there).
    if os.environ.get("BENCH_GIT_REVISION"):
        return os.environ["BENCH_GIT_REVISION"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dispatcher", "migrations"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"
