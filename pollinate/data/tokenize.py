"""Turn dataset rows into token ids, loss labels and padded batches.

Generation uses the tokenizer's chat template: one user turn holding the prompt, one assistant
turn holding the response. The loss covers the answer only: every prompt and template token is
labelled `IGNORE_INDEX`; the response tokens and the end-of-turn token after them keep their
ids (labels are aligned with ``input_ids``; the causal model shifts them itself).
Classification uses the plain tokenizer and one integer label per example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from pollinate.catalog import CLASSIFICATION, GENERATION, TASKS

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (PyTorch cross-entropy's default)."""

# One prompt token plus one answer token: the least that trains anything.
_MIN_GENERATION_LEN = 2

Example = dict[str, Any]


def encode_generation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_len: int
) -> dict[str, list[int]]:
    """Encode one (prompt, response) pair with the chat template, answer-only labels.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        A tokenizer with a chat template.
    prompt : str
        The user's message.
    response : str
        The assistant's answer to learn.
    max_len : int
        Most tokens kept (>= 2). Longer examples lose the answer's tail first; when the
        prompt alone fills ``max_len``, the prompt loses its head and one answer token stays.

    Returns
    -------
    dict[str, list[int]]
        ``input_ids``, ``attention_mask`` and ``labels`` (`IGNORE_INDEX` outside the answer),
        all of one length.
    """
    if max_len < _MIN_GENERATION_LEN:
        raise ValueError(
            f"max-length: {max_len!r} is too short for generation; allowed: an integer >= 2"
        )
    user = [{"role": "user", "content": prompt}]
    prompt_ids = _chat_ids(tokenizer, user, add_generation_prompt=True)
    full_ids = _chat_ids(
        tokenizer, [*user, {"role": "assistant", "content": response}], add_generation_prompt=False
    )
    # The prompt with its generation prompt is a prefix of the full chat for sane templates;
    # the common prefix also copes with templates that render the last user turn differently.
    cut = _common_prefix(prompt_ids, full_ids)
    head, answer = full_ids[:cut], _until_end_of_turn(tokenizer, full_ids[cut:])
    if not answer:
        raise ValueError(
            f"response: {response!r} encodes to no tokens; allowed: a non-empty answer"
        )
    keep_answer = min(len(answer), max(1, max_len - len(head)))
    head = head[len(head) - min(len(head), max_len - keep_answer) :]
    answer = answer[:keep_answer]
    return {
        "input_ids": head + answer,
        "attention_mask": [1] * (len(head) + len(answer)),
        "labels": [IGNORE_INDEX] * len(head) + answer,
    }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Encode a prompt for greedy generation: the user turn plus the assistant's opening.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        A tokenizer with a chat template.
    prompt : str
        The user's message.

    Returns
    -------
    list[int]
        Token ids ending where the model should start answering.
    """
    return _chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, text: str, label: int, max_len: int
) -> dict[str, list[int] | int]:
    """Encode one text for sequence classification.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        Any tokenizer (special tokens such as ``[CLS]`` are added as the model expects).
    text : str
        The text to classify.
    label : int
        The class index.
    max_len : int
        Most tokens kept, special tokens included; longer texts lose their tail.

    Returns
    -------
    dict[str, list[int] | int]
        ``input_ids`` and ``attention_mask`` (lists) and ``labels`` (an int).
    """
    encoded = tokenizer(text, truncation=True, max_length=max_len)
    input_ids = list(encoded["input_ids"])
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": int(label),
    }


def encode_dataset(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, task: str, max_len: int
) -> list[Example]:
    """Encode every row of a dataset from `pollinate.data.load_dataset`, in order.

    Parameters
    ----------
    ds : Dataset
        Columns ``prompt, response`` (generation) or ``text, label`` (classification).
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    task : str
        ``"generation"`` or ``"classification"``.
    max_len : int
        Most tokens per example.

    Returns
    -------
    list[dict]
        One encoded example per row (see `encode_generation`, `encode_classification`).
    """
    if task == GENERATION:
        pairs = zip(ds["prompt"], ds["response"], strict=True)
        return [encode_generation(tokenizer, p, r, max_len) for p, r in pairs]
    if task == CLASSIFICATION:
        rows = zip(ds["text"], ds["label"], strict=True)
        return [encode_classification(tokenizer, t, lab, max_len) for t, lab in rows]
    raise ValueError(f"task: {task!r} is not a task; allowed: {', '.join(TASKS)}")


def collate(examples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into one batch.

    Parameters
    ----------
    examples : Sequence[Mapping[str, Any]]
        Encoded examples, all generation or all classification.
    pad_id : int
        Token id for padding ``input_ids`` (the mask marks it as padding).

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids`` and ``attention_mask`` LongTensors [B, T], T the longest example;
        ``labels`` [B, T] padded with `IGNORE_INDEX` (generation) or [B] (classification).
    """
    if not examples:
        raise ValueError("examples: the batch is empty; allowed: at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": _pad([e["input_ids"] for e in examples], width, pad_id),  # [B, T]
        "attention_mask": _pad([e["attention_mask"] for e in examples], width, 0),  # [B, T]
    }
    labels = [e["labels"] for e in examples]
    if all(isinstance(label, int) for label in labels):
        batch["labels"] = torch.tensor(labels, dtype=torch.long)  # [B]
    else:
        batch["labels"] = _pad(labels, width, IGNORE_INDEX)  # [B, T]
    return batch


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _chat_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template (no extra special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"model: the tokenizer of {name!r} has no chat template; allowed for generation: "
            "an instruct/chat model (for example SmolLM2-135M-Instruct)"
        )
    encoded = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        sanitize_control_tokens=True,  # "<|im_end|>" typed in the data stays plain text
    )
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    ids: Any = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return [int(i) for i in ids]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _until_end_of_turn(tokenizer: PreTrainedTokenizerBase, answer: list[int]) -> list[int]:
    """Drop what the template writes after the answer's end-of-turn token (e.g. a newline).

    The end-of-turn token is the tokenizer's EOS (``<|im_end|>`` for ChatML models). Without
    one in the answer, the whole rendered answer is kept.
    """
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and eos in answer:
        return answer[: len(answer) - answer[::-1].index(eos)]
    return answer
