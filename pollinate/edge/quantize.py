"""Weight quantisation of an exported graph with onnxruntime's own tools. No torch.

``int8``
    ``quantize_dynamic``: MatMul weights int8 per output channel (activations quantised at run time),
    the embedding table (Gather) int8.
``int4``
    ``MatMulNBitsQuantizer``: MatMul weights and the embedding table in symmetric 4-bit blocks of
    :data:`INT4_BLOCK_SIZE` with fp32 scales (``MatMulNBits``, ``GatherBlockQuantized``).

Weights that an adapter overrides (graph inputs) are never quantised: the LoRA branches stay fp32, so
one adapter file serves the fp32 and the quantised graphs of a base alike. A weight shared by the
embedding (Gather) and a transposed use (a tied LM head) is first split into two initializers, so
both uses are quantised.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["INT4_BLOCK_SIZE", "QUANTIZATIONS", "adapter_nodes", "check_choice", "quantize_file",
           "untie_transposed_weights"]

QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4")

INT4_BLOCK_SIZE = 32
"""Elements per 4-bit block: 32 keeps the error of small models low at 1/8 byte of scale per weight."""
# Nodes through which an overridable weight flows unchanged on its way to the MatMul that uses it.
_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze"})


def check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming ``flag`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{flag}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Nodes of ``graph`` by the names of their inputs."""
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            result.setdefault(name, []).append(node)
    return result


def adapter_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute with an overridable weight (LoRA factors, trained heads)."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    frontier = [i.name for i in graph.input if i.name in initializers]
    consumers = _consumers(graph)
    found: set[str] = set()
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in _PASS_THROUGH:
                frontier.extend(node.output)
            elif node.name:
                found.add(node.name)
    return sorted(found)


def untie_transposed_weights(model: onnx.ModelProto) -> int:
    """Give every ``Transpose(weight)`` of a shared weight its own transposed initializer.

    A tied LM head reads the embedding table through a Transpose that no optimiser folds (the table
    has another user, the Gather); quantisers only see weights that are initializers. Returns the
    number of weights split.
    """
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    overridable = {i.name for i in graph.input}
    consumers = _consumers(graph)
    split = 0
    for node in list(graph.node):
        source = node.input[0] if node.op_type == "Transpose" else ""
        if source not in weights or source in overridable or len(consumers[source]) < 2:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = np.transpose(numpy_helper.to_array(weights[source]), perm)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), node.output[0]))
        graph.node.remove(node)  # its output is now an initializer of the same name
        split += 1
    return split


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantisers log every skipped node, and advice, on the root logger: errors only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _int8(model: onnx.ModelProto, dst: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=exclude,
                     extra_options={"MatMulConstBOnly": True})


def _int4(model: onnx.ModelProto, dst: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True, nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_file(src: Path, dst: Path, mode: str) -> None:
    """Quantise the graph ``src`` into ``dst`` (which may be ``src``).

    Parameters
    ----------
    src, dst : Path
        ONNX files (a single file each, no external data).
    mode : {"int8", "int4"}
        See the module docstring.
    """
    check_choice("--quantize", mode, ("int8", "int4"))
    model = onnx.load(str(src))
    untie_transposed_weights(model)
    exclude = adapter_nodes(model)
    with _quiet():
        (_int8 if mode == "int8" else _int4)(model, dst, exclude)
