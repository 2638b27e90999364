"""Privacy accounting against Google's independent dp_accounting, calibration and the plan."""

from __future__ import annotations

import math
import warnings

import pytest

from dplatent.config import resolve
from dplatent.errors import PrivacyError
from dplatent.privacy.accounting import (DPEvent, calibrate_sigma, epsilon, plan,
                                         prv_eps_error, steps_for)

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import pld as google_pld  # noqa: E402
from dp_accounting import rdp as google_rdp  # noqa: E402

DELTA = 1e-5
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# (noise multiplier, sample rate, steps) per stage
CASES = {
    "one-stage": [(1.1, 0.01, 300)],
    "two-stages": [(0.9, 0.02, 250), (1.3, 0.01, 400)],
}
# epsilon about 225: stage 1 of `full` on MNIST planned for a total epsilon of 1000
HUGE = [(0.248, 2048 / 60000, 586)]


def events(case):
    return [DPEvent(stage=f"stage{i}", noise_multiplier=s, sample_rate=q, steps=t, clip_norm=1.0)
            for i, (s, q, t) in enumerate(case)]


def google_epsilon(accountant, case) -> float:
    for sigma, q, steps in case:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("name", list(CASES))
def test_rdp_epsilon_agrees_with_google_rdp(name):
    ours = epsilon(events(CASES[name]), DELTA, "rdp")
    theirs = google_epsilon(google_rdp.RdpAccountant(OPACUS_ORDERS), CASES[name])
    assert ours == pytest.approx(theirs, rel=1e-3)
    # with Google's own default orders the answer barely moves
    default = google_epsilon(google_rdp.RdpAccountant(), CASES[name])
    assert ours == pytest.approx(default, rel=1e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_prv_epsilon_agrees_with_google_pld_and_is_tighter_than_rdp(name):
    ours = epsilon(events(CASES[name]), DELTA, "prv")
    theirs = google_epsilon(google_pld.PLDAccountant(value_discretization_interval=1e-3),
                            CASES[name])
    assert ours == pytest.approx(theirs, rel=0.02)
    assert ours < epsilon(events(CASES[name]), DELTA, "rdp")


def test_prv_at_a_huge_budget_agrees_with_google_pld():
    # With a fixed error of 0.01 the PRV grid here has 5 million points and calibrating a plan
    # around it took minutes and gigabytes; the relative error keeps it small.
    ours = epsilon(events(HUGE), DELTA, "prv")
    theirs = google_epsilon(google_pld.PLDAccountant(value_discretization_interval=0.05), HUGE)
    assert ours == pytest.approx(theirs, rel=2e-3)
    assert ours < epsilon(events(HUGE), DELTA, "rdp")


def test_prv_error_bound_is_absolute_up_to_epsilon_20_then_relative():
    assert prv_eps_error(0.5) == prv_eps_error(20.0) == 0.01
    assert prv_eps_error(1000.0) == pytest.approx(0.5)


def test_calibrate_sigma_with_prv_at_a_huge_budget():
    kw = dict(stage="new", sample_rate=2048 / 60000, steps=586, clip_norm=1.0)
    sigma = calibrate_sigma(target_epsilon=200.0, delta=DELTA, prior=[], accountant="prv", **kw)
    assert epsilon([DPEvent(noise_multiplier=sigma, **kw)], DELTA, "prv") <= 200.0
    assert epsilon([DPEvent(noise_multiplier=0.98 * sigma, **kw)], DELTA, "prv") > 200.0


def test_composition_is_the_sum_of_histories_and_zero_steps_cost_nothing():
    a, b = events(CASES["two-stages"])
    both = epsilon([a, b], DELTA, "rdp")
    assert both > max(epsilon([a], DELTA, "rdp"), epsilon([b], DELTA, "rdp"))
    assert epsilon([b, a], DELTA, "rdp") == pytest.approx(both, rel=1e-12)
    idle = DPEvent(stage="idle", noise_multiplier=0.5, sample_rate=0.5, steps=0, clip_norm=1.0)
    assert epsilon([a, b, idle], DELTA, "rdp") == pytest.approx(both, rel=1e-12)
    assert epsilon([], DELTA, "rdp") == 0.0
    assert epsilon([idle], DELTA, "prv") == 0.0
    more = DPEvent(stage="a", noise_multiplier=a.noise_multiplier, sample_rate=a.sample_rate,
                   steps=2 * a.steps, clip_norm=1.0)
    assert epsilon([more], DELTA, "rdp") > epsilon([a], DELTA, "rdp")
    with pytest.raises(PrivacyError, match="unknown accountant"):
        epsilon([a], DELTA, "gdp")


@pytest.mark.parametrize("field,value", [("noise_multiplier", 0.0), ("sample_rate", 0.0),
                                         ("sample_rate", 1.5), ("steps", -1),
                                         ("clip_norm", 0.0), ("mechanism", "laplace")])
def test_dp_event_refuses_invalid_parameters(field, value):
    args = dict(stage="s", noise_multiplier=1.0, sample_rate=0.1, steps=10, clip_norm=1.0)
    args[field] = value
    with pytest.raises(PrivacyError, match=field.split("_")[0]):
        DPEvent(**args)


def test_calibrate_sigma_meets_the_target_and_is_nearly_tight():
    prior = events([(1.0, 0.02, 100)])
    kw = dict(delta=DELTA, stage="new", sample_rate=0.01, steps=500, clip_norm=1.0,
              accountant="rdp")
    for target, before in ((1.0, []), (3.0, prior)):
        sigma = calibrate_sigma(target_epsilon=target, prior=before, **kw)
        new = DPEvent(noise_multiplier=sigma, **{k: v for k, v in kw.items()
                                                 if k in ("stage", "sample_rate", "steps",
                                                          "clip_norm")})
        assert epsilon([*before, new], DELTA, "rdp") <= target
        looser = DPEvent(stage="new", noise_multiplier=0.98 * sigma, sample_rate=0.01,
                         steps=500, clip_norm=1.0)
        assert epsilon([*before, looser], DELTA, "rdp") > target


def test_calibrate_sigma_with_prv_meets_the_target_and_is_nearly_tight():
    kw = dict(stage="new", sample_rate=0.05, steps=40, clip_norm=1.0)
    sigma = calibrate_sigma(target_epsilon=2.0, delta=DELTA, prior=[], accountant="prv", **kw)
    assert epsilon([DPEvent(noise_multiplier=sigma, **kw)], DELTA, "prv") <= 2.0
    assert epsilon([DPEvent(noise_multiplier=0.98 * sigma, **kw)], DELTA, "prv") > 2.0


def test_calibrate_sigma_refuses_impossible_budgets():
    prior = events([(0.6, 0.1, 200)])
    with pytest.raises(PrivacyError, match="whole budget"):
        calibrate_sigma(target_epsilon=0.5, delta=DELTA, prior=prior, stage="new",
                        sample_rate=0.01, steps=10, clip_norm=1.0, accountant="rdp")


def smoke_cfg(**overrides):
    base = {"privacy.accountant": "rdp", "privacy.delta": 1e-4, "privacy.epsilon": 3.0,
            "autoencoder.epochs": 2, "diffusion.epochs": 4}
    return resolve("smoke", {**base, **overrides})


def test_plan_splits_the_budget_and_composes_within_the_target():
    n = 2000
    cfg = smoke_cfg()
    p = plan(n, cfg)
    assert p.accountant == "rdp" and p.n == n and p.delta == 1e-4
    ae, dm = p.stage("autoencoder"), p.stage("diffusion")
    assert ae.steps == steps_for(2, n, 64) == math.ceil(2 * n / 64)
    assert dm.steps == math.ceil(4 * n / 64)
    assert ae.sample_rate == pytest.approx(64 / n) and ae.batch_size == 64
    # composed total within the target, and nearly all of it spent
    assert p.epsilon <= 3.0
    assert p.epsilon > 0.97 * 3.0
    assert p.epsilon == pytest.approx(epsilon([ae.event(), dm.event()], 1e-4, "rdp"), rel=1e-12)
    # stage 1 alone gets its share
    share = cfg.privacy.autoencoder_share
    assert ae.epsilon_alone <= share * 3.0
    assert ae.epsilon_alone == pytest.approx(share * 3.0, rel=0.03)
    assert ae.epsilon_alone == pytest.approx(epsilon([ae.event()], 1e-4, "rdp"), rel=1e-12)
    d = p.to_dict()
    assert "RDP" in d["accountant_name"] and len(d["stages"]) == 2
    # public quantities only: the same inputs always give the same plan
    assert plan(n, cfg) == p


def test_plan_refuses_delta_at_least_one_over_n():
    with pytest.raises(PrivacyError, match=r"delta=0\.001 must be below 1/n .*n = 1000"):
        plan(1000, smoke_cfg(**{"privacy.delta": 1e-3}))
    with pytest.raises(PrivacyError, match="1/n"):
        plan(999, smoke_cfg(**{"privacy.delta": 1 / 999}))


def test_plan_refuses_a_batch_larger_than_the_data():
    with pytest.raises(PrivacyError, match="batch size 64 exceeds n = 50"):
        plan(50, smoke_cfg(**{"privacy.delta": 1e-3}))


def test_calibrate_sigma_gives_up_beyond_the_largest_noise_multiplier():
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        calibrate_sigma(target_epsilon=1e-4, delta=DELTA, prior=[], stage="huge",
                        sample_rate=1.0, steps=1_000_000, clip_norm=1.0, accountant="rdp")
