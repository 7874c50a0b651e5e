"""Fit a client's local training to its memory budget.

A :class:`Plan` says how one client trains: the adapter method and rank, the micro-batch and the
gradient-accumulation steps that keep the requested effective batch, the sequence-length cap and
whether activations are recomputed (gradient checkpointing). An :class:`Estimator`, registered per
method name, predicts the peak resident memory of a training step at a plan from the model's
configuration alone (:class:`ModelDims`, no weights). :func:`choose_plan` walks the plans from the most
capable down and returns the first whose estimate fits the budget with a safety margin.

The memory model follows docs/algorithms.md ("Memory models for a planner"); its coefficients were
calibrated against measured peaks (:func:`measure_peak`, ``benchmarks/memory.py``). Pure torch and
transformers: the planner itself never loads weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from pollinate.client.budget import format_size

__all__ = [
    "Calibration",
    "Estimate",
    "Estimator",
    "LoraEstimator",
    "Measurement",
    "ModelDims",
    "Plan",
    "TargetShape",
    "candidates",
    "choose_plan",
    "enable_checkpointing",
    "estimator_for",
    "estimator_methods",
    "measure_peak",
    "minimum_budget",
    "model_dims",
    "register_estimator",
    "seq_len_steps",
]

FP32 = 4
"""Bytes per element: the base, the adapters and every activation are fp32 on CPU."""

MIN_SEQ_LEN = 16
"""The shortest sequence cap the planner offers: shorter examples say too little to train on."""


# --------------------------------------------------------------------------------------------------
# What a model looks like to the planner
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetShape:
    """The adapted linear layers of one name (``q_proj``): ``count`` layers of ``in × out``."""

    name: str
    in_features: int
    out_features: int
    count: int


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that decide its training memory, read from its config."""

    name: str
    """The model's name, for messages."""
    model_type: str
    """``llama``, ``bert``, ...: picks the per-layer activation model."""
    encoder: bool
    """True for BERT-like encoders (post-norm, GELU MLP, dropout), False for decoders."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    backbone_params: int
    """Parameters of the model without a task head (tied embeddings counted once)."""
    tied_embeddings: bool
    """Whether the LM head reuses the input embeddings (no extra V × hidden weights)."""
    num_labels: int
    hidden_dropout: float
    attention_dropout: float
    targets: tuple[TargetShape, ...]
    """The linear layers LoRA adapts."""

    def head_params(self, task: str) -> int:
        """Parameters of the task head on top of the backbone."""
        if task == "classification":
            return self.num_labels * self.hidden + self.num_labels  # weight and bias
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def params(self, task: str) -> int:
        """All parameters of the model for ``task`` (tied weights once)."""
        return self.backbone_params + self.head_params(task)

    def lora_params(self, rank: int) -> int:
        """Σ r (m + n) over the adapted layers: the parameters of A (r × n) and B (m × r)."""
        return sum(t.count * rank * (t.in_features + t.out_features) for t in self.targets)


def _first(config: PretrainedConfig, *names: str, default: Any = None) -> Any:
    """The first attribute of ``config`` among ``names`` that is set."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(config: PretrainedConfig, targets: Sequence[str], *, name: str = "") -> ModelDims:
    """Read the planner's view of a model from its transformers config; no weights are loaded.

    Parameters
    ----------
    config : PretrainedConfig
        The model's configuration (e.g. ``pollinate.models.model_config(name, task)``).
    targets : Sequence[str]
        Names of the linear layers LoRA adapts (``q_proj``, ``query``, ...), as in ``lora.targets``.
    name : str, optional
        The model's name for messages; defaults to the config's ``_name_or_path`` or model type.

    Returns
    -------
    ModelDims

    Raises
    ------
    ValueError
        If a target matches no linear layer of the model.
    """
    with torch.device("meta"):  # shapes only: builds in well under a second, allocates nothing
        backbone: nn.Module = AutoModel.from_config(config)
    linears = [(n.rsplit(".", 1)[-1], m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    shapes = _target_shapes(linears, targets)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    model_type = str(getattr(config, "model_type", ""))
    return ModelDims(
        name=name or str(getattr(config, "_name_or_path", "") or model_type),
        model_type=model_type,
        encoder=not bool(getattr(config, "is_decoder", False)) and model_type in _ENCODER_TYPES,
        layers=int(_first(config, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=int(_first(config, "intermediate_size", "n_inner", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", default=heads)),
        head_dim=int(_first(config, "head_dim", default=hidden // heads)),
        vocab=int(config.vocab_size),
        max_positions=int(_first(config, "max_position_embeddings", default=2**31 - 1)),
        backbone_params=sum(p.numel() for p in backbone.parameters()),  # skips tied duplicates
        tied_embeddings=bool(_first(config, "tie_word_embeddings", default=True)),
        num_labels=int(getattr(config, "num_labels", 2)),
        hidden_dropout=float(_first(config, "hidden_dropout_prob", "hidden_dropout", default=0.0)),
        attention_dropout=float(
            _first(config, "attention_probs_dropout_prob", "attention_dropout", default=0.0)),
        targets=shapes,
    )


_ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"})


def _target_shapes(linears: list[tuple[str, nn.Linear]], targets: Sequence[str]) -> tuple[TargetShape, ...]:
    """Group the linear layers named in ``targets`` by name and shape."""
    counts: dict[tuple[str, int, int], int] = {}
    for short, module in linears:
        if short in targets:
            key = (short, module.in_features, module.out_features)
            counts[key] = counts.get(key, 0) + 1
    unknown = [t for t in targets if not any(k[0] == t for k in counts)]
    if unknown or not targets:
        allowed = ", ".join(sorted({short for short, _ in linears}))
        raise ValueError(f"lora.targets: {','.join(unknown) or '(none)'} matches no linear layer "
                         f"of the model; allowed: {allowed}")
    return tuple(TargetShape(n, i, o, c) for (n, i, o), c in sorted(counts.items()))


# --------------------------------------------------------------------------------------------------
# Plans and estimates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one client trains. The effective batch is ``micro_batch * grad_accum``."""

    method: str
    """The adapter method (``"lora"``), which picks the estimator."""
    rank: int
    micro_batch: int
    """Examples per forward/backward pass."""
    grad_accum: int
    """Passes whose gradients are summed before one optimiser step."""
    seq_len: int
    """Cap on tokens per example; longer examples are truncated."""
    checkpointing: bool
    """Recompute each layer's activations in the backward pass instead of keeping them."""

    def __post_init__(self) -> None:
        for key in ("rank", "micro_batch", "grad_accum", "seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"plan.{key}: {value!r} is not allowed; expected an integer >= 1")

    @property
    def effective_batch(self) -> int:
        """Examples per optimiser step."""
        return self.micro_batch * self.grad_accum

    def describe(self) -> str:
        """One line: ``"lora rank 8, batch 2 x 4, 128 tokens, checkpointing"``."""
        ckpt = ", checkpointing" if self.checkpointing else ""
        return (f"{self.method} rank {self.rank}, batch {self.micro_batch} x {self.grad_accum}, "
                f"{self.seq_len} tokens{ckpt}")


@dataclass(frozen=True)
class Estimate:
    """Estimated peak resident memory of a training step, in bytes, and what it is made of."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)
    """What the peak is made of, e.g. for LoRA ``"base weights"``, ``"adapter"`` (weights and
    gradients), ``"optimizer"``, ``"activations"`` (kept for backward), ``"workspace"`` (backward
    temporaries), ``"logits"`` and ``"runtime"``; they sum to ``total``."""

    @classmethod
    def of(cls, parts: dict[str, float]) -> Estimate:
        """An estimate whose total is the sum of ``parts`` (zero parts dropped)."""
        kept = {k: int(v) for k, v in parts.items() if int(v) > 0}
        return cls(sum(kept.values()), kept)

    def breakdown(self, limit: int = 4) -> str:
        """The ``limit`` largest parts: ``"base weights 538 MB, logits 400 MB, ..."``."""
        ranked = sorted(self.parts.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {format_size(v)}" for k, v in ranked[:limit])
        return text + (", ..." if len(ranked) > limit else "")


class Estimator(Protocol):
    """Predicts the peak memory of one adapter method's training step."""

    def estimate(self, dims: ModelDims, plan: Plan, task: str) -> Estimate:
        """Peak resident bytes above the runtime baseline (interpreter and libraries)."""
        ...


E = TypeVar("E", bound=type)
_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(method: str) -> Callable[[E], E]:
    """Class decorator: the estimator (built without arguments) of adapter method ``method``."""

    def add(cls: E) -> E:
        if not method or method in _ESTIMATORS:
            raise ValueError(f"estimator for method {method!r} is registered twice or unnamed")
        _ESTIMATORS[method] = cls()
        return cls

    return add


def estimator_for(method: str) -> Estimator:
    """The estimator registered for ``method``; ValueError naming the known methods otherwise."""
    if method not in _ESTIMATORS:
        raise ValueError(f"method: {method!r} has no memory estimator; "
                         f"allowed: {', '.join(estimator_methods())}")
    return _ESTIMATORS[method]


def estimator_methods() -> list[str]:
    """Names of every method with a registered estimator."""
    return sorted(_ESTIMATORS)


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Coefficients of the LoRA memory model that the count of saved tensors does not give.

    Fitted by ``python benchmarks/memory.py`` (its calibration set) to measured peaks of tiny-llama,
    tiny-bert and small plans of SmolLM2 and MiniLM (one torch thread, ``limit_heap_retention`` on);
    checked on the larger held-out plans of the same script.
    """

    decoder_workspace: float = 0.0
    """Backward temporaries of a decoder layer, in layers' worth of its kept activations. The fit puts
    it at zero: the count of kept tensors is already a little high (the first layer keeps no residual
    input; a batch without padding keeps k and v at the key-value heads' width and no mask), and that
    covers the temporaries of one layer's backward pass."""
    encoder_workspace: float = 0.3
    """The same for an encoder layer, whose attention backward holds score-sized gradients."""
    logit_copies: float = 2.55
    """B·T·V fp32 tensors alive at the peak around the loss: the logits, the log-softmax kept for
    backward, and in the backward pass its gradient and the logits' gradient, partly overlapping."""
    runtime_bytes: int = 25_000_000
    """Fixed cost of a loaded model beyond its tensors: lazily imported modeling code, module objects,
    the autograd engine and the first step's kernels."""
    runtime_per_vocab: float = 720.0
    """Bytes per vocabulary entry that the loaded tokenizer keeps (its vocabulary and merges)."""


def _decoder_layer_floats(dims: ModelDims, rank: int, seq_len: int) -> float:
    """fp32 values a Llama-style decoder layer keeps for backward, per token, with LoRA at ``rank``.

    Counted with a saved-tensor hook on SmolLM2 and tiny-llama (sdpa attention, a padded batch):
    two residual-stream inputs of the RMSNorms, the normed input of q/k/v, q, k and v (k, v repeated
    to every head once there is a padding mask), the attention output, the SwiGLU gate, its SiLU and
    the up projection, the per-head log-sum-exp, two norm scales and the float mask row (``seq_len``).
    """
    d, f = dims.hidden, dims.intermediate
    qkv = 3 * dims.heads * dims.head_dim
    return 4 * d + qkv + 3 * f + dims.heads + 2 + seq_len + rank * _adapted_count(dims)


def _encoder_layer_floats(dims: ModelDims, rank: int, seq_len: int) -> float:
    """fp32 values a BERT-style encoder layer keeps for backward, per token, with LoRA at ``rank``.

    With attention dropout, sdpa takes its math path: it keeps the scores' softmax, the dropout mask
    and the dropped-out probabilities (three ``heads × seq_len`` rows per token). Besides: the layer
    input, q, k, v, two LayerNorm inputs with their statistics, the GELU input, and two hidden
    dropout masks when hidden dropout is on.
    """
    d, f = dims.hidden, dims.intermediate
    # with dropout: softmax, mask, dropped probabilities; without, flash keeps a log-sum-exp and the mask
    scores = 3 * dims.heads * seq_len if dims.attention_dropout > 0 else dims.heads + seq_len
    dropout = 2 * d if dims.hidden_dropout > 0 else 0
    return 4 * d + 2 * d + dropout + f + scores + 4 + rank * _adapted_count(dims)


def _adapted_count(dims: ModelDims) -> int:
    """Adapted linear layers per transformer layer (each keeps its r-wide A output for B)."""
    return round(sum(t.count for t in dims.targets) / max(dims.layers, 1))


@register_estimator("lora")
class LoraEstimator:
    """LoRA with AdamW on a frozen fp32 base (https://arxiv.org/abs/2106.09685).

    peak = P·4 (frozen base) + P_tr·16 (adapter, its gradient, two Adam moments)
         + activations kept for backward (all layers, or with checkpointing the layer inputs and one
           recomputed layer) + one layer's backward workspace
         + the B·T·V logits and their loss copies + a fixed runtime cost.
    """

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration or Calibration()

    def estimate(self, dims: ModelDims, plan: Plan, task: str) -> Estimate:
        """Peak resident bytes of a LoRA training step at ``plan`` (see the class docstring)."""
        cal = self.calibration
        tokens = plan.micro_batch * plan.seq_len
        workspace = cal.encoder_workspace if dims.encoder else cal.decoder_workspace
        trainable = dims.lora_params(plan.rank) + (dims.head_params(task) if task == "classification" else 0)
        layer_fn = _encoder_layer_floats if dims.encoder else _decoder_layer_floats
        layer = layer_fn(dims, plan.rank, plan.seq_len) * tokens * FP32  # one layer, bytes
        kept_layers = 1 if plan.checkpointing else dims.layers
        inputs = dims.layers * tokens * dims.hidden * FP32 if plan.checkpointing else 0
        activations = kept_layers * layer + inputs
        logits = tokens * dims.vocab * FP32 * cal.logit_copies if task == "generation" else 0
        return Estimate.of({
            "base weights": dims.params(task) * FP32,
            "adapter": trainable * 2 * FP32,  # weights and gradients
            "optimizer": trainable * 2 * FP32,  # AdamW's exp_avg and exp_avg_sq
            "activations": activations,
            "workspace": workspace * layer,
            "logits": logits,
            "runtime": cal.runtime_bytes + cal.runtime_per_vocab * dims.vocab,
        })


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


def seq_len_steps(seq_len: int, max_positions: int | None = None) -> list[int]:
    """Sequence caps to try, longest first: ``seq_len``, then 2^k and 1.5·2^k below it, down to 16.

    ``seq_len`` itself (capped at ``max_positions``) always comes first, even when it is below 16.
    """
    top = min(seq_len, max_positions) if max_positions else seq_len
    steps = {top}
    k = 3
    while 2**k < top:
        for value in (2**k, 3 * 2 ** (k - 1)):
            if MIN_SEQ_LEN <= value < top:
                steps.add(value)
        k += 1
    return sorted(steps, reverse=True)


def _check_request(ranks: Sequence[int], batch_size: int, seq_len: int) -> list[int]:
    """Validate the request; return the allowed ranks, largest first, without duplicates."""
    if not ranks:
        raise ValueError("lora.ranks: the list of allowed ranks is empty; give at least one rank")
    checks = [("batch-size", batch_size), ("max-seq-len", seq_len), *(("lora.rank", r) for r in ranks)]
    for key, value in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: {value!r} is not allowed; expected an integer >= 1")
    return sorted(set(ranks), reverse=True)


def candidates(dims: ModelDims, task: str, *, ranks: Sequence[int], batch_size: int, seq_len: int,
               method: str = "lora") -> list[Plan]:
    """Every plan the planner may choose, most capable first.

    Order: larger rank, then longer sequences (never above ``seq_len``), then no checkpointing before
    checkpointing (it costs a second forward pass), then larger micro-batches (fewer accumulation
    steps). Every plan keeps the effective batch at ``batch_size``: micro-batches divide it.

    Parameters
    ----------
    dims : ModelDims
    task : str
        ``"generation"`` or ``"classification"`` (part of the interface; the order does not use it).
    ranks : Sequence[int]
        The ranks allowed (a single one when the strategy needs equal ranks).
    batch_size : int
        The effective batch every plan keeps.
    seq_len : int
        The longest sequence cap asked for.
    method : str, default ``"lora"``

    Returns
    -------
    list of Plan
    """
    allowed = _check_request(ranks, batch_size, seq_len)
    micro = [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
    return [Plan(method, r, b, batch_size // b, t, ckpt)
            for r in allowed
            for t in seq_len_steps(seq_len, dims.max_positions)
            for ckpt in (False, True)
            for b in micro]


def choose_plan(dims: ModelDims, task: str, budget: int, *, ranks: Sequence[int], batch_size: int,
                seq_len: int, method: str = "lora", margin: float = 0.9,
                key: str = "memory budget") -> tuple[Plan, Estimate]:
    """The most capable plan whose estimated peak fits ``margin * budget``.

    Parameters
    ----------
    dims : ModelDims
    task : str
    budget : int
        Bytes this client may use above its runtime baseline.
    ranks, batch_size, seq_len, method
        As for :func:`candidates`.
    margin : float, default 0.9
        Share of the budget the estimate may fill; the rest absorbs estimation error.
    key : str, default ``"memory budget"``
        The configuration key of the budget, named in the error.

    Returns
    -------
    (Plan, Estimate)
        The first fitting plan in :func:`candidates` order, and its estimate. Deterministic.

    Raises
    ------
    ValueError
        If no plan fits: the message gives the smallest budget that would, and what it is made of.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin: {margin!r} is not allowed; expected 0 < margin <= 1")
    if budget <= 0:
        raise ValueError(f"{key}: {budget!r} is not allowed; a memory budget must be greater than 0")
    estimator = estimator_for(method)
    plans = candidates(dims, task, ranks=ranks, batch_size=batch_size, seq_len=seq_len, method=method)
    smallest: tuple[Plan, Estimate] | None = None
    for plan in plans:
        estimate = estimator.estimate(dims, plan, task)
        if estimate.total <= margin * budget:
            return plan, estimate
        if smallest is None or estimate.total < smallest[1].total:
            smallest = (plan, estimate)
    assert smallest is not None  # candidates() never returns an empty list
    raise ValueError(_refusal(dims, budget, margin, key, *smallest))


_DISPLAY_NAMES = {"lora": "LoRA"}


def minimum_budget(estimate: Estimate, margin: float) -> int:
    """The smallest budget whose ``margin`` share holds ``estimate``."""
    return math.ceil(estimate.total / margin)


def _refusal(dims: ModelDims, budget: int, margin: float, key: str, plan: Plan, estimate: Estimate) -> str:
    """One line: the budget is too small, the minimum that works and what it is made of."""
    method = _DISPLAY_NAMES.get(plan.method, plan.method)
    return (f"{key}: {format_size(budget)} is too small for any {method} plan of "
            f"{dims.name}; needs at least {format_size(minimum_budget(estimate, margin), up=True)} "
            f"({estimate.breakdown()}; {plan.describe()}; {1 - margin:.0%} safety margin)")


# --------------------------------------------------------------------------------------------------
# Running a plan, and measuring it
# --------------------------------------------------------------------------------------------------


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing of a (peft-wrapped) transformers model, for a plan that asks.

    Non-reentrant checkpointing of every layer; the embedding output requires grad so that gradients
    reach the adapters of the first layer through the recomputed layers. The KV cache is switched off
    (it is incompatible with checkpointing and useless in training).
    """
    get_base: Any = getattr(model, "get_base_model", None)
    inner: Any = get_base() if callable(get_base) else model
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(inner, "_require_grads_hooks", None):  # transformers 5 enables it already
        inner.enable_input_require_grads()
    if getattr(inner, "config", None) is not None:
        inner.config.use_cache = False


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


def measure_peak(model: str, task: str, plan: Plan, *, targets: Sequence[str] | None = None,
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
    plan : Plan
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    code = "import sys; from pollinate.client.planner import _measure_main; _measure_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model} at {plan.describe()} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Measurement(**result)


def _measure_main(request_json: str) -> None:
    """Child side of :func:`measure_peak`: print one JSON line with the measurement."""
    import resource
    import time
    import warnings

    warnings.filterwarnings("ignore")
    request = json.loads(request_json)
    torch.set_num_threads(1)
    if request["limit_heap"]:
        from pollinate.client.budget import limit_heap_retention

        limit_heap_retention()
    import peft  # noqa: F401  # part of the runtime baseline, like torch and transformers

    from pollinate import models
    from pollinate.adapters import LoraAdapter, LoraAdapterConfig
    from pollinate.client.memory import peak_bytes, reset_peak
    from pollinate.training import train_local

    plan = Plan(**request["plan"])
    reset_peak()
    baseline = peak_bytes()
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
    loaded = peak_bytes() - baseline
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if request["bare"]:
        _bare_loop(peft_model, examples, plan, request["steps"], tokenizer.pad_token_id)
    else:
        train_local(peft_model, examples, steps=request["steps"], batch_size=plan.effective_batch,
                    lr=1e-4, pad_id=tokenizer.pad_token_id, seed=0, micro_batch=plan.micro_batch)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    print(json.dumps({"peak": peak_bytes() - baseline, "baseline": baseline, "loaded": loaded,
                      "seconds": seconds, "cpu_seconds": cpu,
                      "minor_faults": after.ru_minflt - usage.ru_minflt}))


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
    """The attention projections ``lora.targets = "auto"`` picks (pollinate.config.DEFAULT_TARGETS)."""
    from pollinate.config import DEFAULT_TARGETS

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


def _bare_loop(model: nn.Module, examples: list[dict[str, Any]], plan: Plan, steps: int,
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
