"""The ``pollinate`` command. User errors print one line and exit 2, without a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pollinate.config import RunConfig, parse_assignments
from pollinate.server.rundir import CheckpointError


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML tables become dotted keys: [lora] rank = 8 -> lora.rank = 8."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_config(config_file: Path | None, assignments: list[str], run_dir: str | None,
                   base: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults (or ``base``), then the TOML file, then ``--set`` pairs, then ``--run-dir``."""
    values: dict[str, Any] = dict(base or {})
    if config_file is not None:
        if not config_file.is_file():
            raise ValueError(f"--config: {str(config_file)!r} is not a file")
        values.update(_flatten(tomllib.loads(config_file.read_text())))
    values.update(parse_assignments(assignments))
    if run_dir:
        values["run-dir"] = run_dir
    return RunConfig.from_run_config(values)


def _simulate(args: argparse.Namespace) -> int:
    from pollinate.server.app import new_run_id
    from pollinate.server.simulation import simulate

    if args.resume is None:
        cfg = resolve_config(args.config, args.set, args.run_dir)
    else:  # the run's own configuration; --set rounds=N goes on further
        if args.run_dir:
            raise ValueError("--run-dir: not allowed with --resume, which names the run folder")
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume: {args.resume!r} is not a run folder (it has no config.json)")
        cfg = resolve_config(args.config, args.set, args.resume,
                             {**json.loads(saved.read_text()), "resume": True})
    simulate(cfg, cfg.resolved_run_dir(new_run_id()).resolve(), verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="pollinate", description="Federated and on-device fine-tuning of language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser(
        "simulate", help="run a federation locally in Flower's simulation engine",
        description="Run a federation locally: the ServerApp and many ClientApps in Flower's "
                    "simulation engine. Keys are those of [tool.flwr.app.config] in pyproject.toml.")
    sim.add_argument("--config", type=Path, help="a TOML file of run-config keys")
    sim.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help='override keys, e.g. --set rounds=5 lora.rank=16; quote a value with '
                          'spaces: --set \'data.prompt-field="my prompt"\'')
    sim.add_argument("--run-dir", help="where the run folder goes (default runs/<run-id>)")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its last committed round, with its own "
                          "configuration (--set rounds=N to go on further)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=_simulate)
    from pollinate.client import plan_cli
    from pollinate.deploy import cli as deploy_cli
    from pollinate.edge import cli as edge_cli
    from pollinate.privacy import cli as dp_cli

    plan_cli.register(commands)
    dp_cli.register(commands)
    edge_cli.register(commands)
    deploy_cli.register(commands)
    deploy_cli.register_run(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        # Library deprecation notes (transformers, peft, Ray) are not for the user of this command.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, CheckpointError) as err:
        if os.environ.get("POLLINATE_DEBUG"):
            raise
        print(f"pollinate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what the command started is stopped by then (its finally blocks)
        print("pollinate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
