"""Fed-SB: exact by averaging the small square matrix of LoRA-SB (https://arxiv.org/abs/2502.15436).

ΔW = B R A with B and A frozen and identical everywhere, so B (Σ p_k R_k) A = Σ p_k B R_k A exactly. Before
round 1 the setup makes A and B from an approximated first step: the summed gradient of every target
weight over ``fedsb.init-examples`` examples, either on a calibration slice the server keeps
(``fedsb.init = "server"``) or summed once over the clients' shares (``"federated"``); they reach every
node once through the versioned downlink. Bytes per client per round and target matrix: r² numbers each
way, whatever the number of clients (plus r(m + n) + r² down, once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from pollinate import protocol
from pollinate.aggregation import weighted_average
from pollinate.config import RunConfig
from pollinate.methods.base import schema_of
from pollinate.methods.lora_sb.layer import R_KEY
from pollinate.methods.lora_sb.method import LoraSbMethod, LoraSbTrainee
from pollinate.methods.lora_sb.rules import average_r
from pollinate.protocol import ClientReport
from pollinate.strategies.base import Aggregate, Exchange, PollinateStrategy, refuse_client_ranks, weights_of


class FedSb(PollinateStrategy):
    """Weighted mean of every R (and a trained head); A and B come from the setup."""

    averages_uploads = True

    method_name = "lora_sb"
    method: LoraSbMethod

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Equal ranks only, and a rank every target layer can hold (from the model's shapes alone)."""
        refuse_client_ranks(cfg, "every client trains the same r×r matrices: set fedsb.rank instead")
        if cfg.dp.on and cfg.fedsb.init == "federated":
            raise ValueError("fedsb.init: 'federated' is not allowed with differential privacy: the setup's "
                             "gradient sums would leave the clients unclipped and without noise; use "
                             "fedsb.init = 'server'")
        smallest = min(min(t.in_features, t.out_features) for t in LoraSbMethod(cfg).dims().targets)
        if cfg.fedsb.rank > smallest:
            raise ValueError(f"fedsb.rank: {cfg.fedsb.rank} is not allowed; it must be at most {smallest}, "
                             "the smallest dimension of the target layers")

    def setup(self, server: LoraSbTrainee, exchange: Exchange, grid: Grid,  # type: ignore[override]
              config: ConfigRecord) -> None:
        """Make A, B and R0 from the initial gradient, and commit them as update 1."""
        if self.method.calibration_size() > 0:
            sums = server.gradient_sums(self.method.calibration_examples(server))
        else:
            sums = self._federated_sums(server, exchange, grid, config)
        self.commit(self.method.factors(sums))

    def _federated_sums(self, server: LoraSbTrainee, exchange: Exchange, grid: Grid, config: ConfigRecord
                        ) -> dict[str, torch.Tensor]:
        """Ask every node for its share's gradient sums once, and add them up."""
        setup = ConfigRecord({**config, protocol.SETUP: "fedsb-init"})
        messages = [self.node_message(node, None, setup, 0, "query") for node in self.nodes(0, grid)]
        total = self.add_up(server, exchange(messages))
        if not total:
            raise RuntimeError("fedsb.init = 'federated': no client answered the setup exchange usably")
        return total

    def add_up(self, server: LoraSbTrainee, replies: Sequence[Message]) -> dict[str, torch.Tensor]:
        """The sum of the answers' gradient sums; an answer that is not exactly one fp32 sum per target
        weight, of its shape and finite, is left out (in :attr:`setup_rejections`)."""
        expected = schema_of({name: layer.base.weight for name, layer in server.layers.items()})
        total: dict[str, torch.Tensor] = {}
        for reply in replies:  # each a sum over its share: their sum is over every example
            if reply.has_error():
                continue
            reason: str | None
            try:
                sums = protocol.from_record(protocol.arrays_of(reply))
            except Exception as error:  # noqa: BLE001 - any undecodable answer is left out, with its reason
                sums, reason = {}, f"its gradient sums do not decode ({type(error).__name__})"
            else:
                reason = expected.check(sums) or expected.check_values(sums) or _nonfinite(sums)
            if reason is not None:
                self.setup_rejections.append((reply.metadata.src_node_id, reason))
                continue
            for name, grad in sums.items():
                total[name] = total[name] + grad if name in total else grad.clone()
        return total

    def combine(self, reports: Sequence[ClientReport]) -> Aggregate:
        """R ← Σ p_k R_k (exact: the map R ↦ B R A is linear); a classification head averaged plainly."""
        weights = weights_of(reports)
        r_parts = [{k: v for k, v in r.upload.items() if k.endswith(f".{R_KEY}")} for r in reports]
        heads = [{k: v for k, v in r.upload.items() if not k.endswith(f".{R_KEY}")} for r in reports]
        state = average_r(r_parts, weights)
        if heads[0]:  # a classification head travels beside R
            state.update(weighted_average(heads, weights))
        return Aggregate(state=state)


def _nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Why a setup answer is unusable (a NaN or an infinity), or None."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    return f"{bad[0]} holds NaN or infinite values" if bad else None

