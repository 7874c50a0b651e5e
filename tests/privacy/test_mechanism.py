"""Clipping and noise of client updates (pollinate.privacy.mechanism), on tiny tensors."""

import dataclasses
from typing import Any, cast

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.config import RunConfig
from pollinate.methods.fedkseed.method import GRAD_KEY, INDEX_KEY, SUMS_KEY, FedKSeedMethod
from pollinate.privacy.mechanism import CentralDp, LocalDp, NoPrivacy, clip, l2_norm, privacy_for
from pollinate.privacy.settings import DpSettings
from pollinate.protocol import ClientReport


class Plain:
    """A method whose upload is its own dp view (LoRA's and LoRA-SB's are)."""

    @staticmethod
    def dp_view(upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(upload)


PLAIN: Any = Plain()


def report(node: int, upload: dict[str, torch.Tensor], examples: int = 10) -> ClientReport:
    return ClientReport(node=node, examples=examples, loss=1.0, seconds=0.1, plan={}, method_figures={},
                        peak=0, process_peak=0, baseline=0, budget=None, estimate=0, examples_seen=examples,
                        tokens_seen=0, bytes_up=0, bytes_down=0, version=0, fingerprint=0.0, upload=upload)


def tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 5, generator=gen) * scale, "b": torch.randn(7, generator=gen) * scale}


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e4), bound=st.floats(1e-3, 1e3))
def test_clipping_bounds_every_update(seed: int, scale: float, bound: float) -> None:
    update = tensors(seed, scale)
    clipped, was = clip(update, bound)
    assert l2_norm(clipped) <= bound * (1 + 1e-12)
    assert was == (l2_norm(update) > bound)
    if not was:  # an update within the bound is left exactly as it is
        assert all(torch.equal(clipped[k], update[k]) for k in update)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scales=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=6),
       bound=st.floats(1e-2, 10.0))
def test_central_release_bounds_each_clients_contribution(seed: int, scales: list[float],
                                                          bound: float) -> None:
    """With the noise off, adding or removing one client moves the released sum by at most clip (read
    back from the fp32 state the rule gets: up to 1e-5 of rounding at these sizes)."""
    received = tensors(seed, 1.0)
    uploads = [{k: v + tensors(seed + i + 1, s)[k] for k, v in received.items()}
               for i, s in enumerate(scales)]
    dp = CentralDp(DpSettings(mode="central", clip=bound, noise_multiplier=0.0))

    def released_sum(ups: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        [one] = dp.release([report(i, u) for i, u in enumerate(ups)], received, PLAIN)
        assert one.examples == 1
        return {k: (v.double() - received[k].double()) * len(ups) for k, v in one.upload.items()}

    whole, without = released_sum(uploads), released_sum(uploads[1:])
    assert l2_norm({k: whole[k] - without[k] for k in whole}) <= bound + 1e-5
    assert dp.clipped == sum(l2_norm({k: u[k] - received[k] for k in u}) > bound for u in uploads[1:])


def test_local_protect_bounds_the_update_before_noise() -> None:
    received = tensors(0, 1.0)
    for seed in range(50):
        upload = {k: v + tensors(seed + 1, 10.0 ** (seed % 7 - 3))[k] for k, v in received.items()}
        local = LocalDp(DpSettings(mode="local", clip=0.3, noise_multiplier=0.0))
        out = local.protect(upload, received, PLAIN)
        assert l2_norm({k: out[k].double() - received[k].double() for k in out}) <= 0.3 * (1 + 1e-6)
        assert all(out[k].dtype == upload[k].dtype for k in upload)


def test_noise_has_standard_deviation_sigma_times_clip() -> None:
    """Zero updates: what comes out is the noise alone. 200,000 draws: the standard error of the
    estimated standard deviation is 0.16%, so 1% is more than 6 standard errors."""
    received = {"w": torch.zeros(400, 500)}
    sigma, bound = 2.0, 0.5
    local = LocalDp(DpSettings(mode="local", clip=bound, noise_multiplier=sigma),
                    generator=torch.Generator().manual_seed(1))
    noise = local.protect(dict(received), received, PLAIN)["w"].double()
    assert abs(float(noise.std()) / (sigma * bound) - 1) < 0.01 and abs(float(noise.mean())) < 0.01
    central = CentralDp(DpSettings(mode="central", clip=bound, noise_multiplier=sigma),
                        generator=torch.Generator().manual_seed(2))
    [one] = central.release([report(i, dict(received)) for i in range(4)], received, PLAIN)
    mean_noise = one.upload["w"].double()  # (noise on the sum) / 4 clients
    assert abs(float(mean_noise.std()) / (sigma * bound / 4) - 1) < 0.01


def test_secret_noise_differs_between_releases() -> None:
    received = {"w": torch.zeros(100)}
    dp = LocalDp(DpSettings(mode="local", clip=1.0, noise_multiplier=1.0))
    first, second = (dp.protect(dict(received), received, PLAIN)["w"] for _ in range(2))
    assert not torch.equal(first, second)


def test_off_keeps_reports_and_weights_and_local_weighs_uniformly() -> None:
    reports = [report(1, tensors(1, 1.0), examples=5), report(2, tensors(2, 1.0), examples=50)]
    off = privacy_for(DpSettings())
    assert isinstance(off, NoPrivacy) and off.release(reports, {}, PLAIN) == reports
    local = privacy_for(DpSettings(mode="local"))
    assert [r.examples for r in local.release(reports, {}, PLAIN)] == [1, 1]
    assert [r.upload for r in local.release(reports, {}, PLAIN)] == [r.upload for r in reports]


def test_fedkseed_privatises_the_per_seed_sums() -> None:
    """FedKSeed's pairs become K dense sums (a valid upload) before clipping and noise."""
    cfg = RunConfig.from_run_config({"model": "tiny-llama", "strategy": "fedkseed", "fedkseed.seeds": 16})
    method = FedKSeedMethod(cfg)
    pairs = {INDEX_KEY: torch.tensor([3.0, 3.0, 7.0]), GRAD_KEY: torch.tensor([1.0, 2.0, -4.0])}
    view = method.dp_view(pairs)
    assert set(view) == {SUMS_KEY} and view[SUMS_KEY].shape == (16,)
    assert view[SUMS_KEY][3] == 3.0 and view[SUMS_KEY][7] == -4.0 and float(view[SUMS_KEY].abs().sum()) == 7.0
    out = LocalDp(DpSettings(mode="local", clip=1.0, noise_multiplier=0.0)).protect(pairs, {}, method)
    assert torch.allclose(out[SUMS_KEY], view[SUMS_KEY] / 5.0)  # ‖(3, -4)‖ = 5, clipped to 1
    assert method.upload_schema(cast(Any, None), {}).check(out) is None


def test_release_keeps_the_reports_other_fields() -> None:
    reports = [report(7, tensors(1, 1.0))]
    [one] = CentralDp(DpSettings(mode="central", noise_multiplier=0.0)).release(reports, {}, PLAIN)
    assert dataclasses.replace(one, upload=reports[0].upload, examples=10) == reports[0]


@pytest.mark.parametrize(("key", "value"), [
    ("mode", "global"), ("clip", 0.0), ("clip", -1.0), ("noise-multiplier", -0.5), ("delta", 1.0),
    ("delta", -0.1), ("target-epsilon", -1.0)])
def test_bad_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^dp\.{key}: {value!r} is not allowed; "):
        RunConfig.from_run_config({f"dp.{key}": value})
