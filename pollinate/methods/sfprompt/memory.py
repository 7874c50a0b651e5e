"""SFPrompt's memory model of a split client (docs/methods.md, "Memory models for a planner").

peak = (embeddings + head blocks + tail blocks + output head)·4, never the body's blocks
     + (prompt + tail)·12 (their gradients and AdamW's two moments)
     + the activations the head's and the tail's blocks keep for backward, over S = P + T positions
       (the prompt's gradient flows back through the head, so the head keeps its activations too)
     + h, z, ∂L/∂z and ∂L/∂h of one micro-batch (what crosses the network) + the B·S·V logits
     + the runtime's fixed cost.

The per-layer counts and the runtime and library coefficients are LoRA's (rank 0), not fitted again. One
check, batch 4 × 64 tokens, P = 8, head and tail one block each, one thread, the client in its own process
(the body service in another), peak above the runtime baseline: minilm-l6 153-155 MB measured, 153 MB
estimated; SmolLM2 438 MB measured, 412 MB estimated.
"""

from __future__ import annotations

from pollinate.methods.lora.memory import Calibration, _decoder_layer_floats, _encoder_layer_floats
from pollinate.methods.plan import FP32, LIBRARY, Estimate, ModelDims, Plan

TRANSFERS = 4
"""h, z, ∂L/∂z and ∂L/∂h: [B, S, d] each, alive together around one split step."""


def layer_params(dims: ModelDims) -> int:
    """Parameters of one transformer block: attention (q, o at the heads' width; k, v at the key-value
    heads'), the MLP (three matrices in a gated decoder, two in an encoder), norms and biases."""
    d, f = dims.hidden, dims.intermediate
    attention = 2 * d * dims.heads * dims.head_dim + 2 * d * dims.kv_heads * dims.head_dim
    mlp = (2 if dims.encoder else 3) * d * f
    small = (4 * d + f + 4 * d) if dims.encoder else 2 * d  # biases and LayerNorms; RMSNorm scales
    return attention + mlp + small


def client_weights(dims: ModelDims, task: str, body_layers: int) -> int:
    """Numbers a split client holds: the whole model but the body's blocks."""
    return dims.params(task) - body_layers * layer_params(dims)


def trainable(dims: ModelDims, task: str, tail_layers: int, prompt_tokens: int) -> int:
    """The prompt and the tail: its blocks, the final norm (decoder) or pooler (encoder) and the output
    head (a tied LM head is the embedding's: frozen)."""
    exit_modules = dims.hidden * dims.hidden + dims.hidden if dims.encoder else dims.hidden
    head = dims.head_params(task)
    return prompt_tokens * dims.hidden + tail_layers * layer_params(dims) + exit_modules + head


def estimate(dims: ModelDims, plan: Plan, task: str, *, head_layers: int, tail_layers: int,
             prompt_tokens: int, calibration: Calibration | None = None) -> Estimate:
    """Peak resident bytes of one split step at ``plan`` (see the module docstring).

    Parameters
    ----------
    head_layers, tail_layers, prompt_tokens : int
        The cut points and P (``sfprompt.*``); the body is every other block.
    """
    cal = calibration or Calibration()
    positions = plan.seq_len + prompt_tokens  # S = P + T
    tokens = plan.micro_batch * positions
    layer_fn = _encoder_layer_floats if dims.encoder else _decoder_layer_floats
    layer = layer_fn(dims, 0, positions) * tokens * FP32
    workspace = cal.encoder_workspace if dims.encoder else cal.decoder_workspace
    body_layers = dims.layers - head_layers - tail_layers
    train = trainable(dims, task, tail_layers, prompt_tokens)
    return Estimate.of({
        "head and tail weights": client_weights(dims, task, body_layers) * FP32,
        "prompt and tail gradients": train * FP32,
        "optimizer": train * 2 * FP32,  # AdamW's exp_avg and exp_avg_sq
        "activations": (head_layers + tail_layers) * layer,
        "workspace": workspace * layer,
        "transfers": TRANSFERS * tokens * dims.hidden * FP32,
        "logits": tokens * dims.vocab * FP32 * cal.logit_copies if task == "generation" else 0,
        "runtime": cal.runtime_bytes + cal.runtime_per_vocab * dims.vocab,
        LIBRARY: cal.library_bytes,
    })
