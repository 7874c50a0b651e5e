"""What a report reads from a run folder: summary.json, config.json and metrics.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pollinate.catalog import CLASSIFICATION
from pollinate.server.rundir import RunDir

__all__ = ["RunRecord"]


@dataclass
class RunRecord:
    """One finished run, as its folder holds it."""

    name: str
    """The run folder's name (``runs/<run-id>``)."""
    summary: dict[str, Any]
    events: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    """config.json: the flat run-config keys (empty when the folder has none)."""

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """Read ``path``'s run folder (summary.json must exist: it is written when the run ends)."""
        config = path / "config.json"
        return cls(name=path.name, summary=json.loads((path / "summary.json").read_text()),
                   events=RunDir(path).events(),
                   config=json.loads(config.read_text()) if config.exists() else {})

    @property
    def classification(self) -> bool:
        """Scored by accuracy (classification) rather than perplexity (generation)."""
        return str(self.summary.get("task", self.config.get("task", ""))) == CLASSIFICATION

    def of(self, kind: str) -> list[dict[str, Any]]:
        """Every event of one kind (``evaluate``, ``train``, ``client``, ...), in the order written."""
        return [e for e in self.events if e.get("event") == kind]

    def by_round(self, kind: str) -> dict[int, dict[str, Any]]:
        """The last event of ``kind`` in each round (a resumed run's lines are already pruned)."""
        return {int(e["round"]): e for e in self.of(kind)}

    def last_clients(self) -> list[dict[str, Any]]:
        """Each node's client event of the last round it was accepted in, largest budget first."""
        last: dict[int, dict[str, Any]] = {}
        for e in self.of("client"):
            last[int(e["node_id"])] = e
        return sorted(last.values(), key=lambda e: (-(e.get("budget_bytes") or 0), int(e["node_id"])))
