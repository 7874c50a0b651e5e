"""The three small protocols every method implements (docs/methods.md), and what they exchange.

- :class:`Method`: built from the run configuration; plans within a memory budget, estimates a plan's
  peak, builds the :class:`Trainee` of a client or of the server, and gives an export view of a
  checkpoint. It knows nothing of Flower.
- :class:`Trainee`: one process's model for one plan: it loads the global state, trains, uploads
  only what travels, and merges the :class:`Update` s that every node folds into its frozen part.
- :class:`Update`: what every node merges, in round order. Version v means v updates merged.
  ``merge(combine([a, b]))`` equals ``merge(a); merge(b)``, so a node that missed rounds catches up
  from one combined update.

What each method's update is: LoRA's is a low-rank base delta (FLoRA, FedEx-LoRA) or none; LoRA-SB's is
its frozen A and B, once; FedKSeed's the per-seed scalar sums replayed into the weights; SFPrompt has
none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

if TYPE_CHECKING:  # torch only for the types: the registry and `pollinate --help` stay light
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from pollinate.config import RunConfig
    from pollinate.methods.plan import Estimate, ModelDims, Plan
    from pollinate.training import TrainResult

Example = dict[str, Any]
"""One encoded example: ``input_ids``, ``attention_mask``, ``labels``."""

HEADS = ("classifier", "score")
"""Classification heads of the supported families (BERT's ``classifier``, Llama's ``score``)."""

SYNC_TOLERANCE = 1e-6
"""Relative difference of fingerprints above which a client trained on another frozen part. The server
and a client merge the same fp32 updates; only thread-count-dependent summation order differs."""


def check_state(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError unless ``state`` has exactly the keys of ``shapes``, each of that shape.

    ``what`` names the state in the message (``"adapter state"``, ``"lora-sb state"``).
    """
    reason = Schema({k: TensorSpec(None, tuple(shape)) for k, shape in shapes.items()}).check(state)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's dtype and shape. A dimension given as a ``range`` takes any length in it; an int,
    exactly that length. Nothing is broadcast."""

    dtype: str | None
    """``"float32"``, ``"int32"``, ...; None: any."""
    shape: tuple[int | range, ...]

    def admits(self, key: str, tensor: Tensor) -> str | None:
        """None when ``tensor`` has this dtype and shape; else the reason, naming ``key``."""
        dtype = str(tensor.dtype).removeprefix("torch.")
        if self.dtype is not None and dtype != self.dtype:
            return f"{key} has dtype {dtype}, expected {self.dtype}"
        shape = tuple(tensor.shape)
        if len(shape) != len(self.shape) or not all(n in d if isinstance(d, range) else n == d
                                                    for n, d in zip(shape, self.shape, strict=False)):
            return f"{key} has shape {shape}, expected {_shape_text(self.shape)}"
        return None

    @property
    def max_bytes(self) -> int:
        """Bytes of the largest tensor this spec admits."""
        numel = 1
        for d in self.shape:
            numel *= d[-1] if isinstance(d, range) else d
        dtype = self.dtype or "float32"
        return numel * (8 if dtype.endswith("64") else 2 if dtype.endswith("16") else 4)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "") if keys else "none"


def _shape_text(shape: tuple[int | range, ...]) -> str:
    dims = (f"{d.start}..{d.stop - 1}" if isinstance(d, range) else str(d) for d in shape)
    return "(" + ", ".join(dims) + ")"


class Schema:
    """What one client may upload: one of a method's forms, each an exact set of keys with their specs.

    :meth:`check` is the schema step of the server's checks (no missing, extra or base-model key; exact
    dtypes and shapes); a method with rules across tensors or on values subclasses it and overrides
    :meth:`check_values`, which the server runs after the numerics.
    """

    def __init__(self, *forms: Mapping[str, TensorSpec]) -> None:
        self.forms = tuple(dict(f) for f in forms)

    def check(self, upload: Mapping[str, Tensor]) -> str | None:
        """None when ``upload`` is one of the forms, key for key; else the reason."""
        keys = set(upload)
        form = next((f for f in self.forms if set(f) == keys), None)
        if form is None:
            near = min(self.forms, key=lambda f: len(set(f) ^ keys))
            missing, extra = sorted(set(near) - keys), sorted(keys - set(near))
            return f"missing keys {_few(missing)}, unexpected keys {_few(extra)}"
        for key, spec in form.items():
            if (reason := spec.admits(key, upload[key])) is not None:
                return reason
        return None

    def check_values(self, upload: Mapping[str, Tensor]) -> str | None:
        """Rules across tensors or on values, for an upload that passed :meth:`check` and holds only
        finite numbers (none by default)."""
        return None

    @property
    def max_bytes(self) -> int:
        """Payload bytes of the largest form (what the size check before decoding allows, +10%)."""
        return max(sum(spec.max_bytes for spec in f.values()) for f in self.forms)

    @property
    def max_arrays(self) -> int:
        """Tensors in the largest form."""
        return max(len(f) for f in self.forms)


def schema_of(reference: Mapping[str, Tensor]) -> Schema:
    """The one-form schema of uploads shaped exactly as ``reference`` (fp32)."""
    return Schema({k: TensorSpec("float32", tuple(v.shape)) for k, v in reference.items()})


@dataclass(frozen=True)
class TrainSpec:
    """What a round asks of one client's local training."""

    steps: int
    """Optimiser steps (or zeroth-order steps)."""
    batch_size: int
    """Examples per step (the effective batch)."""
    lr: float
    micro_batch: int
    """Examples per forward/backward pass; ``batch_size`` is a multiple of it."""


@dataclass(frozen=True)
class Exportable:
    """How the edge export reads a method's checkpoint folder; recorded in its ``manifest.json``.

    A method's server trainee saves a peft LoRA view of itself (``adapter_config.json``,
    ``adapter_model.safetensors``) in the checkpoint; LoRA-SB's folds R into A. SFPrompt's saves its soft
    prompt and tail instead (``prompt_state``).
    """

    base_delta: str | None = None
    """The checkpoint file of updates merged into the base weights (``<module>.D`` or ``.L``/``.R``,
    by peft module name, or ``<parameter>.D`` for a weight that is not a module's ``weight``), applied to
    the base before the adapter; None when the method merges none."""
    adapter: bool = True
    """False when the peft view holds no trained adapter (its factors are zero: every weight trained
    into the base delta), so only a merged export makes sense."""
    prompt_state: str | None = None
    """The checkpoint file of a soft prompt prepended to every input and the trained blocks (SFPrompt's
    prompt and tail), which the export loads into the run's prompted model and exports merged, with the
    prompt inside the graph; None: the checkpoint holds a peft view."""
    unsupported: str | None = None
    """Why neither the edge export nor ``pollinate merge`` can take this method's checkpoints (None: both
    can, unless ``merge_unsupported`` says otherwise); both refuse them with this reason."""
    merge_unsupported: str | None = None
    """Why ``pollinate merge`` cannot take this method's checkpoints although the edge export can (None:
    it can); it refuses them with this reason."""


class Update(Protocol):
    """What every node folds into its frozen part, in round order."""

    @property
    def span(self) -> int:
        """How many updates this one stands for (a combined catch-up spans several)."""
        ...

    @classmethod
    def combine(cls, updates: Sequence[Self]) -> Self:
        """One update equal to merging ``updates`` in order."""
        ...

    def to_flat(self) -> dict[str, Tensor]:
        """The tensors that travel (and that a checkpoint keeps)."""
        ...

    @classmethod
    def from_flat(cls, flat: Mapping[str, Tensor], *, span: int = 1) -> Self:
        """The inverse of :meth:`to_flat`."""
        ...


class Trainee(Protocol):
    """One process's model for one plan."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    version: int
    """Updates merged into the frozen part so far."""

    def load(self, state: Mapping[str, Tensor], *, seed: int) -> None:
        """Make ``state`` (what the server sends) the trainable part; ``seed`` draws anything fresh."""
        ...

    def train(self, examples: Sequence[Example], spec: TrainSpec, *, seed: int) -> TrainResult:
        """Local training; leaves the trainee at the version it holds."""
        ...

    def upload(self) -> dict[str, Tensor]:
        """The tensors (or scalars) that travel to the server: detached fp32 copies."""
        ...

    def merge(self, update: Any) -> None:  # the method's own Update type
        """Fold ``update`` into the frozen part; ``version`` grows by its span."""
        ...

    def fingerprint(self) -> float:
        """A projection of everything :meth:`merge` writes: equal values, equal frozen parts."""
        ...

    def save(self, folder: Path) -> None:
        """The trainable part (and what export needs) into ``folder``."""
        ...


class Method(Protocol):
    """One way of fine-tuning on a client; built from the run configuration."""

    name: ClassVar[str]
    settings_table: ClassVar[str]
    """The run-config table of its settings (``lora``, ``fedsb``)."""
    title: ClassVar[str]
    """The name people know it by, for messages (``"LoRA"``, ``"LoRA-SB"``)."""
    update_type: ClassVar[Any]
    """The method's :class:`Update` class."""
    cfg: RunConfig
    """The run configuration it was built from."""
    sync_tolerance: float
    """Relative fingerprint difference a client's frozen part may show and still count as the server's
    (:data:`SYNC_TOLERANCE` unless training leaves round-off in it)."""

    def calibration_size(self) -> int:
        """Examples of the training pool the server keeps for itself (no client holds them)."""
        ...

    def dims(self) -> ModelDims:
        """The model's shapes with this method's targets (no weights loaded)."""
        ...

    def candidates(self, dims: ModelDims, client: int) -> list[Plan]:
        """Every plan client ``client`` may use, most capable first."""
        ...

    def estimate(self, dims: ModelDims, plan: Plan) -> Estimate:
        """Peak resident bytes of one training step at ``plan``, above the runtime baseline."""
        ...

    def spec(self, plan: Plan) -> TrainSpec:
        """What a round's local training does at ``plan`` (steps, batch, learning rate)."""
        ...

    def client(self, plan: Plan) -> Trainee:
        """A client's trainee for ``plan``."""
        ...

    def server(self) -> Trainee:
        """The server's trainee: it evaluates, merges and saves the global state."""
        ...

    def initial_state(self, server: Any) -> dict[str, Tensor]:  # the method's own trainee
        """What every client receives in round 1, from the server's trainee."""
        ...

    def sample_update(self, trainee: Any, seed: int) -> Any:  # its own trainee and Update types
        """A valid random update for ``trainee``, drawn from ``seed`` (contract tests, benchmarks)."""
        ...

    def export_view(self) -> Exportable:
        """How the edge export reads this method's checkpoints."""
        ...

    def update_size(self, server: Any, upload: Mapping[str, Tensor]) -> float:  # its own server trainee
        """The size of the change a checked upload makes to the model (Frobenius norm), comparable
        between the clients of a round: what the server bounds, whatever the factors' scale."""
        ...

    def scale_update(self, server: Any, upload: Mapping[str, Tensor], factor: float) -> dict[str, Tensor]:
        """The upload whose change is ``factor`` times this one's (:meth:`update_size` scales by it)."""
        ...

    def dp_view(self, upload: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The upload as float tensors of fixed shapes whose mean the strategy takes (what differential
        privacy clips and noises); itself a valid upload."""
        ...

    def upload_schema(self, server: Any, plan: Mapping[str, int]) -> Schema:  # its own server trainee
        """What a client that trained at ``plan`` (the fields its reply reports) may upload.

        Raises ValueError, with the reason, when no client of this run may train at that plan.
        """
        ...
