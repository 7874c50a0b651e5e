"""SFPrompt against a LoRA client: the client's compute, its memory, the bytes, what it learns (issue 11).

Part 1, on SmolLM2-135M-Instruct (generation) and MiniLM-L6 (classification), the default cut
(``sfprompt.head-layers`` = ``tail-layers`` = 1, ``prompt-tokens`` P = 8), one batch of b examples of exactly
T tokens for both clients (synthetic ids, no padding), one torch thread:

* (a) FLOPs of one step, computed from the model's dimensions (:func:`step_flops`, formula in the doc) and
  counted by torch's ``FlopCounterMode`` on the real models (matrix products, and CPU attention through a
  mapping added here): the split client's part (head forward, tail forward and backward, backward through
  the head into the prompt) against a LoRA r8 client's forward and backward of the whole model; the
  server's body and full fine-tuning for reference; and per round at part 3's settings (the local-loss
  epoch and the EL2N pass over the client's whole share count too);
* (b) seconds per step, median of ``repeats`` alternating pairs after ``warmup`` pairs: a real
  ``SplitClient`` step (``split_step`` over a ``BodyClient`` to the strategy's body service on loopback,
  mutual TLS, in this process; AdamW step included) against a step of the project's peft LoRA trainee
  (forward, backward, AdamW). The client's time waiting on the channel and the body's compute time in the
  service are timed apart, so the client's own seconds are the step less the wait;
* (c) peak memory: each method's ``estimate()`` (what ``pollinate plan`` prints) and the measured peak of
  3 training steps in a fresh process each (``pollinate.client.measure.measure_method_peak``: VmHWM above
  the runtime baseline; the split client trains against the body service of this process, with
  ``sfprompt.keep`` = 1 so that every split step has b examples).

Part 2, bytes: per batch, the tensor bytes the ``BodyClient`` counted against 4·b·S·d per tensor (S = P + T;
h and ∂L/∂z up, z and ∂L/∂h down; BERT's b·S-byte padding mask up), and the protobuf messages around them;
per round and client, from part 3's two runs (Flower's ``bytes_up``/``bytes_down`` of each client event plus
the ``split-bytes-up``/``split-bytes-down`` method figures of the sfprompt clients).

Part 3, learning: ``pollinate simulate`` with strategy sfprompt and fedit on SmolLM2 and a local file of
``--rows`` chatterbot pairs (seeded draw; ``eval-examples`` of them held out by the run, the rest split iid),
the same clients, rounds, local steps, batch and seed; each strategy at its default learning rate.

    python benchmarks/sfprompt.py                 # every part (about 10-20 minutes on 2 cores)
    python benchmarks/sfprompt.py --parts 1,2     # some parts; the others keep their saved results
    python benchmarks/sfprompt.py --quick         # smoke test: minimal sizes, a few minutes
    python benchmarks/sfprompt.py --docs-only     # rewrite the doc from the saved json

Results go to ``benchmarks/results/sfprompt.json`` and ``docs/benchmarks-sfprompt.md`` (a quick run:
``sfprompt.quick.json`` and ``benchmarks/results/sfprompt.quick.md``); the headline for docs/benchmarks.md is
``benchmarks/sfprompt_headline.md`` filled in and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import string
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, CpuMeter, events_of, machine, read_events, read_summary, run_simulate, table

NAME = "sfprompt"
DOC = REPO / "docs" / "benchmarks-sfprompt.md"
HEADLINE = Path(__file__).resolve().parent / "sfprompt_headline.md"
MODELS = {"smollm2-135m-instruct": "generation", "minilm-l6": "classification"}
PAPER_SHARE = 0.46  # % of the local compute the paper reports for the client
LORA_RANK = 8
LR = 1e-3  # step timing and memory only: the value does not change the work done
SIZES: dict[str, dict[str, Any]] = {
    "full": {"batch": 4, "tokens": 64, "warmup": 1, "repeats": 5, "memory_steps": 3},
    "quick": {"batch": 2, "tokens": 16, "warmup": 1, "repeats": 2, "memory_steps": 2},
}
RUNS: dict[str, dict[str, Any]] = {  # part 3: the settings both strategies share
    "full": {"rows": 324, "num-clients": 3, "rounds": 3, "local-steps": 5, "batch-size": 4,
             "max-seq-len": 64, "eval-examples": 24},
    "quick": {"rows": 40, "num-clients": 2, "rounds": 2, "local-steps": 1, "batch-size": 2,
              "max-seq-len": 16, "eval-examples": 8},
}
GB = 1e9
MB = 1e6


# --------------------------------------------------------------------------------------------------
# (a) FLOPs from the model's dimensions
# --------------------------------------------------------------------------------------------------


def block_products(dims: Any) -> int:
    """M: weights of one block's matrix products (q, o at the heads' width, k, v at the key-value heads';
    two MLP matrices in an encoder, three in a gated decoder). Biases and norms are no products."""
    d, width, kv = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    return 2 * d * width + 2 * d * kv + (2 if dims.encoder else 3) * d * dims.intermediate


def attention(dims: Any, positions: int) -> int:
    """A(S): forward FLOPs per token of QKᵀ and A·V over S positions (no causal discount: the kernel
    computes the full square)."""
    return 4 * positions * dims.heads * dims.head_dim


def block(dims: Any, positions: int, *, backward: str | None = None) -> int:
    """FLOPs per token of one block: forward 2M + A; backward 2M + 2.5A for the input's gradient alone
    (frozen weights; the CPU kernel recomputes the scores, hence 2.5 and not 2) and 4M + 2.5A with the
    weights' gradients too."""
    m, a = block_products(dims), attention(dims, positions)
    if backward is None:
        return 2 * m + a
    return (4 if backward == "weights" else 2) * m + 5 * a // 2


def output(dims: Any, task: str, batch: int, positions: int, trained: str) -> tuple[int, int]:
    """(forward, backward) FLOPs of the output head for one step. Generation: the LM head, 2·d·V per
    position (its weight trains only if untied and ``trained`` is ``all``); classification: the pooler
    (2·d², trains if ``trained`` is not ``classifier``) and the classifier (2·d·C, always trains), per
    example."""
    d = dims.hidden
    if task == "generation":
        per = 2 * d * dims.vocab * batch * positions
        weights = trained == "all" and not dims.tied_embeddings
        return per, per * (2 if weights else 1)
    pooler, classifier = 2 * d * d * batch, 2 * d * dims.num_labels * batch
    return pooler + classifier, pooler * (1 if trained == "classifier" else 2) + 2 * classifier


def step_flops(dims: Any, task: str, batch: int, tokens: int, prompt: int, head: int, tail: int
               ) -> dict[str, dict[str, int]]:
    """Forward and backward FLOPs of one step of b examples of T tokens, per role (see the doc)."""
    s = prompt + tokens  # S: the split runs the prompt's positions too
    body = dims.layers - head - tail
    n_split, n_lora = batch * s, batch * tokens
    out_split = output(dims, task, batch, s, "all")
    out_lora = output(dims, task, batch, tokens, "classifier")
    out_full = output(dims, task, batch, tokens, "all")
    adapters = sum(t.count * 2 * LORA_RANK * (t.in_features + t.out_features) for t in dims.targets)
    first_qkv = 2 * dims.hidden * (dims.heads + 2 * dims.kv_heads) * dims.head_dim  # no input gradient
    return {
        "sfprompt client": {
            "forward": n_split * (head + tail) * block(dims, s) + out_split[0],
            "backward": n_split * (tail * block(dims, s, backward="weights")
                                   + head * block(dims, s, backward="input")) + out_split[1]},
        "sfprompt server (body)": {
            "forward": 2 * n_split * body * block(dims, s),  # Forward, and Backward's recomputation
            "backward": n_split * body * block(dims, s, backward="input")},
        f"lora r{LORA_RANK} client": {
            "forward": n_lora * (dims.layers * block(dims, tokens) + adapters) + out_lora[0],
            "backward": n_lora * (dims.layers * block(dims, tokens, backward="input") + 2 * adapters
                                  - first_qkv) + out_lora[1]},
        "full fine-tuning client": {
            "forward": n_lora * dims.layers * block(dims, tokens) + out_full[0],
            "backward": n_lora * dims.layers * block(dims, tokens, backward="weights") + out_full[1]},
    }


def flop_counter() -> Any:
    """torch's FlopCounterMode, taught the CPU attention kernels (it knows the CUDA ones only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return int(sdpa_flop_count(q, k, v))

    def backward(grad: Any, q: Any, k: Any, v: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
        return int(sdpa_backward_flop_count(grad, q, k, v))

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


# --------------------------------------------------------------------------------------------------
# The two clients, side by side in this process
# --------------------------------------------------------------------------------------------------


class TimedBody:
    """The server's BodyCompute, timing what the service asks of it (the service's threads call it)."""

    def __init__(self, body: Any) -> None:
        self.body, self.hidden_size = body, body.hidden_size
        self.seconds, self._lock = 0.0, threading.Lock()

    def _timed(self, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        with self._lock:
            self.seconds += time.perf_counter() - start
        return out

    def forward(self, h: Any, mask: Any = None) -> Any:
        return self._timed(self.body.forward, h, mask)

    def backward(self, h: Any, grad_z: Any, mask: Any = None) -> Any:
        return self._timed(self.body.backward, h, grad_z, mask)


class TimedRemote:
    """``split_step``'s body over a BodyClient session (round 1, one step id per forward), timing the
    client's wait for each answer: encoding, TLS, gRPC, the server's work and decoding."""

    def __init__(self, client: Any) -> None:
        self.client, self.step, self.wait = client, 0, 0.0

    def forward(self, h: Any, mask: Any) -> Any:
        self.step += 1
        start = time.perf_counter()
        z = self.client.forward(1, self.step, h, mask)
        self.wait += time.perf_counter() - start
        return z

    def backward(self, h: Any, grad_z: Any, mask: Any) -> Any:
        start = time.perf_counter()
        grad_h = self.client.backward(1, self.step, grad_z)
        self.wait += time.perf_counter() - start
        return grad_h


class EchoBody:
    """A body that does no arithmetic (z = h, ∂L/∂h = ∂L/∂z): counting FLOPs of the client alone."""

    def forward(self, h: Any, mask: Any) -> Any:
        return h.clone()

    def backward(self, h: Any, grad_z: Any, mask: Any) -> Any:
        return grad_z.clone()


def base_settings(model: str, labels: Path) -> dict[str, Any]:
    """Model and task; a classifier reads its label count from ``labels``, a file of a few rows (the
    built-in dataset would be loaded, into the measured process too, only to count two labels)."""
    task = MODELS[model]
    return {"model": model, "task": task, **({"dataset": str(labels)} if task == "classification" else {})}


def settings_of(model: str, sizes: dict[str, Any], labels: Path) -> dict[str, Any]:
    """The run-config keys of part 1's split clients."""
    return {**base_settings(model, labels), "strategy": "sfprompt", "batch-size": sizes["batch"],
            "max-seq-len": sizes["tokens"], "sfprompt.keep": 1.0}


def label_file(folder: Path) -> Path:
    """48 rows of two labels, as a local classification dataset (24 of them the held-out split)."""
    path = folder / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": f"example {i}", "label": i % 2}) + "\n" for i in range(48)))
    return path


def synthetic_batch(batch: int, tokens: int, vocab: int, task: str) -> dict[str, Any]:
    """b examples of exactly T random tokens (no padding): S = P + T for every split tensor."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 3, (batch, tokens), generator=gen)  # [b, T]
    labels = ids.clone() if task == "generation" else torch.arange(batch) % 2  # [b, T] or [b]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Rig:
    """The strategy's body service on the server's frozen body, a SplitClient session to it, and a LoRA
    client of the same model, in this process."""

    def __init__(self, model: str, sizes: dict[str, Any], labels: Path) -> None:
        import torch

        from pollinate.config import RunConfig
        from pollinate.methods import build
        from pollinate.methods.lora.method import LoraPlan
        from pollinate.methods.plan import Plan
        from pollinate.methods.sfprompt.method import SfPromptMethod
        from pollinate.strategies.sfprompt import SfPrompt

        self.task, self.sizes = MODELS[model], sizes
        b, t = sizes["batch"], sizes["tokens"]
        self.base = base_settings(model, labels)
        self.cfg = RunConfig.from_run_config(settings_of(model, sizes, labels))
        self.strategy = SfPrompt(self.cfg)
        self.server = self.strategy.method.server()
        self.timed = TimedBody(self.server.body)
        self.server.body = self.timed  # what the service will call
        self.strategy.start_body(self.server)
        self.client_settings = {**settings_of(model, sizes, labels), **self.strategy.service_config()}
        self.method = SfPromptMethod(RunConfig.from_run_config(self.client_settings))
        self.dims = self.method.dims()
        self.split_plan = Plan("sfprompt", b, 1, t, False)
        self.client = self.method.client(self.split_plan)
        self.client.load(self.server.upload(), seed=0)
        self.session = self.client.body()
        self.remote = TimedRemote(self.session)
        self.split_opt = torch.optim.AdamW(self.client.split.trainable(), lr=LR, weight_decay=0.0)
        self.lora_method = build("lora", RunConfig.from_run_config(self.base))
        self.lora_plan = LoraPlan("lora", b, 1, t, False, rank=LORA_RANK)
        self.lora = self.lora_method.client(self.lora_plan).model
        self.lora_opt = torch.optim.AdamW([p for p in self.lora.parameters() if p.requires_grad], lr=LR)
        self.batch = synthetic_batch(b, t, self.dims.vocab, self.task)

    def close(self) -> None:
        self.session.close()
        self.strategy.teardown()

    def split_step(self) -> dict[str, float]:
        """One SplitClient step over the service; its seconds, the wait and the body's compute."""
        from pollinate.methods.sfprompt.split import split_step

        self.client.model.eval()  # as SplitClient.train: dropout off, the split exact
        wait, body = self.remote.wait, self.timed.seconds
        start = time.perf_counter()
        split_step(self.client.split, self.remote, self.batch)
        self.split_opt.step()
        self.split_opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        return {"step": seconds, "wait": self.remote.wait - wait, "body": self.timed.seconds - body}

    def lora_step(self) -> float:
        """One step of the LoRA trainee's peft model: forward, backward, AdamW."""
        self.lora.train()  # as train_local
        start = time.perf_counter()
        self.lora(**self.batch).loss.backward()
        self.lora_opt.step()
        self.lora_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


@contextmanager
def rig(model: str, sizes: dict[str, Any], labels: Path) -> Iterator[Rig]:
    built = Rig(model, sizes, labels)
    try:
        yield built
    finally:
        built.close()


def counted(r: Rig) -> dict[str, dict[str, int]]:
    """FLOPs torch counts for one step of each role, forward and backward apart."""
    import torch

    from pollinate.methods.sfprompt.split import split_step

    out: dict[str, dict[str, int]] = {}
    split, batch = r.client.split, r.batch
    with flop_counter() as fwd, torch.no_grad():
        split.local_loss(batch)  # head and tail, as the split step's client forward
    with flop_counter() as both:
        split_step(split, EchoBody(), batch)
    r.split_opt.zero_grad(set_to_none=True)
    out["sfprompt client"] = {"forward": fwd.get_total_flops(),
                              "backward": both.get_total_flops() - fwd.get_total_flops()}
    body = r.timed.body
    with torch.no_grad():
        h = split.head(batch)
    mask = split.body_mask(batch)
    with flop_counter() as fwd:
        z = body.forward(h, mask)
    leaf = h.detach().requires_grad_(True)
    with flop_counter() as back:  # BodyCompute.backward's work; the counter breaks its autograd.grad
        body.parts.run(body.blocks, leaf, mask).backward(torch.ones_like(z))
    out["sfprompt server (body)"] = {"forward": 2 * fwd.get_total_flops(),  # Backward recomputes it
                                     "backward": back.get_total_flops() - fwd.get_total_flops()}
    r.lora.train()
    with flop_counter() as fwd, torch.no_grad():
        r.lora(**batch)
    with flop_counter() as both:
        r.lora(**batch).loss.backward()
    r.lora_opt.zero_grad(set_to_none=True)
    out[f"lora r{LORA_RANK} client"] = {"forward": fwd.get_total_flops(),
                                        "backward": both.get_total_flops() - fwd.get_total_flops()}
    return out


def timings(r: Rig) -> dict[str, Any]:
    """Median seconds per step of each client after the warm-up pairs; pairs alternate who goes first."""
    split: list[dict[str, float]] = []
    lora: list[float] = []
    meter = CpuMeter()
    for i in range(r.sizes["warmup"] + r.sizes["repeats"]):
        first_split = i % 2 == 0
        s = r.split_step() if first_split else None
        t = r.lora_step()
        s = s if s is not None else r.split_step()
        if i >= r.sizes["warmup"]:
            split.append(s)
            lora.append(t)
    med = {k: statistics.median(x[k] for x in split) for k in ("step", "wait", "body")}
    client_own = statistics.median(x["step"] - x["wait"] for x in split)
    return {"split_step_s": med["step"], "split_wait_s": med["wait"], "body_compute_s": med["body"],
            "split_client_own_s": client_own, "channel_s": med["wait"] - med["body"],
            "lora_step_s": statistics.median(lora), "split_steps": split, "lora_steps": lora,
            "busy_cores": meter.busy_cores()}


def memory(r: Rig) -> dict[str, Any]:
    """Estimated and measured peaks (fresh processes) of the split client and the LoRA client."""
    from pollinate.client.measure import measure_method_peak

    steps = r.sizes["memory_steps"]
    split = measure_method_peak("sfprompt", r.client_settings, r.split_plan, steps=steps)
    lora = measure_method_peak("lora", r.base, r.lora_plan, steps=steps)
    split_est = r.method.estimate(r.dims, r.split_plan)
    lora_est = r.lora_method.estimate(r.lora_method.dims(), r.lora_plan)
    return {"sfprompt": {"peak": split.peak, "loaded": split.loaded, "estimate": split_est.total,
                         "estimate_parts": split_est.parts, "seconds": split.seconds},
            f"lora r{LORA_RANK}": {"peak": lora.peak, "loaded": lora.loaded, "estimate": lora_est.total,
                                   "estimate_parts": lora_est.parts, "seconds": lora.seconds}}


def batch_bytes(r: Rig) -> dict[str, Any]:
    """Tensor bytes per batch the BodyClient counted (all steps so far) and the protobuf messages of one
    step, against 4·b·S·d per tensor."""
    from pollinate.methods.sfprompt import split_pb2
    from pollinate.methods.sfprompt.channel import encode_tensor

    if r.remote.step == 0:
        r.split_step()
    traffic, steps = r.session.traffic(1), r.remote.step
    split, b = r.client.split, r.sizes["batch"]
    s = split.prompt_tokens + r.sizes["tokens"]
    h = split.head(r.batch).detach()  # [b, S, d]: z, ∂L/∂z and ∂L/∂h have its shape
    mask = split.body_mask(r.batch)
    sid = r.session.session_id
    forward = split_pb2.ForwardRequest(session_id=sid, round=1, step=steps, h=encode_tensor(h))
    if mask is not None:
        forward.mask.CopyFrom(encode_tensor(mask.bool()))
    backward = split_pb2.BackwardRequest(session_id=sid, round=1, step=steps, grad_z=encode_tensor(h))
    tensor = 4 * b * s * r.dims.hidden
    return {"b": b, "S": s, "d": r.dims.hidden, "per_tensor_formula": tensor,
            "mask_formula": b * s if mask is not None else 0,
            "up_per_batch": traffic.sent / steps, "down_per_batch": traffic.received / steps,
            "up_messages": forward.ByteSize() + backward.ByteSize(),
            "down_messages": 2 * split_pb2.ForwardReply(z=encode_tensor(h)).ByteSize(),
            "steps_counted": steps}


def flops_part(r: Rig, runs: dict[str, Any]) -> dict[str, Any]:
    """Analytic and counted FLOPs per step, and per round at part 3's settings."""
    s = r.cfg.sfprompt
    analytic = step_flops(r.dims, r.task, r.sizes["batch"], r.sizes["tokens"], s.prompt_tokens,
                          s.head_layers, s.tail_layers)
    share = (runs["rows"] - runs["eval-examples"]) // runs["num-clients"]
    return {"analytic": analytic, "counted": counted(r),
            "lm_head_forward": output(r.dims, r.task, r.sizes["batch"],
                                      s.prompt_tokens + r.sizes["tokens"], "all")[0],
            "dims": {"layers": r.dims.layers, "hidden": r.dims.hidden, "intermediate": r.dims.intermediate,
                     "heads": r.dims.heads, "kv_heads": r.dims.kv_heads, "head_dim": r.dims.head_dim,
                     "vocab": r.dims.vocab, "tied": r.dims.tied_embeddings, "params": r.dims.params(r.task),
                     "block_products": block_products(r.dims)},
            "round": {"share": share, "local_epochs": s.local_epochs}}


def part_models(parts: set[int], sizes: dict[str, Any], runs: dict[str, Any]) -> dict[str, Any]:
    """Parts 1 and 2 (per batch) on every model: one rig each."""
    import torch

    torch.set_num_threads(1)  # one thread per client, as the simulation runs them
    out: dict[str, Any] = {}
    for model in MODELS:
        with tempfile.TemporaryDirectory(prefix="pollinate-sfprompt-") as tmp, \
                rig(model, sizes, label_file(Path(tmp))) as r:
            row: dict[str, Any] = {}
            if 1 in parts:
                row["flops"] = flops_part(r, runs)
                row["time"] = timings(r)
                row["memory"] = memory(r)
            if 2 in parts:
                row["bytes"] = batch_bytes(r)
            out[model] = row
            brief = {k: v for k, v in row.get("time", {}).items() if "steps" not in k}
            print(f"{model}: {json.dumps(brief)}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Part 3: two simulations
# --------------------------------------------------------------------------------------------------


def chatterbot_file(folder: Path, rows: int) -> Path:
    """``rows`` chatterbot pairs drawn with seed 0, as a local .jsonl file."""
    from pollinate.data import load_dataset

    data = load_dataset("chatterbot", "generation").shuffle(seed=0).select(range(rows))
    path = folder / f"chatterbot-{rows}.jsonl"
    with path.open("w") as out:
        for row in data:
            out.write(json.dumps({"prompt": row["prompt"], "response": row["response"],
                                  "category": row["category"]}) + "\n")
    return path


def one_run(settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """One simulation: eval loss per round, time, and bytes per client per round (Flower's and split)."""
    done = run_simulate(settings, work)
    events, summary = read_events(done["run_dir"]), read_summary(done["run_dir"])
    evals, trains = events_of(events, "evaluate"), events_of(events, "train")
    clients = [e for e in events if e["event"] == "client"]
    later = [e for e in clients if e["round"] > 1] or clients  # fedit's round-1 downlink is smaller
    fig = [e.get("method_figures", {}) for e in later]
    return {
        "settings": settings, "wall_seconds": done["wall_seconds"], "busy_cores": done["busy_cores"],
        "eval": [evals[r]["loss"] for r in sorted(evals)],
        "round_seconds": [trains[r]["round_seconds"] for r in sorted(trains)],
        "client_train_seconds": [trains[r]["client_train_seconds"] for r in sorted(trains)],
        "flower_up": statistics.mean(e["bytes_up"] for e in later),
        "flower_down": statistics.mean(e["bytes_down"] for e in later),
        "split_up": statistics.mean(f.get("split-bytes-up", 0.0) for f in fig),
        "split_down": statistics.mean(f.get("split-bytes-down", 0.0) for f in fig),
        "kept_examples": statistics.mean(f["kept-examples"] for f in fig) if fig and "kept-examples" in fig[0]
        else None,
        "clients_counted": len(later),
        "events_up_total": int(sum(e["bytes_up"] + e.get("method_figures", {}).get("split-bytes-up", 0)
                                   for e in clients)),
        "events_down_total": int(sum(e["bytes_down"] + e.get("method_figures", {}).get("split-bytes-down", 0)
                                     for e in clients)),
        "summary_totals": {k: v for k, v in summary.items() if "bytes" in k},
        "seconds_per_step": summary["seconds_per_step"],
    }


def model_params(model: str) -> int:
    """P of a generation model, from its configuration (no weights loaded)."""
    from pollinate import workload
    from pollinate.config import RunConfig

    return int(workload.dims(RunConfig.from_run_config({"model": model}), "lora").params("generation"))


def part_learning(runs: dict[str, Any]) -> dict[str, Any]:
    """sfprompt and fedit on the same file, clients, rounds, steps and seed."""
    out: dict[str, Any] = {"full_ft_bytes": 4 * model_params("smollm2-135m-instruct")}
    with tempfile.TemporaryDirectory(prefix="pollinate-sfprompt-bench-") as tmp:
        folder = Path(tmp)
        data = chatterbot_file(folder, runs["rows"])
        shared = {k: v for k, v in runs.items() if k != "rows"}
        shared.update({"model": "smollm2-135m-instruct", "task": "generation", "dataset": str(data),
                       "partitioner": "iid", "seed": 0})
        for strategy in ("sfprompt", "fedit"):
            (folder / strategy).mkdir()
            out[strategy] = one_run({**shared, "strategy": strategy}, folder / strategy)
            done = out[strategy]
            print(f"{strategy}: eval {done['eval']}, {done['wall_seconds']:.0f} s", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# The doc
# --------------------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def flops_rows(f: dict[str, Any]) -> list[list[Any]]:
    lora = f"lora r{LORA_RANK} client"
    ref = sum(f["analytic"][lora].values())
    rows = []
    for role, a in f["analytic"].items():
        c = f["counted"].get(role)
        total = sum(a.values())
        rows.append([role, f"{a['forward'] / GB:.2f}", f"{a['backward'] / GB:.2f}", f"{total / GB:.2f}",
                     f"{sum(c.values()) / GB:.2f}" if c else "-",
                     f"{total / sum(c.values()):.3f}" if c else "-", pct(total / ref)])
    return rows


def round_flops(f: dict[str, Any], runs: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one round per client at part 3's settings from the counted per-batch figures (part 1's
    batch and length are part 3's batch and max-seq-len): SFPrompt's local-loss epochs (⌊n/b⌋ client
    steps each), its EL2N pass (n/b client forwards) and its split steps, against LoRA's steps."""
    c = f["counted"]
    n, b = f["round"]["share"], runs["batch-size"]
    client = sum(c["sfprompt client"].values())
    forward = c["sfprompt client"]["forward"]
    lora = sum(c[f"lora r{LORA_RANK} client"].values())
    local = f["round"]["local_epochs"] * max(n // b, 1) * client + (n / b) * forward
    split = runs["local-steps"] * client
    return {"local_and_el2n": local, "split": split, "sfprompt": local + split,
            "lora": runs["local-steps"] * lora}


def doc_part1(out: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    sizes = out["sizes"]
    lines = ["## 1. The client's compute and memory", "",
             f"One step of b = {sizes['batch']} examples of T = {sizes['tokens']} tokens (synthetic, no "
             "padding) for both clients; the split adds P = 8 prompt positions (S = P + T); head and tail "
             "one block each; LoRA rank 8 on the family's default targets.", "",
             "### (a) FLOPs per step", "",
             "Computed from the model's dimensions (d hidden, f MLP width, h heads of width h_d, kv "
             "key-value heads, V vocabulary, C classes, L blocks): per token and block M = 2·d·h·h_d + "
             "2·d·kv·h_d + k·d·f multiply-accumulates (k = 3 gated decoder, 2 encoder), attention "
             "A(S) = 4·S·h·h_d; forward 2M + A(S); backward 2M + 2.5·A(S) when only the input's gradient "
             "is needed (frozen weights; the CPU attention kernel recomputes the scores) and 4M + 2.5·A(S) "
             "when the weights train. Output head: 2·d·V per position (generation; its weight is the tied "
             "embedding, frozen in every case here), or pooler 2·d² and classifier 2·d·C per example. "
             "Then, per step:", "",
             "- split client: forward b·S·2·(2M + A(S)) (one head and one tail block) + the output head's; "
             "backward b·S·[(4M + 2.5A) (tail block, trains) + (2M + 2.5A) (head block, to the prompt)] + "
             "the output head's (pooler and classifier train);",
             "- body on the server: b·S·(L − 2)·[2·(2M + A) + (2M + 2.5A)] (its Backward recomputes the "
             "forward);",
             "- LoRA client: b·T·[L·(2M + A) + ℓ] forward, b·T·[L·(2M + 2.5A) + 2ℓ − q/k/v input gradients "
             "of the first block] backward, ℓ = Σ 2r(m + n) over the adapted matrices; the classifier "
             "trains, the pooler does not;",
             "- full fine-tuning (reference): every backward with 4M.",
             "",
             "Norms, activations, softmax and the optimiser's elementwise work are not counted. The counted "
             "column is torch's FlopCounterMode on the real models (the same step; attention through a "
             "mapping of the CPU kernels); the body's counted forward is doubled for the recomputation.", ""]
    for model, row in out["models"].items():
        if "flops" not in row:
            continue
        f = row["flops"]
        dims = f["dims"]
        lines += [f"**{model}** (L = {dims['layers']}, d = {dims['hidden']}, f = {dims['intermediate']}, "
                  f"h = {dims['heads']}, kv = {dims['kv_heads']}, V = {dims['vocab']:,}, "
                  f"{dims['params'] / 1e6:.1f}M parameters):", "",
                  table(["role", "forward GFLOP", "backward GFLOP", "total GFLOP", "counted GFLOP",
                         "formula / counted", "share of the LoRA step"], flops_rows(f)), ""]
        client = sum(f["analytic"]["sfprompt client"].values())
        lines += [f"The output head's forward alone is {f['lm_head_forward'] / GB:.2f} GFLOP, "
                  f"{pct(f['lm_head_forward'] / client)} of the split client's step.", ""]
        if "round" in f:
            rf = round_flops(f, runs)
            lines += [f"Per round and client at part 3's settings (share n = {f['round']['share']} "
                      f"examples, batch {runs['batch-size']}, {runs['local-steps']} steps; from the counted "
                      f"step above, every example taken at the full {sizes['tokens']} tokens): SFPrompt's "
                      f"local-loss epoch and EL2N pass {rf['local_and_el2n'] / GB:.1f} GFLOP + split steps "
                      f"{rf['split'] / GB:.1f} "
                      f"= {rf['sfprompt'] / GB:.1f} GFLOP against LoRA's {rf['lora'] / GB:.1f} GFLOP "
                      f"({rf['sfprompt'] / rf['lora']:.2f}x).", ""]
    rows = []
    for model, row in out["models"].items():
        if "time" in row:
            t = row["time"]
            rows.append([model, f"{t['lora_step_s']:.3f}", f"{t['split_step_s']:.3f}",
                         f"{t['split_step_s'] / t['lora_step_s']:.2f}", f"{t['split_client_own_s']:.3f}",
                         f"{t['split_client_own_s'] / t['lora_step_s']:.2f}", f"{t['body_compute_s']:.3f}",
                         f"{t['channel_s']:.3f}", f"{t['busy_cores']:.2f}" if t["busy_cores"] else "-"])
    if rows:
        lines += ["### (b) Seconds per step (one thread, median)", "",
                  f"{sizes['warmup']} warm-up pair(s) left out, then {sizes['repeats']} pairs, alternating "
                  "which client goes first. Split step = the client's head, tail and prompt backward, AdamW, "
                  "and two calls to the body service on 127.0.0.1 (mutual TLS, in this process). Client's "
                  "own = step less the time waiting on those calls; the wait splits into the body's compute "
                  "in the service and the channel (encoding, TLS, gRPC, decoding).", "",
                  table(["model", "LoRA step s", "split step s", "split / LoRA", "split client's own s",
                         "own / LoRA", "body compute s", "channel s", "busy cores"], rows), ""]
    rows = []
    for model, row in out["models"].items():
        if "memory" in row:
            m = row["memory"]
            lora, split = m[f"lora r{LORA_RANK}"], m["sfprompt"]
            rows.append([model, f"{lora['estimate'] / MB:.0f}", f"{lora['peak'] / MB:.0f}",
                         f"{split['estimate'] / MB:.0f}", f"{split['peak'] / MB:.0f}",
                         f"{split['estimate'] / lora['estimate']:.2f}", f"{split['peak'] / lora['peak']:.2f}",
                         f"{split['estimate'] / split['peak']:.2f}"])
    if rows:
        lines += ["### (c) Peak memory (MB)", "",
                  "Estimate: the method's `estimate()` at the same plan (what `pollinate plan` prints). "
                  f"Measured: {sizes['memory_steps']} training steps in a fresh process each (one thread), "
                  "VmHWM above the runtime baseline (`pollinate.client.measure.measure_method_peak`); the "
                  "split client trains against the body service of the benchmark's process (local-loss "
                  "phase, pruning with keep = 1, split steps), so the body's memory is the server's, not in "
                  "these figures.", "",
                  table(["model", "LoRA estimate", "LoRA measured", "split estimate", "split measured",
                         "split / LoRA (estimate)", "split / LoRA (measured)", "split estimate / measured"],
                        rows), ""]
    return lines


def doc_part2(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    rows = []
    for model, row in out["models"].items():
        if "bytes" in row:
            b = row["bytes"]
            up_formula = 2 * b["per_tensor_formula"] + b["mask_formula"]
            down_formula = 2 * b["per_tensor_formula"]
            rows.append([model, f"{b['b']} x {b['S']} x {b['d']}", f"{b['per_tensor_formula']:,}",
                         f"{up_formula:,}", f"{b['up_per_batch']:,.0f}",
                         f"{b['up_per_batch'] / up_formula:.3f}",
                         f"{down_formula:,}", f"{b['down_per_batch']:,.0f}",
                         f"{b['down_per_batch'] / down_formula:.3f}",
                         f"{b['up_messages']:,} / {b['down_messages']:,}"])
    if rows:
        lines += ["### Per batch, over the body service", "",
                  "Formula: 4·b·S·d per tensor; up h and ∂L/∂z (+ b·S bytes of padding mask for BERT), "
                  "down z and ∂L/∂h. Counted: the `BodyClient`'s tensor bytes (part 1's steps, divided by "
                  "their number). Messages: the protobuf encoding of one step's two requests / two replies "
                  "(TLS and HTTP/2 framing not included).", "",
                  table(["model", "b x S x d", "B per tensor", "up formula", "up counted", "ratio",
                         "down formula", "down counted", "ratio", "protobuf B up / down"], rows), ""]
    return lines


def up_total(r: dict[str, Any]) -> float:
    """Bytes a client sent in a round: Flower's and the body service's."""
    return float(r["flower_up"] + r["split_up"])


def down_total(r: dict[str, Any]) -> float:
    return float(r["flower_down"] + r["split_down"])


def strategies(learning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The runs of part 3 by strategy (the rest of its entry are reference figures)."""
    return {k: learning[k] for k in ("sfprompt", "fedit")}


def doc_round_bytes(learning: dict[str, Any]) -> list[str]:
    runs = strategies(learning)
    sf, fe = runs["sfprompt"], runs["fedit"]
    rows = [[name, f"{r['flower_up'] / MB:.2f}", f"{r['flower_down'] / MB:.2f}", f"{r['split_up'] / MB:.2f}",
             f"{r['split_down'] / MB:.2f}", f"{up_total(r) / MB:.2f}", f"{down_total(r) / MB:.2f}"]
            for name, r in runs.items()]
    full = learning.get("full_ft_bytes")
    if full:
        rows.append(["full fine-tuning (formula: 4·P each way, no framing)", f"{full / MB:.2f}",
                     f"{full / MB:.2f}", "-", "-", f"{full / MB:.2f}", f"{full / MB:.2f}"])
    check = [[name, f"{r['events_up_total']:,}", f"{r['summary_totals'].get('bytes_up_total', 0):,}",
              f"{r['events_down_total']:,}", f"{r['summary_totals'].get('bytes_down_total', 0):,}"]
             for name, r in runs.items() if "events_up_total" in r]
    return ["### Per round and client, in the runs of part 3", "",
            "Mean over the client events of rounds 2 and later. Flower: each client event's `bytes_up` / "
            "`bytes_down`; split: its `split-bytes-up` / `split-bytes-down` method figures (the body "
            "service).",
            "", table(["strategy", "Flower MB up", "Flower MB down", "split MB up", "split MB down",
                       "total MB up", "total MB down"], rows), "",
            f"sfprompt / fedit per client and round: {up_total(sf) / up_total(fe):.2f}x up, "
            f"{down_total(sf) / down_total(fe):.2f}x down"
            + (f"; sfprompt / federated full fine-tuning: {up_total(sf) / full:.3f}x up." if full else "."),
            "", "The whole runs, client events (Flower + split, every round) against summary.json's totals "
            "(which count the split bytes in `bytes_up_total` / `bytes_down_total` where pollinate records "
            "them there):", "",
            table(["strategy", "events B up", "summary B up", "events B down", "summary B down"], check), ""]


def doc_part3(out: dict[str, Any]) -> list[str]:
    runs = strategies(out["learning"])
    sf, fe = runs["sfprompt"], runs["fedit"]
    s = sf["settings"]
    rows = [[r, f"{fe['eval'][r]:.3f}", f"{sf['eval'][r]:.3f}", f"{sf['eval'][r] - fe['eval'][r]:+.3f}",
             f"{fe['round_seconds'][r - 1]:.0f}" if r else "-",
             f"{sf['round_seconds'][r - 1]:.0f}" if r else "-"]
            for r in range(len(sf["eval"]))]
    summary = [[k, f"{r['wall_seconds']:.0f}", f"{sum(r['client_train_seconds']):.0f}",
                f"{r['busy_cores']:.2f}" if r["busy_cores"] else "-",
                f"{r['kept_examples']:.0f}" if r["kept_examples"] is not None else "-"]
               for k, r in runs.items()]
    return ["## 3. Eval loss per round (SmolLM2, chatterbot)", "",
            f"`pollinate simulate`, both strategies with: {s['num-clients']} clients, {s['rounds']} rounds, "
            f"{s['local-steps']} local steps of batch {s['batch-size']}, max-seq-len {s['max-seq-len']}, "
            f"seed {s['seed']}, a local file of {out['runs']['rows']} chatterbot pairs (seeded draw), "
            f"{s['eval-examples']} of them held out by the run and evaluated on the server, the rest split "
            "iid (each client's share is what SFPrompt's local-loss epoch and EL2N pass go over every "
            "round). "
            "Each strategy at its default learning rate (fedit lr 3e-3, rank 8; sfprompt.lr 1e-3, keep 0.5, "
            "one local-loss epoch); sim.workers 2. Round 0 is the model before training; round r's loss is "
            "after round r.", "",
            table(["round", "fedit eval loss", "sfprompt eval loss", "sfprompt − fedit", "fedit round s",
                   "sfprompt round s"], rows), "",
            "Round 0 is not the same model for both: sfprompt's starts with its soft prompt (8 vocabulary "
            "embeddings drawn from the seed) prepended, fedit's with a LoRA adapter whose B is zero (the "
            "base model). Round seconds: from sending the instructions to the aggregate (round 1 includes "
            "loading the model in the simulation workers), the server's evaluation excluded.", "",
            table(["strategy", "wall s (whole command)", "clients' training s (all rounds)", "busy cores",
                   "examples kept per client (γn)"], summary), ""]


def shows(out: dict[str, Any]) -> list[str]:
    """Plain statements of the figures, no more."""
    notes = []
    for model, row in out.get("models", {}).items():
        if "flops" in row:
            f = row["flops"]["analytic"]
            share = sum(f["sfprompt client"].values()) / sum(f[f"lora r{LORA_RANK} client"].values())
            notes.append(f"- {model}: the split client's step is {pct(share)} of a LoRA step's FLOPs at "
                         f"these sizes (the paper reports {PAPER_SHARE}% of the local compute for its "
                         "models).")
        if "time" in row and "memory" in row:
            t, m = row["time"], row["memory"]
            step, own = t["split_step_s"] / t["lora_step_s"], t["split_client_own_s"] / t["lora_step_s"]
            peak = m["sfprompt"]["peak"] / m[f"lora r{LORA_RANK}"]["peak"]
            notes.append(f"- {model}: a split step takes {step:.2f}x a LoRA step's wall time, the client's "
                         f"own part {own:.2f}x; measured peak {peak:.2f}x the LoRA client's.")
    for model, row in out.get("models", {}).items():
        if "flops" in row and "round" in row["flops"] and "runs" in out:
            rf = round_flops(row["flops"], out["runs"])
            ratio = rf["sfprompt"] / rf["lora"]
            notes.append(f"- {model}: per round, at part 3's share and steps, the split client's local-loss "
                         f"epoch, EL2N pass and split steps come to {ratio:.2f}x the FLOPs of a LoRA "
                         f"client's {out['runs']['local-steps']} steps.")
    if out.get("learning"):
        sf, fe = out["learning"]["sfprompt"], out["learning"]["fedit"]
        full = out["learning"].get("full_ft_bytes")
        notes.append(f"- Per client and round in those runs sfprompt sent {up_total(sf) / up_total(fe):.2f}x "
                     f"fedit's bytes up and received {down_total(sf) / down_total(fe):.2f}x its bytes down "
                     "(Flower's and the body service's together)"
                     + (f", and {up_total(sf) / full:.3f}x what federated full fine-tuning would send each "
                        "way (4·P)." if full else "."))
        notes.append(f"- SmolLM2 on chatterbot, {len(sf['eval']) - 1} rounds: eval loss "
                     f"{sf['eval'][0]:.3f} -> {sf['eval'][-1]:.3f} with sfprompt, {fe['eval'][0]:.3f} -> "
                     f"{fe['eval'][-1]:.3f} with "
                     f"fedit; wall time {sf['wall_seconds']:.0f} s against {fe['wall_seconds']:.0f} s.")
    return ["## What this shows", "", *notes, "",
            "One seed, one machine, short runs: these are measurements of this implementation at these "
            "sizes, not of the method in general.", ""] if notes else []


def write_doc(out: dict[str, Any]) -> Path:
    m = out.get("machine", {})
    path = RESULTS / f"{NAME}.quick.md" if out.get("quick") else DOC
    quick = " — QUICK SMOKE RUN" if out.get("quick") else ""
    lines = [f"# SFPrompt against a LoRA client (`benchmarks/sfprompt.py`){quick}",
             "", f"Measured {out.get('date', '?')} on {m.get('cpus')} CPU cores, Python {m.get('python')}, "
             f"{m.get('platform')}, pollinate at commit {m.get('git_head')} "
             f"({m.get('uncommitted_pollinate_files')} uncommitted files under pollinate/), load average "
             f"{m.get('loadavg_at_start', 0):.2f} at the start. Every figure is read from "
             f"`benchmarks/results/{NAME}{'.quick' if out.get('quick') else ''}.json`; rerun with "
             "`cd benchmarks && ../.venv/bin/python sfprompt.py` (the script's docstring has `--parts`).",
             ""]
    if any(k in row for row in out.get("models", {}).values() for k in ("flops", "time", "memory")):
        lines += doc_part1(out, out["runs"])
    per_batch = doc_part2(out)
    if per_batch or out.get("learning"):
        lines += ["## 2. Bytes", "", *per_batch]
    if out.get("learning"):
        lines += doc_round_bytes(out["learning"]) + doc_part3(out)
    lines += shows(out)
    path.write_text("\n".join(lines))
    return path


def headline_figures(out: dict[str, Any]) -> dict[str, str]:
    """The values the headline template names (missing parts leave their placeholders)."""
    sizes = out.get("sizes", {})
    fig: dict[str, str] = {"date": str(out.get("date", "?")), "batch": str(sizes.get("batch", "?")),
                           "tokens": str(sizes.get("tokens", "?"))}
    for model, key in (("smollm2-135m-instruct", "smollm2"), ("minilm-l6", "minilm")):
        row = out.get("models", {}).get(model, {})
        if "flops" in row:
            f = row["flops"]["analytic"]
            client = sum(f["sfprompt client"].values())
            fig[f"{key}_flops_share"] = pct(client / sum(f[f"lora r{LORA_RANK} client"].values()))
            checks = [sum(f[k].values()) / sum(c.values()) for k, c in row["flops"]["counted"].items()]
            fig[f"{key}_flops_check"] = f"{min(checks):.3f}-{max(checks):.3f}"
            fig[f"{key}_lmhead_share"] = pct(row["flops"]["lm_head_forward"] / client)
            if "runs" in out:
                rf = round_flops(row["flops"], out["runs"])
                fig[f"{key}_round_ratio"] = f"{rf['sfprompt'] / rf['lora']:.2f}x"
        if "time" in row:
            t = row["time"]
            fig[f"{key}_step_ratio"] = f"{t['split_step_s'] / t['lora_step_s']:.2f}x"
            fig[f"{key}_own_ratio"] = f"{t['split_client_own_s'] / t['lora_step_s']:.2f}x"
            fig[f"{key}_lora_s"] = f"{t['lora_step_s']:.2f}"
            fig[f"{key}_split_s"] = f"{t['split_step_s']:.2f}"
        if "memory" in row:
            m = row["memory"]
            lora, split = m[f"lora r{LORA_RANK}"], m["sfprompt"]
            fig[f"{key}_split_mb"] = f"{split['peak'] / MB:.0f}"
            fig[f"{key}_lora_mb"] = f"{lora['peak'] / MB:.0f}"
            fig[f"{key}_mem_ratio"] = f"{split['peak'] / lora['peak']:.2f}x"
            fig[f"{key}_est_ratio"] = f"{split['estimate'] / split['peak']:.2f}"
        if "bytes" in row:
            b = row["bytes"]
            fig[f"{key}_batch_up"] = f"{b['up_per_batch']:,.0f}"
            fig[f"{key}_batch_formula"] = f"{2 * b['per_tensor_formula'] + b['mask_formula']:,}"
    if out.get("learning"):
        sf, fe = out["learning"]["sfprompt"], out["learning"]["fedit"]
        fig.update({"sf_up_mb": f"{up_total(sf) / MB:.1f}", "fe_up_mb": f"{up_total(fe) / MB:.1f}",
                    "sf_down_mb": f"{down_total(sf) / MB:.1f}", "fe_down_mb": f"{down_total(fe) / MB:.1f}",
                    "sf_split_up_mb": f"{sf['split_up'] / MB:.1f}",
                    "bytes_ratio": f"{up_total(sf) / up_total(fe):.2f}x",
                    "bytes_ratio_down": f"{down_total(sf) / down_total(fe):.2f}x",
                    "full_ft_ratio": f"{up_total(sf) / out['learning'].get('full_ft_bytes', math.nan):.3f}x",
                    "sf_loss": f"{sf['eval'][0]:.3f} -> {sf['eval'][-1]:.3f}",
                    "fe_loss": f"{fe['eval'][0]:.3f} -> {fe['eval'][-1]:.3f}",
                    "sf_wall": f"{sf['wall_seconds']:.0f}", "fe_wall": f"{fe['wall_seconds']:.0f}",
                    "rounds": str(len(sf["eval"]) - 1)})
    return fig


def headline(out: dict[str, Any]) -> str:
    return string.Template(HEADLINE.read_text()).safe_substitute(headline_figures(out))


# --------------------------------------------------------------------------------------------------


def results_path(quick: bool) -> Path:
    return RESULTS / f"{NAME}{'.quick' if quick else ''}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", default="1,2,3", help="comma-separated parts to run (1, 2, 3)")
    parser.add_argument("--quick", action="store_true", help="minimal sizes: a smoke test of the script")
    parser.add_argument("--docs-only", action="store_true", help="rewrite the doc from the saved json")
    parser.add_argument("--rows", type=int, help="part 3: chatterbot pairs in the local file")
    parser.add_argument("--rounds", type=int, help="part 3: rounds")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not parts <= {1, 2, 3}:
        raise SystemExit(f"--parts: {args.parts!r}; give some of 1,2,3")
    mode = "quick" if args.quick else "full"
    path = results_path(args.quick)
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.docs_only and not out:
        raise SystemExit(f"--docs-only: {path} does not exist yet; run the benchmark first")
    if not args.docs_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        runs = {**RUNS[mode], **({"rows": args.rows} if args.rows else {}),
                **({"rounds": args.rounds} if args.rounds else {})}
        out.update({"quick": args.quick, "sizes": SIZES[mode], "runs": runs, "machine": machine(),
                    "date": time.strftime("%Y-%m-%d")})
        start = time.perf_counter()
        if parts & {1, 2}:
            models = part_models(parts, SIZES[mode], runs)
            for model, row in models.items():  # a part not rerun keeps its saved figures
                out.setdefault("models", {}).setdefault(model, {}).update(row)
        if 3 in parts:
            out["learning"] = part_learning(runs)
        out.setdefault("log", []).append({"parts": sorted(parts), "date": out["date"],
                                          "machine": out["machine"],
                                          "minutes": (time.perf_counter() - start) / 60})
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {write_doc(out)}\n")
    print(("QUICK SMOKE RUN: not figures to publish\n\n" if out.get("quick") else "") + headline(out))


if __name__ == "__main__":
    main()
