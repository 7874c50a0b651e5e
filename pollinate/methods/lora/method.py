"""LoRA as a pollinate method (https://arxiv.org/abs/2106.09685): plans, estimates, trainees, export.

Each aggregation rule's client behaviour is a variant object (:mod:`pollinate.methods.lora.variants`)
that the rule's strategy hands to :class:`LoraMethod`; the trainee is the same for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pollinate import workload
from pollinate.aggregation import Delta, LoraFactors, apply_delta, fingerprint
from pollinate.config import RunConfig
from pollinate.files import UPDATES_FILE
from pollinate.methods.base import SYNC_TOLERANCE, Example, Exportable, Schema, TensorSpec, TrainSpec
from pollinate.methods.lora.adapter import LoraAdapter, LoraAdapterConfig, State
from pollinate.methods.lora.memory import LoraEstimator
from pollinate.methods.lora.update import LowRankUpdate
from pollinate.methods.lora.variants import Shared
from pollinate.methods.plan import Estimate, ModelDims, Plan, micro_batches, seq_len_steps
from pollinate.training import TrainResult, enable_checkpointing, train_local


@dataclass(frozen=True)
class LoraPlan(Plan):
    """A LoRA plan: the generic one plus the adapter's rank."""

    rank: int = 8

    def choices(self) -> str:
        """``"rank 8"``."""
        return f"rank {self.rank}"


def lora_candidates(dims: ModelDims, ranks: Sequence[int], batch_size: int, seq_len: int,
                    method: str = "lora") -> list[LoraPlan]:
    """Every LoRA plan, most capable first.

    Order: larger rank, then longer sequences (never above ``seq_len``), then no checkpointing before
    checkpointing (it costs a second forward pass), then larger micro-batches (fewer accumulation
    steps). Every plan keeps the effective batch at ``batch_size``: micro-batches divide it.
    """
    if not ranks:
        raise ValueError("lora.ranks: the list of allowed ranks is empty; give at least one rank")
    checks = [("batch-size", batch_size), ("max-seq-len", seq_len), *(("lora.rank", r) for r in ranks)]
    for key, value in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: {value!r} is not allowed; expected an integer >= 1")
    return [LoraPlan(method, b, batch_size // b, t, ckpt, rank=r)
            for r in sorted(set(ranks), reverse=True)
            for t in seq_len_steps(seq_len, dims.max_positions)
            for ckpt in (False, True)
            for b in micro_batches(batch_size)]


def attach_shared_adapter(cfg: RunConfig, model: nn.Module, rank: int, dropout: float
                          ) -> tuple[LoraAdapter, nn.Module]:
    """A peft LoRA adapter at ``rank`` on ``lora.targets``, its A drawn from the run seed: identical on
    every node (peft draws A from the global RNG, so the draw is forked and seeded here)."""
    family = str(getattr(getattr(model, "config", None), "model_type", ""))
    adapter = LoraAdapter(LoraAdapterConfig(rank=rank, alpha=cfg.lora.alpha,
                                            targets=tuple(cfg.lora.target_list(family)), task=cfg.task,
                                            dropout=dropout))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return adapter, adapter.attach(model)


class LoraTrainee:
    """A base model with one peft LoRA adapter, kept for the life of a process."""

    def __init__(self, cfg: RunConfig, rank: int, variant: Shared, checkpointing: bool = False) -> None:
        model, self.tokenizer = workload.base_model(cfg)
        self.adapter, self.model = attach_shared_adapter(cfg, model, rank, cfg.lora.dropout)
        self.variant = variant
        variant.prepare(self.adapter, self.model)
        if checkpointing:
            enable_checkpointing(self.model)
        self.version = 0

    def load(self, state: Mapping[str, torch.Tensor], *, seed: int) -> None:
        """Load the global adapter the way this variant's clients do."""
        self.variant.load(self.adapter, self.model, state, seed)

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """AdamW steps on the adapter (and a head); the base is untouched."""
        return train_local(self.model, examples, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                           pad_id=self.tokenizer.pad_token_id, seed=seed, micro_batch=spec.micro_batch)

    def upload(self) -> State:
        """The adapter tensors that train, fp32 copies, in peft's key names."""
        return self.adapter.trainable_state(self.model)

    def initial_state(self) -> State:
        """What every client receives in round 1 (this variant's choice)."""
        return self.variant.initial_state(self.adapter, self.model)

    def merge(self, update: LowRankUpdate) -> None:
        """W ← W + ΔW under every adapted layer."""
        apply_delta(self.adapter.base_weights(self.model), update.delta)
        self.version += update.span

    def fingerprint(self) -> float:
        """Of the base weights under the adapted layers (what merges write)."""
        return fingerprint(self.adapter.base_weights(self.model))

    def save(self, folder: Path) -> None:
        """The adapter in peft format (``PeftModel.from_pretrained(base, folder)``)."""
        self.model.save_pretrained(str(folder))  # type: ignore[operator]


class LoraMethod:
    """LoRA with one of the rules' client variants."""

    name: ClassVar[str] = "lora"
    settings_table: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    update_type: ClassVar[type[LowRankUpdate]] = LowRankUpdate
    sync_tolerance: float = SYNC_TOLERANCE
    estimator: ClassVar[LoraEstimator] = LoraEstimator()

    def __init__(self, cfg: RunConfig, variant: Shared | None = None,
                 ranks: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.variant = variant or Shared()
        self.allowed_ranks = list(ranks) if ranks is not None else None
        """Ranks every client may choose among (``pollinate plan --ranks``); None: from the config."""

    def calibration_size(self) -> int:
        """LoRA keeps no examples on the server."""
        return 0

    def dims(self) -> ModelDims:
        """The model's shapes with the LoRA targets."""
        return workload.dims(self.cfg, self.settings_table)

    def ranks(self, client: int) -> list[int]:
        """The client's fixed rank; where the variant takes mixed ranks and none are set, lora.rank
        halved down to 1 (the planner picks the largest that fits)."""
        if self.allowed_ranks is not None:
            return self.allowed_ranks
        if self.cfg.lora.ranks or not self.variant.heterogeneous:
            return [self.cfg.lora.rank_for(client)]
        ranks, r = [], self.cfg.lora.rank
        while r >= 1:
            ranks.append(r)
            r //= 2
        return ranks

    def server_rank(self) -> int:
        """The server adapter's rank: the largest client rank."""
        return max(self.cfg.lora.rank_for(i) for i in range(self.cfg.num_clients))

    def candidates(self, dims: ModelDims, client: int) -> list[Plan]:
        """LoRA plans for client ``client``: its ranks, then sequence, checkpointing, micro-batch."""
        return list(lora_candidates(dims, self.ranks(client), self.cfg.batch_size, self.cfg.max_seq_len))

    def estimate(self, dims: ModelDims, plan: Plan) -> Estimate:
        """Base + P_tr·16 (adapter, gradient, AdamW moments) + activations + logits (memory.py)."""
        rank = plan.rank if isinstance(plan, LoraPlan) else self.cfg.lora.rank
        return self.estimator.estimate(dims, plan, self.cfg.task, width=rank,
                                       trainable=dims.lora_params(rank))

    def spec(self, plan: Plan) -> TrainSpec:
        """``local-steps`` AdamW steps of ``batch-size`` examples at ``lr``."""
        return TrainSpec(steps=self.cfg.local_steps, batch_size=self.cfg.batch_size, lr=self.cfg.lr,
                         micro_batch=plan.micro_batch)

    def client(self, plan: Plan) -> LoraTrainee:
        """A trainee at the plan's rank."""
        assert isinstance(plan, LoraPlan), plan
        return LoraTrainee(self.cfg, plan.rank, self.variant, plan.checkpointing)

    def server(self) -> LoraTrainee:
        """The server's trainee, at the largest client rank."""
        return LoraTrainee(self.cfg, self.server_rank(), self.variant)

    def initial_state(self, server: LoraTrainee) -> State:
        """What every client receives in round 1."""
        return server.initial_state()

    def sample_update(self, trainee: LoraTrainee, seed: int) -> LowRankUpdate:
        """A random rank-2 delta on every adapted layer, about the size a merged round has."""
        gen = torch.Generator().manual_seed(seed)
        return LowRankUpdate({name: Delta(left=0.01 * torch.randn(w.shape[0], 2, generator=gen),  # (m, 2)
                                          right=0.01 * torch.randn(2, w.shape[1], generator=gen))  # (2, n)
                              for name, w in trainee.adapter.base_weights(trainee.model).items()})

    def export_view(self) -> Exportable:
        """A LoRA checkpoint is peft LoRA; its merged updates (FLoRA, FedEx-LoRA) are base deltas."""
        return Exportable(base_delta=UPDATES_FILE)

    def update_size(self, server: LoraTrainee, upload: Mapping[str, torch.Tensor]) -> float:
        """‖(α/r)·B·A‖ over every adapted layer, from r×r Gram matrices: ‖BA‖² = tr((BᵀB)(AAᵀ)), so B·c
        with A/c counts the same; with a head's change from the server's (a classification head travels
        too) in the same sum of squares. A frozen A (FFA) is the server's, which every node draws alike."""
        state = {k: v for k, v in upload.items() if _is_factor(k)}
        if not any(".lora_A." in k for k in upload):  # only FFA's uploads lack A
            state.update({k.replace(".default.", "."): v for k, v in server.model.state_dict().items()
                          if ".lora_A." in k})
        squares = LoraFactors.from_state(state, self.cfg.lora.alpha).norm() ** 2
        heads = [k for k in upload if not _is_factor(k)]
        if heads:
            now = server.upload()
            squares += sum(float((upload[k].double() - now[k].double()).pow(2).sum()) for k in heads)
        return math.sqrt(squares)

    def scale_update(self, server: LoraTrainee, upload: Mapping[str, torch.Tensor],
                     factor: float) -> dict[str, torch.Tensor]:
        """B·A scaled by ``factor``: A and B by √factor each, so that rules averaging the factors apart
        (FedIT) see neither outsized (B alone under FFA, whose A is frozen); a head's change from the
        server's scaled by ``factor``."""
        on_a = math.sqrt(factor) if any(".lora_A." in k for k in upload) else 1.0
        on = {"A": on_a, "B": factor / on_a}
        now = server.upload() if any(not _is_factor(k) for k in upload) else {}
        return {k: v * on["A" if ".lora_A." in k else "B"] if _is_factor(k)
                else now[k] + factor * (v - now[k]) for k, v in upload.items()}

    def dp_view(self, upload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The upload as it is: the rules that average it (FedIT, FFA) average every tensor."""
        return dict(upload)

    def upload_schema(self, server: LoraTrainee, plan: Mapping[str, int]) -> Schema:
        """The server adapter's trainable keys with A (r×n) and B (m×r) at the client's reported rank,
        which must be one this run offers some client."""
        offered = sorted({r for client in range(self.cfg.num_clients) for r in self.ranks(client)})
        rank = plan.get("rank")
        if rank not in offered:
            raise ValueError(f"plan.rank {rank} is not a rank this run offers ({offered})")

        def at_rank(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
            if ".lora_A." in key:
                return (rank, shape[1])
            return (shape[0], rank) if ".lora_B." in key else shape

        reference = server.upload()
        return Schema({k: TensorSpec("float32", at_rank(k, tuple(v.shape))) for k, v in reference.items()})


def _is_factor(key: str) -> bool:
    """A LoRA factor's key (an upload's other keys are a classification head's)."""
    return ".lora_A." in key or ".lora_B." in key

