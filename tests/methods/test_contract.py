"""The contract every registered method keeps (design: "Methods: the unit of extension").

One parametrised matrix, as peft tests every tuner: a new method gets these tests by registering. Each
row builds the method on tiny-llama (generation) and, where it supports classification, tiny-bert.

SFPrompt cuts a model into head, body and tail, which the two-block tiny models cannot hold: its rows are
tiny-llama made four blocks deep (``deep_tiny``) and minilm-l6 (six), each on a few dozen rows of a file
(its local-loss phase passes over every example of a share), and its trainee trains against the body
service its strategy starts.
"""

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sfprompt_helpers import deep_tiny, small_dataset

from pollinate import methods, protocol
from pollinate.config import RunConfig
from pollinate.methods.base import Method, Trainee
from pollinate.methods.plan import Plan

# The strategy that trains each method (the strategy determines the method).
STRATEGY = {"lora": "fedit", "lora_sb": "fedsb", "fedkseed": "fedkseed", "sfprompt": "sfprompt"}
MODELS = {"sfprompt": (("tiny-llama", "generation"), ("minilm-l6", "classification"))}
CASES = [(name, model, task) for name in methods.names()
         for model, task in MODELS.get(name, (("tiny-llama", "generation"), ("tiny-bert", "classification")))]
DATA: dict[str, str] = {}
"""Per task, the small dataset file of the SFPrompt rows."""


@pytest.fixture(autouse=True)
def _sfprompt_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                   tmp_path_factory: pytest.TempPathFactory) -> None:
    params = getattr(request.node, "callspec", None)
    if params is None or params.params.get("name") != "sfprompt":
        return
    deep_tiny(monkeypatch)
    folder = tmp_path_factory.mktemp("sfprompt-data")
    for task in ("generation", "classification"):
        DATA[task] = str(small_dataset(folder, task))


def _method(name: str, model: str, task: str, **extra: object) -> Method:
    own = {"dataset": DATA[task], "partitioner": "iid"} if name == "sfprompt" else {}
    cfg = RunConfig.from_run_config({"model": model, "task": task, "strategy": STRATEGY[name],
                                     "num-clients": 2, "eval-examples": 8, "local-steps": 2,
                                     "fedsb.rank": 4, "fedsb.init-examples": 4, "fedkseed.steps": 3,
                                     **own, **extra})
    return methods.build(name, cfg)


@contextlib.contextmanager
def _serving(method: Method) -> Iterator[Method]:
    """The method as its clients see it during a run: SFPrompt's with the body service its strategy
    starts on the server's trainee (and stops after); any other as it is."""
    if method.name != "sfprompt":
        yield method
        return
    from pollinate.strategies import strategy_class

    cfg: RunConfig = method.cfg  # type: ignore[attr-defined]
    strategy = strategy_class(cfg.strategy)(cfg)
    strategy.start_body(method.server())  # type: ignore[attr-defined]
    try:
        yield methods.build(method.name, RunConfig.from_run_config(
            {**cfg.to_run_config(), **strategy.service_config()}))  # type: ignore[attr-defined]
    finally:
        strategy.teardown()


def _client(method: Method) -> tuple[Trainee, Plan]:
    plan = method.candidates(method.dims(), 0)[0]
    return method.client(plan), plan


def _tensors(trainee: Trainee) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}


def test_every_method_has_a_strategy_row() -> None:
    assert set(STRATEGY) == set(methods.names())


@pytest.mark.parametrize(("name", "model", "task"), CASES)
def test_upload_after_load_returns_what_was_loaded(name: str, model: str, task: str) -> None:
    method = _method(name, model, task)
    trainee, _ = _client(method)
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in trainee.upload().items()}
    trainee.load(state, seed=1)
    back = trainee.upload()
    assert back.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(back[key], state[key], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "model", "task"), CASES)
def test_merging_a_combination_equals_merging_in_order(name: str, model: str, task: str) -> None:
    method = _method(name, model, task)
    together, one_by_one = _client(method)[0], _client(method)[0]
    probe = _client(method)[0]
    u1, u2 = method.sample_update(probe, 1), method.sample_update(probe, 2)
    together.merge(method.update_type.combine([u1, u2]))
    one_by_one.merge(u1)
    one_by_one.merge(u2)
    assert together.version == one_by_one.version == 2
    # fp32 merges in another order: within the tolerance the server's sync guard allows
    assert together.fingerprint() == pytest.approx(one_by_one.fingerprint(), rel=method.sync_tolerance)
    a, b = _tensors(together), _tensors(one_by_one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # what travels survives the wire form
    again = method.update_type.from_flat(method.update_type.combine([u1, u2]).to_flat(), span=2)
    fresh = _client(method)[0]
    fresh.merge(again)
    assert fresh.fingerprint() == pytest.approx(together.fingerprint(), rel=method.sync_tolerance)


@pytest.mark.parametrize(("name", "model", "task"), CASES)
def test_training_keeps_the_version_and_frozen_part(name: str, model: str, task: str) -> None:
    from pollinate import workload
    from pollinate.data import encode_dataset

    with _serving(_method(name, model, task)) as method:
        trainee, plan = _client(method)
        trainee.merge(method.sample_update(trainee, 1))
        version, frozen = trainee.version, trainee.fingerprint()
        share = workload.shares(method.cfg, method.calibration_size())[0]  # type: ignore[attr-defined]
        examples = encode_dataset(share, trainee.tokenizer, task, plan.seq_len)
        before = trainee.upload()
        result = trainee.train(examples, method.spec(plan), seed=0)
    assert result.loss > 0 and result.examples == method.spec(plan).steps * method.spec(plan).batch_size
    # a method that moves its frozen part while training (FedKSeed) must restore it, to round-off
    assert trainee.version == version
    assert trainee.fingerprint() == pytest.approx(frozen, rel=method.sync_tolerance)
    assert any(not torch.equal(before[k], v) for k, v in trainee.upload().items())  # something trained
    # what travels (everything fp32) is what the server's checks admit for this plan
    schema = method.upload_schema(method.server(), plan.fields())
    sent = protocol.from_record(protocol.to_record(trainee.upload()))
    assert schema.check(sent) is None and schema.check_values(sent) is None
    # its differential-privacy view is a valid upload too: fixed float tensors, the same for a second read
    view = method.dp_view(sent)
    assert schema.check(view) is None and schema.check_values(view) is None
    assert all(v.is_floating_point() for v in view.values())
    assert {k: v.shape for k, v in view.items()} == {k: v.shape for k, v in method.dp_view(view).items()}


@pytest.mark.parametrize(("name", "model", "task"), CASES)
def test_estimates_rise_with_batch_and_sequence_length(name: str, model: str, task: str) -> None:
    method = _method(name, model, task)
    dims = method.dims()
    plans = method.candidates(dims, 0)
    base = plans[0]

    bigger_batch = dataclasses.replace(base, micro_batch=base.micro_batch * 2)
    longer = dataclasses.replace(base, seq_len=base.seq_len * 2)
    est = method.estimate(dims, base).total
    assert method.estimate(dims, bigger_batch).total > est
    assert method.estimate(dims, longer).total > est
    assert all(p.effective_batch == base.effective_batch for p in plans)


@pytest.mark.parametrize(("name", "model", "task"), CASES)
def test_a_saved_server_checkpoint_exports(name: str, model: str, task: str, tmp_path: Path) -> None:
    from pollinate.edge.export import export_bundle
    from pollinate.edge.runtime import EdgeModel

    method = _method(name, model, task)
    server = method.server()
    server.merge(method.sample_update(server, 1))
    run = tmp_path / "run"
    folder = run / "checkpoints" / "round-0001"
    folder.mkdir(parents=True)
    server.save(folder)
    (run / "config.json").write_text(json.dumps(method.cfg.to_run_config()))  # type: ignore[attr-defined]
    (folder / "manifest.json").write_text(json.dumps(
        {"method": method.name, "export": dataclasses.asdict(method.export_view())}))
    (run / "LATEST").write_text("checkpoints/round-0001\n")
    bundle = tmp_path / "bundle"
    if (reason := method.export_view().unsupported) is not None:  # refused, with the method's reason
        with pytest.raises(ValueError, match="cannot be exported") as refused:
            export_bundle(run, bundle)
        assert reason in str(refused.value) and "\n" not in str(refused.value)
        assert not bundle.exists()
        return
    export_bundle(run, bundle)
    edge = EdgeModel(bundle)
    assert edge is not None
