"""FedIT: FedAvg of the LoRA factors, the baseline (https://arxiv.org/abs/2305.05644).

Averaging B and A separately is not the average of the updates B A (see aggregation/fedavg.py); pollinate
keeps this strategy as the reference that the exact strategies are measured against.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from pollinate.aggregation import weighted_average
from pollinate.strategies.wire import (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    arrays_of,
    from_record,
    metric,
    metrics_of,
    to_record,
)


class FedIt(FedAvg):
    """Weighted FedAvg of every trainable tensor, factors included."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies' states by their number of examples."""
        good = [m for m in replies if not m.has_error()]
        if not good:
            return None, None
        weights = [metric(metrics_of(m), NUM_EXAMPLES) for m in good]
        states = [from_record(arrays_of(m)) for m in good]
        losses = [metric(metrics_of(m), TRAIN_LOSS) for m in good]
        total = sum(weights)
        loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / total
        return to_record(weighted_average(states, weights)), MetricRecord(
            {TRAIN_LOSS: loss, NUM_EXAMPLES: int(total)}
        )
