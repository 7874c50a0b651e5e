"""Local simulation: the ServerApp and ClientApp in Flower's simulation engine (Ray), one process."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from pollinate.client.app import app as client_app
from pollinate.config import RunConfig
from pollinate.server.app import make_server_app
from pollinate.server.global_model import GlobalModel


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources: ``sim.workers`` clients at a time, one CPU thread each."""
    workers = min(cfg.sim.workers, cfg.num_clients)
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # Ray sets OMP_NUM_THREADS to this
        "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": True},
    }


def simulate(cfg: RunConfig, run_path: Path, verbose: bool = False) -> dict[str, Any]:
    """Check ``cfg`` by building the global model, then run the federation; returns the summary."""
    global_model = GlobalModel(cfg)  # every configuration error stops here, before Ray starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # hides the run_simulation deprecation note
    run_simulation(server_app=make_server_app(cfg, run_path, global_model), client_app=client_app,
                   num_supernodes=cfg.num_clients, backend_config=backend_config(cfg),
                   verbose_logging=verbose)
    return dict(json.loads((run_path / "summary.json").read_text()))
