"""Weight quantisation of an exported graph with onnxruntime's own tools. No torch.

``int8``
    Every MatMul weight in symmetric 8-bit blocks of :data:`BLOCK_SIZE` with fp32 scales
    (``MatMulNBits``, bits 8), multiplied in int8 with the activations quantised per block at run time
    (accuracy level 4); the embedding table (Gather) int8 by ``quantize_dynamic``. Plain
    ``quantize_dynamic`` on the MatMuls too is faster still but quantises each activation tensor with
    one scale: the outliers that enter a Llama's MLP down projection then cost a third of the greedy
    tokens of SmolLM2-135M (docs/benchmarks-edge.md), where blocks keep 95%.
``int4``
    MatMul weights and the embedding table in symmetric 4-bit blocks of :data:`BLOCK_SIZE` with fp32
    scales (``MatMulNBits``, ``GatherBlockQuantized``), int8 arithmetic (accuracy level 4).

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

__all__ = ["BLOCK_SIZE", "QUANTIZATIONS", "adapter_nodes", "check_choice", "quantize_file",
           "unfuse_adapter_gemms", "untie_transposed_weights"]

QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4")

BLOCK_SIZE = 32
"""Weights per block: 32 keeps the error of small models low (64 lost 2.6 points of greedy agreement on
SmolLM2 at int8) for 1/8 byte of scale per weight."""
INT8_COMPUTE = 4
"""MatMulNBits accuracy level 4: int8 arithmetic, activations quantised per block (fp32: 4-10x slower)."""
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


def unfuse_adapter_gemms(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm that reads an overridable weight as Transpose + MatMul + Add.

    ``quantize_dynamic`` turns every Gemm into a MatMul itself, transposing its weight in place and
    dropping the weight from the graph inputs: an adapter could no longer override it. Returns the
    number of Gemms rewritten (only plain ones: alpha = beta = 1, no transA).
    """
    graph = model.graph
    overridable = {i.name for i in graph.input} & {i.name for i in graph.initializer}
    rewritten = 0
    for index, node in reversed(list(enumerate(graph.node))):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)
        if node.op_type != "Gemm" or scaled or not overridable & set(node.input):
            continue
        weight, product = node.input[1], f"{node.output[0]}_matmul"
        nodes = []
        if attrs.get("transB", 0):
            nodes.append(onnx.helper.make_node("Transpose", [weight], [f"{weight}_t_{index}"],
                                               name=f"{node.name}_Transpose"))
            weight = nodes[-1].output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight],
                                           [product if has_bias else node.output[0]],
                                           name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                               name=f"{node.name}_Add"))
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
        rewritten += 1
    return rewritten


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


def _nbits(model: onnx.ModelProto, dst: Path, bits: int, op_types: tuple[str, ...],
           exclude: list[str]) -> None:
    """Block-quantise the weights of ``op_types`` nodes with MatMulNBitsQuantizer and save to ``dst``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=INT8_COMPUTE,
        nodes_to_exclude=exclude, op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: the quantiser divides 0 / 0
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _int8(model: onnx.ModelProto, dst: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    embedded = dst.with_name(dst.name + ".gather.tmp")  # quantize_dynamic writes a file
    try:
        quantize_dynamic(model, str(embedded), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["Gather"], nodes_to_exclude=exclude)
        model = onnx.load(str(embedded))
    finally:
        embedded.unlink(missing_ok=True)
    _nbits(model, dst, 8, ("MatMul",), exclude)


def _int4(model: onnx.ModelProto, dst: Path, exclude: list[str]) -> None:
    _nbits(model, dst, 4, ("MatMul", "Gather"), exclude)


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
    del model.graph.value_info[:]  # the quantisers rewrite weights (a Gemm's is transposed): infer anew
    untie_transposed_weights(model)
    unfuse_adapter_gemms(model)
    exclude = adapter_nodes(model)
    with _quiet():
        (_int8 if mode == "int8" else _int4)(model, dst, exclude)
