"""Measure the real peak memory of a training step in a fresh child process (the planner's check).

:func:`measure_peak` runs a few training steps at a plan in a child process with one torch thread and
reports its resident high-water mark above the runtime baseline: the figure every estimate is
calibrated against (``benchmarks/memory.py``) and checked against (``tests/client/test_planner.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pollinate.methods.lora.method import LoraPlan
from pollinate.methods.plan import Plan

__all__ = ["Measurement", "measure_forward_peak", "measure_method_peak", "measure_peak"]


@dataclass(frozen=True)
class Measurement:
    """A measured training step: peak resident bytes above the runtime baseline."""

    peak: int
    """VmHWM at the end of training minus VmHWM right before the model was loaded."""
    baseline: int
    """Resident bytes of the interpreter with torch, transformers and peft imported."""
    loaded: int
    """Resident bytes the loaded model with its adapter added to the baseline, before training."""
    seconds: float
    """Wall time of the training steps."""
    cpu_seconds: float = 0.0
    """CPU time (user and system) of the training steps: unlike wall time, barely moved by other
    programs on the machine."""
    minor_faults: int = 0
    """Pages the kernel had to map in during the training steps (fresh memory costs system time)."""
    file_growth: int = 0
    """Growth of the resident pages mapped from files (library code) between the baseline and the end:
    part of ``peak``, and the part that differs most between hosts."""


def measure_peak(model: str, task: str, plan: LoraPlan, *, targets: Sequence[str] | None = None,
                 steps: int = 3, alpha: float = 16.0, limit_heap: bool = True, bare: bool = False,
                 base_dtype: str = "float32", timeout: float = 900.0) -> Measurement:
    """Measure the real peak of ``steps`` LoRA training steps at ``plan`` in a fresh process.

    The child runs with one torch thread: it imports torch, transformers and peft, reads the baseline,
    loads ``model``, attaches LoRA (``targets`` or the family's defaults), enables checkpointing when
    the plan asks, and trains on synthetic examples of ``plan.seq_len`` tokens (every other one a token
    shorter, so batches are padded as real ones are) with :func:`pollinate.training.train_local`, one
    step being ``grad_accum`` micro-batches of ``micro_batch`` examples.

    Parameters
    ----------
    model, task : str
        As for :func:`pollinate.models.load_model`.
    plan : LoraPlan
    targets : Sequence[str], optional
    steps : int, default 3
    alpha : float, default 16.0
    limit_heap : bool, default True
        Call :func:`pollinate.client.budget.limit_heap_retention` first, as the client does.
    bare : bool, default False
        Train with a plain torch loop (forward, backward, AdamW) instead of ``train_local``.
    base_dtype : str, default ``"float32"``
        dtype of the frozen base (``"bfloat16"`` to measure a half-width base; the adapters stay fp32).
    timeout : float, default 900

    Returns
    -------
    Measurement
    """
    request = {"model": model, "task": task, "plan": dataclasses.asdict(plan), "steps": steps,
               "alpha": alpha, "targets": list(targets) if targets else None,
               "limit_heap": limit_heap, "bare": bare, "base_dtype": base_dtype}
    return _run_child("_measure_main", request, f"{model} at {plan.describe()}", timeout)


def measure_method_peak(method: str, settings: Mapping[str, Any], plan: Plan, *, steps: int = 3,
                        limit_heap: bool = True, timeout: float = 900.0) -> Measurement:
    """Measure the real peak of ``steps`` training steps of any registered method's client trainee.

    As :func:`measure_peak`, but the child builds ``method`` from the run-config ``settings`` and trains
    its own trainee (after merging one :meth:`~pollinate.methods.base.Method.sample_update`, so a
    method whose frozen part arrives by update, like LoRA-SB, has it) with its ``train``.

    Parameters
    ----------
    method : str
        A registered method (``"lora"``, ``"lora_sb"``).
    settings : Mapping[str, Any]
        Run-config keys (``model``, ``task``, ``fedsb.rank``, ...).
    plan : Plan
        One of the method's plans.
    steps, limit_heap, timeout
        As for :func:`measure_peak`.
    """
    request = {"method": method, "settings": dict(settings), "plan": dataclasses.asdict(plan),
               "plan_type": type(plan).__name__, "steps": steps, "limit_heap": limit_heap}
    return _run_child("_measure_method_main", request, f"{method} at {plan.describe()}", timeout)


def measure_forward_peak(model: str, task: str, plan: Plan, *, steps: int = 3, limit_heap: bool = True,
                         timeout: float = 900.0) -> Measurement:
    """The reference of an inference-level method: ``steps`` forward passes with the loss, no graph.

    The child loads the bare base model and computes the loss of each step's batch (micro-batches of
    ``plan.micro_batch``) under ``torch.no_grad``, as a zeroth-order step's forward passes do.
    """
    request = {"model": model, "task": task, "plan": dataclasses.asdict(plan), "steps": steps,
               "limit_heap": limit_heap}
    return _run_child("_measure_forward_main", request, f"a forward of {model} at {plan.describe()}", timeout)


def _run_child(entry: str, request: dict[str, Any], label: str, timeout: float) -> Measurement:
    """Run ``entry`` of this module in a fresh interpreter with one thread; read its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    code = f"import sys; from pollinate.client.measure import {entry}; {entry}(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {label} failed:\n{done.stderr[-2000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _child_start(request: dict[str, Any]) -> None:
    """One torch thread, small pages, the client's heap policy, and the libraries of the runtime baseline.

    Huge pages are off even for a measurement on glibc's default heap, so that a host which maps them
    cannot move a peak for reasons that are not the plan's.
    """
    import warnings

    from pollinate.client.budget import disable_huge_pages, limit_heap_retention

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    disable_huge_pages()
    if request["limit_heap"]:
        limit_heap_retention()
    import peft  # noqa: F401  # part of the runtime baseline, like torch and transformers


def _report(baseline: int, files: int, loaded: int, train: Callable[[], object]) -> None:
    """Run ``train`` timed; print the peak above ``baseline``, the growth of file pages above ``files``
    and the times as one JSON line."""
    import resource
    import time

    from pollinate.client.memory import file_bytes, peak_bytes

    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    train()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    print(json.dumps({"peak": peak_bytes() - baseline, "baseline": baseline, "loaded": loaded,
                      "seconds": seconds, "cpu_seconds": cpu,
                      "minor_faults": after.ru_minflt - usage.ru_minflt,
                      "file_growth": file_bytes() - files}))


def _measure_method_main(request_json: str) -> None:
    """Child side of :func:`measure_method_peak`: print one JSON line with the measurement."""
    request = json.loads(request_json)
    _child_start(request)
    from pollinate import methods
    from pollinate.client.memory import file_bytes, peak_bytes, reset_peak
    from pollinate.config import RunConfig
    from pollinate.methods.base import TrainSpec

    cfg = RunConfig.from_run_config(request["settings"])
    method = methods.build(request["method"], cfg)
    plan_type = LoraPlan if request["plan_type"] == "LoraPlan" else Plan
    plan = plan_type(**request["plan"])
    reset_peak()
    baseline, files = peak_bytes(), file_bytes()
    trainee = method.client(plan)
    trainee.merge(method.sample_update(trainee, 0))
    model: Any = trainee.model  # a transformers model (or peft's wrapper): it has a config
    examples = _synthetic_examples(plan, int(model.config.vocab_size), cfg.task)
    _touch(trainee.model)
    spec = TrainSpec(request["steps"], plan.effective_batch, 1e-4, plan.micro_batch)
    _report(baseline, files, peak_bytes() - baseline, lambda: trainee.train(examples, spec, seed=0))


def _measure_forward_main(request_json: str) -> None:
    """Child side of :func:`measure_forward_peak`: print one JSON line with the measurement."""
    request = json.loads(request_json)
    _child_start(request)
    from pollinate import models
    from pollinate.client.memory import file_bytes, peak_bytes, reset_peak
    from pollinate.training import batch_loss, micro_batches_of

    plan = Plan(**request["plan"])
    reset_peak()
    baseline, files = peak_bytes(), file_bytes()
    model, tokenizer = models.load_model(request["model"], request["task"])
    model.eval()
    examples = _synthetic_examples(plan, model.config.vocab_size, request["task"])
    _touch(model)

    def forward() -> None:
        parts = micro_batches_of(examples, plan.micro_batch, tokenizer.pad_token_id)
        for _ in range(request["steps"]):
            batch_loss(model, parts)

    _report(baseline, files, peak_bytes() - baseline, forward)


def _measure_main(request_json: str) -> None:
    """Child side of :func:`measure_peak`: print one JSON line with the measurement."""
    request = json.loads(request_json)
    _child_start(request)

    from pollinate import models
    from pollinate.client.memory import file_bytes, peak_bytes, reset_peak
    from pollinate.methods.lora.adapter import LoraAdapter, LoraAdapterConfig
    from pollinate.training import enable_checkpointing, train_local

    plan = LoraPlan(**request["plan"])
    reset_peak()
    baseline, files = peak_bytes(), file_bytes()
    model, tokenizer = models.load_model(request["model"], request["task"])
    model.to(getattr(torch, request["base_dtype"]))
    targets = tuple(request["targets"] or _default_targets(model.config.model_type))
    adapter = LoraAdapter(LoraAdapterConfig(plan.rank, request["alpha"], targets, request["task"]))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = adapter.attach(model)
    if plan.checkpointing:
        enable_checkpointing(peft_model)
    examples = _synthetic_examples(plan, model.config.vocab_size, request["task"])
    _touch(peft_model)
    def train() -> None:
        if request["bare"]:
            _bare_loop(peft_model, examples, plan, request["steps"], tokenizer.pad_token_id)
        else:
            train_local(peft_model, examples, steps=request["steps"], batch_size=plan.effective_batch,
                        lr=1e-4, pad_id=tokenizer.pad_token_id, seed=0, micro_batch=plan.micro_batch)

    _report(baseline, files, peak_bytes() - baseline, train)


@torch.no_grad()
def _touch(model: nn.Module) -> None:
    """Read every weight once, so all of them are resident as the budget assumes.

    transformers maps a safetensors checkpoint into memory; a page becomes resident only when read.
    A decoder reads all of its weights in one step (the LM head reads the whole embedding table), but an
    encoder's embedding lookup reads only the rows of the tokens it has seen: a long-running client
    ends up with most of them, a three-step measurement would not.
    """
    for param in model.parameters():
        param.sum()


def _default_targets(model_type: str) -> tuple[str, ...]:
    """The attention projections ``lora.targets = "auto"`` picks."""
    from pollinate.methods.settings import DEFAULT_TARGETS

    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"lora.targets: no default targets for model type {model_type!r}; name them")
    return DEFAULT_TARGETS[model_type]


def _synthetic_examples(plan: Plan, vocab: int, task: str) -> list[dict[str, Any]]:
    """One step's encoded examples of random tokens: ``seq_len`` long, every other one a token shorter
    so that micro-batches are padded (with a mask) as real batches are."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(plan.effective_batch):
        length = plan.seq_len - (i % 2)
        ids = torch.randint(3, vocab - 3, (length,), generator=generator).tolist()
        label: Any = ids if task == "generation" else i % 2
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return examples


def _bare_loop(model: nn.Module, examples: list[dict[str, Any]], plan: LoraPlan, steps: int,
               pad_id: int) -> None:
    """The reference training loop: padded micro-batches, forward, backward, AdamW, nothing else."""
    from pollinate.data import collate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    parts = [collate(examples[i : i + plan.micro_batch], pad_id)
             for i in range(0, len(examples), plan.micro_batch)]
    for _ in range(steps):
        for part in parts:
            (model(**part).loss / len(parts)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
