"""Edge deployment: ONNX export, quantisation, adapter files, signed bundles and the onnxruntime runner.

The runner side (:mod:`~pollinate.edge.runtime`, :mod:`~pollinate.edge.manifest`,
:mod:`~pollinate.edge.adapters`, :mod:`~pollinate.edge.quantize`) needs onnxruntime, numpy, tokenizers
and cryptography, never torch. :func:`export_bundle` (torch, transformers, peft) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from pollinate.edge.adapters import export_adapter
from pollinate.edge.manifest import VerificationError, generate_keys
from pollinate.edge.runtime import EdgeModel

__all__ = ["EdgeModel", "VerificationError", "export_adapter", "export_bundle", "generate_keys"]


def __getattr__(name: str) -> Any:
    """Import the torch-dependent exporter only when it is asked for."""
    if name == "export_bundle":
        from pollinate.edge.export import export_bundle

        return export_bundle
    raise AttributeError(f"module 'pollinate.edge' has no attribute {name!r}")
