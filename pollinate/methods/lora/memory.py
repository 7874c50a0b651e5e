"""LoRA's memory model: the peak of one AdamW step with adapters on a frozen fp32 base.

Follows the shared memory models ("Memory models for a planner", docs/methods.md); the coefficients were
calibrated against measured peaks (``pollinate.client.measure``, ``benchmarks/memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pollinate.methods.plan import FP32, LIBRARY, Estimate, ModelDims, Plan


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
    runtime_bytes: int = 5_000_000
    """Fixed cost of a loaded model beyond its tensors and library pages: module objects and the autograd
    engine's state."""
    library_bytes: int = 20_000_000
    """Library code and data the first steps map in from files (:data:`~pollinate.methods.plan.LIBRARY`):
    19-26 MB measured on tiny-llama and tiny-bert (RssFile growth)."""
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


class LoraEstimator:
    """LoRA with AdamW on a frozen fp32 base (https://arxiv.org/abs/2106.09685).

    peak = P·4 (frozen base) + P_tr·16 (adapter, its gradient, two Adam moments)
         + activations kept for backward (all layers, or with checkpointing the layer inputs and one
           recomputed layer) + one layer's backward workspace
         + the B·T·V logits and their loss copies + a fixed runtime cost.
    """

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration or Calibration()

    def estimate(self, dims: ModelDims, plan: Plan, task: str, *, width: int, trainable: int,
                 frozen: int = 0) -> Estimate:
        """Peak resident bytes of one training step at ``plan`` (see the class docstring).

        Parameters
        ----------
        dims, plan, task
            The model, the plan and ``"generation"`` or ``"classification"``.
        width : int
            Numbers per token each adapted layer keeps for backward: LoRA's r (the A output);
            LoRA-SB's 2r (the A output and the R output).
        trainable : int
            Adapter parameters that train (LoRA: Σ r(m+n); LoRA-SB: Σ r²); a classifier head is added.
        frozen : int, default 0
            Adapter numbers that never train (LoRA-SB's A and B).
        """
        cal = self.calibration
        tokens = plan.micro_batch * plan.seq_len
        workspace = cal.encoder_workspace if dims.encoder else cal.decoder_workspace
        trainable += dims.head_params(task) if task == "classification" else 0
        layer_fn = _encoder_layer_floats if dims.encoder else _decoder_layer_floats
        layer = layer_fn(dims, width, plan.seq_len) * tokens * FP32  # one layer, bytes
        kept_layers = 1 if plan.checkpointing else dims.layers
        inputs = dims.layers * tokens * dims.hidden * FP32 if plan.checkpointing else 0
        activations = kept_layers * layer + inputs
        logits = tokens * dims.vocab * FP32 * cal.logit_copies if task == "generation" else 0
        return Estimate.of({
            "base weights": dims.params(task) * FP32,
            "adapter": trainable * 2 * FP32 + frozen * FP32,  # weights and gradients; frozen factors
            "optimizer": trainable * 2 * FP32,  # AdamW's exp_avg and exp_avg_sq
            "activations": activations,
            "workspace": workspace * layer,
            "logits": logits,
            "runtime": cal.runtime_bytes + cal.runtime_per_vocab * dims.vocab,
            LIBRARY: cal.library_bytes,
        })

