"""report.html from a hand-written run folder: the headline equals summary.json, one row per round and per
reply (rejections and failures with their reason), everything escaped, nothing loaded from elsewhere, and
plots with whole-round ticks and byte axes in kB/MB."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from pollinate.config import RunConfig
from pollinate.server.report import RunRecord, write_report
from pollinate.server.report.plots import byte_axis, bytes_figure, eval_figure, memory_figure
from pollinate.server.rundir import RunDir

NASTY = "update <b>too</b> large & {odd}"
PLAN = {"checkpointing": False, "grad_accum": 2, "micro_batch": 2, "rank": 8, "seq_len": 64}


def client(rnd: int, node: int, budget: int | None, peak: int, estimate: int) -> dict[str, Any]:
    return {"round": rnd, "event": "client", "node_id": node, "method": "lora", "rank": 8, "num_examples": 40,
            "train_loss": 1.9, "train_seconds": 2.5, "peak_mem_bytes": peak, "budget_bytes": budget,
            "estimate_bytes": estimate, "over_budget": False, "plan": PLAN, "bytes_up": 120_000,
            "bytes_down": 500_000}


def events(classification: bool) -> list[dict[str, Any]]:
    def scores(loss: float, accuracy: float) -> dict[str, float]:
        return {"loss": loss, "accuracy": accuracy} if classification else {"loss": loss,
                                                                            "perplexity": math.exp(loss)}
    return [
        {"round": 0, "event": "evaluate", **scores(2.0, 0.5), "eval_seconds": 0.5},
        client(1, 11, 10**9, 250_000_000, 300_000_000),
        client(1, 22, None, 270_000_000, 200_000_000),
        {"round": 1, "event": "clipped", "node_id": 22, "factor": 0.5},
        {"round": 1, "event": "rejected", "node_id": 33, "check": "bound", "reason": NASTY},
        {"round": 1, "event": "failed", "node_id": 44, "code": 0,
         "reason": "memory-budget: 100 MB is too small"},
        {"round": 1, "event": "train", "sampled": 4, "accepted": 2, "train_loss": 1.9, "bytes_up": 240_000,
         "bytes_down": 2_000_000, "round_seconds": 3.2, "committed": True, "epsilon": 1.5},
        {"round": 1, "event": "evaluate", **scores(1.5, 0.625), "eval_seconds": 0.4},
        client(2, 11, 10**9, 250_000_000, 300_000_000),
        {"round": 2, "event": "train", "sampled": 4, "accepted": 1, "train_loss": None, "bytes_up": 120_000,
         "bytes_down": 2_000_000, "round_seconds": 3.0, "committed": False, "epsilon": 2.5,
         "not_committed": "quorum not reached: 1 accepted, 2 needed"},
        {"round": 3, "event": "stopped", "reason": "dp.target-epsilon 3 reached"},
    ]


def write_run(path: Path, classification: bool = False) -> Path:
    run = RunDir(path)
    for event in events(classification):
        run.append_event(event)
    evals = [e for e in events(classification) if e["event"] == "evaluate"]
    summary = {
        "strategy": "fedit", "method": "lora", "model": "tiny-llama",
        "task": "classification" if classification else "generation", "num_clients": 4,
        "rounds_completed": 1, "initial_eval": {k: v for k, v in evals[0].items() if k not in
                                                 ("round", "event", "eval_seconds")},
        "final_eval": {k: v for k, v in evals[1].items() if k not in ("round", "event", "eval_seconds")},
        "bytes_up_total": 360_000, "bytes_down_total": 4_123_456, "rejected_updates": 1,
        "rejected_by_check": {"bound": 1}, "uncommitted_rounds": 1, "over_budget_clients": 0,
        "failed_clients": 1, "seconds_per_step": 0.25, "wall_seconds": 75.4, "dp_mode": "local",
        "epsilon": 2.5, "delta": 0.25, "dp_rounds": 2, "stopped": "dp.target-epsilon 3 reached",
        **({} if classification else {"sample": {"prompt": "What is <this>?", "reference": "A test.",
                                                 "base": "}{ noise", "fine_tuned": "A test!"}}),
    }
    run.write_json("summary.json", summary)
    run.write_json("config.json", {**RunConfig().to_run_config(), "model": "tiny-llama", "dp.mode": "local",
                                   "task": summary["task"]})
    return path


class Tables(HTMLParser):
    """Each table's rows (by id) as lists of cell texts, and each img's src."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table":
            self._table = found.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(found.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(report: Path) -> Tables:
    tables = Tables()
    tables.feed(report.read_text())
    return tables


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


def test_the_headline_is_summary_json(run: Path) -> None:
    head = {label: (value, note) for label, value, note in parse(write_report(run)).tables["headline"]}
    assert head["Eval loss"][0] == "2.000 → 1.500"
    assert head["Perplexity"][0] == f"{math.exp(2.0):.2f} → {math.exp(1.5):.2f}"
    assert head["Uploaded"][0] == "0.36 MB" and head["Downloaded"][0] == "4.12 MB"
    assert head["Wall time"][0] == "1 min 15 s" and "0.25 s per step" in head["Wall time"][1]
    assert head["Rounds completed"][0] == "1 of 3"
    assert "1 not committed" in head["Rounds completed"][1]
    assert "stopped early: dp.target-epsilon 3 reached" in head["Rounds completed"][1]
    assert head["Clients"] == ("4", "1 rejected (bound: 1), 1 failed, 0 over budget")
    assert head["Privacy"][0] == "ε = 2.50" and "δ = 0.25" in head["Privacy"][1]


def test_a_classification_run_shows_accuracy_and_no_sample(tmp_path: Path) -> None:
    tables = parse(write_report(write_run(tmp_path / "run", classification=True))).tables
    head = {label: value for label, value, _ in tables["headline"]}
    assert head["Accuracy"] == "50.0% → 62.5%" and "Perplexity" not in head
    assert "samples" not in tables


def test_one_row_per_round_and_per_reply_with_reasons(run: Path) -> None:
    tables = parse(write_report(run)).tables
    rounds = tables["rounds"][1:]
    assert [r[0] for r in rounds] == ["0 (start)", "1", "2", "3"]
    assert rounds[1][1] == "2 of 4" and rounds[1][5:7] == ["240 kB", "2 MB"] and rounds[1][-2:] == [
        "committed", "1.50"]
    assert rounds[2][-2] == "not committed: quorum not reached: 1 accepted, 2 needed"
    assert rounds[3][-2] == "not run: dp.target-epsilon 3 reached"
    replies = tables["clients"][1:]
    assert [(r[0], r[1]) for r in replies] == [("1", "11"), ("1", "22"), ("1", "33"), ("1", "44"),
                                               ("2", "11")]
    outcome = {r[1]: r[2] for r in replies if r[0] == "1"}
    assert [len(r) for r in replies] == [14, 14, 3, 3, 14]  # a reason spans the columns of figures
    assert outcome == {"11": "accepted", "22": "accepted, clipped ×0.50", "33": f"rejected (bound): {NASTY}",
                       "44": "failed: memory-budget: 100 MB is too small"}
    first = replies[0]
    assert first[3:7] == ["batch 2 × 2 accum., 64 tokens", "8", "40", "1.900"]
    assert first[7:11] == ["250 MB", "-17%", "300 MB", "1 GB (25% used)"]
    assert replies[1][7:11] == ["270 MB", "+35%", "200 MB", "none"]
    samples = {r[0]: r[1] for r in tables["samples"]}
    assert samples["Question"] == "What is <this>?" and samples["Fine-tuned (after)"] == "A test!"
    changed = {r[0]: r[1:] for r in tables["config-changed"][1:]}
    assert changed["model"] == ["tiny-llama", "smollm2-135m-instruct"] and "lr" not in changed


def test_text_is_escaped_and_nothing_is_loaded_from_elsewhere(run: Path) -> None:
    report = write_report(run)
    text = report.read_text()
    assert "<b>too</b>" not in text and "&lt;b&gt;too&lt;/b&gt;" in text and "<this>" not in text
    assert not re.search(r"https?://|url\(|@import|<link|<script", text)
    images = parse(report).images
    assert len(images) == 3
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in run.glob("*.png")} == {"eval.png", "bytes.png", "memory.png"}


def labels(fig: Figure) -> list[tuple[list[str], list[str], str]]:
    """Each axes' x and y tick labels and its y offset text ('1e7'), as drawn."""
    fig.draw_without_rendering()
    return [([t.get_text().replace("−", "-") for t in ax.get_xticklabels()],
             [t.get_text().replace("−", "-") for t in ax.get_yticklabels()],
             ax.yaxis.get_offset_text().get_text()) for ax in fig.axes]


@pytest.mark.parametrize("rounds", [1, 2])
def test_round_axes_have_whole_rounds_and_bytes_have_units(run: Path, rounds: int) -> None:
    record = RunRecord.load(run)
    record.events = [e for e in record.events if e["round"] <= rounds]
    for fig in (eval_figure(record), bytes_figure(record)):
        assert fig is not None
        for xs, _, _ in labels(fig):
            assert xs and all(re.fullmatch(r"-?\d+", x) for x in xs), xs
            assert {str(r) for r in range(1, rounds + 1)} <= set(xs)
    ((_, ys, offset),) = labels(bytes_figure(record))  # type: ignore[arg-type]
    assert offset == "" and all(re.fullmatch(r"0|[\d.]+ (kB|MB)", y) for y in ys), ys


def test_a_large_byte_axis_reads_in_mb_without_an_offset() -> None:
    fig = Figure()
    ax = fig.subplots()
    ax.bar([1, 2], [1.2e7, 2.4e7])
    byte_axis(ax, 2.4e7)
    ((_, ys, offset),) = labels(fig)
    assert offset == "" and "25 MB" in ys and all(re.fullmatch(r"0|\d+ MB", y) for y in ys), ys


def test_the_memory_plot_shows_a_budget_only_where_one_was_declared(run: Path) -> None:
    record = RunRecord.load(run)
    fig = memory_figure(record)
    assert fig is not None
    (ax,) = fig.axes
    assert "budget" in ax.get_title() and len(ax.collections) == 1  # node 11's budget line only
    for e in record.events:
        e.pop("budget_bytes", None)
    fig = memory_figure(record)
    assert fig is not None
    (ax,) = fig.axes
    assert ax.get_title().endswith("measured and estimated (no budget set)") and not ax.collections
    ((_, ys, offset),) = labels(fig)
    assert offset == "" and all(re.fullmatch(r"0|[\d.]+ MB", y) for y in ys), ys


def test_the_run_folder_is_read_back_as_written(run: Path) -> None:
    record = RunRecord.load(run)
    assert record.summary == json.loads((run / "summary.json").read_text())
    assert [e["node_id"] for e in record.last_clients()] == [11, 22]


def test_a_split_method_shows_its_channel_apart(run: Path) -> None:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for e in lines:
        if e["event"] == "train":
            e.update(split_bytes_up=100_000, split_bytes_down=100_000)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "split_bytes_up_total": 200_000,
                                                  "split_bytes_down_total": 200_000}))
    tables = parse(write_report(run)).tables
    head = {label: (value, note) for label, value, note in tables["headline"]}
    assert head["Uploaded"] == ("0.36 MB", "clients → server, all rounds, setup and evaluation included; "
                                           "0.20 MB of it over the split channel")
    assert tables["rounds"][2][5] == "340 kB"  # round 1: 240 kB through Flower, 100 kB beside it
    fig = bytes_figure(RunRecord.load(run))
    assert fig is not None
    legend = fig.axes[0].get_legend()
    assert legend is not None and "up (split channel)" in [t.get_text() for t in legend.get_texts()]
