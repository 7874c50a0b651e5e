"""FedKSeed's memory model: inference level (docs/methods.md, "Memory models for a planner").

peak = P·4 (weights, with an adapter's in ``lora`` mode) + max(one direction tensor the size of the
largest trained tensor, the live activations of one forward pass (no autograd graph: one layer's at a
time) + the B·T·V logits and the loss's copies) + the runtime's fixed cost. The direction lives only
while the weights shift and the forward only between shifts, so the larger of the two counts, not their
sum. Nothing for gradients or an optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.methods.plan import FP32, LIBRARY, Estimate, ModelDims, Plan


@dataclass(frozen=True)
class InferenceCalibration:
    """Coefficients that counting tensors does not give, fitted by hand to measured peaks of tiny-llama
    (4 x 64 to 16 x 256 tokens) and SmolLM2 (4 x 64, 4 x 128), both ``params`` modes, and checked by
    ``tests/client/test_planner.py`` and ``benchmarks/fedkseed.py``."""

    layer_floats_per_hidden: float = 4.0
    """Live fp32 values per token of one layer's forward, in units of the hidden size (the residual
    stream, the normed input and the attention's projections, not all alive at once)."""
    layer_floats_per_intermediate: float = 2.0
    """The same in units of the MLP's intermediate size (of gate, up and their product, two at once)."""
    logit_copies: float = 2.0
    """B·T·V fp32 tensors alive around the loss: the logits and the log-softmax of the cross-entropy."""
    runtime_bytes: int = 4_000_000
    """As LoRA's, without the autograd engine's share."""
    library_bytes: int = 16_000_000
    """Library code and data a forward maps in from files (:data:`~pollinate.methods.plan.LIBRARY`):
    16-18 MB measured on tiny-llama, less than a backward's."""
    runtime_per_vocab: float = 720.0
    """Bytes per vocabulary entry that the loaded tokenizer keeps."""


def estimate(dims: ModelDims, plan: Plan, task: str, *, weights: int, largest: int,
             calibration: InferenceCalibration | None = None) -> Estimate:
    """Peak resident bytes of one zeroth-order step at ``plan``.

    Parameters
    ----------
    weights : int
        Every number the model holds (base, head, an adapter).
    largest : int
        Numbers of the largest trained tensor: the one direction temporary alive at a time.
    """
    cal = calibration or InferenceCalibration()
    tokens = plan.micro_batch * plan.seq_len
    per_token = (cal.layer_floats_per_hidden * dims.hidden
                 + cal.layer_floats_per_intermediate * dims.intermediate
                 + dims.heads + plan.seq_len)  # a log-sum-exp per head and the float mask row
    logits = tokens * dims.vocab * FP32 * cal.logit_copies if task == "generation" else 0
    activations = tokens * per_token * FP32
    forward = activations + logits
    direction = max(largest * FP32 - forward, 0)  # what the direction adds above the forward's peak
    return Estimate.of({
        "weights": weights * FP32,
        "activations": activations,
        "logits": logits,
        "direction beyond the forward": direction,
        "runtime": cal.runtime_bytes + cal.runtime_per_vocab * dims.vocab,
        LIBRARY: cal.library_bytes,
    })
