"""What the demo learns: held-out loss of the default federation against centralized LoRA training.

Federated: ``pollinate simulate`` with every default (4 clients, natural split of chatterbot by
category, 3 rounds of 10 local steps at batch 4, max-seq-len 64, lr 1e-3, LoRA rank 8, FedIT).

Centralized reference, same total examples seen: one model, the same base and the same initial
adapter (``GlobalModel(cfg)``), trained with ``train_local`` (one AdamW) on the union of the 4
clients' shares for rounds x local-steps x num-clients = 120 steps of batch 4, i.e. the 480 examples
the 4 clients see together. Both are evaluated by ``GlobalModel.evaluate`` on the same held-out split
that no client sees.

    python benchmarks/learning.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import CpuMeter, events_of, machine, read_events, read_summary, run_simulate, save_result, table

NAME = "learning"
QUICK = {"model": "tiny-llama", "num-clients": 2, "rounds": 1, "local-steps": 2}


def federated(settings: dict[str, Any]) -> dict[str, Any]:
    """The demo run in its own process; held-out loss before, after each round, examples seen."""
    with tempfile.TemporaryDirectory(prefix="pollinate-learning-") as tmp:
        run = run_simulate(settings, Path(tmp))
        events, summary = read_events(run["run_dir"]), read_summary(run["run_dir"])
    clients = [e for e in events if e["event"] == "client"]
    return {"command": run["command"], "wall_seconds": run["wall_seconds"], "busy_cores": run["busy_cores"],
            "initial_eval": summary["initial_eval"], "final_eval": summary["final_eval"],
            "eval_loss_by_round": {r: e["loss"] for r, e in sorted(events_of(events, "evaluate").items())},
            "examples_seen": sum(e["examples_seen"] for e in clients),
            "tokens_seen": sum(e["tokens_seen"] for e in clients),
            "sample": summary.get("sample")}


def centralized(settings: dict[str, Any]) -> dict[str, Any]:
    """One model on the union of the shares, as many examples as the federation saw in all."""
    import torch  # imported here, with pollinate: the federated run above starts clean

    from pollinate import workload
    from pollinate.config import RunConfig
    from pollinate.data import encode_dataset
    from pollinate.server.global_model import GlobalModel
    from pollinate.strategies import method_for
    from pollinate.training import train_local

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes
    # One thread, as each simulated client trains: two threads on two shared cores slow down
    # several-fold as soon as anything else runs (docs: shared platform.md).
    torch.set_num_threads(1)
    cfg = RunConfig.from_run_config(settings)
    meter, start = CpuMeter(), time.perf_counter()
    model = GlobalModel(cfg, method_for(cfg))  # same base, seeded initial adapter, held-out split
    union = [e for share in workload.shares(cfg, model.method.calibration_size())
             for e in encode_dataset(share, model.tokenizer, cfg.task, cfg.max_seq_len)]
    before = model.evaluate()
    steps = cfg.rounds * cfg.local_steps * cfg.num_clients
    result = train_local(model.model, union, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         pad_id=model.tokenizer.pad_token_id, seed=cfg.seed)
    after = model.evaluate()
    return {"steps": steps, "batch_size": cfg.batch_size, "union_examples": len(union),
            "examples_seen": result.examples, "tokens_seen": result.tokens,
            "train_seconds": result.seconds, "wall_seconds": time.perf_counter() - start,
            "busy_cores": meter.busy_cores(),
            "initial_eval": before, "final_eval": after,
            "config": {k: v for k, v in cfg.to_run_config().items() if not k.startswith("data.")}}


def report(out: dict[str, Any]) -> str:
    """Held-out loss and perplexity before and after, federated beside centralized."""
    fed, cen = out["federated"], out["centralized"]
    c = cen["config"]
    shape = f"{c['num-clients']} clients x {c['rounds']} rounds x {c['local-steps']} steps"
    rows = []
    for label, res, seen in ((f"federated ({shape})", fed, fed["examples_seen"]),
                             (f"centralized ({cen['steps']} steps on the union)", cen, cen["examples_seen"])):
        b, a = res["initial_eval"], res["final_eval"]
        rows.append([label, seen, f"{b['loss']:.3f}", f"{a['loss']:.3f}",
                     f"{b.get('perplexity', 0):.2f} -> {a.get('perplexity', 0):.2f}",
                     f"{a['loss'] - b['loss']:+.3f}"])
    return table(["training", "examples seen", "eval loss before", "eval loss after", "perplexity",
                  "change"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round: a smoke test")
    args = parser.parse_args()
    settings = QUICK if args.quick else {}  # the full run is the demo: every default
    fed = federated(settings)
    print(f"federated: {fed['initial_eval']['loss']:.3f} -> {fed['final_eval']['loss']:.3f}", flush=True)
    cen = centralized(settings)
    out = {"name": NAME, "quick": args.quick, "settings": settings or "defaults",
           "federated": fed, "centralized": cen,
           # the centralized run starts from the very adapter the federation starts from
           "same_start": abs(cen["initial_eval"]["loss"] - fed["initial_eval"]["loss"]) < 1e-4,
           "gap_final_loss": fed["final_eval"]["loss"] - cen["final_eval"]["loss"],
           "machine": machine()}
    print(report(out))
    print(f"results: {save_result(NAME, out)}")


if __name__ == "__main__":
    main()
