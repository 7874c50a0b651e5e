"""LoRA-SB as a pollinate method (https://arxiv.org/abs/2502.15436): its update, trainee and planning.

The update is the frozen factors (A, B) with the initial R0, merged once before round 1 (a node that
starts late gets them by catch-up); afterwards each round moves only the r² numbers of every R. The
checkpoint holds R (and a trained head) for resume, and a peft LoRA view with R folded into A
(A' = R·A, B, scale 1) for the edge export.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import save_file
from torch import nn

from pollinate import workload
from pollinate.aggregation import fingerprint
from pollinate.config import RunConfig
from pollinate.data import CLASSIFICATION, collate, encode_dataset
from pollinate.methods.base import (
    HEADS,
    SYNC_TOLERANCE,
    Example,
    Exportable,
    Schema,
    TrainSpec,
    check_state,
    schema_of,
)
from pollinate.methods.lora.memory import LoraEstimator
from pollinate.methods.lora_sb.init import init_factors, target_gradients
from pollinate.methods.lora_sb.layer import A_KEY, B_KEY, R_KEY, Factors, install_factors, wrap
from pollinate.methods.plan import Estimate, ModelDims, Plan, micro_batches, seq_len_steps
from pollinate.training import TrainResult, enable_checkpointing, train_local

R0_KEY = "sb_R0"
STATE_FILE = "lora_sb.safetensors"
"""A checkpoint's trainable state (every R, and a trained head) for resume."""


@dataclass(frozen=True)
class FrozenFactors:
    """LoRA-SB's update: (A, B, R0) per layer, installed once; a later install replaces an earlier one."""

    factors: dict[str, Factors]
    span: int = 1

    @classmethod
    def combine(cls, updates: Sequence[Self]) -> Self:
        """The last install is what merging them all in order leaves."""
        return cls(updates[-1].factors, sum(u.span for u in updates))

    def to_flat(self) -> dict[str, torch.Tensor]:
        """``<module>.sb_A`` (r×n), ``.sb_B`` (m×r), ``.sb_R0`` (r×r)."""
        flat = {}
        for name, (a, b, r0) in self.factors.items():
            for key, value in ((A_KEY, a), (B_KEY, b), (R0_KEY, r0)):
                flat[f"{name}.{key}"] = value.contiguous()
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, torch.Tensor], *, span: int = 1) -> Self:
        """The inverse of :meth:`to_flat`."""
        names = [k[: -len(A_KEY) - 1] for k in flat if k.endswith(f".{A_KEY}")]
        factors = {n: (flat[f"{n}.{A_KEY}"], flat[f"{n}.{B_KEY}"], flat[f"{n}.{R0_KEY}"]) for n in names}
        return cls(factors, span)


class LoraSbTrainee:
    """A base model whose target layers carry B R A; only R (and a classification head) trains."""

    def __init__(self, cfg: RunConfig, checkpointing: bool = False) -> None:
        model, self.tokenizer = workload.base_model(cfg)
        family = str(getattr(model.config, "model_type", ""))
        self.layers = wrap(model, cfg.fedsb.target_list(family), cfg.fedsb.rank)
        self.heads = sorted({n.split(".")[0] for n, _ in model.named_parameters()
                             if cfg.task == CLASSIFICATION and n.split(".")[0] in HEADS})
        for head in self.heads:
            model.get_submodule(head).requires_grad_(True)
        self.model: nn.Module = model
        if checkpointing:
            enable_checkpointing(model)
        self.version = 0

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, state: Mapping[str, torch.Tensor], *, seed: int) -> None:
        """Every R (and the head) from ``state``: exactly the keys :meth:`upload` sends, in shape."""
        params = self._trainable()
        check_state(state, {n: tuple(p.shape) for n, p in params.items()}, "lora-sb state")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """AdamW steps on R (and the head); A, B and the base never change."""
        assert self.version > 0, "LoRA-SB trains only after A and B are installed"
        return train_local(self.model, examples, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                           pad_id=self.tokenizer.pad_token_id, seed=seed, micro_batch=spec.micro_batch)

    def upload(self) -> dict[str, torch.Tensor]:
        """Every R (``<module>.sb_R``, r×r) and a trained head: fp32 copies."""
        return {n: p.detach().to(torch.float32).clone() for n, p in self._trainable().items()}

    def merge(self, update: FrozenFactors) -> None:
        """Install A, B and R0 on every layer."""
        install_factors(self.model, update.factors)
        self.version += update.span

    def fingerprint(self) -> float:
        """Of A and B on every layer (0.0 before they are installed)."""
        frozen = {f"{n}.{k}": getattr(m, k) for n, m in self.layers.items() for k in (A_KEY, B_KEY)}
        return fingerprint(frozen)

    def gradient_sums(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Σ over ``examples`` (one at a time, so any grouping gives the same sum) of ∂loss/∂W per layer."""
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        return target_gradients(self.model, self.layers, (collate([e], pad) for e in examples))

    def save(self, folder: Path) -> None:
        """R and the head for resume; the peft LoRA view (A' = R·A, B, scale 1) for the edge export."""
        save_file(self.upload(), str(folder / STATE_FILE))
        save_file(dict(self._peft_view()), str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(self._peft_config(), indent=2))

    def _peft_view(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, m in self.layers.items():
            a_folded = (m.sb_R.detach() @ m.sb_A) * m.scale  # (r, r) @ (r, n): R folded into A, scale in
            yield f"base_model.model.{name}.lora_A.weight", a_folded.contiguous()
            yield f"base_model.model.{name}.lora_B.weight", m.sb_B.detach().clone()
        for name, p in self.model.named_parameters():
            if p.requires_grad and not name.endswith(R_KEY):
                yield f"base_model.model.{name}", p.detach().clone()

    def _peft_config(self) -> dict[str, Any]:
        rank = next(iter(self.layers.values())).rank
        return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.layers}),
                "task_type": "SEQ_CLS" if self.heads else "CAUSAL_LM",
                "modules_to_save": self.heads or None,
                "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False}


class LoraSbMethod:
    """Fed-SB's method: LoRA-SB layers, an exact mean of R, r² numbers per layer and round."""

    name: ClassVar[str] = "lora_sb"
    settings_table: ClassVar[str] = "fedsb"
    title: ClassVar[str] = "LoRA-SB"
    update_type: ClassVar[type[FrozenFactors]] = FrozenFactors
    sync_tolerance: float = SYNC_TOLERANCE
    estimator: ClassVar[LoraEstimator] = LoraEstimator()

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def calibration_size(self) -> int:
        """``fedsb.init-examples`` with server initialisation, else 0."""
        return self.cfg.fedsb.init_examples if self.cfg.fedsb.init == "server" else 0

    def dims(self) -> ModelDims:
        """The model's shapes with the Fed-SB targets."""
        return workload.dims(self.cfg, self.settings_table)

    def candidates(self, dims: ModelDims, client: int) -> list[Plan]:
        """Longer sequences, then no checkpointing, then larger micro-batches (the rank is fixed)."""
        return [Plan(self.name, b, self.cfg.batch_size // b, t, ckpt)
                for t in seq_len_steps(self.cfg.max_seq_len, dims.max_positions)
                for ckpt in (False, True)
                for b in micro_batches(self.cfg.batch_size)]

    def estimate(self, dims: ModelDims, plan: Plan) -> Estimate:
        """As LoRA with P_tr = Σ r², the frozen A and B, and two r-wide outputs kept per layer."""
        r = self.cfg.fedsb.rank
        count = sum(t.count for t in dims.targets)
        return self.estimator.estimate(dims, plan, self.cfg.task, width=2 * r, trainable=count * r * r,
                                       frozen=dims.lora_params(r))

    def spec(self, plan: Plan) -> TrainSpec:
        """``local-steps`` AdamW steps on R at ``fedsb.lr``."""
        return TrainSpec(steps=self.cfg.local_steps, batch_size=self.cfg.batch_size, lr=self.cfg.fedsb.lr,
                         micro_batch=plan.micro_batch)

    def client(self, plan: Plan) -> LoraSbTrainee:
        """A client's trainee (A and B arrive with the first update)."""
        return LoraSbTrainee(self.cfg, plan.checkpointing)

    def server(self) -> LoraSbTrainee:
        """The server's trainee."""
        return LoraSbTrainee(self.cfg)

    def initial_state(self, server: LoraSbTrainee) -> dict[str, torch.Tensor]:
        """R0 (and the initial head) once the factors are installed."""
        return server.upload()

    def sample_update(self, trainee: LoraSbTrainee, seed: int) -> FrozenFactors:
        """Random orthonormal A and B (QR of Gaussians) and a small random R0 on every layer."""
        gen = torch.Generator().manual_seed(seed)
        factors = {}
        for name, m in trainee.layers.items():
            r, (out, inp) = m.rank, m.base.weight.shape
            b = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q  # (m, r), orthonormal columns
            a = torch.linalg.qr(torch.randn(inp, r, generator=gen)).Q.T.contiguous()  # (r, n): orthonormal
            factors[name] = (a, b, 0.01 * torch.randn(r, r, generator=gen))
        return FrozenFactors(factors)

    def export_view(self) -> Exportable:
        """The checkpoint's peft view already has R folded in; nothing is merged into the base."""
        return Exportable(base_delta=None)

    def update_size(self, server: LoraSbTrainee, upload: Mapping[str, torch.Tensor]) -> float:
        """‖R_k − R‖ over every layer, R being the global one the server holds (what it sent)."""
        held = server.upload()
        return sum(float((v.to(torch.float64) - held[k].to(torch.float64)).pow(2).sum())
                   for k, v in upload.items() if k.endswith(R_KEY)) ** 0.5

    def scale_update(self, server: LoraSbTrainee, upload: Mapping[str, torch.Tensor],
                     factor: float) -> dict[str, torch.Tensor]:
        """R + factor·(R_k − R) on every layer; a head as it is."""
        held = server.upload()
        return {k: held[k] + factor * (v - held[k]) if k.endswith(R_KEY) else v for k, v in upload.items()}

    def dp_view(self, upload: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The upload as it is: every R (and a head), which Fed-SB averages."""
        return dict(upload)

    def upload_schema(self, server: LoraSbTrainee, plan: Mapping[str, int]) -> Schema:
        """Every R (r×r) and a trained head, as the server's trainee holds them: the same for every plan."""
        return schema_of(server.upload())

    # -- initialisation ---------------------------------------------------------------------------

    def calibration_examples(self, server: LoraSbTrainee) -> list[Example]:
        """The server's calibration slice, encoded with the server trainee's tokenizer."""
        calibration, _ = workload.pools(self.cfg, self.calibration_size())
        return encode_dataset(calibration, server.tokenizer, self.cfg.task, self.cfg.max_seq_len)

    def factors(self, grad_sums: Mapping[str, torch.Tensor]) -> FrozenFactors:
        """The update from summed target gradients: Ĝ = −η·sign(ΣG) (η = init-lr), its rank-r SVD."""
        return FrozenFactors(init_factors(grad_sums, self.cfg.fedsb.rank, self.cfg.fedsb.init_lr))

    def setup_reply(self, trainee: LoraSbTrainee, examples: Sequence[Example], request: str
                    ) -> dict[str, torch.Tensor]:
        """Federated initialisation: this share's gradient sums (at most ``init-examples`` examples)."""
        return trainee.gradient_sums(list(examples)[: self.cfg.fedsb.init_examples])
