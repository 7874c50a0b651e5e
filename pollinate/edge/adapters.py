"""LoRA adapters as onnxruntime adapter files, made from a peft checkpoint with numpy alone. No torch.

A graph exported with ``--adapters separate`` takes every LoRA weight (and every trained whole module,
such as a classifier head) as an overridable input named by peft's saved key, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Its LoRA scale is 1, so an adapter
file carries ``B`` pre-multiplied by the checkpoint's own scale (``alpha / r``, per module when peft's
``rank_pattern`` / ``alpha_pattern`` say so): adapters of different ranks and alphas plug into one graph.
A LoRA input that an adapter leaves out keeps the graph's default, zero, which adapts nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from pollinate.edge import manifest
from pollinate.edge.bundle_pb2 import Adapter, AdapterMode, BaseModel, LoraInput
from pollinate.files import MANIFEST_FILE

__all__ = [
    "ADAPTER_MODES",
    "ADAPTER_SUFFIX",
    "Checkpoint",
    "PeftAdapter",
    "adapter_message",
    "adapter_tensors",
    "check_fits",
    "export_adapter",
    "graph_input_name",
    "read_adapter",
    "refusal",
    "resolve_checkpoint",
    "write_adapter_file",
]

ADAPTER_SUFFIX = ".onnx_adapter"
ADAPTER_MODES: tuple[str, ...] = ("merged", "separate")
"""``merged``: merge_and_unload before export; ``separate``: LoRA weights as graph inputs + adapter files."""
_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
"""The peft LoRA view every method's checkpoint holds (LoRA-SB's with R folded into A)."""
_ROUND = re.compile(r"round-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder, the configuration of the run that wrote it, and its method's export view."""

    folder: Path
    run_config: dict[str, Any]
    """The run's flat ``config.json`` (``model``, ``task``, ``seed``, ``lora.rank``, ...)."""
    run: Path | None = None
    """The run folder that holds it (and its ``config.json``)."""
    method: str = "lora"
    """The method that wrote it, from its ``manifest.json``."""
    base_delta: Path | None = None
    """Updates merged into the base weights during the federation (``<module>.D``, or ``.L`` and ``.R``
    with ΔW = L R, by peft module name), when the method merges any and some were merged."""
    adapter: bool = True
    """False when the method trained no adapter (its peft view has zero factors, or it has none): merged
    export only."""
    prompt_state: Path | None = None
    """A soft prompt and trained blocks instead of a peft view (SFPrompt's ``sfprompt.safetensors``): the
    export bakes them into a merged graph (:mod:`pollinate.edge.prompted`)."""
    merge_unsupported: str | None = None
    """Why ``pollinate merge`` refuses this checkpoint (None: it takes it)."""

    @property
    def base_delta_sha256(self) -> str:
        """SHA-256 of the checkpoint's merged base updates, '' when it has none."""
        return manifest.sha256_file(self.base_delta) if self.base_delta is not None else ""

    @property
    def round(self) -> int:
        """The federated round of a ``round-NNNN`` folder, else 0."""
        match = _ROUND.search(self.folder.name)
        return int(match.group(1)) if match else 0


def resolve_checkpoint(source: Path, *, action: str = "exported") -> Checkpoint:
    """Find the checkpoint of a run folder (its ``LATEST``) or a checkpoint folder, and its run config.

    Parameters
    ----------
    source : Path
        A run folder holding ``LATEST`` and ``config.json``, or a checkpoint folder
        ``RUN/checkpoints/round-NNNN`` (then ``RUN/config.json`` names the base model).
    action : str, default "exported"
        What the caller does with it, for the refusal of a method whose export view is ``unsupported``
        (``"... cannot be exported: method ...: reason"``).

    A checkpoint is recognised by its ``manifest.json``, which names the method and how the export
    reads it (the method's export view): a peft view, or the file of its soft prompt and trained blocks.

    Raises
    ------
    ValueError
        If ``source`` is neither, or no run ``config.json`` can be found.
    """
    source = Path(source)
    if (source / "LATEST").is_file():
        run = source
        folder = source / (source / "LATEST").read_text().strip()
    elif (source / MANIFEST_FILE).is_file():
        folder, run = source, source.parent.parent
    else:
        raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(source)!r} is neither a run folder (with LATEST) "
                         f"nor a checkpoint folder (with {MANIFEST_FILE})")
    if not (folder / MANIFEST_FILE).is_file():
        raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(folder)!r} has no {MANIFEST_FILE}: it is not a "
                         "checkpoint pollinate wrote")
    written = json.loads((folder / MANIFEST_FILE).read_text())
    view = written.get("export") or {}
    if (reason := view.get("unsupported")) is not None:
        raise refusal(folder, action, str(written.get("method", "")), reason)
    delta_name = view.get("base_delta")
    base_delta = folder / delta_name if delta_name and (folder / delta_name).is_file() else None
    prompt_state = _checkpoint_files(folder, view.get("prompt_state"))
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ValueError(f"RUN_DIR_OR_CHECKPOINT: no run config.json at {str(config_path)!r}; it names the "
                         "base model: keep the checkpoint inside its run folder")
    run_config = json.loads(config_path.read_text())
    for key in ("model", "task"):
        if not isinstance(run_config.get(key), str):
            raise ValueError(f"{config_path}: has no {key!r}")
    return Checkpoint(folder=folder.resolve(), run_config=run_config, run=run.resolve(),
                      method=str(written.get("method", "")),
                      base_delta=base_delta.resolve() if base_delta else None,
                      adapter=bool(view.get("adapter", True)),
                      prompt_state=prompt_state.resolve() if prompt_state else None,
                      merge_unsupported=view.get("merge_unsupported"))


def refusal(folder: Path, action: str, method: str, reason: str) -> ValueError:
    """The one-line error of a checkpoint that cannot be ``action`` (exported, merged ...)."""
    return ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(folder)!r} cannot be {action}: method {method!r}: "
                      f"{reason}")


def _checkpoint_files(folder: Path, prompt_name: str | None) -> Path | None:
    """The prompt state file when the export view names one (else the peft view must be there); ValueError
    when what the checkpoint should hold is missing."""
    if prompt_name:
        if not (folder / prompt_name).is_file():
            raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(folder)!r} lacks {prompt_name}")
        return folder / prompt_name
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        raise ValueError(f"RUN_DIR_OR_CHECKPOINT: {str(folder)!r} lacks {_CONFIG} or {_WEIGHTS}")
    return None


# --------------------------------------------------------------------------------------------------
# The peft checkpoint, read with numpy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftAdapter:
    """A peft LoRA checkpoint: its ``adapter_config.json`` and its tensors."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    """Keys as peft saves them: ``...q_proj.lora_A.weight``, ``...classifier.weight``."""

    @property
    def rank(self) -> int:
        """peft's ``r`` (the largest, when ``rank_pattern`` sets others)."""
        return int(max([self.config["r"], *self.config.get("rank_pattern", {}).values()]))

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def targets(self) -> list[str]:
        targets = self.config.get("target_modules") or []
        return sorted([targets] if isinstance(targets, str) else targets)

    @property
    def modules_to_save(self) -> list[str]:
        """Trained whole modules that are present in the checkpoint (a classifier head)."""
        names = self.config.get("modules_to_save") or []
        return sorted(n for n in names if any(f".{n}." in k for k in self.tensors))

    def scale(self, module: str) -> float:
        """peft's scale of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA, patterns first."""
        rank = float(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.alpha))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of ``module`` (peft's rule), else default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> PeftAdapter:
    """Read a peft LoRA checkpoint folder; refuse variants the exported graph cannot express."""
    config = json.loads((folder / _CONFIG).read_text())
    what = f"{folder / _CONFIG}"
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{what}: peft_type {config.get('peft_type')!r} is not supported; allowed: LORA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{what}: {flag} is not supported by the edge export; allowed: false")
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(folder / _WEIGHTS)).items()}
    return PeftAdapter(config=config, tensors=tensors)


# --------------------------------------------------------------------------------------------------
# Graph input names and adapter tensors
# --------------------------------------------------------------------------------------------------


def graph_input_name(parameter: str) -> str:
    """The graph input of a peft parameter: its name as peft saves it.

    ``model.base_model.model.x.q_proj.lora_A.default.weight`` -> ``base_model.model.x.q_proj.lora_A.weight``;
    ``...classifier.modules_to_save.default.weight`` -> ``...classifier.weight``.
    """
    name = parameter[parameter.index("base_model."):]
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def adapter_tensors(adapter: PeftAdapter) -> dict[str, np.ndarray]:
    """The tensors of an adapter file: each ``lora_B`` times its module's scale, the rest as they are."""
    out: dict[str, np.ndarray] = {}
    for key, value in adapter.tensors.items():
        if ".lora_B." in key:
            module = key.split(".lora_B.")[0].removeprefix("base_model.model.")  # peft's module name
            value = value * np.float32(adapter.scale(module))
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def check_fits(tensors: Mapping[str, np.ndarray], lora_inputs: Iterable[LoraInput], what: str) -> None:
    """Raise ValueError unless every tensor is an adapter input of the graph with a fitting shape."""
    shapes = {i.name: tuple(i.shape) for i in lora_inputs}
    for key, value in tensors.items():
        if key not in shapes:
            targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in shapes if ".lora_" in n})
            raise ValueError(f"{what}: {key} is not an adapter input of the bundle's graph (it adapts "
                             f"{', '.join(targets) or 'nothing'}); export the base again from a "
                             "checkpoint with these targets")
        expected = shapes[key]
        if not _fits(expected, value.shape):
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, the graph expects "
                             f"{tuple('r' if e == -1 else e for e in expected)}")
        if ".lora_A." in key:
            partner = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if partner is None or partner.shape[1] != value.shape[0]:
                raise ValueError(f"{what}: {key} has no lora_B of the same rank")


def _fits(expected: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` matches ``expected``, where -1 stands for any size (the rank axis)."""
    return len(expected) == len(shape) and all(e in (-1, s) for e, s in zip(expected, shape, strict=True))


def write_adapter_file(tensors: Mapping[str, np.ndarray], path: Path, version: int = 0) -> None:
    """Write an onnxruntime adapter file (``onnxruntime.LoraAdapter`` reads it)."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(version)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))


def adapter_message(adapter: PeftAdapter, checkpoint: Checkpoint, base_weights_sha256: str,
                    source_sha256: str) -> Adapter:
    """The manifest entry describing ``adapter`` (file fields are filled when it is written)."""
    return Adapter(
        base_weights_sha256=base_weights_sha256,
        rank=adapter.rank,
        alpha=adapter.alpha,
        targets=adapter.targets,
        modules_to_save=adapter.modules_to_save,
        source=checkpoint.folder.name,
        round=checkpoint.round,
        source_sha256=source_sha256,
        use_rslora=bool(adapter.config.get("use_rslora")),
    )


# --------------------------------------------------------------------------------------------------
# A later round's adapter for an existing bundle
# --------------------------------------------------------------------------------------------------


def export_adapter(source: Path, bundle: Path, out: Path, *, sign_key: Path | None = None) -> Path:
    """Write a checkpoint's adapter as a file for an existing separate-adapter bundle. No torch.

    Parameters
    ----------
    source : Path
        A run folder (its latest checkpoint) or a checkpoint folder inside a run folder.
    bundle : Path
        A bundle exported with ``adapter_mode="separate"`` from the same base model.
    out : Path
        The adapter file to write (``.onnx_adapter`` is appended when missing); its signed manifest
        goes beside it as ``OUT.manifest.pb``.
    sign_key : Path, optional
        An Ed25519 private key to sign the adapter's manifest with.

    Returns
    -------
    Path
        The adapter file.

    Raises
    ------
    ValueError
        If the bundle does not verify, merges its adapter, or belongs to another base model, or the
        checkpoint's adapter does not fit the bundle's graph.
    """
    key = manifest.load_private_key(sign_key) if sign_key is not None else None
    bundle_manifest, _ = manifest.read_bundle_manifest(bundle)
    if bundle_manifest.adapter_mode != AdapterMode.SEPARATE:
        raise ValueError(f"--adapter-for: bundle {str(bundle)!r} has its adapter merged; export the base "
                         "with --adapters separate to ship adapters on their own")
    checkpoint = resolve_checkpoint(source)
    if checkpoint.prompt_state is not None:
        raise ValueError(f"--adapter-for: checkpoint {str(checkpoint.folder)!r} (method "
                         f"{checkpoint.method!r}) holds a soft prompt and trained blocks, no adapter; export "
                         "it as a bundle of its own with --adapters merged")
    _check_same_base(checkpoint, bundle_manifest.base, bundle)
    if checkpoint.base_delta_sha256 != bundle_manifest.base.base_delta_sha256:
        raise ValueError(f"--adapter-for: checkpoint {str(checkpoint.folder)!r} was trained on a base with "
                         f"other merged updates ({checkpoint.base_delta}) than bundle {str(bundle)!r}; "
                         "export the "
                         "base again from this checkpoint")
    peft_adapter = read_adapter(checkpoint.folder)
    tensors = adapter_tensors(peft_adapter)
    check_fits(tensors, bundle_manifest.graph.lora_inputs, f"checkpoint {checkpoint.folder}")
    out = out if out.name.endswith(ADAPTER_SUFFIX) else out.with_name(out.name + ADAPTER_SUFFIX)
    if out.exists():
        raise ValueError(f"--out: {str(out)!r} exists; choose a new name")
    write_adapter_file(tensors, out, version=checkpoint.round)
    source_sha = manifest.sha256_file(checkpoint.folder / "adapter_model.safetensors")
    entry = adapter_message(peft_adapter, checkpoint, bundle_manifest.base.weights_sha256, source_sha)
    manifest.write_adapter_manifest(out, entry, key)
    return out


def _check_same_base(checkpoint: Checkpoint, base: BaseModel, bundle: Path) -> None:
    """Refuse a checkpoint whose run trained another base model than the bundle's."""
    cfg = checkpoint.run_config
    name, seed = str(cfg["model"]), int(cfg.get("seed", 0))
    if name != base.name or (base.seeded and seed != base.seed):
        mine = f"{name} (seed {seed})" if base.seeded else name
        theirs = f"{base.name} (seed {base.seed})" if base.seeded else base.name
        raise ValueError(f"--adapter-for: checkpoint {str(checkpoint.folder)!r} was trained on base {mine}, "
                         f"bundle {str(bundle)!r} holds {theirs}")
