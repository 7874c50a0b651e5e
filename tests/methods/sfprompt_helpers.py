"""What SFPrompt's tests share: small local datasets and tiny models deep enough to cut.

The offline tiny models have two blocks, too few for a head, a body and a tail; :func:`deep_tiny` makes
them four (head 1, body 2, tail 1) for a test. The built-in datasets give shares of thousands of
examples, and SFPrompt's local-loss phase passes over every one each round; these tests train on a few
dozen rows written to a file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from pollinate import models

WORDS = ("good", "bad", "great", "awful", "fine", "boring", "lovely", "dull", "superb", "terrible")


def small_dataset(folder: Path, task: str, rows: int = 40) -> Path:
    """A .jsonl file of ``rows`` examples: texts of 8 to 12 words with a 2-class label, or
    prompt/response pairs."""
    rng = random.Random(0)
    path = folder / f"small-{task}.jsonl"
    with path.open("w") as out:
        for i in range(rows):
            label = i % 2
            text = " ".join(rng.choice(WORDS[label::2]) for _ in range(rng.randint(8, 12)))
            row: dict[str, Any] = ({"text": text, "label": label} if task == "classification"
                                   else {"prompt": f"Say something {WORDS[label]}.", "response": text})
            out.write(json.dumps(row) + "\n")
    return path


def deep_tiny(monkeypatch: pytest.MonkeyPatch, layers: int = 4) -> None:
    """Make the tiny models ``layers`` blocks deep for the rest of the test."""
    original = models._tiny_config

    def deeper(name: str, tokenizer: Any, num_labels: int) -> Any:
        config = original(name, tokenizer, num_labels)
        config.num_hidden_layers = layers
        return config

    monkeypatch.setattr(models, "_tiny_config", deeper)
