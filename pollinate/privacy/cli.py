"""``pollinate dp``: the ε a configuration would spend, round by round, without training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def register(commands: Any) -> None:
    """Add the ``dp`` subcommand to the ``pollinate`` subparsers (``argparse`` ``_SubParsersAction``)."""
    dp = commands.add_parser(
        "dp", help="show the privacy (ε, δ) a configuration would spend, without training",
        description="Compute ε after each round for the run a configuration describes (dp.mode, "
                    "dp.noise-multiplier, dp.delta, num-clients, clients-per-round, rounds), with "
                    "the accountant a run uses; nothing is trained.")
    dp.add_argument("--config", type=Path, help="a TOML file of run-config keys")
    dp.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override keys, e.g. --set dp.mode=central dp.noise-multiplier=1.1 rounds=20")
    dp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the table; 0."""
    from pollinate.cli import resolve_config
    from pollinate.privacy.accountant import Accountant, check_target
    from pollinate.strategies import strategy_class

    cfg = resolve_config(args.config, args.set, None)
    if not cfg.dp.on:
        raise ValueError("dp.mode: 'off' spends no privacy; give dp.mode=central or dp.mode=local")
    strategy_class(cfg.strategy).check_privacy(cfg)
    check_target(cfg.dp, cfg.num_clients, cfg.per_round)
    accountant = Accountant(cfg.dp, cfg.num_clients, cfg.per_round)
    target = cfg.dp.target_epsilon
    runs = accountant.rounds_within(target, cfg.rounds) if target else cfg.rounds
    console = Console()
    dp = cfg.dp
    console.print(f"dp.mode {dp.mode}: clip {dp.clip:g}, noise multiplier {dp.noise_multiplier:g}, "
                  f"sampling rate {accountant.sampling_rate:.3g} ({cfg.per_round} of {cfg.num_clients} "
                  f"clients a round), δ = {accountant.delta:.3g}", highlight=False)
    table = Table("round", "ε")
    for r in range(1, runs + 1):
        table.add_row(str(r), f"{accountant.epsilon(r):.3f}")
    console.print(table)
    if runs < cfg.rounds:
        console.print(f"dp.target-epsilon {target:g} stops the run after round {runs} of {cfg.rounds}: round "
                      f"{runs + 1} would reach ε = {accountant.epsilon(runs + 1):.3f}", highlight=False)
    return 0
