"""What a run trains and evaluates on: the held-out split, the validation slice, the shares."""

from pathlib import Path

import pytest

from pollinate import workload
from pollinate.config import RunConfig


def _rows(ds) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {(r["prompt"], r["response"]) for r in ds}


def test_the_validation_slice_is_held_by_no_client_and_is_not_the_held_out_split() -> None:
    settings = {"model": "tiny-llama", "strategy": "fedsb", "num-clients": 3, "eval-examples": 8}
    held_out_run = RunConfig.from_run_config(settings)
    tuning_run = RunConfig.from_run_config({**settings, "eval-split": "validation"})
    pool, heldout = workload.splits(held_out_run)
    train, validation = workload.splits(tuning_run)
    assert len(validation) == len(heldout) == 8 and len(train) == len(pool) - 8
    assert _rows(validation) <= _rows(pool) and not _rows(validation) & _rows(heldout)
    assert not any(_rows(validation) & _rows(share) for share in workload.shares(tuning_run))
    calibration, _ = workload.pools(tuning_run, 10)  # Fed-SB's slice is drawn from what is left
    assert not _rows(calibration) & _rows(validation)


def test_an_unknown_eval_split_is_one_line() -> None:
    message = r"^eval-split: 'test' is not allowed; allowed: held-out, validation, clients$"
    with pytest.raises(ValueError, match=message):
        RunConfig.from_run_config({"eval-split": "test"})


def test_eval_dataset_is_the_servers_own_file(tmp_path: Path) -> None:
    """``eval-dataset``: the server evaluates every row of its own file; the dataset is all training."""
    from pollinate.data import load_dataset

    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(5)))
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "eval-dataset": str(data)})
    train, heldout = workload.splits(cfg)
    assert heldout["prompt"] == [f"q{i}" for i in range(5)]
    assert len(train) == len(load_dataset(cfg.dataset_name, cfg.task))
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\nlovely,positive\ndull,0\n")
    bert = {"model": "tiny-bert", "task": "classification", "eval-dataset": str(reviews)}
    cls = RunConfig.from_run_config(bert)
    _, heldout = workload.splits(cls)
    assert heldout.features["label"].names == ["negative", "positive"] and heldout["label"] == [1, 0]
    reviews.write_text("text,label\nmeh,neutral\n")
    odd = RunConfig.from_run_config({**bert, "seed": 1})  # another configuration: not the cached split
    with pytest.raises(ValueError, match=r"^eval-dataset: .* has the label 'neutral'"):
        workload.splits(odd)
