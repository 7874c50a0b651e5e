"""report.html's sections: headline, sample answers, plots, rounds, clients, configuration.

Every section is built from a :class:`RunRecord` alone and every text goes through :func:`html.escape`;
the page loads nothing (inline CSS, PNGs as data: URLs), so it opens from anywhere, offline.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from pollinate.config import RunConfig
from pollinate.server.report.record import RunRecord
from pollinate.server.report.units import DASH, duration, fixed, megabytes, missing, percent, size

__all__ = ["Cell", "clients_rows", "headline", "page", "rounds_rows"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
  max-width:1400px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.1em} h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #ccc}
.sub,.note,caption{color:#666} caption{caption-side:bottom;text-align:left;font-size:.9em;padding-top:.3em}
table{border-collapse:collapse;margin:.3em 0 1em}
th,td{padding:.25em .7em;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top}
thead th{background:#f4f4f4;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td:first-child,td.plan{white-space:nowrap}
#headline th{font-weight:normal;color:#444} #headline td.value{font-size:1.2em;font-weight:600}
.bad{color:#b00020} .node{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.answer{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;max-width:60ch}
#clients{font-size:.9em} .scroll{overflow-x:auto} figure{margin:.6em 0 1.2em} img{max-width:100%;height:auto}
figcaption{color:#666;font-size:.9em}
"""


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, an optional tooltip (exact figures), CSS class and column span."""

    text: str
    title: str = ""
    cls: str = ""
    span: int = 1

    def html(self, tag: str = "td") -> str:
        """The escaped cell."""
        title = f' title="{escape(self.title)}"' if self.title else ""
        cls = f' class="{escape(self.cls)}"' if self.cls else ""
        span = f' colspan="{self.span}"' if self.span > 1 else ""
        return f"<{tag}{cls}{span}{title}>{escape(self.text)}</{tag}>"


def num(text: str, title: str = "") -> Cell:
    """A right-aligned figure."""
    return Cell(text, title, "num")


def nbytes(n: float | None) -> Cell:
    """A byte count ('538 kB'), the exact count as its tooltip."""
    return num(size(n), "" if missing(n) else f"{int(n or 0):,} bytes")


def table(ident: str, head: Sequence[str], rows: Iterable[Sequence[Cell]], caption: str = "") -> str:
    """A table with a header row (none when ``head`` is empty); ``caption`` under it."""
    body = "".join("<tr>" + "".join(c.html() for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    thead = f"<thead><tr>{header}</tr></thead>" if head else ""
    return f'<div class="scroll"><table id="{ident}">{cap}{thead}<tbody>{body}</tbody></table></div>'


# --- headline ---------------------------------------------------------------------------------------

EVAL_ON = {"held-out": "the server's held-out split", "validation": "a validation slice of the training pool",
           "clients": "the nodes' own held-out slices (mean weighted by examples)"}


def _perplexity(scores: dict[str, Any]) -> float | None:
    if "perplexity" in scores:
        return float(scores["perplexity"])
    loss = scores.get("loss")
    if loss is None or missing(float(loss)):
        return None
    return math.exp(min(float(loss), 50.0))  # 50: past it, overflow


def headline(run: RunRecord) -> list[tuple[str, str, str]]:
    """(label, value, note) rows: eval before → after, traffic, time, clients' outcome, privacy."""
    s = run.summary
    before, after = s.get("initial_eval", {}), s.get("final_eval", {})
    where = EVAL_ON.get(str(run.config.get("eval-split", "held-out")), "the held-out split")
    rows = [("Eval loss", f"{fixed(before.get('loss'))} → {fixed(after.get('loss'))}",
             f"before training → after the last round, on {where}")]
    if run.classification:
        rows.append(("Accuracy", f"{percent(before.get('accuracy'))} → {percent(after.get('accuracy'))}",
                     "share of held-out examples labelled correctly"))
    else:
        rows.append(("Perplexity", f"{fixed(_perplexity(before), 2)} → {fixed(_perplexity(after), 2)}",
                     "exp(eval loss): lower is better"))
    rows += [_rounds_line(run), *_traffic_lines(s),
             ("Wall time", duration(s.get("wall_seconds")),
              f"clients trained at {fixed(s.get('seconds_per_step'), 2)} s per step, one thread each"),
             _clients_line(s)]
    if "epsilon" in s:
        epsilon = s["epsilon"]
        rows.append(("Privacy", "ε = ∞ (no noise)" if epsilon is None else f"ε = {epsilon:.2f}",
                     f"δ = {s.get('delta', 0):.2g}, {s.get('dp_mode', '')} differential privacy over "
                     f"{s.get('dp_rounds', 0)} rounds"))
    return rows


def _rounds_line(run: RunRecord) -> tuple[str, str, str]:
    s = run.summary
    planned = run.config.get("rounds")
    value = f"{s.get('rounds_completed', 0)}" + (f" of {planned}" if planned is not None else "")
    notes = []
    if s.get("uncommitted_rounds"):
        notes.append(f"{s['uncommitted_rounds']} not committed (the global model stayed as it was)")
    if s.get("stopped"):
        notes.append(f"stopped early: {s['stopped']}")
    return "Rounds completed", value, "; ".join(notes) or "every round committed"


def _traffic_lines(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for label, side, direction in (("Uploaded", "up", "clients → server"),
                                   ("Downloaded", "down", "server → clients")):
        total = int(s.get(f"bytes_{side}_total", 0))
        note = f"{direction}, all rounds, setup and evaluation included"
        if f"split_bytes_{side}_total" in s:
            note += f"; {megabytes(s[f'split_bytes_{side}_total'])} of it over the split channel"
        rows.append((label, megabytes(total), note))
    return rows


def _clients_line(s: dict[str, Any]) -> tuple[str, str, str]:
    by_check = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("rejected_by_check", {}).items()))
    problems = [f"{s.get('rejected_updates', 0)} rejected" + (f" ({by_check})" if by_check else ""),
                f"{s.get('failed_clients', 0)} failed", f"{s.get('over_budget_clients', 0)} over budget"]
    return "Clients", str(s.get("num_clients", DASH)), ", ".join(problems)


def headline_html(run: RunRecord) -> str:
    """The headline as a two-column table with notes."""
    rows = "".join(f'<tr><th>{escape(label)}</th><td class="value">{escape(value)}</td>'
                   f'<td class="note">{escape(note)}</td></tr>' for label, value, note in headline(run))
    return f'<table id="headline"><tbody>{rows}</tbody></table>'


# --- sample answers ----------------------------------------------------------------------------------

def samples_html(run: RunRecord) -> str:
    """A held-out question with the base model's and the fine-tuned model's greedy answers (generation)."""
    sample = run.summary.get("sample")
    if not sample:
        return ""
    rows = [[Cell(label), Cell(str(sample.get(key, "")) or "(empty answer)", cls="answer")]
            for label, key in (("Question", "prompt"), ("Reference answer", "reference"),
                               ("Base model (before)", "base"), ("Fine-tuned (after)", "fine_tuned"))]
    return ('<section id="samples-section"><h2>Sample answer</h2>'
            + table("samples", [], rows,
                    "A held-out question, greedy decoding; the base model answered before round 1.")
            + "</section>")


# --- per round ---------------------------------------------------------------------------------------

def rounds_rows(run: RunRecord) -> list[list[Cell]]:
    """One row per round: round 0 (the start), then each round trained or stopped before."""
    evals, trains, stops = run.by_round("evaluate"), run.by_round("train"), run.by_round("stopped")
    eps = any("epsilon" in e for e in trains.values())
    rows = []
    if 0 in evals:
        rows.append([Cell("0 (start)"), num(DASH), num(DASH), *_scores(run, evals[0]), num(DASH), num(DASH),
                     num(duration(evals[0].get("eval_seconds"))), Cell("before training"),
                     *([num(DASH)] if eps else [])])
    for r in sorted(set(trains) | set(stops)):
        if r in stops and r not in trains:
            rows.append([Cell(str(r)), *[num(DASH)] * 7, Cell(f"not run: {stops[r]['reason']}", cls="bad"),
                         *([num(DASH)] if eps else [])])
            continue
        t, e = trains[r], evals.get(r, {})
        up = t.get("bytes_up", 0) + t.get("split_bytes_up", 0)
        down = t.get("bytes_down", 0) + t.get("split_bytes_down", 0)
        outcome = (Cell("committed") if t.get("committed", True)
                   else Cell(f"not committed: {t.get('not_committed', '')}", cls="bad"))
        rows.append([Cell(str(r)), num(f"{t.get('accepted', 0)} of {t.get('sampled', 0)}"),
                     num(fixed(t.get("train_loss"))), *(_scores(run, e) if e else [num(DASH)] * 2),
                     nbytes(up), nbytes(down),
                     num(duration(t.get("round_seconds", 0.0) + e.get("eval_seconds", 0.0))), outcome,
                     *([num(_epsilon(t))] if eps else [])])
    return rows


def _scores(run: RunRecord, event: dict[str, Any]) -> list[Cell]:
    score = percent(event.get("accuracy")) if run.classification else fixed(_perplexity(event), 2)
    return [num(fixed(event.get("loss"))), num(score)]


def _epsilon(train: dict[str, Any]) -> str:
    if "epsilon" not in train:
        return DASH
    return "∞" if train["epsilon"] is None else f"{train['epsilon']:.2f}"


def rounds_html(run: RunRecord) -> str:
    """The per-round table."""
    trains = run.by_round("train")
    head = ["Round", "Clients accepted", "Train loss", "Eval loss",
            "Eval accuracy" if run.classification else "Eval perplexity", "Up", "Down", "Time", "Outcome"]
    if any("epsilon" in e for e in trains.values()):
        head.append("ε so far")
    resumed = "".join(f'<p class="note">Resumed after round {e["round"]} from {escape(str(e["checkpoint"]))}.'
                      "</p>" for e in run.of("resumed"))
    return ('<section><h2>Rounds</h2>' + resumed
            + table("rounds", head, rounds_rows(run),
                    "Train loss: the clients' mean as aggregated; eval: the global model after the round. "
                    "Up and down: the round's training exchange (a split method's channel included); "
                    "time: sending to aggregating, plus the evaluation.")
            + "</section>")


# --- per client --------------------------------------------------------------------------------------

CLIENT_KINDS = ("client", "rejected", "failed", "eval_failed")
CLIENT_HEAD = ("Round", "Node", "Outcome", "Memory plan", "Rank", "Examples", "Train loss", "Peak memory",
               "vs estimate", "Estimate", "Budget", "Up", "Down", "Time")


def clients_rows(run: RunRecord) -> list[list[Cell]]:
    """One row per client reply: accepted ones with their plan, loss, memory and bytes; rejected and failed
    ones (and evaluations left out) with their reason across the other columns."""
    clipped = {(e["round"], e["node_id"]): e["factor"] for e in run.of("clipped")}
    events = sorted((e for e in run.events if e.get("event") in CLIENT_KINDS), key=lambda e: int(e["round"]))
    rows = []
    for e in events:
        node = Cell(str(e.get("node_id", "")), cls="node")
        if e["event"] != "client":
            reason = {"rejected": f"rejected ({e.get('check', '')}): ", "failed": "failed: ",
                      "eval_failed": "evaluation left out: "}[e["event"]] + str(e.get("reason", ""))
            rows.append([Cell(str(e["round"])), node, Cell(reason, cls="bad", span=len(CLIENT_HEAD) - 2)])
            continue
        outcome = "accepted" + (f", clipped ×{clipped[(e['round'], e['node_id'])]:.2f}"
                                if (e["round"], e["node_id"]) in clipped else "")
        rows.append([Cell(str(e["round"])), node,
                     Cell(outcome + (", over budget" if e.get("over_budget") else ""),
                          cls="bad" if e.get("over_budget") else ""),
                     Cell(plan_text(e.get("plan", {})), cls="plan"),
                     num(str(e.get("rank", e.get("plan", {}).get("rank", DASH)))),
                     num(str(e.get("num_examples", DASH))), num(fixed(e.get("train_loss"))),
                     *_memory(e), nbytes(e.get("bytes_up")), nbytes(e.get("bytes_down")),
                     num(duration(e.get("train_seconds")))])
    return rows


def plan_text(plan: dict[str, Any]) -> str:
    """'batch 4 × 2 accum., 64 tokens, checkpointing': what a client's memory plan chose (micro-batch ×
    gradient accumulation steps, the sequence cap; its rank apart)."""
    parts = []
    if "micro_batch" in plan:
        parts.append(f"batch {plan['micro_batch']}" + (f" × {plan['grad_accum']} accum."
                                                       if plan.get("grad_accum", 1) != 1 else ""))
    if "seq_len" in plan:
        parts.append(f"{plan['seq_len']} tokens")
    if plan.get("checkpointing"):
        parts.append("checkpointing")
    known = {"micro_batch", "grad_accum", "seq_len", "checkpointing", "rank"}
    parts += [f"{k} {v}" for k, v in sorted(plan.items()) if k not in known]
    return ", ".join(parts) or DASH


def _memory(event: dict[str, Any]) -> list[Cell]:
    """Peak, its distance from the estimate, the estimate, and the budget with the share of it used."""
    peak, estimate = event.get("peak_mem_bytes"), event.get("estimate_bytes")
    budget = event.get("budget_bytes")
    versus = f"{(peak / estimate - 1):+.0%}" if peak and estimate else DASH
    used = f" ({peak / budget:.0%} used)" if peak and budget else ""
    return [nbytes(peak), num(versus), nbytes(estimate),
            num(f"{size(budget)}{used}" if budget else "none",
                f"{int(budget):,} bytes" if budget else "no budget declared")]


def clients_html(run: RunRecord) -> str:
    """The per-client table."""
    return ('<section><h2>Clients</h2>'
            + table("clients", CLIENT_HEAD, clients_rows(run),
                    "One row per reply. Peak: the client's measured peak above its runtime's baseline; "
                    "estimate: the planner's for the plan chosen; budget: what the client declared.")
            + "</section>")


# --- configuration -----------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "(empty)" if value == "" else str(value)


def _defaults() -> dict[str, Any]:
    """Every key's default (RunConfig's, which pyproject.toml's [tool.flwr.app.config] repeats)."""
    return dict(RunConfig().to_run_config())


def config_html(run: RunRecord) -> str:
    """The settings changed from their defaults, then every setting (folded)."""
    if not run.config:
        return ""
    defaults = _defaults()
    changed = [[Cell(k), Cell(_shown(v)), Cell(_shown(defaults[k]) if k in defaults else DASH)]
               for k, v in sorted(run.config.items()) if k not in defaults or defaults[k] != v]
    every = [[Cell(k), Cell(_shown(v))] for k, v in sorted(run.config.items())]
    return ('<section><h2>Configuration</h2>'
            + (table("config-changed", ["Setting", "This run", "Default"], changed,
                     "Only the settings this run changed; all of them below.") if changed
               else '<p class="note">Every setting at its default.</p>')
            + f"<details><summary>All {len(every)} settings (config.json)</summary>"
            + table("config-all", ["Setting", "Value"], every) + "</details></section>")


# --- the page ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    """One figure of the page: its PNG bytes and what it shows."""

    name: str
    png: bytes
    alt: str
    caption: str = ""

    def html(self) -> str:
        """An <img> holding the PNG as a data: URL (no file beside the page needed)."""
        data = base64.b64encode(self.png).decode("ascii")
        cap = f"<figcaption>{escape(self.caption)}</figcaption>" if self.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(self.alt)}" '
                f'data-name="{escape(self.name)}">{cap}</figure>')


def page(run: RunRecord, plots: Sequence[Plot]) -> str:
    """The whole report.html."""
    s = run.summary
    title = f"pollinate run {run.name}"
    sub = (f"{s.get('strategy', '?')} ({s.get('method', '?')}) on {s.get('model', '?')}, "
           f"{s.get('task', '?')}, {s.get('num_clients', '?')} clients")
    figures = "".join(p.html() for p in plots)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class='sub'>{escape(sub)}</p>"
            f"<section id='headline-section'>{headline_html(run)}</section>"
            + samples_html(run)
            + (f"<section id='plots'><h2>Plots</h2>{figures}</section>" if figures else "")
            + rounds_html(run) + clients_html(run) + config_html(run)
            + "<p class='note'>Written from this folder's summary.json, metrics.jsonl and config.json.</p>"
            "</body></html>\n")
