"""The run configuration: one frozen dataclass per concern, validated on construction.

Keys are kebab-case as Flower writes them; nested tables become dotted keys (``lora.rank``). The same
keys are accepted by ``pollinate simulate --set``, ``flwr run . --run-config`` and
``[tool.flwr.app.config]`` in pyproject.toml. Each field names its key in ``metadata["key"]``; a nested
dataclass names its table in ``metadata["table"]``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollinate.catalog import GENERATION, PARTITIONERS, TASKS, default_dataset
from pollinate.methods.fedkseed.settings import FedKSeedSettings
from pollinate.methods.lora.settings import LoraSettings
from pollinate.methods.lora_sb.settings import FedSbSettings
from pollinate.methods.settings import AUTO
from pollinate.methods.settings import fail as _fail
from pollinate.methods.settings import key as _key
from pollinate.methods.settings import positive as _positive
from pollinate.methods.sfprompt.settings import SfPromptSettings
from pollinate.privacy.settings import DpSettings

Scalar = bool | int | float | str
EVAL_SPLITS = ("held-out", "validation", "clients")
ROBUST = ("none", "clip")  # the keys of pollinate.server.validate.BOUND_POLICIES
TRACKING = ("none", "tensorboard", "mlflow")  # the keys of pollinate.server.tracking.TRACKERS

@dataclass(frozen=True)
class DataFields:
    """Column names in a user's local .jsonl/.csv file."""

    prompt: str = field(default="prompt", metadata=_key("prompt-field"))
    response: str = field(default="response", metadata=_key("response-field"))
    text: str = field(default="text", metadata=_key("text-field"))
    label: str = field(default="label", metadata=_key("label-field"))
    category: str = field(default="category", metadata=_key("category-field"))


@dataclass(frozen=True)
class MemorySettings:
    """Each client's memory budget; the planner fits its training into it."""

    budgets: str = field(default="", metadata=_key("budgets"))
    """One budget per client, comma-separated ("8GB,1.5GB"); empty: no budgets. A deployed node
    declares its own with ``--node-config 'memory-budget=1.5GB'``."""

    def budget_for(self, client: int) -> int | None:
        """Client ``client``'s budget in bytes (the list repeats), or None."""
        from pollinate.client.budget import budget_list

        budgets = budget_list(self.budgets)
        return budgets[client % len(budgets)] if budgets else None

    def __post_init__(self) -> None:
        self.budget_for(0)  # parse now: a bad size fails before any training


@dataclass(frozen=True)
class SimulationSettings:
    """How the local simulation engine runs clients."""

    workers: int = field(default=2, metadata=_key("workers"))
    """Clients trained at the same time, each on one CPU thread (Ray actors)."""
    ray_address: str = field(default="", metadata=_key("ray-address"))
    """An existing Ray cluster to run the clients on (``HOST:PORT`` of its head, as ``ray start --head``
    prints, or ``auto``); empty: a local Ray started for the run. With a cluster, ``workers`` is ignored:
    every CPU of the cluster takes a client."""

    def __post_init__(self) -> None:
        _positive("sim.workers", self.workers)


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run needs; built by :meth:`from_run_config`."""

    model: str = field(default="smollm2-135m-instruct", metadata=_key("model"))
    task: str = field(default=GENERATION, metadata=_key("task"))
    dataset: str = field(default=AUTO, metadata=_key("dataset"))
    """A built-in dataset, a .jsonl/.csv file, or "auto" (the default dataset of the task)."""
    partitioner: str = field(default="natural", metadata=_key("partitioner"))
    dirichlet_alpha: float = field(default=0.5, metadata=_key("dirichlet-alpha"))
    num_clients: int = field(default=4, metadata=_key("num-clients"))
    rounds: int = field(default=3, metadata=_key("rounds"))
    local_steps: int = field(default=5, metadata=_key("local-steps"))
    batch_size: int = field(default=4, metadata=_key("batch-size"))
    max_seq_len: int = field(default=64, metadata=_key("max-seq-len"))
    lr: float = field(default=3e-3, metadata=_key("lr"))
    seed: int = field(default=0, metadata=_key("seed"))
    strategy: str = field(default="fedit", metadata=_key("strategy"))
    eval_examples: int = field(default=24, metadata=_key("eval-examples"))
    """Size of the held-out split that no client sees; the server evaluates on it."""
    eval_dataset: str = field(default="", metadata=_key("eval-dataset"))
    """The server's own held-out .jsonl/.csv file (or a built-in dataset), evaluated whole every round;
    empty: ``eval-examples`` drawn from ``dataset``. In a deployment the devices' data never reaches it."""
    clients_per_round: int = field(default=0, metadata=_key("clients-per-round"))
    """Nodes sampled each round, drawn from the run's seed and the round; 0: every node."""
    min_accepted: float = field(default=1.0, metadata=_key("min-accepted"))
    """The quorum: a round commits only with at least this many accepted replies (a count, from 1), or
    this fraction of the sampled nodes (below 1); otherwise the global state stays as it was."""
    round_timeout: float = field(default=3600.0, metadata=_key("round-timeout"))
    """Seconds a round waits for replies; it then goes on with those in hand (later ones are stale)."""
    update_bound: float = field(default=10.0, metadata=_key("update-bound"))
    """A reply whose update is larger than this many times the median of the round's (with 3 or more
    accepted) is rejected; 0 turns the bound off."""
    robust: str = field(default="none", metadata=_key("robust"))
    """``clip``: an update above ``update-bound`` times the round's median is scaled down to it before the
    rule runs, instead of rejected (``none``)."""
    max_examples: int = field(default=0, metadata=_key("max-examples"))
    """The most examples a client's reply may claim as its weight (a reply above it is rejected); 0: the
    largest share of the run's own partition. Set it where nodes train on data of their own."""
    eval_split: str = field(default="held-out", metadata=_key("eval-split"))
    """What the global model is evaluated on: the server's ``held-out`` split; a ``validation`` slice of the
    same size drawn from the training pool (no client holds it either) for tuning without touching the
    held-out one; or ``clients``: each node evaluates on a held-out slice of its own data (``eval-fraction``
    of it, never trained on) and the server reports the mean weighted by examples (a deployment whose
    server has no data of the devices' kind)."""
    eval_fraction: float = field(default=0.2, metadata=_key("eval-fraction"))
    """With ``eval-split = "clients"``: the share of each node's data it holds back to evaluate on."""
    save_updates: bool = field(default=False, metadata=_key("save-updates"))
    """Keep every accepted client update in the round's checkpoint (audits, exactness tests)."""
    run_dir: str = field(default="", metadata=_key("run-dir"))
    """Where the run folder goes; empty means runs/<run-id>."""
    resume: bool = field(default=False, metadata=_key("resume"))
    """Continue the run in ``run-dir`` from its last committed round (a run folder without one starts
    afresh); the rest of the configuration must be the run's own, ``rounds`` aside."""
    tracking: str = field(default="none", metadata=_key("tracking"))
    """Also log the run's figures, configuration and results to ``tensorboard`` (event files in
    ``<run>/tensorboard``) or ``mlflow`` (a run in ``<run>/mlflow``, or at ``tracking-uri``); ``none``
    imports neither. Needs the ``tracking`` extra."""
    tracking_uri: str = field(default="", metadata=_key("tracking-uri"))
    """With ``tracking = "mlflow"``: the tracking server or store (``http://host:5000``,
    ``sqlite:///mlflow.db``); empty: a store inside the run folder. A flat key of its own: in Flower's
    run config ``tracking`` cannot be both a value and a table."""
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"table": "lora"})
    fedsb: FedSbSettings = field(default_factory=FedSbSettings, metadata={"table": "fedsb"})
    fedkseed: FedKSeedSettings = field(default_factory=FedKSeedSettings, metadata={"table": "fedkseed"})
    sfprompt: SfPromptSettings = field(default_factory=SfPromptSettings, metadata={"table": "sfprompt"})
    dp: DpSettings = field(default_factory=DpSettings, metadata={"table": "dp"})
    data: DataFields = field(default_factory=DataFields, metadata={"table": "data"})
    memory: MemorySettings = field(default_factory=MemorySettings, metadata={"table": "memory"})
    sim: SimulationSettings = field(default_factory=SimulationSettings, metadata={"table": "sim"})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise _fail("task", self.task, f"allowed: {', '.join(TASKS)}")
        if self.eval_split not in EVAL_SPLITS:
            raise _fail("eval-split", self.eval_split, f"allowed: {', '.join(EVAL_SPLITS)}")
        if not 0 < self.eval_fraction < 1:
            raise _fail("eval-fraction", self.eval_fraction, "give a fraction in (0, 1)")
        if self.eval_split == "clients" and self.eval_dataset:
            raise _fail("eval-dataset", self.eval_dataset, 'with eval-split = "clients" the nodes evaluate '
                        "on their own data: leave it empty, or choose another eval-split")
        if self.partitioner not in PARTITIONERS:
            raise _fail("partitioner", self.partitioner, f"allowed: {', '.join(PARTITIONERS)}")
        for key in ("dirichlet-alpha", "num-clients", "rounds", "local-steps", "batch-size",
                    "lr", "eval-examples"):
            _positive(key, getattr(self, key.replace("-", "_")))
        if not 0 <= self.clients_per_round <= self.num_clients:
            raise _fail("clients-per-round", self.clients_per_round,
                        f"it must be 0 (every node) or at most num-clients ({self.num_clients})")
        if not (0 < self.min_accepted < 1 or (self.min_accepted.is_integer() and
                                                1 <= self.min_accepted <= self.per_round)):
            raise _fail("min-accepted", self.min_accepted, "give a fraction in (0, 1) or a whole count from "
                        f"1 to the {self.per_round} sampled nodes")
        _positive("round-timeout", self.round_timeout)
        if self.update_bound < 0 or 0 < self.update_bound <= 1:
            raise _fail("update-bound", self.update_bound, "give 0 (off) or a factor above 1")
        if self.robust not in ROBUST:
            raise _fail("robust", self.robust, f"allowed: {', '.join(ROBUST)}")
        if self.tracking not in TRACKING:
            raise _fail("tracking", self.tracking, f"allowed: {', '.join(TRACKING)}")
        if self.tracking_uri and self.tracking != "mlflow":
            raise _fail("tracking-uri", self.tracking_uri, f"only tracking = \"mlflow\" logs to a URI "
                        f"(tracking is {self.tracking!r}); leave it empty")
        if self.max_examples < 0:
            raise _fail("max-examples", self.max_examples, "it must be 0 (the largest share) or positive")
        if self.resume and not self.run_dir:
            raise _fail("resume", self.resume, "it needs run-dir: the folder of the run to continue")
        if self.max_seq_len < 8:
            raise _fail("max-seq-len", self.max_seq_len, "it must be at least 8")

    @property
    def dataset_name(self) -> str:
        """The dataset to load: ``dataset``, or the task's default when it is "auto"."""
        return self.dataset if self.dataset != AUTO else default_dataset(self.task)

    @property
    def partition_by(self) -> str:
        """The column that non-IID partitioners split on."""
        return "category" if self.task == GENERATION else "label"

    @property
    def per_round(self) -> int:
        """Nodes sampled each round."""
        return self.clients_per_round or self.num_clients

    @property
    def quorum(self) -> int:
        """Accepted replies a round needs to commit, of the nodes it samples."""
        if self.min_accepted >= 1:
            return int(self.min_accepted)
        return math.ceil(self.min_accepted * self.per_round)

    def resolved_run_dir(self, run_id: str) -> Path:
        """The run folder of run ``run_id``."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / run_id

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from flat kebab-case keys; unknown keys and wrong types raise ValueError."""
        known = set(flat_keys(cls))
        for key in values:
            if key not in known:
                raise _fail(key, values[key], f"unknown key; known keys: {', '.join(sorted(known))}")
        return _build(cls, values, prefix="")

    def to_run_config(self) -> dict[str, Scalar]:
        """Flat kebab-case keys and scalar values, the inverse of :meth:`from_run_config`."""
        return _flatten(self, prefix="")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def flat_keys(cls: type) -> list[str]:
    """Every flat key a config dataclass accepts, nested tables as dotted keys."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if "table" in f.metadata:
            sub = _field_type(cls, f.name)
            keys += [f"{f.metadata['table']}.{k}" for k in flat_keys(sub)]
        else:
            keys.append(f.metadata["key"])
    return keys


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f.name)
        if "table" in f.metadata:
            kwargs[f.name] = _build(kind, values, prefix + f.metadata["table"] + ".")
        elif (key := prefix + f.metadata["key"]) in values:
            kwargs[f.name] = _coerce(key, values[key], kind)
    return cls(**kwargs)


def _flatten(obj: Any, prefix: str) -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "table" in f.metadata:
            flat.update(_flatten(value, prefix + f.metadata["table"] + "."))
        else:
            flat[prefix + f.metadata["key"]] = value
    return flat


def _coerce(key: str, value: Any, kind: Any) -> Scalar:
    """Turn a TOML/CLI value into the field's type; strings from ``--set`` are parsed."""
    if isinstance(kind, types.UnionType):  # pragma: no cover - no optional fields today
        kind = kind.__args__[0]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return bool(value)
        if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        return typing.cast(Scalar, kind(value))
    except (TypeError, ValueError):
        raise _fail(key, value, f"expected {kind.__name__}") from None


def parse_assignments(items: list[str]) -> dict[str, str]:
    """Parse ``key=value`` items (``--set``) into a dict; a later key wins.

    One item may hold several pairs separated by whitespace, as ``flwr run --run-config`` takes
    them: ``"rounds=5 lr=1e-4"``. Quote a value that holds spaces: ``data.prompt-field="my
    prompt"``. Backslashes stay as typed, so Windows paths work.
    """
    import shlex  # only here: splitting an item as a shell splits words

    out: dict[str, str] = {}
    for item in items:
        lexer = shlex.shlex(item, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""  # "#" is an ordinary character of a value
        lexer.escape = ""  # keep backslashes: dataset=C:\data\chat.jsonl
        try:
            pairs = list(lexer)
        except ValueError:  # shlex: "No closing quotation"
            raise ValueError(f"--set: {item!r} has an unclosed quote; "
                             'quote a value with spaces as key="a b"') from None
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or not name.strip():
                where = "" if pair == item else f" (in {item!r})"
                raise ValueError(f"--set: {pair!r}{where} is not key=value")
            out[name.strip()] = value.strip()
    return out
