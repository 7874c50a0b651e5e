"""Throughput of pollinate's local training step against a bare torch + peft loop.

A: ``pollinate.training.train_local`` on a peft model built as the ClientApp builds it: a
``LoraTrainee`` with the configured strategy's client variant (``pollinate.methods.lora``).
B: a loop written below with nothing but torch and peft: the same base weights wrapped by
``peft.get_peft_model`` with the same LoRA settings, AdamW, and per step forward, backward, step,
zero_grad over batches collated before the clock starts.

Both see identical tokens: chatterbot examples of client 0's share, each padded or trimmed to
exactly ``max-seq-len`` tokens, batched in the order ``train_local`` draws them for the block's seed.
Both start from identical adapter weights and take identical steps, so their losses must agree (checked
and reported). One torch thread; a warm-up block of each is excluded; then alternating blocks
A B A B ... and the median of each. Tokens/s counts every position of the [B, T] batch.

    python benchmarks/trainer.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from common import CpuMeter, machine, mark, save_result, table
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from pollinate import workload
from pollinate.config import RunConfig
from pollinate.data import IGNORE_INDEX, collate, encode_dataset
from pollinate.methods.lora.method import LoraTrainee
from pollinate.strategies import LoraStrategy, strategy_class
from pollinate.training import batches, train_local

NAME = "trainer"
GOAL = 0.95  # ours / bare tokens per second
SEQ_LEN = 64
LR = 1e-3
WARMUP_STEPS = 2
# short blocks, many pairs: a burst of foreign load then spoils one pair, not the median
FULL = {"model": "smollm2-135m-instruct", "batch_sizes": (8, 4), "steps": 2, "pairs": 6}
QUICK = {"model": "tiny-llama", "batch_sizes": (8, 4), "steps": 3, "pairs": 2}

Example = dict[str, Any]


def fixed_length(examples: list[Example], length: int, pad_id: int) -> list[Example]:
    """Every example padded (mask 0, label ignored) or trimmed to exactly ``length`` tokens."""
    out = []
    for e in examples:
        pad = max(length - len(e["input_ids"]), 0)
        out.append({"input_ids": (e["input_ids"] + [pad_id] * pad)[:length],
                    "attention_mask": (e["attention_mask"] + [0] * pad)[:length],
                    "labels": (e["labels"] + [IGNORE_INDEX] * pad)[:length]})
    return out


def bare_model(base: nn.Module, cfg: RunConfig) -> nn.Module:
    """The base wrapped by peft directly, LoRA settings spelled out from the run configuration."""
    family = base.config.model_type  # type: ignore[union-attr]
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=int(cfg.lora.alpha), lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_list(family), task_type=TaskType.CAUSAL_LM)
    torch.manual_seed(cfg.seed)  # the same draw of A as LoraTrainee
    return get_peft_model(base, lora)  # type: ignore[arg-type]


def our_model(cfg: RunConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The peft model exactly as the ClientApp builds it (pollinate/client/app.py), and its tokenizer."""
    strategy = strategy_class(cfg.strategy)
    if not issubclass(strategy, LoraStrategy):
        raise SystemExit(f"strategy {cfg.strategy!r} does not train LoRA; this benchmark compares LoRA loops")
    trainee = LoraTrainee(cfg, cfg.lora.rank_for(0), strategy.variant)  # A drawn from the run's seed
    return trainee.model, trainee.tokenizer


def bare_train(model: nn.Module, prepared: list[dict[str, torch.Tensor]]) -> float:
    """The bare loop: forward, backward, step, zero_grad; returns the mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for batch in prepared:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


def block(which: str, model: nn.Module, examples: list[Example], batch_size: int, steps: int,
          seed: int, pad_id: int) -> tuple[float, float, float]:
    """One timed block of ``steps`` steps; returns (wall seconds, CPU seconds, mean loss).

    CPU time (this process, every thread) barely moves when other programs share the cores, so it
    cross-checks the wall-clock figure on a busy machine.
    """
    if which == "bare":
        stream = batches(examples, batch_size, seed)  # the order train_local draws for this seed
        prepared = [collate(next(stream), pad_id) for _ in range(steps)]
        wall, cpu = time.perf_counter(), time.process_time()
        loss = bare_train(model, prepared)
        return time.perf_counter() - wall, time.process_time() - cpu, loss
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(model, examples, steps=steps, batch_size=batch_size, lr=LR, pad_id=pad_id,
                         seed=seed)
    return time.perf_counter() - wall, time.process_time() - cpu, result.loss


def measure(models: dict[str, nn.Module], examples: list[Example], batch_size: int, steps: int,
            pairs: int, pad_id: int) -> dict[str, Any]:
    """Warm-up, then ``pairs`` alternating blocks (ours, bare); medians and the ratio."""
    tokens, meter = batch_size * SEQ_LEN * steps, CpuMeter()
    warm = {k: block(k, m, examples, batch_size, WARMUP_STEPS, 10_000 + batch_size, pad_id)[2]
            for k, m in models.items()}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for pair in range(pairs):
        for k, m in models.items():  # ours first, bare second, every pair
            w, c, loss = block(k, m, examples, batch_size, steps, pair, pad_id)
            wall[k].append(w)
            cpu[k].append(c)
            losses[k].append(loss)
    rate = {k: tokens / statistics.median(v) for k, v in wall.items()}
    cpu_rate = {k: tokens / statistics.median(v) for k, v in cpu.items()}
    pair_ratios = [b / a for a, b in zip(wall["ours"], wall["bare"], strict=True)]
    # identical weights, tokens and steps: every block's loss must agree between the two loops
    pairs_of_losses = [(warm["ours"], warm["bare"]), *zip(losses["ours"], losses["bare"], strict=True)]
    return {"batch_size": batch_size, "seq_len": SEQ_LEN, "steps_per_block": steps, "pairs": pairs,
            "wall_seconds": wall, "cpu_seconds": cpu, "losses": losses, "warmup_losses": warm,
            "max_loss_difference": max(abs(a - b) for a, b in pairs_of_losses),
            "tokens_per_second": rate, "ratio": rate["ours"] / rate["bare"],
            "pair_ratios": pair_ratios, "median_pair_ratio": statistics.median(pair_ratios),
            "cpu_tokens_per_second": cpu_rate, "cpu_ratio": cpu_rate["ours"] / cpu_rate["bare"],
            "seconds_per_step": {k: statistics.median(v) / steps for k, v in wall.items()},
            "busy_cores": meter.busy_cores()}  # machine-wide; this benchmark alone keeps 1 core busy


def report(results: list[dict[str, Any]]) -> str:
    """One row per batch size."""
    rows = [[f"{r['batch_size']} x {r['seq_len']}", f"{r['tokens_per_second']['ours']:.0f}",
             f"{r['tokens_per_second']['bare']:.0f}", f"{r['ratio']:.3f}", f"{r['median_pair_ratio']:.3f}",
             f"{r['cpu_ratio']:.3f}", f"{r['max_loss_difference']:.1e}", f"{r['busy_cores']:.2f}",
             mark(r.get("met"))] for r in results]
    return table(["batch", "ours tokens/s", "bare tokens/s", "ours / bare (median blocks)",
                  "median of pair ratios", "ours / bare (CPU time)", "max loss difference",
                  "busy cores", f"goal: >= {GOAL}"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes
    torch.set_num_threads(1)  # one thread per client, as in the simulation (platform.md)
    cfg = RunConfig.from_run_config({"model": plan["model"], "max-seq-len": SEQ_LEN, "lr": LR})
    ours, tokenizer = our_model(cfg)
    bare = bare_model(workload.base_model(cfg)[0], cfg)
    pad_id = int(tokenizer.pad_token_id)
    share = workload.shares(cfg)[0]
    examples = fixed_length(encode_dataset(share, tokenizer, cfg.task, SEQ_LEN), SEQ_LEN, pad_id)
    real = sum(sum(e["attention_mask"]) for e in examples) / (len(examples) * SEQ_LEN)
    results = []
    for batch_size in plan["batch_sizes"]:
        res = measure({"ours": ours, "bare": bare}, examples, batch_size, plan["steps"], plan["pairs"],
                      pad_id)
        res["met"] = None if args.quick else res["ratio"] >= GOAL
        results.append(res)
        print(f"batch {batch_size}: ratio {res['ratio']:.3f} {res['pair_ratios']}", flush=True)
    out = {"name": NAME, "quick": args.quick, "model": cfg.model, "lora_rank": cfg.lora.rank,
           "lora_targets": cfg.lora.target_list(ours.base_model.config.model_type),
           "examples": len(examples), "non_pad_fraction": real, "threads": torch.get_num_threads(),
           "warmup_steps": WARMUP_STEPS, "goal_min_ratio": GOAL, "machine": machine(), "results": results}
    print(report(results))
    print(f"results: {save_result(NAME, out)}")


if __name__ == "__main__":
    main()
