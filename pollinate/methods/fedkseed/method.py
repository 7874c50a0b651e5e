"""FedKSeed as a pollinate method (https://arxiv.org/abs/2312.06353): its update, trainee and planning.

A client takes τ zeroth-order steps, each along z(s) for a seed s drawn from K candidates shared by
every node, and uploads what it did as (seed index, g) pairs or as K per-seed sums, whichever is fewer
bytes. The update every node merges is the per-seed sums of a round (weighted by examples): merging
replays them, w ← w − η Σ_s G_s z(s), so the model is w0 − η Σ_s G_s z(s) and a node that missed
rounds catches up from K numbers. After its steps a client returns to the version it was sent: with
``params = "lora"`` by copying back the adapter it kept (exact; the adapter is small), with ``"full"`` by
replaying its own sums backwards (no copy of the model: memory stays at inference level, and round-off
stays in the weights, so the server's sync check allows :data:`REPLAY_TOLERANCE` there).

``fedkseed.params = "lora"`` moves only the tensors of a LoRA adapter (and a classification head);
``"full"`` moves every weight, as the paper.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

import torch
from safetensors.torch import save_file
from torch import nn

from pollinate import workload
from pollinate.aggregation import fingerprint
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION
from pollinate.methods.base import HEADS, SYNC_TOLERANCE, Example, Exportable, Schema, TensorSpec, TrainSpec
from pollinate.methods.fedkseed import memory
from pollinate.methods.fedkseed.zo import (
    UniformSeeds,
    WeightedSeeds,
    candidate_seeds,
    replay,
    zo_step,
)
from pollinate.methods.lora.adapter import LoraAdapter
from pollinate.methods.lora.method import attach_shared_adapter
from pollinate.methods.plan import Estimate, ModelDims, Plan, micro_batches, seq_len_steps
from pollinate.training import TrainResult, batch_loss, batches, micro_batches_of

SUMS_KEY = "seed_sums"
"""K per-seed sums of g (an update, or an upload when it is the smaller form)."""
INDEX_KEY, GRAD_KEY = "seed_index", "seed_grad"
"""An upload as τ pairs: the index of each step's seed among the K and its g."""
PROBABILITIES_KEY = "seed_probabilities"
"""FedKSeed-Pro's K sampling probabilities, sent as the round's state."""
REPLAY_TOLERANCE = 1e-4
"""Relative fingerprint difference allowed with ``params = "full"``: undoing τ fp32 steps by replay leaves
round-off (about 1e-6 relative after a round of tiny-llama's adapter, growing with steps and rounds)."""
DELTA_FILE = "fedkseed_delta.safetensors"
"""With ``params = "full"``: w − w0 of every weight, merged into the base by the edge export."""


@dataclass(frozen=True)
class SeedSums:
    """FedKSeed's update: G_s per candidate seed (K numbers); merging replays w ← w − η Σ_s G_s z(s)."""

    sums: torch.Tensor
    span: int = 1

    @classmethod
    def combine(cls, updates: Sequence[Self]) -> Self:
        """Replays add up: merging the sum equals merging each (to round-off)."""
        total = torch.stack([u.sums.to(torch.float64) for u in updates]).sum(0)
        return cls(total.to(torch.float32), sum(u.span for u in updates))

    def to_flat(self) -> dict[str, torch.Tensor]:
        return {SUMS_KEY: self.sums}

    @classmethod
    def from_flat(cls, flat: Mapping[str, torch.Tensor], *, span: int = 1) -> Self:
        return cls(flat[SUMS_KEY].to(torch.float32), span)


def upload_form(index: torch.Tensor, grads: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """τ (index, g) pairs (8τ bytes) or K per-seed sums (4K bytes), whichever is fewer."""
    if 8 * index.numel() < 4 * k:
        return {INDEX_KEY: index.to(torch.int32), GRAD_KEY: grads.to(torch.float32)}
    return {SUMS_KEY: per_seed(index, grads, k)}


def per_seed(index: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Σ of ``values`` per seed index, as K fp32 numbers (added in fp64)."""
    out = torch.zeros(k, dtype=torch.float64)
    out.index_add_(0, index.to(torch.int64), values.to(torch.float64))
    return out.to(torch.float32)


def uploaded_entries(flat: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(seed indices, g) of an upload in either form (a sums upload gives one entry per seed used)."""
    if SUMS_KEY in flat:
        sums = flat[SUMS_KEY]
        index = torch.nonzero(sums).flatten()
        return index, sums[index].to(torch.float32)
    return flat[INDEX_KEY].to(torch.int64), flat[GRAD_KEY].to(torch.float32)


class SeedSchema(Schema):
    """An upload of τ ≤ ``steps`` (index, g) pairs or of K per-seed sums; every index names one of the K
    seeds. Indices travel as fp32 like every uploaded number (exact while K ≤ 2^24)."""

    def __init__(self, k: int, steps: int) -> None:
        tau = range(1, steps + 1)
        super().__init__({INDEX_KEY: TensorSpec("float32", (tau,)), GRAD_KEY: TensorSpec("float32", (tau,))},
                         {SUMS_KEY: TensorSpec("float32", (k,))})
        self.k = k

    def check_values(self, upload: Mapping[str, torch.Tensor]) -> str | None:
        """Pairs come in equal numbers, each index a whole number below K."""
        if INDEX_KEY not in upload:
            return None
        index, grads = upload[INDEX_KEY], upload[GRAD_KEY]
        if index.numel() != grads.numel():
            return f"{index.numel()} seed indices but {grads.numel()} scalars"
        whole = bool(torch.all(index == torch.round(index))) if index.is_floating_point() else True
        if not whole or float(index.min()) < 0 or float(index.max()) > self.k - 1:
            return f"a seed index that is not one of 0..{self.k - 1}"
        return None


class ZerothOrderTrainee:
    """A model stepped along seeded directions with forward passes only: no graph, no optimiser state."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.settings = cfg, cfg.fedkseed
        base, self.tokenizer = workload.base_model(cfg)
        model: nn.Module = base
        self.adapter: LoraAdapter | None = None
        if self.settings.params == "lora":
            self.adapter, model = attach_shared_adapter(cfg, model, cfg.lora.rank, dropout=0.0)
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            trained = list(model.named_parameters())  # tied weights once
        model.requires_grad_(False)
        model.eval()
        self.model: nn.Module = model
        self.trained: dict[str, torch.Tensor] = dict(trained)  # the fixed order every z is drawn in
        self.seeds = candidate_seeds(cfg.seed, self.settings.seeds)
        self.sampler: UniformSeeds | WeightedSeeds = UniformSeeds()
        self.record: dict[str, torch.Tensor] = upload_form(torch.zeros(0), torch.zeros(0), len(self.seeds))
        self.version = 0

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.trained.values())

    def load(self, state: Mapping[str, torch.Tensor], *, seed: int) -> None:
        """FedKSeed-Pro's probabilities (absent: uniform); an upload's tensors restore the record."""
        k = len(self.seeds)
        unknown = set(state) - {PROBABILITIES_KEY, SUMS_KEY, INDEX_KEY, GRAD_KEY}
        if unknown:
            raise ValueError(f"fedkseed state: unexpected keys {sorted(unknown)[:3]}")
        probabilities = state.get(PROBABILITIES_KEY)
        if probabilities is None:
            self.sampler = UniformSeeds()
        elif tuple(probabilities.shape) != (k,) or not bool((probabilities >= 0).all()):
            raise ValueError(f"fedkseed state: {PROBABILITIES_KEY} must be {k} numbers >= 0")
        else:
            self.sampler = WeightedSeeds(probabilities.to(torch.float32))
        record = {key: v for key, v in state.items() if key != PROBABILITIES_KEY}
        if record:
            self.record = {key: v.clone() for key, v in record.items()}

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """τ zeroth-order steps, then back to the version held (see the module docstring)."""
        kept = [p.detach().clone() for p in self.params] if self.adapter is not None else None
        result, index, grads = self.descend(examples, spec, seed=seed)
        k = len(self.seeds)
        if kept is not None:
            with torch.no_grad():
                for p, saved in zip(self.params, kept, strict=True):
                    p.copy_(saved)
        else:
            replay(self.params, self.seeds, -per_seed(index, grads, k), spec.lr)  # w + η Σ g z
        self.record = upload_form(index, grads, k)
        return result

    def descend(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int
                ) -> tuple[TrainResult, torch.Tensor, torch.Tensor]:
        """τ steps, leaving the model at this client's final weights; the result, seed indices and g."""
        k, eps = len(self.seeds), self.settings.epsilon
        gen = torch.Generator().manual_seed(seed)
        stream = batches(examples, spec.batch_size, seed)
        pad, micro = self.tokenizer.pad_token_id, min(spec.micro_batch, spec.batch_size)
        index, grads = [], []
        start, total, seen, tokens = time.perf_counter(), 0.0, 0, 0
        for _ in range(spec.steps):
            step = next(stream)
            parts = micro_batches_of(step, micro, pad)
            i = self.sampler.draw(k, gen)
            result = zo_step(self.params, self.seeds[i], functools.partial(batch_loss, self.model, parts),
                             epsilon=eps, lr=spec.lr)
            index.append(i)
            grads.append(result.grad)
            total += result.loss
            seen += len(step)
            tokens += sum(int(p["attention_mask"].sum()) for p, _ in parts)
        done = TrainResult(total / max(spec.steps, 1), seen, tokens, time.perf_counter() - start)
        return done, torch.tensor(index, dtype=torch.int64), torch.tensor(grads, dtype=torch.float64)

    def upload(self) -> dict[str, torch.Tensor]:
        """The last training's (index, g) pairs or per-seed sums, whichever is fewer bytes."""
        return {key: v.clone() for key, v in self.record.items()}

    def merge(self, update: SeedSums) -> None:
        """w ← w − η Σ_s G_s z(s): one regeneration per seed with a nonzero sum."""
        replay(self.params, self.seeds, update.sums, self.settings.lr)
        self.version += update.span

    def fingerprint(self) -> float:
        """Of every trained tensor (what merges write)."""
        return fingerprint(self.trained)

    def save(self, folder: Path) -> None:
        """``lora``: the adapter in peft format. ``full``: w − w0 of every weight (:data:`DELTA_FILE`)
        and a peft view with zero factors that carries a classification head, so the edge export
        reads the checkpoint as any other (merged only)."""
        if self.adapter is not None:
            self.model.save_pretrained(str(folder))  # type: ignore[operator]
            return
        heads = sorted({n.split(".")[0] for n in self.trained if n.split(".")[0] in HEADS}
                       if self.cfg.task == CLASSIFICATION else set())
        base, _ = workload.base_model(self.cfg)
        start = dict(base.named_parameters())
        delta, view = {}, {}
        for name, w in self.trained.items():
            if name.split(".")[0] in heads:
                view[f"base_model.model.{name}"] = w.detach().clone()
                continue
            module, _, kind = name.rpartition(".")  # "<module>.weight" -> "<module>.D"
            key = f"{module}.D" if kind == "weight" else f"{name}.D"
            delta[key] = (w.detach() - start[name].detach()).to(torch.float32).contiguous()
        save_file(delta, str(folder / DELTA_FILE))
        targets = tuple(self.cfg.lora.target_list(str(getattr(self.model.config, "model_type", ""))))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                view[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, module.in_features)
                view[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, 1)
        save_file(view, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(targets), "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "modules_to_save": heads or None, "fan_in_fan_out": False, "init_lora_weights": True,
            "use_rslora": False}, indent=2))


class FedKSeedMethod:
    """FedKSeed's method: zeroth-order steps on K shared seeds, inference-level memory."""

    name: ClassVar[str] = "fedkseed"
    settings_table: ClassVar[str] = "fedkseed"
    title: ClassVar[str] = "FedKSeed"
    update_type: ClassVar[type[SeedSums]] = SeedSums

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.sync_tolerance = SYNC_TOLERANCE if cfg.fedkseed.params == "lora" else REPLAY_TOLERANCE

    def calibration_size(self) -> int:
        return 0

    def dims(self) -> ModelDims:
        """The model's shapes, with the LoRA targets (the adapter of ``params = "lora"``)."""
        return workload.dims(self.cfg, "lora")

    def candidates(self, dims: ModelDims, client: int) -> list[Plan]:
        """Longer sequences, then larger micro-batches (no backward pass: nothing to checkpoint)."""
        return [Plan(self.name, b, self.cfg.batch_size // b, t, False)
                for t in seq_len_steps(self.cfg.max_seq_len, dims.max_positions)
                for b in micro_batches(self.cfg.batch_size)]

    def estimate(self, dims: ModelDims, plan: Plan) -> Estimate:
        """Inference level: weights, one direction tensor, one forward's activations and the logits."""
        task, rank = self.cfg.task, self.cfg.lora.rank
        head = dims.head_params(task) if task == "classification" else 0
        if self.cfg.fedkseed.params == "lora":
            adapter = dims.lora_params(rank)
            largest = max([rank * max(t.in_features, t.out_features) for t in dims.targets] + [head])
            weights = dims.params(task) + 2 * (adapter + head)  # peft's head copy; the kept adapter
        else:
            weights = dims.params(task)
            largest = max(dims.vocab * dims.hidden, dims.intermediate * dims.hidden, head)
        return memory.estimate(dims, plan, task, weights=weights, largest=largest)

    def spec(self, plan: Plan) -> TrainSpec:
        """``fedkseed.steps`` zeroth-order steps of ``batch-size`` examples at ``fedkseed.lr``."""
        s = self.cfg.fedkseed
        return TrainSpec(steps=s.steps, batch_size=self.cfg.batch_size, lr=s.lr, micro_batch=plan.micro_batch)

    def client(self, plan: Plan) -> ZerothOrderTrainee:
        return ZerothOrderTrainee(self.cfg)

    def server(self) -> ZerothOrderTrainee:
        return ZerothOrderTrainee(self.cfg)

    def initial_state(self, server: ZerothOrderTrainee) -> dict[str, torch.Tensor]:
        """Nothing: every node builds the same starting model from the run seed."""
        return {}

    def sample_update(self, trainee: ZerothOrderTrainee, seed: int) -> SeedSums:
        """Sums on five random seeds."""
        gen = torch.Generator().manual_seed(seed)
        sums = torch.zeros(len(trainee.seeds))
        sums[torch.randint(len(trainee.seeds), (5,), generator=gen)] = torch.randn(5, generator=gen)
        return SeedSums(sums)

    def update_size(self, server: ZerothOrderTrainee, upload: Mapping[str, torch.Tensor]) -> float:
        """‖g‖ of the projected gradients (every step moves the weights by η·g along a unit-variance z)."""
        _, grads = uploaded_entries(upload)
        return float(grads.to(torch.float64).norm())

    def scale_update(self, server: ZerothOrderTrainee, upload: Mapping[str, torch.Tensor],
                     factor: float) -> dict[str, torch.Tensor]:
        """Every g (or per-seed sum) scaled; the seed indices as they are."""
        return {k: v if k == INDEX_KEY else v * factor for k, v in upload.items()}

    def dp_view(self, upload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The K per-seed sums, whichever form the upload took (a private upload is dense: noise
        reaches every seed)."""
        index, grads = uploaded_entries(upload)
        return {SUMS_KEY: per_seed(index, grads, self.cfg.fedkseed.seeds)}

    def upload_schema(self, server: ZerothOrderTrainee, plan: Mapping[str, int]) -> Schema:
        """Up to ``fedkseed.steps`` pairs, or K sums: the same for every plan."""
        return SeedSchema(self.cfg.fedkseed.seeds, self.cfg.fedkseed.steps)

    def export_view(self) -> Exportable:
        """``lora``: the adapter as any LoRA checkpoint; ``full``: w − w0 merged into the base."""
        if self.cfg.fedkseed.params == "full":
            return Exportable(base_delta=DELTA_FILE, adapter=False)
        return Exportable(base_delta=None)
