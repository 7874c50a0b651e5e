"""The server's checks on every training reply (reliability.md, scenarios 8, 9, 10, 12 and 13), for
every method: real uploads of tiny-llama trainees in real Flower messages, spoiled one way at a time."""

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from pollinate import methods
from pollinate import protocol as wire
from pollinate.config import RunConfig
from pollinate.methods.fedkseed.method import GRAD_KEY, INDEX_KEY, SUMS_KEY
from pollinate.server.validate import CHECKS, Rejection, RoundChecks
from pollinate.strategies import build_strategy

EXAMPLES_CAP = 50
SETTINGS = {  # strategy -> (method, extra run-config keys)
    "fedit": ("lora", {}),
    "fedsb": ("lora_sb", {"fedsb.rank": 4}),
    "fedkseed": ("fedkseed", {"fedkseed.seeds": 64, "fedkseed.steps": 4}),
}


@pytest.fixture(autouse=True)
def _inside_a_run(flower_task: None) -> None:
    """Every message here is built as if inside a run."""


@dataclass
class Setup:
    method: Any
    server: Any
    good: dict[str, torch.Tensor]
    plan: dict[str, int]

    def checks(self, addressed: dict[str, int] | None = None) -> RoundChecks:
        return RoundChecks(self.method, self.server, addressed or {"m7": 7, "m8": 8}, EXAMPLES_CAP,
                           self.server.fingerprint(), self.method.sync_tolerance)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def setup(request: pytest.FixtureRequest) -> Setup:
    name, extra = SETTINGS[request.param]
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": request.param, "num-clients": 3,
                                     **extra})
    method = methods.build(name, cfg)
    server = method.server()
    good = server.upload()
    if name == "fedkseed":  # what a client that took its steps uploads: (index, g) pairs
        good = {INDEX_KEY: torch.tensor([3.0, 9.0, 3.0, 60.0]),  # indices travel as fp32
                GRAD_KEY: torch.tensor([0.5, -1.0, 0.25, 2.0])}
    plan = {"rank": cfg.lora.rank} if name == "lora" else {}
    return Setup(method, server, good, plan)


def instruction(node: int, message_id: str) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type="train")
    ask.metadata.__dict__["_message_id"] = message_id  # as Flower's grid stamps it when it pushes
    return ask


def reply(setup: Setup, upload: dict[str, torch.Tensor] | ArrayRecord | None = None, *, node: int = 7,
          to: str = "m7", **metrics: Any) -> Message:
    figures = {wire.NUM_EXAMPLES: 20, wire.TRAIN_LOSS: 1.0, wire.BASE_FINGERPRINT: setup.server.fingerprint(),
               **wire.plan_metrics(setup.plan), **metrics}
    record = upload if isinstance(upload, ArrayRecord) else wire.to_record(setup.good if upload is None
                                                                            else upload)
    if isinstance(upload, dict):  # keep dtypes as given (to_record makes everything fp32)
        record = ArrayRecord({k: Array(v.numpy()) for k, v in upload.items()})
    return Message(RecordDict({wire.ARRAYS: record, wire.METRICS: MetricRecord(figures)}),
                   reply_to=instruction(node, to))


def rejected(setup: Setup, message: Message) -> Rejection:
    outcome = setup.checks().check(message)
    assert isinstance(outcome, Rejection), "accepted"
    assert outcome.check in CHECKS and outcome.node == message.metadata.src_node_id
    return outcome


def spoil(setup: Setup, change: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The good upload with its first floating tensor changed."""
    key = next(k for k, v in setup.good.items() if v.is_floating_point())
    return {**setup.good, key: change(setup.good[key].clone())}


def test_a_good_reply_is_accepted_once(setup: Setup) -> None:
    checks = setup.checks()
    report = checks.check(reply(setup))
    assert not isinstance(report, Rejection), report
    assert report.examples == 20 and set(report.upload) == set(setup.good)
    again = checks.check(reply(setup))  # scenario 13: a duplicate
    assert isinstance(again, Rejection) and again.check == "envelope" and "second reply" in again.reason


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_values_are_rejected(setup: Setup, value: float) -> None:  # scenario 8
    def poison(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] = value
        return t

    assert rejected(setup, reply(setup, spoil(setup, poison))).check == "numerics"


def test_schema_violations_are_rejected(setup: Setup) -> None:  # scenario 9
    key, tensor = next((k, v) for k, v in setup.good.items() if v.is_floating_point())
    first = next(iter(setup.good))
    cases = {
        "wrong shape (one row, which would broadcast)": {**setup.good, key: tensor.reshape(-1)[:1].reshape(
            (1,) * tensor.dim())},
        "wrong dtype": {**setup.good, key: tensor.double()},
        "missing key": {k: v for k, v in setup.good.items() if k != first},
        "extra key": {**setup.good, "extra": torch.zeros(2)},
        "base-model key": {**setup.good, "base_model.model.model.embed_tokens.weight": torch.zeros(4, 4)},
    }
    for label, upload in cases.items():
        outcome = rejected(setup, reply(setup, upload))
        assert outcome.check in ("schema", "size"), (label, outcome)
        assert outcome.reason, label


@pytest.mark.parametrize("weight", [10**12, 0, -20, float("nan"), [1, 2], 2.5])
def test_a_weight_that_is_not_a_count_in_range_is_rejected(setup: Setup, weight: Any) -> None:  # 10
    outcome = rejected(setup, reply(setup, **{wire.NUM_EXAMPLES: weight}))
    assert outcome.check in ("weight", "metrics") and wire.NUM_EXAMPLES in outcome.reason


def test_replies_outside_the_round_are_rejected(setup: Setup) -> None:  # scenario 13
    stale = rejected(setup, reply(setup, to="an-instruction-of-round-1"))
    foreign = rejected(setup, reply(setup, node=7, to="m8"))  # node 7 answers what node 8 was sent
    assert (stale.check, foreign.check) == ("envelope", "envelope")
    assert "no instruction of this round" in stale.reason and "node 8" in foreign.reason


def test_a_figure_that_is_not_a_number_is_rejected(setup: Setup) -> None:
    outcome = rejected(setup, reply(setup, **{wire.PEAK_MEM: float("inf")}))
    assert outcome.check == "metrics" and wire.PEAK_MEM in outcome.reason


def test_an_oversized_payload_is_rejected_before_decoding(setup: Setup) -> None:
    key = next(iter(setup.good))
    bloated = ArrayRecord({**{k: Array(v.numpy()) for k, v in setup.good.items()},
                           key: Array(np.zeros(10 * sum(v.numel() for v in setup.good.values()) + 4096,
                                               dtype=np.float32))})
    assert rejected(setup, reply(setup, bloated)).check == "size"


def test_a_client_on_another_frozen_part_is_rejected(setup: Setup) -> None:
    outcome = rejected(setup, reply(setup, **{wire.BASE_FINGERPRINT: setup.server.fingerprint() + 1.0}))
    assert (outcome.check, outcome.reason) == ("sync", "base out of sync")


def test_random_byte_mutations_never_crash_the_checks(setup: Setup) -> None:  # scenario 12
    rng = random.Random(0)
    arrays = {k: Array(v.numpy()) for k, v in setup.good.items()}
    outcomes: dict[str, int] = {}
    for _ in range(1000):
        key = rng.choice(list(arrays))
        data = bytearray(arrays[key].data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        mutated = Array(dtype=arrays[key].dtype, shape=arrays[key].shape, stype=arrays[key].stype,
                        data=bytes(data))
        outcome = setup.checks().check(reply(setup, ArrayRecord({**arrays, key: mutated})))
        label = outcome.check if isinstance(outcome, Rejection) else "accepted"
        outcomes[label] = outcomes.get(label, 0) + 1
        if not isinstance(outcome, Rejection):  # a mutation of values only: still the method's form
            assert setup.method.upload_schema(setup.server, setup.plan).check(outcome.upload) is None
    assert sum(outcomes.values()) == 1000 and set(outcomes) <= {*CHECKS, "accepted"}, outcomes
    assert sum(v for k, v in outcomes.items() if k != "accepted") > 0, outcomes


def test_lora_refuses_a_rank_the_run_does_not_offer() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "flora", "num-clients": 2,
                                     "lora.rank": 8})
    method = build_strategy(cfg).method  # FLoRA's clients may train any rank halved down from 8
    with pytest.raises(ValueError, match=r"^plan\.rank 3 is not a rank this run offers \(\[1, 2, 4, 8\]\)"):
        method.upload_schema(method.server(), {"rank": 3})
    server = method.server()
    schema = method.upload_schema(server, {"rank": 2})  # heterogeneous: A (2 x n), B (m x 2)
    shapes = {tuple(spec.shape) for form in schema.forms for spec in form.values()}
    assert all(2 in shape for shape in shapes if len(shape) == 2)


def test_fedkseed_pairs_must_match_and_name_one_of_the_k_seeds() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "fedkseed", "fedkseed.seeds": 64,
                                     "fedkseed.steps": 4})
    schema = methods.build("fedkseed", cfg).upload_schema(None, {})
    good = {INDEX_KEY: torch.tensor([0.0, 63.0]), GRAD_KEY: torch.tensor([1.0, 2.0])}  # indices as fp32
    assert schema.check(good) is None and schema.check_values(good) is None
    assert schema.check({SUMS_KEY: torch.zeros(64)}) is None
    for index in ([0.0, 64.0], [-1.0, 2.0], [0.5, 2.0]):
        assert "not one of 0..63" in str(schema.check_values({**good, INDEX_KEY: torch.tensor(index)}))
    assert "2 seed indices but 3 scalars" in str(schema.check_values({**good, GRAD_KEY: torch.ones(3)}))
    assert "shape" in str(schema.check({INDEX_KEY: torch.zeros(5), GRAD_KEY: torch.ones(5)}))
    assert "dtype" in str(schema.check({**good, INDEX_KEY: torch.tensor([0, 63], dtype=torch.int32)}))


def _client_update(setup: Setup, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A client's upload whose change is ``scale`` x an honest one: the good upload moved by a small
    seeded change (FedKSeed: its projected gradients themselves scaled; seed indices kept)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in setup.good.items():
        noise = 0.01 * torch.randn(v.shape, generator=gen)
        out[k] = v if k == INDEX_KEY else scale * (v + noise) if k == GRAD_KEY else v + scale * noise
    return out


def test_an_update_far_above_the_rounds_median_is_rejected(setup: Setup) -> None:  # scenario 11
    checks = setup.checks({f"m{n}": n for n in range(1, 6)})
    reports = []
    for node in range(1, 6):
        upload = _client_update(setup, node, scale=100.0 if node == 5 else 1.0)
        outcome = checks.check(reply(setup, upload, node=node, to=f"m{node}"))
        assert not isinstance(outcome, Rejection), outcome
        reports.append(outcome)
    (outlier,) = checks.outliers(reports, bound=10.0)
    assert (outlier.node, outlier.check) == (5, "update") and "median" in outlier.reason
    assert checks.outliers(reports[:4], bound=10.0) == []  # honest clients are all within the bound
    assert checks.outliers(reports, bound=0.0) == [] and checks.outliers(reports[:2], bound=10.0) == []


def test_lora_update_size_is_the_norm_of_the_scaled_product_whatever_the_factors_scale() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "num-clients": 2, "lora.rank": 4})
    method = methods.build("lora", cfg)
    server = method.server()
    gen = torch.Generator().manual_seed(0)
    upload = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64).float()
              for k, v in server.upload().items()}
    dense = 0.0
    for key, b in upload.items():
        if ".lora_B." in key:
            a = upload[key.replace(".lora_B.", ".lora_A.")]
            dense += float(((cfg.lora.alpha / 4) * (b.double() @ a.double())).pow(2).sum())
    size = method.update_size(server, upload)
    assert size == pytest.approx(dense**0.5, rel=1e-9)
    rescaled = {k: v * 3.0 if ".lora_B." in k else v / 3.0 for k, v in upload.items()}  # B·c with A/c
    assert method.update_size(server, rescaled) == pytest.approx(size, rel=1e-5)


def test_clipping_brings_an_outlier_to_the_bound_and_leaves_the_rest(setup: Setup) -> None:
    checks = setup.checks({f"m{n}": n for n in range(1, 6)})
    reports = [checks.check(reply(setup, _client_update(setup, n, 100.0 if n == 5 else 1.0), node=n,
                                  to=f"m{n}")) for n in range(1, 6)]
    assert not any(isinstance(r, Rejection) for r in reports)
    sizes = [setup.method.update_size(setup.server, r.upload) for r in reports]
    clipped, factors = checks.clipped(reports, bound=10.0)
    assert list(factors) == [5] and 0 < factors[5] < 1
    after = [setup.method.update_size(setup.server, r.upload) for r in clipped]
    median = sorted(sizes)[2]
    assert after[4] == pytest.approx(10.0 * median, rel=1e-4)  # at the bound, not rejected
    assert after[:4] == pytest.approx(sizes[:4], rel=1e-9)  # honest ones untouched
    assert setup.method.upload_schema(setup.server, setup.plan).check(clipped[4].upload) is None


def test_ffa_update_size_takes_the_frozen_a_every_node_shares() -> None:
    strategy = build_strategy(RunConfig.from_run_config({"model": "tiny-llama", "strategy": "ffa"}))
    server = strategy.method.server()
    upload = {k: torch.ones_like(v) for k, v in server.upload().items()}  # FFA uploads B (and no A)
    frozen = {k.replace(".default.", "."): v for k, v in server.model.state_dict().items() if ".lora_A." in k}
    scale = strategy.method.cfg.lora.alpha / strategy.method.cfg.lora.rank
    dense = sum(float((scale * (b.double() @ frozen[k.replace(".lora_B.", ".lora_A.")].double()))
                      .pow(2).sum()) for k, b in upload.items() if ".lora_B." in k)
    assert strategy.method.update_size(server, upload) == pytest.approx(dense**0.5, rel=1e-9)


def test_lora_clipping_keeps_the_factors_balanced_and_counts_a_head() -> None:
    cfg = RunConfig.from_run_config({"model": "tiny-bert", "task": "classification", "num-clients": 2,
                                     "lora.rank": 4, "eval-examples": 8})
    method = methods.build("lora", cfg)
    server = method.server()
    now = server.upload()
    heads = [k for k in now if ".lora_" not in k]
    assert heads  # the classifier travels beside the factors
    gen = torch.Generator().manual_seed(1)
    upload = {k: v + torch.randn(v.shape, generator=gen) for k, v in now.items()}
    factors_only = {k: v for k, v in upload.items() if ".lora_" in k}
    head_change = sum(float((upload[k] - now[k]).double().pow(2).sum()) for k in heads)
    size = method.update_size(server, upload)  # the head's change counts in the same sum of squares
    assert size**2 == pytest.approx(method.update_size(server, factors_only) ** 2 + head_change, rel=1e-6)

    clipped = method.scale_update(server, upload, 0.25)
    for k, v in upload.items():
        if ".lora_" in k:  # √0.25 on A and on B: B·A by 0.25, neither factor outsized for FedIT's means
            assert torch.allclose(clipped[k], 0.5 * v)
        else:
            assert torch.allclose(clipped[k] - now[k], 0.25 * (v - now[k]), atol=1e-6)
    assert method.update_size(server, clipped) == pytest.approx(0.25 * size, rel=1e-5)
