"""SFPrompt as a method and a strategy (../shared/docs/algorithms.md, "SFPrompt"): a client trains against a
real body service over mutual TLS, exactly as in process; the local phase sends nothing; the bytes per
batch are 4·b·S·d per tensor; the body never changes; a simulation runs; bad settings get one line.

The models: minilm-l6 (BERT, six blocks) and tiny-llama made four blocks deep, on a few dozen rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sfprompt_helpers import deep_tiny, small_dataset

from pollinate import workload
from pollinate.config import RunConfig
from pollinate.data import collate, encode_dataset
from pollinate.methods.sfprompt.method import SfPromptMethod, SplitClient, SplitServer
from pollinate.methods.sfprompt.split import BodyCompute
from pollinate.strategies.sfprompt import SfPrompt
from pollinate.training import greedy_generate

CASES = [("minilm-l6", "classification"), ("tiny-llama", "generation")]
PROMPT, SEQ, BATCH = 4, 8, 4


class CountingBody:
    """The server's body, counting the calls the service makes of it."""

    def __init__(self, body: BodyCompute) -> None:
        self.body, self.hidden_size, self.blocks = body, body.hidden_size, body.blocks
        self.calls = 0

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.body.forward(h, mask)

    def backward(self, h: torch.Tensor, grad_z: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.body.backward(h, grad_z, mask)


class Run:
    """A strategy with its body service running, the server's trainee, and a client configuration."""

    def __init__(self, cfg: RunConfig) -> None:
        self.strategy = SfPrompt(cfg)
        self.server: SplitServer = self.strategy.method.server()
        self.counting = CountingBody(self.server.body)
        self.server.body = self.counting  # type: ignore[assignment]  # what the service will call
        self.strategy.start_body(self.server)
        self.client_cfg = RunConfig.from_run_config({**cfg.to_run_config(), **self.strategy.service_config()})
        self.method = SfPromptMethod(self.client_cfg)
        self.plan = self.method.candidates(self.method.dims(), 0)[0]

    def client(self) -> SplitClient:
        client = self.method.client(self.plan)
        client.load(self.server.upload(), seed=0)
        return client

    def examples(self, client: SplitClient) -> list[dict[str, Any]]:
        share = workload.shares(self.client_cfg)[0]
        return encode_dataset(share, client.tokenizer, self.client_cfg.task, self.plan.seq_len)


def _cfg(model: str, task: str, data: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_run_config({
        "model": model, "task": task, "strategy": "sfprompt", "dataset": str(data), "partitioner": "iid",
        "num-clients": 2, "eval-examples": 8, "local-steps": 2, "batch-size": BATCH, "max-seq-len": SEQ,
        "sfprompt.prompt-tokens": PROMPT, **extra})


@pytest.fixture(params=CASES, ids=[m for m, _ in CASES])
def run(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Run]:
    model, task = request.param
    deep_tiny(monkeypatch)
    started = Run(_cfg(model, task, small_dataset(tmp_path, task)))
    yield started
    started.strategy.teardown()


def _body_state(server: SplitServer) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, b in enumerate(server.body.blocks)
            for n, p in b.named_parameters()}


def test_training_over_the_service_equals_the_steps_in_process(run: Run) -> None:
    """Prompt and tail after a round over mutual TLS equal, bit for bit, the same local phase, pruning
    and split steps done in process with split_step and the server's BodyCompute."""
    remote, local = run.client(), run.client()
    examples = run.examples(remote)
    spec = run.method.spec(run.plan)
    body_before = _body_state(run.server)
    result = remote.train(examples, spec, seed=5)

    optimizer = local.optimizer(spec)
    local.local_phase(examples, spec, optimizer, 5)
    kept = local.prune(examples, spec.micro_batch)
    loss, seen, _ = local.split_phase([examples[i] for i in kept], spec, optimizer, run.counting.body, 5)

    sent, mine = remote.upload(), local.upload()
    assert sent.keys() == mine.keys()
    for key in sent:
        torch.testing.assert_close(sent[key], mine[key], rtol=0, atol=0)
    assert result.loss == loss and result.examples == seen == spec.steps * spec.batch_size
    assert result.figures["kept-examples"] == len(kept) == len(examples) // 2  # γ = 0.5
    after = _body_state(run.server)  # the body is bit-identical after two rounds' worth of steps
    assert all(torch.equal(body_before[k], after[k]) for k in body_before)
    assert run.strategy.service.sessions() == []  # the client closed its session


def test_the_local_phase_sends_nothing(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    client = run.client()
    seen_by_body: list[int] = []
    phase = client.local_phase

    def watched(*args: Any, **kwargs: Any) -> float:
        loss = phase(*args, **kwargs)
        seen_by_body.append(run.counting.calls)
        assert run.strategy.service.sessions() == []
        return loss

    monkeypatch.setattr(client, "local_phase", watched)
    result = client.train(run.examples(client), run.method.spec(run.plan), seed=1)
    assert seen_by_body == [0]  # nothing reached the body during the local phase
    steps = int(result.figures["split-steps"])
    assert steps == run.method.spec(run.plan).steps and run.counting.calls == 2 * steps


def test_bytes_per_batch_are_four_b_s_d_per_tensor(run: Run) -> None:
    """Every example is truncated to max-seq-len tokens, so S = P + T for every batch; h and ∂L/∂z go up,
    z and ∂L/∂h come down (BERT's padding mask, b·S bytes, goes up with h)."""
    client = run.client()
    examples = run.examples(client)
    assert all(len(e["input_ids"]) == SEQ for e in examples)
    spec = run.method.spec(run.plan)
    result = client.train(examples, spec, seed=2)
    d, s = run.strategy.method.dims().hidden, PROMPT + SEQ
    per_tensor = 4 * spec.micro_batch * s * d
    passes = spec.steps * (spec.batch_size // spec.micro_batch)
    mask = spec.micro_batch * s if run.client_cfg.task == "classification" else 0
    assert result.figures["split-bytes-down"] == passes * 2 * per_tensor
    assert result.figures["split-bytes-up"] == passes * (2 * per_tensor + mask)
    print(f"\n{run.client_cfg.model}: b={spec.micro_batch} S={s} d={d}: {per_tensor} bytes per tensor, "
          f"{result.figures['split-bytes-up']:.0f} up, {result.figures['split-bytes-down']:.0f} down "
          "per round")


def test_the_server_evaluates_the_prompted_model_as_the_split(run: Run) -> None:
    """PromptedModel's loss equals the split's: tail(body(head(x)))."""
    client = run.client()
    batch = collate(run.examples(client)[:3], client.tokenizer.pad_token_id)
    split = run.server.split
    with torch.no_grad():
        out = run.server.model(**batch)
        z = run.counting.body.forward(split.head(batch), split.body_mask(batch))
        loss, logits = split.tail(z, batch)
    assert out.loss is not None and float(out.loss) == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(out.logits, logits)


def test_the_server_answers_greedily_through_the_prompt(run: Run) -> None:
    """The demo's sample answer (``GlobalModel.answer``) decodes through the prompted model."""
    if run.client_cfg.task != "generation":
        pytest.skip("a classifier does not generate")
    ids = [5, 17, 42, 9]
    new = greedy_generate(run.server.model, ids, max_new_tokens=3, eos_id=None)
    assert len(new) == 3
    with torch.no_grad():
        first = run.server.model(torch.tensor([ids]), torch.ones(1, 4, dtype=torch.long)).logits[0, -1]
    assert new[0] == int(first.argmax())


def test_teardown_stops_the_service_and_deletes_the_ca(run: Run) -> None:
    folder = Path(run.strategy.service_config()["sfprompt.certs"])
    assert (folder / "ca.crt").is_file()
    run.strategy.teardown()
    assert not folder.exists() and run.strategy.service_config() == {}
    with pytest.raises(RuntimeError, match="body service is not running"):
        run.strategy.configure_train(1, None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("settings", "message"), [
    (["model=tiny-llama", "task=generation"],
     "sfprompt.head-layers: 1 is not allowed; with sfprompt.tail-layers = 1"),
    (["sfprompt.head-layers=3", "sfprompt.tail-layers=3"], "below the model's 6 layers"),
    (["sfprompt.keep=0"], "sfprompt.keep: 0.0 is not allowed; it must be in (0, 1]"),
    (["sfprompt.keep=1.5"], "sfprompt.keep: 1.5 is not allowed"),
    (["sfprompt.prompt-tokens=0"], "sfprompt.prompt-tokens: 0 is not allowed; it must be at least 1"),
    (["eval-split=clients"], "eval-split: 'clients' is not allowed; with strategy 'sfprompt'"),
    (["sfprompt.body-address=10.0.0.1:5"], "sfprompt.body-address: '10.0.0.1:5' is not allowed"),
    (["dp.mode=central"], "dp.mode: 'central' is not allowed; strategy 'sfprompt' sends h and"),
    (["resume=true", "run-dir=/nonexistent"], "resume: True is not allowed; strategy 'sfprompt'"),
])
def test_bad_settings_get_one_line(simulate_error: Any, settings: list[str], message: str) -> None:
    base = ["strategy=sfprompt", "model=minilm-l6", "task=classification"]
    args = [a for s in [*base, *settings] for a in ("--set", s)]
    assert message in simulate_error(args)


@pytest.mark.slow
def test_a_simulation_runs_with_the_split_bytes_in_its_metrics(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pollinate.cli import main

    data = small_dataset(tmp_path, "classification", rows=48)
    settings = {"strategy": "sfprompt", "model": "minilm-l6", "task": "classification", "dataset": str(data),
                "partitioner": "iid", "num-clients": 3, "rounds": 2, "local-steps": 2, "eval-examples": 12,
                "max-seq-len": 16, "sfprompt.prompt-tokens": 4}
    path = tmp_path / "run"
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert main(["simulate", "--run-dir", str(path), *args]) == 0
    summary = json.loads((path / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "sfprompt"
    assert math.isfinite(summary["final_eval"]["loss"])
    events = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    clients = [e for e in events if e["event"] == "client"]
    assert len(clients) == 6 and not [e for e in events if e["event"] in ("rejected", "failed")]
    for e in clients:
        figures = e["method_figures"]
        assert figures["split-bytes-up"] > 0 and figures["split-bytes-down"] > 0
        assert figures["split-steps"] == 2 and figures["kept-examples"] >= 1
    split_up = sum(e["method_figures"]["split-bytes-up"] for e in clients)
    split_down = sum(e["method_figures"]["split-bytes-down"] for e in clients)
    assert summary["split_bytes_up_total"] == split_up and summary["split_bytes_down_total"] == split_down
    assert summary["bytes_up_total"] == sum(e["bytes_up"] for e in clients) + split_up  # Flower + body
    rounds = [e for e in events if e["event"] == "train"]
    assert sum(e["split_bytes_down"] for e in rounds) == split_down
    checkpoint = path / (path / "LATEST").read_text().strip()
    assert (checkpoint / "sfprompt.safetensors").is_file()
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    assert main(["export", str(path), "--out", str(bundle), "--adapters", "separate"]) == 2  # no adapter
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(sfprompt) trained a soft prompt" in err
    assert main(["export", str(path), "--out", str(bundle)]) == 0  # merged: the prompt inside the graph
    diff = _bundle_against_the_checkpoint(path, checkpoint, bundle)
    assert diff <= 1e-4
    print(f"\nsimulation: {summary['wall_seconds']:.1f} s, eval loss "
          f"{summary['initial_eval']['loss']:.4f} -> {summary['final_eval']['loss']:.4f}, "
          "split bytes up per client-round "
          f"{clients[0]['method_figures']['split-bytes-up']:.0f}; bundle max |logit diff| {diff:.1e}")


def _bundle_against_the_checkpoint(run: Path, checkpoint: Path, bundle: Path) -> float:
    """The largest logit difference between the edge bundle and the server's prompted model rebuilt from
    the run's configuration and its last checkpoint, on a right-padded batch of three texts."""
    from safetensors.torch import load_file

    from pollinate.edge.runtime import EdgeModel

    server = SplitServer(RunConfig.from_run_config(json.loads((run / "config.json").read_text())))
    server.load(load_file(str(checkpoint / "sfprompt.safetensors")), seed=0)
    batch = server.tokenizer(["good", "a dull and boring film", "superb lovely great fine"], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        want = server.model(batch["input_ids"], batch["attention_mask"]).logits.numpy()
    got = EdgeModel(bundle).logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    return float(abs(got - want).max())
