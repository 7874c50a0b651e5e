"""The report's figures: evaluation per round, bytes per round, memory per client.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot, no global state, no display), with
whole-round ticks and byte axes in kB/MB/GB, so a test can read their tick labels before they become PNGs.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from pollinate.server.report.record import RunRecord
from pollinate.server.report.units import axis_unit

__all__ = ["bytes_figure", "eval_figure", "memory_figure", "png"]

UP, DOWN, SPLIT, ESTIMATE, BUDGET = "#3366aa", "#ee9933", "#99bbdd", "#aaaaaa", "#cc2222"
WIDE = (8.0, 3.2)  # inches; at 100 dpi the page shows them at their own size


def integer_rounds(ax: Axes) -> None:
    """Round ticks at whole rounds only (bars offset by ±0.2 no longer give 1.5, 2.5); one tick is enough
    (a one-round run's axis spans 0.6 to 1.4)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("round")


def byte_axis(ax: Axes, largest: float) -> None:
    """The y axis in one decimal unit chosen by ``largest`` ('200 kB', '1.5 MB'), never an offset like
    1e7: each tick label carries its unit."""
    scale, unit = axis_unit(largest)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v / scale, unit)))


def _tick(value: float, unit: str) -> str:
    """'2.5 MB'; rounded to 3 decimals so that float noise never prints as '3e-17' (and -0 as 0)."""
    shown = round(value, 3) + 0.0
    return f"{shown:g} {unit}" if shown else "0"


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (tight layout, 100 dpi)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _score(event: dict[str, Any], classification: bool) -> float:
    """Accuracy (classification) or perplexity (generation: exp(loss) where the event has none)."""
    if classification:
        return float(event.get("accuracy", math.nan))
    if "perplexity" in event:
        return float(event["perplexity"])
    loss = float(event.get("loss", math.nan))
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan  # 50: past it, overflow


def eval_figure(run: RunRecord) -> Figure:
    """Left: eval loss per round (0 = before training) and the clients' train loss; right: accuracy or
    perplexity per round."""
    evals = sorted(run.by_round("evaluate").items())
    trains = sorted((r, e["train_loss"]) for r, e in run.by_round("train").items()
                    if e.get("train_loss") is not None)
    fig = Figure(figsize=WIDE)
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot([r for r, _ in evals], [float(e.get("loss", math.nan)) for _, e in evals], marker="o",
                 color=UP, label="eval loss (global model)")
    if trains:
        loss_ax.plot([r for r, _ in trains], [loss for _, loss in trains], marker="s", linestyle="--",
                     color=DOWN, label="train loss (clients' mean)")
    loss_ax.set_title("Loss")
    loss_ax.legend(fontsize=8)
    name = "accuracy" if run.classification else "perplexity"
    score_ax.plot([r for r, _ in evals], [_score(e, run.classification) for _, e in evals], marker="o",
                  color=UP)
    score_ax.set_title(f"Eval {name}" + (" (higher is better)" if run.classification
                                         else " (lower is better)"))
    if run.classification:
        score_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 1) + 0.0:g}%"))
    for ax in (loss_ax, score_ax):
        integer_rounds(ax)
        ax.grid(alpha=0.3)
    return fig


def bytes_figure(run: RunRecord) -> Figure | None:
    """Bytes per round, all clients together: up and down side by side, a split method's body channel
    stacked on each (None before any round trained)."""
    trains = sorted(run.by_round("train").items())
    if not trains:
        return None
    fig = Figure(figsize=WIDE)
    ax = fig.subplots()
    rounds = [r for r, _ in trains]
    largest = 0.0
    for side, offset, colour in (("up", -0.2, UP), ("down", 0.2, DOWN)):
        flower = [float(e.get(f"bytes_{side}", 0)) for _, e in trains]
        split = [float(e.get(f"split_bytes_{side}", 0)) for _, e in trains]
        xs = [r + offset for r in rounds]
        ax.bar(xs, flower, 0.38, color=colour, label=f"{side} (Flower)" if any(split) else side)
        if any(split):
            ax.bar(xs, split, 0.38, bottom=flower, color=colour, alpha=0.45, hatch="//",
                   label=f"{side} (split channel)")
        largest = max(largest, *(f + s for f, s in zip(flower, split, strict=True)))
    byte_axis(ax, largest)
    integer_rounds(ax)
    ax.set_title("Bytes per round, all clients")
    _legend_above_bars(ax, largest)
    return fig


def memory_figure(run: RunRecord) -> Figure | None:
    """Each client's measured peak (its last accepted round) beside the planner's estimate, and its
    budget as a red line only where the client declared one (None without client events)."""
    clients = run.last_clients()
    if not clients:
        return None
    fig = Figure(figsize=WIDE)
    ax = fig.subplots()
    xs = list(range(len(clients)))
    peaks = [float(e.get("peak_mem_bytes") or 0) for e in clients]
    estimates = [float(e.get("estimate_bytes") or 0) for e in clients]
    ax.bar([x - 0.2 for x in xs], peaks, 0.38, color=UP, label="measured peak")
    ax.bar([x + 0.2 for x in xs], estimates, 0.38, color=ESTIMATE, label="estimate")
    budgets = [(x, float(e["budget_bytes"])) for x, e in zip(xs, clients, strict=True)
               if e.get("budget_bytes")]
    for i, (x, budget) in enumerate(budgets):
        ax.hlines(budget, x - 0.45, x + 0.45, colors=BUDGET, linewidth=2,
                  label="budget" if i == 0 else "_nolegend_")
    largest = max([*peaks, *estimates, *(b for _, b in budgets)])
    byte_axis(ax, largest)
    ax.set_xticks(xs, [_client_label(e) for e in clients], fontsize=7)
    ax.set_xlim(-0.6, len(clients) - 0.4)
    which = "measured, estimated and budget" if budgets else "measured and estimated (no budget set)"
    ax.set_title(f"Peak memory per client, last round: {which}", fontsize=10)
    _legend_above_bars(ax, largest)
    return fig


def _legend_above_bars(ax: Axes, largest: float) -> None:
    """Room above the tallest bar (a quarter of it) for a one-line legend, so that it hides no bar."""
    ax.set_ylim(0, max(largest, 1.0) * 1.25)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", ncols=4, frameon=False)


def _client_label(event: dict[str, Any]) -> str:
    """'node …4692' and its rank: the last four digits are enough to tell a run's nodes apart."""
    rank = event.get("rank", event.get("plan", {}).get("rank"))
    return f"node …{int(event['node_id']) % 10000:04d}" + (f"\nrank {rank}" if rank is not None else "")
