"""report.html and its PNG plots, built from the run folder alone (metrics.jsonl, summary.json)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pollinate.server.rundir import RunDir, atomic_write  # noqa: E402


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]],
          kind: str = "line") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        if kind == "bar":
            width = 0.8 / max(len(series), 1)
            ax.bar([x + i * width for x in xs], ys, width=width, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(events: list[dict[str, Any]], event: str, key: str) -> tuple[list[int], list[float]]:
    rows = [e for e in events if e["event"] == event and e.get(key) is not None]
    return [e["round"] for e in rows], [float(e[key]) for e in rows]


def _memory_plot(path: Path, events: list[dict[str, Any]]) -> None:
    """Per client (its last round): measured peak and the planner's estimate against its budget."""
    last: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "client":
            last[e["node_id"]] = e
    rows = sorted(last.values(), key=lambda e: (-(e.get("budget_bytes") or 0), e["node_id"]))
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in xs], [e["peak_mem_bytes"] / 1e9 for e in rows], 0.4, label="measured peak")
    ax.bar([x + 0.2 for x in xs], [e.get("estimate_bytes", 0) / 1e9 for e in rows], 0.4, label="estimate")
    for x, e in zip(xs, rows, strict=True):
        if e.get("budget_bytes"):
            ax.hlines(e["budget_bytes"] / 1e9, x - 0.45, x + 0.45, colors="red",
                      label="budget" if x == 0 else "_nolegend_")
    ax.set_xticks(xs, [f"node {e['node_id'] % 10000}\nrank {e.get('rank', '?')}" for e in rows],
                  fontsize=7)
    ax.set_ylabel("GB")
    ax.set_title("Peak memory per client (last round) against its budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(run_dir: RunDir) -> list[str]:
    """eval.png, bytes.png and memory.png in the run folder; returns their names."""
    events = run_dir.events()
    plots = {
        "eval.png": ("Held-out evaluation", "loss",
                     {k: _series(events, "evaluate", k) for k in ("loss", "accuracy")
                      if _series(events, "evaluate", k)[0]}),
        "bytes.png": ("Bytes per round (all clients)", "bytes",
                      {"up": _series(events, "train", "bytes_up"),
                       "down": _series(events, "train", "bytes_down")}),
    }
    for name, (title, ylabel, series) in plots.items():
        _plot(run_dir.path / name, title, ylabel, series, "bar" if name != "eval.png" else "line")
    _memory_plot(run_dir.path / "memory.png", events)
    return [*plots, "memory.png"]


def write_report(run_dir: RunDir) -> Path:
    """report.html: the summary table and the plots."""
    images = write_plots(run_dir)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in summary.items())
    figures = "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pollinate run</title>"
            f"<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}"
            f"th{{text-align:left;padding-right:1em}}</style></head><body>"
            f"<h1>pollinate run: {html.escape(run_dir.path.name)}</h1><table>{rows}</table>"
            f"{figures}</body></html>\n")
    path = run_dir.path / "report.html"
    atomic_write(path, page.encode())
    return path
