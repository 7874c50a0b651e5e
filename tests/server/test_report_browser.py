"""A real run's report.html in headless Chromium, copied alone into an empty folder: what a person sees.

A small script added to the copy writes what the browser rendered (the text, each table's cells, each
image's decoded size) into the page before Chromium dumps its DOM. The plots' tick formatting is tested on
the figures themselves (tests/server/test_report.py), not read off the pixels.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pollinate.server.report.units import duration

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if (found := shutil.which(name))), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (chromium, chromium-browser): apt-get install chromium")

PROBE = """<script>
window.addEventListener("load", () => {
  const cells = t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  const section = document.getElementById("samples-section");
  const probe = {
    text: document.body.innerText,
    samples: section ? section.innerText : "",
    tables: Object.fromEntries([...document.querySelectorAll("table[id]")].map(t => [t.id, cells(t)])),
    images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth,
                                            shown: i.getBoundingClientRect().width})),
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def seen(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What Chromium rendered of the run's report.html, opened from a folder holding nothing else."""
    folder = tmp_path_factory.mktemp("elsewhere")
    page = folder / "report.html"
    page.write_text((tiny_run / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    assert CHROMIUM is not None
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={folder / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"Chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return dict(json.loads(html.unescape(found.group(1))))


def test_the_headline_shows_summary_json(seen: dict[str, Any], tiny_run: Path) -> None:
    s = json.loads((tiny_run / "summary.json").read_text())
    head = {row[0]: row[1] for row in seen["tables"]["headline"]}
    assert head["Eval loss"] == f"{s['initial_eval']['loss']:.3f} → {s['final_eval']['loss']:.3f}"
    assert head["Perplexity"] == (f"{s['initial_eval']['perplexity']:.2f} → "
                                  f"{s['final_eval']['perplexity']:.2f}")
    assert math.isclose(s["final_eval"]["perplexity"], math.exp(s["final_eval"]["loss"]), rel_tol=1e-6)
    assert s["bytes_up_total"] < 10**7 and s["bytes_down_total"] < 10**7  # the MB figure has 2 decimals
    assert head["Uploaded"] == f"{s['bytes_up_total'] / 1e6:.2f} MB"
    assert head["Downloaded"] == f"{s['bytes_down_total'] / 1e6:.2f} MB"
    assert head["Wall time"] == duration(s["wall_seconds"])
    assert head["Rounds completed"] == "2 of 2" and head["Clients"] == "3"


def test_one_row_per_round_and_per_client(seen: dict[str, Any], tiny_run: Path) -> None:
    events = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    rounds = seen["tables"]["rounds"][1:]
    assert [r[0] for r in rounds] == ["0 (start)", "1", "2"]
    assert [r[-1] for r in rounds[1:]] == ["committed", "committed"]
    clients = seen["tables"]["clients"][1:]
    expected = [(str(e["round"]), str(e["node_id"])) for e in events if e["event"] == "client"]
    assert [(r[0], r[1]) for r in clients] == expected and len(expected) == 6
    assert all(r[2] == "accepted" and r[10] == "none" for r in clients)  # no budget set in this run


def test_it_reads_as_text_not_json(seen: dict[str, Any], tiny_run: Path) -> None:
    text = seen["text"].replace(seen["samples"], "")  # the tiny model's answers may hold anything
    assert "{" not in text and "}" not in text and "null" not in text
    figures = " ".join(c for t in ("headline", "rounds", "clients") for row in seen["tables"][t] for c in row)
    assert not re.search(r"\de[+-]?\d", figures), figures  # no 1e7, 3.2e-05
    sample = json.loads((tiny_run / "summary.json").read_text())["sample"]
    assert sample["prompt"] in seen["samples"] and "Fine-tuned (after)" in seen["samples"]


def test_the_plots_load_from_the_page_alone(seen: dict[str, Any]) -> None:
    images = seen["images"]
    assert len(images) == 3
    assert all(i["complete"] and i["width"] > 100 and i["shown"] > 100 for i in images), images
