"""Local simulation: the ServerApp and ClientApp in Flower's simulation engine (Ray), one process."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation
from transformers.utils import logging as transformers_logging

from pollinate.client.app import app as client_app
from pollinate.config import RunConfig
from pollinate.server.app import make_server_app, prepare
from pollinate.server.rundir import CheckpointError
from pollinate.server.tracking import build_tracker


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: ``sim.workers`` clients at a time, one CPU thread each; or, with
    ``sim.ray-address``, the existing cluster there, one client per CPU it has."""
    logs = {"logging_level": logging.ERROR, "log_to_driver": True}
    if cfg.sim.ray_address:  # a cluster has its resources already: ray.init may not set them
        init_args = {"address": cfg.sim.ray_address, **logs}
    else:
        workers = min(cfg.sim.workers, cfg.num_clients)
        init_args = {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False, **logs}
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # Ray sets OMP_NUM_THREADS to this
        "init_args": init_args,
    }


def _quiet_libraries() -> None:
    """Keep the console for pollinate's progress: no library progress bars or deprecation notes.

    Set before Ray starts, the environment variables reach the simulation workers too.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # hides the run_simulation deprecation note


def simulate(cfg: RunConfig, run_path: Path, verbose: bool = False) -> dict[str, Any]:
    """Check ``cfg`` by building the global model, then run the federation; returns the summary."""
    if not verbose:
        _quiet_libraries()
    tracker = build_tracker(cfg)  # a missing tracking library or an unreachable server stops here
    global_model = prepare(cfg)  # every configuration error stops here, before Ray starts
    failures: list[CheckpointError] = []
    run_simulation(server_app=make_server_app(cfg, run_path, global_model, failures, tracker),
                   client_app=client_app, num_supernodes=cfg.num_clients,
                   backend_config=backend_config(cfg), verbose_logging=verbose)
    if failures:
        raise failures[0]
    return dict(json.loads((run_path / "summary.json").read_text()))
