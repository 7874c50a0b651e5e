"""``pollinate plan``: the training plans a memory budget allows, and the one a client would choose.

    pollinate plan --model smollm2-135m-instruct --task generation --budget 1.5GB \\
        [--seq-len 64] [--batch-size 4] [--rank 8 | --ranks 64,32,16,8]

Prints the candidate plans, most capable first, each with its estimated peak memory, and marks the
one chosen; a budget too small for any plan is a ValueError naming the minimum that would work.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from pollinate.client.budget import format_size, parse_size

if TYPE_CHECKING:  # the methods import torch and transformers: only when the command runs
    from pollinate.methods.base import Method
    from pollinate.methods.plan import Estimate, Plan

__all__ = ["register"]

_SHOWN = 40  # rows printed without --all
_AFTER_CHOSEN = 5  # less capable plans shown below the chosen one when the list is cut


def register(commands: Any) -> None:
    """Add the ``plan`` subcommand to the ``pollinate`` subparsers (``argparse`` ``_SubParsersAction``)."""
    plan = commands.add_parser(
        "plan", help="show the training plans a memory budget allows",
        description="Estimate the peak memory of every training plan of a method for a model and pick "
                    "the most capable one that fits a budget (rank, then sequence length, then no "
                    "checkpointing, then larger micro-batches; the effective batch never changes).")
    plan.add_argument("--model", default="smollm2-135m-instruct",
                      help="a built-in model or a local folder (default smollm2-135m-instruct)")
    plan.add_argument("--task", help="generation or classification (default: the model's first)")
    plan.add_argument("--budget", required=True, help="memory budget, e.g. 1.5GB, 800MiB")
    plan.add_argument("--seq-len", type=int, default=64, help="longest sequence cap (default 64)")
    plan.add_argument("--batch-size", type=int, default=4, help="effective batch (default 4)")
    ranks = plan.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int,
                       help="the rank (default: the method's, LoRA 8, LoRA-SB 16; FedKSeed: its adapter's)")
    ranks.add_argument("--ranks", help="allowed ranks, comma-separated, e.g. 64,32,16,8")
    plan.add_argument("--targets", default="auto", help="the method's target modules (default auto)")
    plan.add_argument("--method", default="lora",
                      help="a registered method: lora, lora_sb, fedkseed, sfprompt (default lora)")
    plan.add_argument("--margin", type=float, default=0.9,
                      help="share of the budget an estimate may fill (default 0.9)")
    plan.add_argument("--all", action="store_true", help="print every candidate plan")
    plan.set_defaults(func=run)


def _ranks(args: argparse.Namespace) -> list[int] | None:
    if args.ranks is None:
        return None
    try:
        return [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--ranks: {args.ranks!r} is not allowed; give integers separated by "
                         "commas, e.g. 64,32,16,8") from None


def _method(args: argparse.Namespace) -> Method:
    """The registered method ``--method`` for the request, built from a run configuration."""
    from pollinate import methods
    from pollinate.config import RunConfig, flat_keys
    from pollinate.models import model_tasks

    name = args.method
    method_class = methods.method_class(name)  # an unknown name: one line naming the known ones
    values: dict[str, Any] = {"model": args.model, "task": args.task or model_tasks(args.model)[0],
                              "batch-size": args.batch_size, "max-seq-len": args.seq_len}
    table = method_class.settings_table
    if f"{table}.rank" not in flat_keys(RunConfig):  # FedKSeed's adapter is set in the lora table
        table = "lora"
    values[f"{table}.targets"] = args.targets
    if args.rank is not None:
        values[f"{table}.rank"] = args.rank
    cfg = RunConfig.from_run_config(values)
    if name == "lora":
        from pollinate.methods.lora.method import LoraMethod

        return LoraMethod(cfg, ranks=_ranks(args))
    if args.ranks is not None:
        raise ValueError(f"--ranks: {args.ranks!r} is not allowed with --method {args.method}; "
                         "only LoRA chooses among ranks")
    return method_class(cfg)  # type: ignore[call-arg]


def run(args: argparse.Namespace) -> int:
    """Print the plan table for ``args``; raises ValueError for bad input or a budget too small."""
    from pollinate.client.planner import choose_plan

    budget = parse_size(args.budget, "--budget")
    method = _method(args)
    dims = method.dims()
    plans = method.candidates(dims, 0)
    chosen, estimate = choose_plan(plans, lambda p: method.estimate(dims, p), budget, margin=args.margin,
                                   key="--budget", model=dims.name, title=method.title)
    rows = [(p, method.estimate(dims, p)) for p in plans]
    console = Console(highlight=False)
    console.print(f"{dims.name} ({method.cfg.task}, {method.title}): budget {format_size(budget)}, "
                  f"estimates must stay under {format_size(int(args.margin * budget))} ({args.margin:.0%})")
    console.print(_table(rows, chosen, args.margin * budget, show_all=args.all))
    console.print(f"chosen: {chosen.describe()}: {format_size(estimate.total)} "
                  f"({estimate.breakdown(limit=len(estimate.parts))})")
    return 0


def _table(rows: Sequence[tuple[Plan, Estimate]], chosen: Plan, limit: float, *, show_all: bool) -> Table:
    """The candidates as a table (the method's own plan fields first); long lists are cut a few rows
    after the chosen plan."""
    index = next(i for i, (p, _) in enumerate(rows) if p == chosen)
    end = len(rows) if show_all or len(rows) <= _SHOWN else index + 1 + _AFTER_CHOSEN
    table = Table(box=box.SIMPLE, caption=None if end >= len(rows) else
                  f"... {len(rows) - end} less capable plans not shown (--all)")
    own = [k for k in rows[0][0].fields() if k not in _GENERIC]
    for header in ("", *own, "batch", "seq len", "checkpointing", "estimate", "fits"):
        table.add_column(header.replace("_", " "),
                         justify="right" if header in (*own, "seq len", "estimate") else "left")
    for plan, est in rows[:end]:
        mark = "→ chosen" if plan == chosen else ""
        fields = plan.fields()
        table.add_row(mark, *(str(fields[k]) for k in own), f"{plan.micro_batch} x {plan.grad_accum}",
                      str(plan.seq_len), "yes" if plan.checkpointing else "no", format_size(est.total),
                      "yes" if est.total <= limit else "no", style="bold" if plan == chosen else None)
    return table


_GENERIC = ("micro_batch", "grad_accum", "seq_len", "checkpointing")
