"""``pollinate merge``: a checkpoint as a plain Hugging Face model folder, loaded back with transformers'
Auto classes and compared with the model pollinate itself holds.

Fast rows: the edge tests' fabricated checkpoints against their peft reference, and the server trainee
of every method with a merged update and a moved trainable part, saved as the round loop saves it,
against that trainee's own model. Slow rows: real simulations (FLoRA on tiny-llama, Fed-SB classifying
with MiniLM) against the server's global model that evaluated their last round.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from edge_helpers import load_reference
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from pollinate import models
from pollinate.cli import main
from pollinate.config import RunConfig
from pollinate.edge.merge import MERGE_FILE, merge_checkpoint
from pollinate.files import UPDATES_FILE
from pollinate.strategies import method_for

TOLERANCE = 1e-5  # fp32: merging W + s·B·A rounds each weight once; measured gaps are below 1e-6
TEXTS = ["Hi", "What is the capital of France?", "Bees carry pollen from flower to flower in spring."]


def _auto(folder: Path, task: str) -> torch.nn.Module:
    auto = AutoModelForCausalLM if task == "generation" else AutoModelForSequenceClassification
    model: torch.nn.Module = auto.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def _gap(merged: torch.nn.Module, reference: torch.nn.Module, folder: Path, task: str) -> float:
    """Max |logit difference| of two models on TEXTS, padded into one batch (real positions only)."""
    batch = AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = reference.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "generation":  # (B, S, V): the positions of real tokens
        real = batch["attention_mask"].bool()
        got, want = got[real], want[real]
    return float((got - want).abs().max())


def _one_line_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pollinate: error: "), err
    return err


# --------------------------------------------------------------------------------------------------
# Fabricated checkpoints (edge_helpers): the peft reference with its base delta
# --------------------------------------------------------------------------------------------------


def test_a_checkpoint_with_a_base_delta_merges_to_its_reference(gen_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(gen_run), "--out", str(out)]) == 0  # the run folder: its LATEST, round 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            MERGE_FILE} <= {p.name for p in out.iterdir()}
    info = json.loads((out / MERGE_FILE).read_text())
    assert (info["round"], info["method"], info["base_delta"]) == (1, "lora", UPDATES_FILE)
    assert info["run"] == str(gen_run.resolve()) and info["auto_class"] == "AutoModelForCausalLM"
    assert set(info["sha256"]) == {"manifest.json", "adapter_config.json", "adapter_model.safetensors",
                                   UPDATES_FILE}
    reference = load_reference(gen_run / "checkpoints" / "round-0001")
    assert _gap(_auto(out, "generation"), reference, out, "generation") <= TOLERANCE


def test_a_classifier_merges_with_its_head_and_label_names(cls_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    info = merge_checkpoint(cls_run / "checkpoints" / "round-0001", out)
    model = _auto(out, "classification")
    assert sorted(model.config.id2label.values()) == ["angry", "happy", "sad"]  # the run's dataset's
    assert [model.config.id2label[i] for i in range(3)] == info["labels"]
    reference = load_reference(cls_run / "checkpoints" / "round-0001", model="tiny-bert",
                               task="classification")
    assert _gap(model, reference, out, "classification") <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# Every method: its server trainee, saved as the round loop saves it
# --------------------------------------------------------------------------------------------------

ZO_STEP = {"fedkseed.lr": 0.05}  # a replayed seed sum moves the weights by lr·sum·z: visibly, at this lr
METHODS = {"flora": {}, "fedsb": {}, "fedkseed": ZO_STEP,
           "fedkseed-full": {"fedkseed.params": "full", **ZO_STEP}}
BASES = [("tiny-llama", "generation"), ("tiny-bert", "classification")]


def _saved_server(root: Path, row: str, model: str, task: str) -> torch.nn.Module:
    """A run folder whose round-1 checkpoint is a server trainee that merged one update and whose
    trainable tensors moved; returns the trainee's model."""
    strategy = row.removesuffix("-full")
    cfg = RunConfig.from_run_config({"model": model, "task": task, "strategy": strategy, "num-clients": 2,
                                     "eval-examples": 8, "fedsb.rank": 4, "fedsb.init-examples": 4,
                                     **METHODS[row]})
    method = method_for(cfg)
    server = method.server()
    update = method.sample_update(server, 1)
    server.merge(update)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # as training leaves them (FedKSeed's move by the merged seed sums alone)
        for param in server.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    folder = root / "checkpoints" / "round-0001"
    folder.mkdir(parents=True)
    server.save(folder)
    save_file({k: v.contiguous() for k, v in update.to_flat().items()}, str(folder / UPDATES_FILE))
    (folder / "manifest.json").write_text(json.dumps(
        {"method": method.name, "strategy": strategy, "export": dataclasses.asdict(method.export_view())}))
    (root / "config.json").write_text(json.dumps(cfg.to_run_config()))
    (root / "LATEST").write_text("checkpoints/round-0001\n")
    return server.model


@pytest.mark.parametrize(("model", "task"), BASES, ids=[b[0] for b in BASES])
@pytest.mark.parametrize("row", list(METHODS))
def test_every_method_merges_to_its_server_model(row: str, model: str, task: str, tmp_path: Path) -> None:
    server_model = _saved_server(tmp_path / "run", row, model, task)
    out = tmp_path / "merged"
    merge_checkpoint(tmp_path / "run", out)
    merged = _auto(out, task)
    assert _gap(merged, server_model, out, task) <= TOLERANCE
    base, _ = models.load_model(model, task, num_labels=merged.config.num_labels)
    assert _gap(merged, base, out, task) > 100 * TOLERANCE  # something was merged


# --------------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------


def test_bad_sources_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    err = _one_line_error(capsys, ["merge", str(tmp_path / "missing"), "--out", str(out)])
    assert "is neither a run folder" in err
    (tmp_path / "plain").mkdir()
    assert "is neither a run folder" in _one_line_error(capsys, ["merge", str(tmp_path / "plain"),
                                                                 "--out", str(out)])
    assert not out.exists()


def test_a_non_empty_out_is_never_overwritten(gen_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "exists and is not an empty folder" in _one_line_error(capsys, ["merge", str(gen_run), "--out",
                                                                           str(out)])
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_checkpoint_changed_after_it_was_written_is_refused(gen_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    folder = run / "checkpoints" / "round-0001"
    written = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**written, "files": {UPDATES_FILE: "0" * 64}}))
    err = _one_line_error(capsys, ["merge", str(run), "--out", str(tmp_path / "out")])
    assert "does not match its SHA-256" in err and not (tmp_path / "out").exists()
    (folder / UPDATES_FILE).unlink()  # without it the merged model would silently lack the base deltas
    err = _one_line_error(capsys, ["merge", str(run), "--out", str(tmp_path / "out")])
    assert f"{UPDATES_FILE}' is missing" in err and not (tmp_path / "out").exists()


def test_a_method_without_a_merged_form_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    folder = run / "checkpoints" / "round-0001"
    folder.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "tiny-llama", "task": "generation"}))
    (run / "LATEST").write_text("checkpoints/round-0001\n")
    (folder / "manifest.json").write_text(json.dumps(  # as SFPrompt's export view says
        {"method": "sfprompt", "export": {"unsupported": "a soft prompt and a split model"}}))
    err = _one_line_error(capsys, ["merge", str(run), "--out", str(tmp_path / "out")])
    assert "cannot be merged into a plain Hugging Face model: method 'sfprompt'" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Real simulations (slow): against the server's global model that evaluated the last round
# --------------------------------------------------------------------------------------------------

SIMULATIONS = {
    "flora": ["model=tiny-llama", "strategy=flora", "lora.ranks=4,2", "num-clients=2", "rounds=2",
              "local-steps=2", "lr=0.01", "eval-examples=4"],
    "fedsb": ["model=minilm-l6", "task=classification", "strategy=fedsb", "num-clients=2", "rounds=1",
              "local-steps=2", "batch-size=4", "eval-examples=8", "fedsb.rank=4", "fedsb.init-examples=4"],
}


@pytest.fixture(scope="module", params=list(SIMULATIONS))
def simulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A simulated run, its merged folder and the server's own global model, caught as it is built."""
    from pollinate.server import simulation

    root = tmp_path_factory.mktemp(request.param)
    prepare, built = simulation.prepare, []

    def keep(cfg: RunConfig) -> Any:
        built.append(prepare(cfg))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulation, "prepare", keep)
        assert main(["simulate", "--run-dir", str(root / "run"), "--set", *SIMULATIONS[request.param]]) == 0
    info = merge_checkpoint(root / "run", root / "merged")
    return {"strategy": request.param, "run": root / "run", "out": root / "merged", "info": info,
            "server": built[0]}


@pytest.mark.slow
def test_a_simulated_run_merges_to_the_servers_global_model(simulated: dict[str, Any]) -> None:
    out, info, server = simulated["out"], simulated["info"], simulated["server"]
    task = info["task"]
    merged = _auto(out, task)
    assert _gap(merged, server.model, out, task) <= TOLERANCE
    folder = Path(info["checkpoint"])
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert info["sha256"]["adapter_model.safetensors"] == files["adapter_model.safetensors"]
    assert (info["strategy"], folder.name) == (simulated["strategy"], f"round-{server.cfg.rounds:04d}")
    if task == "classification":
        assert list(merged.config.id2label.values()) == server.heldout.features["label"].names


@pytest.mark.slow
def test_plain_peft_loads_only_part_of_what_needs_merge(simulated: dict[str, Any]) -> None:
    """A plain peft load of the checkpoint on the base: FLoRA's misses the merged base deltas (so the
    README sends it to ``pollinate merge``); Fed-SB's is the whole model (a plain peft adapter)."""
    out, info = simulated["out"], simulated["info"]
    base, _ = models.load_model(info["model"], info["task"], num_labels=len(info.get("labels", [0, 1])))
    plain = PeftModel.from_pretrained(base, info["checkpoint"])
    gap = _gap(_auto(out, info["task"]), plain, out, info["task"])
    if info["base_delta"] is not None:
        assert gap > 1e-3
    else:
        assert gap <= TOLERANCE
