"""report.html, built from the run folder alone (summary.json, metrics.jsonl, config.json).

It reads like a result: the headline (eval before → after, traffic in MB, wall time, the clients'
outcome, ε under differential privacy), a held-out question answered before and after (generation),
three plots (evaluation per round, bytes per round, memory per client), a table per round and per client
reply (rejections and failures with their reason) and the configuration. It is one self-contained file:
CSS inline, the plots as data: URLs, nothing fetched. The plots are also written beside it as PNGs.
"""

from __future__ import annotations

from pathlib import Path

from pollinate.files import atomic_write
from pollinate.server.report.page import Plot, page
from pollinate.server.report.plots import bytes_figure, eval_figure, memory_figure, png
from pollinate.server.report.record import RunRecord
from pollinate.server.rundir import RunDir

__all__ = ["Plot", "RunRecord", "build_plots", "write_report"]


def build_plots(run: RunRecord) -> list[Plot]:
    """The page's figures as PNGs: evaluation, bytes (once a round trained), memory (once a client was
    accepted)."""
    score = "accuracy" if run.classification else "perplexity"
    figures = [("eval.png", eval_figure(run), f"Eval loss and {score} per round",
                "Round 0 is the model before training.")]
    if (traffic := bytes_figure(run)) is not None:
        figures.append(("bytes.png", traffic, "Bytes up and down per round",
                        "Accepted clients' uploads and everything sent to the sampled nodes, per round."))
    if (memory := memory_figure(run)) is not None:
        budgets = any(e.get("budget_bytes") for e in run.last_clients())
        figures.append(("memory.png", memory, "Peak memory per client against its estimate",
                        "Each client's last accepted round: its measured peak above the runtime's baseline "
                        "and the planner's estimate"
                        + ("; the red line is its budget, where it declared one." if budgets
                           else "; no client declared a budget.")))
    return [Plot(name, png(fig), alt, caption) for name, fig, alt, caption in figures]


def write_report(run_dir: RunDir | Path) -> Path:
    """Write report.html (and its plots as PNG files beside it) into the run folder; returns its path."""
    path = run_dir.path if isinstance(run_dir, RunDir) else run_dir
    run = RunRecord.load(path)
    plots = build_plots(run)
    for plot in plots:
        atomic_write(path / plot.name, plot.png)
    report = path / "report.html"
    atomic_write(report, page(run, plots).encode("utf-8"))
    return report
