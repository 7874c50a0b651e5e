"""Tests for pollinate.data.datasets: built-ins, local files and input errors."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pytest

from pollinate.data import (
    BUILTIN_DATASETS,
    CLASSIFICATION,
    GENERATION,
    Fields,
    default_dataset,
    load_dataset,
)

GENERATION_COLUMNS = ["prompt", "response", "category"]
CLASSIFICATION_COLUMNS = ["text", "label", "category"]


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, object]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _write_csv(path: Path, rows: list[dict[str, str]]) -> str:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _assert_classification_layout(ds: datasets.Dataset) -> list[str]:
    assert ds.column_names == CLASSIFICATION_COLUMNS
    label = ds.features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names == sorted(label.names) or all(n.lstrip("-").isdigit() for n in label.names)
    assert ds["category"] == [label.names[i] for i in ds["label"]]
    return list(label.names)


# --------------------------------------------------------------------------- built-ins


def test_builtin_table_and_defaults() -> None:
    assert set(BUILTIN_DATASETS.values()) == {GENERATION, CLASSIFICATION}
    assert default_dataset(GENERATION) == "chatterbot"
    assert default_dataset(CLASSIFICATION) == "rotten-tomatoes"
    assert BUILTIN_DATASETS[default_dataset(GENERATION)] == GENERATION


def test_chatterbot_pairs_and_categories() -> None:
    ds = load_dataset("chatterbot", GENERATION)
    assert ds.column_names == GENERATION_COLUMNS
    # 2,144 pairs in the files, 1,015 after dropping exact duplicates (tech_support repeats).
    assert 900 <= len(ds) <= 2200
    pairs = list(zip(ds["prompt"], ds["response"], strict=True))
    assert len(set(pairs)) == len(pairs)
    assert all(p and r for p, r in pairs)
    categories = Counter(ds["category"])
    assert len(categories) > 15
    assert all(categories.values())
    assert ds[0] == {
        "prompt": "What is AI?",
        "response": "Artificial Intelligence is the branch of engineering and science devoted "
        "to constructing machines that think.",
        "category": "AI",
    }


def test_chatterbot_long_conversations_give_later_pairs() -> None:
    ds = load_dataset("chatterbot", GENERATION)
    # computers.yml holds conversations of up to 6 turns: turn 2 -> turn 3 is a pair too.
    computers = ds.filter(lambda row: row["category"] == "computers")
    assert len(computers) > 10


def test_rotten_tomatoes() -> None:
    ds = load_dataset("rotten-tomatoes", CLASSIFICATION)
    assert len(ds) == 8530
    assert _assert_classification_layout(ds) == ["negative", "positive"]
    assert Counter(ds["label"]) == {0: 4265, 1: 4265}
    assert all(isinstance(t, str) and t for t in ds["text"][:100])


def test_imdb() -> None:
    ds = load_dataset("imdb", CLASSIFICATION)
    assert len(ds) == 25000
    assert _assert_classification_layout(ds) == ["negative", "positive"]
    assert "<br />" not in ds[0]["text"]


def test_bbc_news() -> None:
    ds = load_dataset("bbc-news", CLASSIFICATION)
    assert len(ds) == 2225
    names = _assert_classification_layout(ds)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert min(Counter(ds["label"]).values()) > 300
    # sports/199.txt is Latin-1 encoded; it must still load, with its pound sign.
    assert any("£15.8m" in text for text in ds["text"])


def test_builtins_are_cached_and_deterministic() -> None:
    first = load_dataset("rotten-tomatoes", CLASSIFICATION)
    assert load_dataset("rotten-tomatoes", CLASSIFICATION) is first
    assert load_dataset("bbc-news", CLASSIFICATION)[0]["category"] == "business"


# --------------------------------------------------------------------------- local files


def test_local_jsonl_generation_with_custom_fields(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"q": "Hi?", "a": "Hello.", "topic": "greet"},
        {"q": "Bye?", "a": "Goodbye.", "topic": "greet"},
        {"q": "", "a": "skipped: empty prompt", "topic": "x"},
        {"q": "2+2?", "a": 4, "topic": "math"},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = load_dataset(path, GENERATION, Fields(prompt="q", response="a", category="topic"))
    assert ds.column_names == GENERATION_COLUMNS
    assert ds["prompt"] == ["Hi?", "Bye?", "2+2?"]
    assert ds["response"] == ["Hello.", "Goodbye.", "4"]
    assert ds["category"] == ["greet", "greet", "math"]


def test_local_csv_generation_without_category(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "chat.csv", [{"prompt": "Hi?", "response": "Hello."}])
    ds = load_dataset(path, GENERATION)
    assert ds[0] == {"prompt": "Hi?", "response": "Hello.", "category": ""}


def test_local_csv_classification_with_custom_fields(tmp_path: Path) -> None:
    rows = [{"body": f"text {i}", "y": ["spam", "ham", "eggs"][i % 3]} for i in range(9)]
    path = _write_csv(tmp_path / "mail.csv", rows)
    ds = load_dataset(path, CLASSIFICATION, Fields(text="body", label="y"))
    assert _assert_classification_layout(ds) == ["eggs", "ham", "spam"]
    assert ds["text"] == [f"text {i}" for i in range(9)]
    assert ds["category"][:3] == ["spam", "ham", "eggs"]
    assert ds["label"][:3] == [2, 1, 0]


def test_local_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 11} for i in range(22)]
    ds = load_dataset(_write_jsonl(tmp_path / "d.jsonl", rows), CLASSIFICATION)
    assert ds.features["label"].names == [str(i) for i in range(11)]
    assert ds["label"] == [i % 11 for i in range(22)]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["foo", "missing.jsonl", "missing.csv"])
def test_unknown_dataset_or_missing_file(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^dataset: .*built-ins: chatterbot, rotten-tomatoes"):
        load_dataset(str(tmp_path / name) if "." in name else name, GENERATION)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^dataset: .*\.jsonl/\.csv"):
        load_dataset(str(path), CLASSIFICATION)


@pytest.mark.parametrize(
    ("task", "fields", "key"),
    [
        (GENERATION, Fields(prompt="question"), "data.prompt-field"),
        (GENERATION, Fields(response="answer"), "data.response-field"),
        (CLASSIFICATION, Fields(text="body"), "data.text-field"),
        (CLASSIFICATION, Fields(label="y"), "data.label-field"),
    ],
)
def test_missing_column_names_the_key(tmp_path: Path, task: str, fields: Fields, key: str) -> None:
    row = {"prompt": "p", "response": "r", "text": "t", "label": "a"}
    path = _write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(ValueError, match=rf"^{key}: .*columns: label, prompt, response, text$"):
        load_dataset(path, task, fields)


def test_missing_column_in_csv(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"^data.prompt-field: 'prompt' .*answer, question"):
        load_dataset(path, GENERATION)


def test_file_without_usable_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": " ", "response": "r"}])
    with pytest.raises(ValueError, match=r"^dataset: .*no row"):
        load_dataset(path, GENERATION)


@pytest.mark.parametrize(
    ("file", "content", "task", "fields", "problem"),
    [
        ("x.jsonl", b"", GENERATION, Fields(), "is empty"),
        ("x.csv", b"", GENERATION, Fields(), "is empty"),
        ("x.jsonl", b"  \n\n\t\r\n", GENERATION, Fields(), "is empty"),
        ("x.csv", b" \n \n", GENERATION, Fields(), "is empty"),
        ("x.csv", b"\xef\xbb\xbf\n", GENERATION, Fields(), "is empty"),  # only a byte-order mark
        ("x.csv", b"body,y\n", CLASSIFICATION, Fields(text="body", label="y"),
         "has only a header row (body, y)"),
        ("x.csv", b"question,answer\r\n\r\n", GENERATION, Fields(prompt="q", response="a"),
         "has only a header row (question, answer)"),
    ],
)
def test_empty_file_names_the_columns_it_needs(
    tmp_path: Path, file: str, content: bytes, task: str, fields: Fields, problem: str
) -> None:
    path = tmp_path / file
    path.write_bytes(content)
    needed = (
        f"{fields.prompt}, {fields.response}" if task == GENERATION else f"{fields.text}, {fields.label}"
    )
    message = rf"{problem}; it needs at least one example with columns {needed}"
    with pytest.raises(ValueError, match=rf"^dataset: {re.escape(repr(str(path)))} {re.escape(message)}$"):
        load_dataset(str(path), task, fields)


@pytest.mark.parametrize(
    ("file", "content", "byte", "position"),
    [
        ("x.jsonl", '{"prompt": "Café", "response": "r"}\n'.encode("latin-1"), 0xE9, 15),
        ("x.csv", b"prompt,response\nHi,\xf4\n", 0xF4, 19),
        ("x.csv", "prompt,response\nHi,there\n".encode("utf-16"), 0xFF, 0),  # Excel "Unicode text"
        ("x.jsonl", b'{"prompt": "caf\xc3', 0xC3, 15),  # truncated in the middle of a character
    ],
)
def test_file_that_is_not_utf8(
    tmp_path: Path, file: str, content: bytes, byte: int, position: int
) -> None:
    path = tmp_path / file
    path.write_bytes(content)
    message = f"is not UTF-8 text (byte 0x{byte:02x} at position {position}); save it as UTF-8"
    with pytest.raises(ValueError, match=rf"^dataset: {re.escape(repr(str(path)))} {re.escape(message)}$"):
        load_dataset(str(path), GENERATION)


def test_utf8_with_byte_order_mark_and_windows_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes("prompt,response\r\nHi?,Héllo.\r\n".encode("utf-8-sig"))
    assert load_dataset(str(path), GENERATION)[0] == {"prompt": "Hi?", "response": "Héllo.", "category": ""}
    path = tmp_path / "x.jsonl"
    # A raw U+2028 inside a JSON string is valid JSON and no line end.
    path.write_bytes('\ufeff{"prompt": "p", "response": "r\u2028s"}\r\n\r\n'.encode())
    assert load_dataset(str(path), GENERATION)["response"] == ["r\u2028s"]


def test_bad_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^dataset: .*line 2"):
        load_dataset(str(path), GENERATION)


@pytest.mark.parametrize(
    ("name", "task", "others"),
    [
        ("chatterbot", CLASSIFICATION, "rotten-tomatoes, imdb, bbc-news"),
        ("imdb", GENERATION, "chatterbot"),
    ],
)
def test_builtin_of_the_other_task(name: str, task: str, others: str) -> None:
    with pytest.raises(ValueError, match=rf"^dataset: '{name}' .*{task} built-ins: {others}"):
        load_dataset(name, task)


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"^task: 'regression' .*generation, classification"):
        load_dataset("chatterbot", "regression")
    with pytest.raises(ValueError, match=r"^task: "):
        default_dataset("regression")
