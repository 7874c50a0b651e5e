"""Experiment tracking: a run's figures, configuration and results, also in TensorBoard or MLflow.

``tracking`` chooses a :class:`Tracker` from :data:`TRACKERS`. The server builds it before anything starts
(a missing library or an unreachable ``tracking-uri`` stops the run with one line), calls
:meth:`Tracker.start` with the flat configuration, hands it every event as it is written to metrics.jsonl
(:class:`pollinate.server.rundir.RunDir`'s ``on_event``), and calls :meth:`Tracker.finish` after
report.html is written. metrics.jsonl stays the record; a tracker is a view of it.

What is logged, at step = round: every number of the ``evaluate`` (``eval/loss``, ``eval/accuracy``,
``eval/perplexity``, ...) and ``train`` events (``train/train_loss``, ``train/bytes_up``,
``train/accepted``, ``train/epsilon``, ...; ``train/rejected`` and ``train/failed`` count the round's
rejected and failed replies), each accepted client's figures as ``client/<node_id>/<field>``
(``client/<node_id>/plan/rank``), and at the end the numbers of summary.json as ``summary/...`` at the
last round. Booleans are 0/1; strings, lists and nulls (a round without a train loss) are left out.

``tracking = "none"`` imports neither library.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlparse

from pollinate.config import RunConfig, Scalar
from pollinate.files import atomic_write
from pollinate.server.rundir import RunDir

__all__ = ["TRACKERS", "MlflowTracker", "NoTracker", "TensorBoardTracker", "Tracker", "build_tracker",
           "figures"]

EXTRA = "pip install 'pollinate[tracking]'"
TRACKING_FILE = "tracking.json"
"""In the run folder: the MLflow run a resumed run goes on logging into."""
EXPERIMENT = "pollinate"
ARTEFACTS = ("report.html", "summary.json", "config.json", "metrics.jsonl")
COUNTED = ("rejected", "failed")
"""Events of one node, counted per round on the train line (their reasons are in the report)."""
NOT_FIGURES = frozenset(["round", "event", "node_id", "base_fingerprint"])
PROBE_SECONDS = 5.0  # a tracking server that does not accept a connection in this time is unreachable
PARAMS_PER_BATCH = 100  # MLflow's limit on the parameters of one log_batch


class Tracker(Protocol):
    """Where a run's figures go besides the run folder."""

    def start(self, run_dir: RunDir, config: Mapping[str, Scalar]) -> None:
        """Open the tracking run (the one a resumed run had, where there is one); log ``config``."""

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Log the figures of one metrics.jsonl event, just written."""

    def finish(self, run_dir: RunDir, completed: bool = True) -> None:
        """Close the tracking run; when ``completed``, log the results (report.html is written)."""


def figures(event: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Every number in ``event`` as ``prefix/key`` (nested tables as ``prefix/key/sub``); booleans are
    0/1; strings, lists and nulls are left out, and so are ids (round, node, fingerprint)."""
    found: dict[str, float] = {}
    for key, value in event.items():
        if key in NOT_FIGURES:
            continue
        if isinstance(value, Mapping):
            found.update(figures(value, f"{prefix}/{key}"))
        elif isinstance(value, bool | int | float):
            found[f"{prefix}/{key}"] = float(value)
    return found


class RoundFigures:
    """Turns each event into the figures a tracker logs at its round (see the module's text)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], int] = {}

    def __call__(self, event: Mapping[str, Any]) -> dict[str, float]:
        kind, server_round = str(event["event"]), int(event["round"])
        if kind in COUNTED:
            self.counts[server_round, kind] = self.counts.get((server_round, kind), 0) + 1
            return {}
        if kind == "client":
            return figures(event, f"client/{event['node_id']}")
        if kind == "evaluate":
            return figures(event, "eval")
        if kind == "train":
            counted = {f"train/{k}": float(self.counts.get((server_round, k), 0)) for k in COUNTED}
            return {**figures(event, "train"), **counted}
        return {}


def summary_figures(run_dir: RunDir) -> tuple[int, dict[str, float]]:
    """The last round and the numbers of summary.json (``summary/...``)."""
    summary = json.loads((run_dir.path / "summary.json").read_text())
    return int(summary["rounds_completed"]), figures(summary, "summary")


def missing(library: str) -> ValueError:
    """The one-line error of a tracking library that is not installed."""
    return ValueError(f"tracking: {library!r} needs the {library} package, which is not installed; "
                      f"{EXTRA}")


class NoTracker:
    """``tracking = "none"``: the run folder alone."""

    def __init__(self, uri: str = "") -> None:
        pass

    def start(self, run_dir: RunDir, config: Mapping[str, Scalar]) -> None:
        """Nothing to open."""

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Nothing to log."""

    def finish(self, run_dir: RunDir, completed: bool = True) -> None:
        """Nothing to close."""


class TensorBoardTracker:
    """TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir runs/<id>/tensorboard``).

    Every figure is a scalar at step = round; the configuration is a text summary (``config``, a
    table) at step 0. TensorBoard has no parameters and no artefacts: at the end a text summary
    (``results``) gives the paths of report.html and the final checkpoint, which stay in the run folder.
    A resumed run appends to the same folder; rounds after the checkpoint it resumes from, which the
    killed run may have logged, are purged (TensorBoard's ``purge_step``), as in metrics.jsonl.
    """

    def __init__(self, uri: str = "") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # it needs the tensorboard package
        except ImportError:
            raise missing("tensorboard") from None
        self.writer_type = SummaryWriter
        self.writer: Any = None
        self.round_figures = RoundFigures()
        self.log_dir = ""

    def start(self, run_dir: RunDir, config: Mapping[str, Scalar]) -> None:
        """Open a writer in ``<run>/tensorboard``; the configuration as a text summary."""
        self.log_dir = str(run_dir.path / "tensorboard")
        self.writer = self.writer_type(self.log_dir)
        rows = "".join(f"| {key} | {value!r} |\n" for key, value in sorted(config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)
        self.writer.flush()

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Each figure as a scalar at the event's round; flushed once a round's line is in."""
        if event["event"] == "resumed":  # hide what a killed run logged after the checkpoint
            self.writer.close()
            self.writer = self.writer_type(self.log_dir, purge_step=int(event["round"]) + 1)
        for name, value in self.round_figures(event).items():
            self.writer.add_scalar(name, value, int(event["round"]))
        if event["event"] in ("train", "evaluate"):
            self.writer.flush()

    def finish(self, run_dir: RunDir, completed: bool = True) -> None:
        """The summary's figures and where report.html and the final checkpoint are; close the files."""
        if completed:
            last, found = summary_figures(run_dir)
            for name, value in found.items():
                self.writer.add_scalar(name, value, last)
            checkpoint = run_dir.latest_checkpoint()
            self.writer.add_text("results", f"report: `{run_dir.path / 'report.html'}`  \n"
                                 f"final checkpoint: `{checkpoint}`", last)
        self.writer.close()


class MlflowTracker:
    """An MLflow run (``mlflow ui --backend-store-uri sqlite:///runs/<id>/mlflow/mlflow.db``).

    With an empty ``tracking-uri`` the store is ``<run>/mlflow/``: a SQLite database (``mlflow.db``;
    MLflow 3 refuses its plain-file store unless told otherwise, and SQLAlchemy comes with Flower) and
    the artefacts beside it (``artifacts/``). Otherwise the run goes to the experiment ``pollinate`` at
    ``tracking-uri``, checked when the tracker is built. Figures are metrics at step = round, the
    configuration the run's parameters, and at the end report.html, summary.json, config.json,
    metrics.jsonl and the final checkpoint (``checkpoints/round-NNNN/``) its artefacts. The run's id
    is kept in ``<run>/tracking.json``: a resumed run logs into the same MLflow run (a parameter it
    changed, such as ``rounds``, becomes a tag ``resumed.<key>``: MLflow keeps parameters fixed). Rounds
    after the checkpoint it resumes from, which the killed run may have logged, are logged again:
    MLflow cannot delete a metric's steps, so their history holds both values.
    """

    def __init__(self, uri: str = "") -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing("mlflow") from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its notes on creating the database
        self.client_type = MlflowClient
        self.client: Any = None
        self.uri = uri
        self.round_figures = RoundFigures()
        self.run_id = ""
        if uri:
            self.client = connect(uri, MlflowClient)

    def start(self, run_dir: RunDir, config: Mapping[str, Scalar]) -> None:
        """Open the run (a resumed run's own, where ``tracking.json`` names one) and log the parameters."""
        if not self.uri:
            store = run_dir.path.resolve() / "mlflow"
            store.mkdir(parents=True, exist_ok=True)
            self.client = self.client_type(f"sqlite:///{store / 'mlflow.db'}")
        params = {key: str(value) for key, value in config.items()}
        self.run_id = self.reopen(run_dir, params) if config.get("resume") else ""
        if not self.run_id:
            self.run_id = self.create(run_dir, params)

    def create(self, run_dir: RunDir, params: Mapping[str, str]) -> str:
        """A new run named after the run folder, its parameters logged and its id in tracking.json."""
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a local store's artefacts beside it; a server chooses its own
            local = (run_dir.path.resolve() / "mlflow" / "artifacts").as_uri() if not self.uri else None
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=local)
        run = self.client.create_run(experiment_id, run_name=run_dir.path.name,
                                     tags={"pollinate.run_folder": str(run_dir.path.resolve())})
        items = [Param(k, v) for k, v in sorted(params.items())]
        for batch in chunks(items, PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=batch)
        atomic_write(run_dir.path / TRACKING_FILE, json.dumps(
            {"tracking": "mlflow", "tracking_uri": self.uri, "run_id": run.info.run_id}, indent=2).encode())
        return str(run.info.run_id)

    def reopen(self, run_dir: RunDir, params: Mapping[str, str]) -> str:
        """The id of the run tracking.json names, set running again, or "" when there is none to reopen
        (no file, another tracking URI, a run deleted since)."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            saved = json.loads((run_dir.path / TRACKING_FILE).read_text())
        except (OSError, ValueError):
            return ""
        if saved.get("tracking_uri") != self.uri:
            return ""
        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException:
            return ""
        if run.info.lifecycle_stage != "active":  # deleted in the UI: it takes no more figures
            return ""
        run_id, had = str(run.info.run_id), run.data.params
        self.client.update_run(run_id, status="RUNNING")
        new = [Param(k, v) for k, v in sorted(params.items()) if k not in had]
        for batch in chunks(new, PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=batch)
        for key, value in params.items():
            if key in had and had[key] != value:
                self.client.set_tag(run_id, f"resumed.{key}", value)
        return run_id

    def log_event(self, event: Mapping[str, Any]) -> None:
        """The event's figures as metrics at its round, in one batch."""
        from mlflow.entities import Metric

        found = self.round_figures(event)
        if found:
            now = int(time.time() * 1000)
            step = int(event["round"])
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in found.items()])

    def finish(self, run_dir: RunDir, completed: bool = True) -> None:
        """The summary's figures, then the artefacts; the run ends FINISHED (FAILED when not
        ``completed``)."""
        if completed:
            from mlflow.entities import Metric

            last, found = summary_figures(run_dir)
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, last) for k, v in found.items()])
            for name in ARTEFACTS:
                if (run_dir.path / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir.path / name))
            if (checkpoint := run_dir.latest_checkpoint()) is not None:
                self.client.log_artifacts(self.run_id, str(checkpoint), f"checkpoints/{checkpoint.name}")
        self.client.set_terminated(self.run_id, "FINISHED" if completed else "FAILED")


def connect(uri: str, client_type: Callable[[str], Any]) -> Any:
    """An MLflow client of ``uri``, which must answer now; otherwise the one-line ValueError.

    An http(s) server is first probed with one connection: MLflow's own client retries for minutes.
    """
    address = urlparse(uri)
    try:
        if address.scheme in ("http", "https"):
            port = address.port or (443 if address.scheme == "https" else 80)
            socket.create_connection((address.hostname or "", port), timeout=PROBE_SECONDS).close()
        client = client_type(uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # whatever the store raises (MLflow's, requests', OS errors): no run
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"tracking-uri: {uri!r} does not answer ({reason}); start the tracking server, "
                         "or leave tracking-uri empty to log into the run folder") from None
    return client


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of at most ``size``."""
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


TRACKERS: dict[str, Callable[[str], Tracker]] = {
    "none": NoTracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}
"""Each ``tracking`` value's tracker, built from ``tracking-uri``."""


def build_tracker(cfg: RunConfig) -> Tracker:
    """The tracker ``tracking`` names; raises the one-line ValueError when its library is not installed
    or (MLflow) ``tracking-uri`` does not answer."""
    return TRACKERS[cfg.tracking](cfg.tracking_uri)
