"""The ServerApp: resolves the configuration, checks it by building the global model, runs the rounds.

``flwr run .`` reaches :data:`app`, which reads ``context.run_config``; ``pollinate simulate`` builds the
same app with :func:`make_server_app` around a configuration and global model it has already checked.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import GENERATION, RunConfig
from pollinate.privacy.accountant import check_target
from pollinate.server.global_model import GlobalModel
from pollinate.server.loop import run_federation, same_run
from pollinate.server.progress import RoundProgress
from pollinate.server.report import write_report
from pollinate.server.rundir import CheckpointError, RunDir
from pollinate.server.tracking import Tracker, build_tracker
from pollinate.strategies import build_strategy


def new_run_id() -> str:
    """A sortable, unique run name: 20261121-101500-3fa2."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare(cfg: RunConfig) -> GlobalModel:
    """Check everything a run needs before any client trains; returns the global model."""
    if cfg.resume:
        same_run(Path(cfg.run_dir), cfg)
    check_target(cfg.dp, cfg.num_clients, cfg.per_round)
    return GlobalModel(cfg, build_strategy(cfg).method)


def serve(grid: Grid, cfg: RunConfig, run_path: Path, global_model: GlobalModel | None = None,
          tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the federation into ``run_path``, logging to ``tracker`` (by default the one ``tracking``
    names); write report.html; print the outcome; return the summary."""
    tracker = tracker or build_tracker(cfg)  # a missing library, an unreachable server: nothing started
    model = global_model or prepare(cfg)
    run_dir = RunDir(run_path, on_event=tracker.log_event)
    run_dir.remove_temp_files()  # a killed run's leftovers: never read
    sample = model.heldout[0] if cfg.task == GENERATION else None
    base_answer = model.answer(str(sample["prompt"])) if sample else ""  # before any merge
    tracker.start(run_dir, cfg.to_run_config())
    with RoundProgress(cfg.rounds) as progress:
        try:
            summary = run_federation(grid, cfg, run_dir, model, progress)
            if sample:
                summary["sample"] = {"prompt": sample["prompt"], "reference": sample["response"],
                                     "base": base_answer, "fine_tuned": model.answer(str(sample["prompt"]))}
                run_dir.write_json("summary.json", summary)
            write_report(run_dir)  # after the sample: the report shows it
        except BaseException:
            tracker.finish(run_dir, completed=False)
            raise
        tracker.finish(run_dir)  # after the report: it is an artefact
        _print_outcome(progress, summary, run_path)
    return summary


def _print_outcome(progress: RoundProgress, summary: dict[str, Any], run_path: Path) -> None:
    before, after = summary["initial_eval"], summary["final_eval"]
    line = f"eval loss {before['loss']:.3f} -> {after['loss']:.3f}"
    if "accuracy" in after:
        line += f"   accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
    progress.print(line)
    if "sample" in summary:
        s = summary["sample"]
        progress.print(f"question:   {s['prompt']}\nbase:       {s['base']}\n"
                       f"fine-tuned: {s['fine_tuned']}\nreference:  {s['reference']}")
    progress.print(f"clients trained at {summary['seconds_per_step']:.2f} s per step, one thread each "
                   f"(the machine's speed); the run took {summary['wall_seconds']:.0f} s")
    progress.print(f"run folder: {run_path}")


def make_server_app(cfg: RunConfig, run_path: Path, global_model: GlobalModel,
                    failures: list[CheckpointError], tracker: Tracker | None = None) -> ServerApp:
    """A ServerApp bound to an already-checked configuration and tracker (used by ``pollinate
    simulate``); a checkpoint that cannot be written or read ends the run and is handed back in
    ``failures``."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run_path, global_model, tracker)
        except CheckpointError as err:
            failures.append(err)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the configuration comes from the run config."""
    cfg = RunConfig.from_run_config(dict(context.run_config))
    serve(grid, cfg, cfg.resolved_run_dir(new_run_id()).resolve())
