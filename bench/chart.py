"""A PNG of throughput and latency against the raw ceiling and pgqueuer (needs matplotlib,
the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.targets import med

Results = Mapping[str, Mapping[str, Any]]


def write_chart(results: Results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (drain_ax, emit_ax, lat_ax) = plt.subplots(1, 3, figsize=(16, 5.2))

    drains = [
        ("raw\nceiling", med(results, "raw", "drain"), "#999999"),
        ("pgqueuer\nbatch 100", med(results, "pgqueuer", "drain"), "#d08a3c"),
        ("B4\n1 process", med(results, "b4", "drain"), "#3c6fd0"),
        ("B5\n10% fail", med(results, "b5", "drain"), "#6d93dd"),
        ("B6\n2 processes", med(results, "b6", "drain"), "#1f4aa0"),
    ]
    _bars(drain_ax, drains, "Drain of a seeded backlog (rows/s, medians)")
    pgq, raw = med(results, "pgqueuer", "drain"), med(results, "raw", "drain")
    for value, label, style in (
        (2.2 * pgq if pgq else None, "target: 2.2x pgqueuer", "--"),
        (0.35 * raw if raw else None, "target: 0.35x raw", ":"),
    ):
        if value:
            drain_ax.axhline(value, color="#444444", linestyle=style, linewidth=1, label=label)
    drain_ax.legend(fontsize=8)

    pairs = [
        ("1 conn", med(results, "raw", "insert_1conn"), med(results, "b1", "emit_rate")),
        ("10 conns", med(results, "raw", "insert_10conn"), med(results, "b2", "emit_rate")),
        ("bulk", med(results, "raw", "insert_bulk"), med(results, "b3", "rows_fanout10")),
    ]
    xs = range(len(pairs))
    width = 0.38
    raw_vals = [p[1] or 0 for p in pairs]
    disp_vals = [p[2] or 0 for p in pairs]
    emit_ax.bar([x - width / 2 for x in xs], raw_vals, width, label="raw INSERT", color="#999999")
    emit_ax.bar(
        [x + width / 2 for x in xs], disp_vals, width, label="dispatcher emit", color="#3c6fd0"
    )
    for x, v in zip(xs, raw_vals, strict=True):
        emit_ax.annotate(f"{v:,.0f}", (x - width / 2, v), ha="center", va="bottom", fontsize=8)
    for x, v in zip(xs, disp_vals, strict=True):
        emit_ax.annotate(f"{v:,.0f}", (x + width / 2, v), ha="center", va="bottom", fontsize=8)
    emit_ax.set_xticks(list(xs), ["B1 vs 1 conn", "B2 vs 10 conns", "B3 vs bulk"])
    emit_ax.set_yscale("log")
    emit_ax.set_title("Enqueue (rows/s, log scale)")
    emit_ax.legend(fontsize=8)

    series = [
        ("dispatcher LISTEN", "b7", "listen_500", "#3c6fd0"),
        ("pgqueuer LISTEN", "pgqueuer", "latency", "#d08a3c"),
        ("dispatcher poll-only", "b7", "poll_500", "#999999"),
    ]
    qs = ("p50", "p95", "p99")
    w = 0.26
    for i, (label, scenario, prefix, color) in enumerate(series):
        vals: list[float] = [med(results, scenario, f"{prefix}_{q}") or 0.0 for q in qs]
        pos = [j + (i - 1) * w for j in range(len(qs))]
        lat_ax.bar(pos, vals, w, label=label, color=color)
        for px, v in zip(pos, vals, strict=True):
            lat_ax.annotate(f"{v:.1f}", (px, v), ha="center", va="bottom", fontsize=7)
    lat_ax.set_xticks(range(len(qs)), qs)
    lat_ax.axhline(1.2, color="#444444", linestyle="--", linewidth=1, label="target p50 1.2 ms")
    lat_ax.axhline(3.5, color="#444444", linestyle=":", linewidth=1, label="target p99 3.5 ms")
    lat_ax.set_yscale("log")
    lat_ax.set_title("Commit → handler start at 500/s (ms, log scale)")
    lat_ax.legend(fontsize=8)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, items: list[tuple[str, float | None, str]], title: str) -> None:
    labels = [i[0] for i in items]
    values = [i[1] or 0 for i in items]
    ax.bar(range(len(items)), values, color=[i[2] for i in items])
    for x, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(items)), labels, fontsize=8)
    ax.set_title(title)
