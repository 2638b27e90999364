"""The privacy ledger: privacy.json round trip, recomputation, monotonicity, refusals."""

from __future__ import annotations

import json

import pytest

from dplatent.errors import PrivacyError
from dplatent.privacy.accounting import DPEvent, epsilon
from dplatent.privacy.ledger import FILENAME, Ledger, recompute, run_privacy_status

DELTA = 1e-5


def event(stage="autoencoder", steps=100, sigma=1.2, q=0.01, clip=1.0):
    return DPEvent(stage=stage, noise_multiplier=sigma, sample_rate=q, steps=steps,
                   clip_norm=clip)


def two_stage_ledger(accountant="rdp", target=10.0) -> Ledger:
    led = Ledger(accountant=accountant, target_epsilon=target, delta=DELTA)
    led.record(event("autoencoder", 120, sigma=1.3))
    led.record(event("diffusion", 300, sigma=0.9, q=0.02, clip=0.5))
    return led


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_round_trip_and_stored_total_equals_recomputation(tmp_path, accountant):
    led = two_stage_ledger(accountant)
    saved = led.save(tmp_path)
    on_disk = json.loads((tmp_path / FILENAME).read_text())
    assert on_disk == saved
    assert on_disk["accountant"] == accountant and on_disk["delta"] == DELTA
    assert accountant.upper() in on_disk["accountant_name"]
    assert [e["stage"] for e in on_disk["entries"]] == ["autoencoder", "diffusion"]
    # the total is the composition of the entries, and nothing else
    assert on_disk["epsilon"] == pytest.approx(recompute(tmp_path / FILENAME), rel=1e-9)
    assert on_disk["epsilon"] == pytest.approx(epsilon(led.events, DELTA, accountant), rel=1e-9)
    assert on_disk["epsilon"] <= on_disk["target_epsilon"]
    for entry, ev in zip(on_disk["entries"], led.events):
        assert entry["epsilon_alone"] == pytest.approx(epsilon([ev], DELTA, accountant),
                                                       rel=1e-9)
    back = Ledger.load(tmp_path)
    assert back.events == led.events
    assert (back.accountant, back.target_epsilon, back.delta) == (accountant, 10.0, DELTA)
    assert back.steps("diffusion") == 300 and back.steps("nothing") == 0


def test_recompute_ignores_a_tampered_stored_total(tmp_path):
    led = two_stage_ledger()
    true_total = led.save(tmp_path)["epsilon"]
    path = tmp_path / FILENAME
    d = json.loads(path.read_text())
    d["epsilon"] = 0.01
    for e in d["entries"]:
        e["epsilon_alone"] = 0.001
    path.write_text(json.dumps(d))
    assert recompute(path) == pytest.approx(true_total, rel=1e-9)


def test_record_sets_steps_and_refuses_to_lose_steps_or_change_mechanism():
    led = Ledger(accountant="rdp", target_epsilon=10.0, delta=DELTA)
    led.record(event(steps=0))
    led.record(event(steps=50))
    led.record(event(steps=50))       # same count again: allowed (a resumed, finished stage)
    led.record(event(steps=80))
    assert [e.steps for e in led.events] == [80]
    for bad in (event(steps=79), event(steps=100, sigma=1.1), event(steps=100, q=0.02),
                event(steps=100, clip=2.0)):
        with pytest.raises(PrivacyError, match="autoencoder"):
            led.record(bad)
    assert led.events == [event(steps=80)], "a refused record must change nothing"
    led.record(event("diffusion", 5))
    assert [e.stage for e in led.events] == ["autoencoder", "diffusion"]


def test_epsilon_grows_with_recorded_steps():
    led = Ledger(accountant="rdp", target_epsilon=10.0, delta=DELTA)
    assert led.epsilon() == 0.0
    values = []
    for steps in (10, 100, 1000):
        led.record(event(steps=steps))
        values.append(led.epsilon())
    assert values == sorted(values) and values[0] > 0


def test_save_refuses_totals_above_the_target_and_keeps_the_old_file(tmp_path):
    led = two_stage_ledger()
    total = led.save(tmp_path)["epsilon"]
    before = (tmp_path / FILENAME).read_bytes()
    over = Ledger(accountant="rdp", target_epsilon=total, delta=DELTA, events=led.events)
    over.record(event("diffusion", 400, sigma=0.9, q=0.02, clip=0.5))
    with pytest.raises(PrivacyError, match="exceeds the target"):
        over.save(tmp_path)
    assert (tmp_path / FILENAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != FILENAME], "no temporary files left"


def test_unknown_accountant_is_refused():
    with pytest.raises(PrivacyError, match="accountant"):
        Ledger(accountant="moments", target_epsilon=1.0, delta=DELTA)


def _valid(tmp_path) -> dict:
    two_stage_ledger().save(tmp_path)
    return json.loads((tmp_path / FILENAME).read_text())


CORRUPTIONS = {
    "not-json": lambda d: "{not json",
    "truncated": lambda d: json.dumps(d)[:40],
    "empty": lambda d: "",
    "list": lambda d: "[]",
    "no-entries": lambda d: json.dumps({k: v for k, v in d.items() if k != "entries"}),
    "no-delta": lambda d: json.dumps({k: v for k, v in d.items() if k != "delta"}),
    "unknown-field": lambda d: json.dumps({**d, "entries": [{**d["entries"][0], "extra": 1}]}),
    "missing-field": lambda d: json.dumps(
        {**d, "entries": [{k: v for k, v in d["entries"][0].items() if k != "steps"}]}),
    "entry-not-object": lambda d: json.dumps({**d, "entries": [3]}),
    "invalid-sigma": lambda d: json.dumps(
        {**d, "entries": [{**d["entries"][0], "noise_multiplier": 0}]}),
    "negative-steps": lambda d: json.dumps({**d, "entries": [{**d["entries"][0], "steps": -5}]}),
    "unknown-accountant": lambda d: json.dumps({**d, "accountant": "moments"}),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_ledger_is_a_privacy_error_naming_the_file(tmp_path, kind):
    d = _valid(tmp_path)
    path = tmp_path / FILENAME
    path.write_text(CORRUPTIONS[kind](d))
    with pytest.raises(PrivacyError) as info:
        Ledger.load(tmp_path)
    assert str(path) in str(info.value)
    with pytest.raises(PrivacyError, match=FILENAME):
        recompute(path)


def test_missing_ledger_is_a_privacy_error_naming_the_file(tmp_path):
    with pytest.raises(PrivacyError, match=str(tmp_path / FILENAME)):
        Ledger.load(tmp_path)


def test_non_numeric_budget_in_ledger_is_a_privacy_error_naming_the_file(tmp_path):
    d = _valid(tmp_path)
    path = tmp_path / FILENAME
    for key, value in (("target_epsilon", "ten"), ("delta", None)):
        path.write_text(json.dumps({**d, key: value}))
        with pytest.raises(PrivacyError, match=str(path)):
            Ledger.load(tmp_path)


PRIVATE_LEDGER = {"private": True, "epsilon": 9.9, "delta": 1e-5}
CONTROL_LEDGER = {"private": False, "epsilon": None,
                  "label": "NOT PRIVATE: non-private control run (noise multiplier 0)"}


@pytest.mark.parametrize("config, ledger, others, reason", [
    ({}, None, (), "no privacy ledger"),
    ({"privacy": {"non_private_control": True}}, PRIVATE_LEDGER, (), "non-private control"),
    ({"derived": {"private": False}}, PRIVATE_LEDGER, (), "non-private control"),
    ({}, CONTROL_LEDGER, (), "non-private control run (noise multiplier 0)"),
    ({}, PRIVATE_LEDGER, ({"private": False},), "non-private control"),
    ({}, {**PRIVATE_LEDGER, "epsilon": None}, (), "no finite epsilon"),
    ({}, {**PRIVATE_LEDGER, "epsilon": float("inf")}, (), "no finite epsilon"),
    ({}, {**PRIVATE_LEDGER, "epsilon": True}, (), "no finite epsilon"),
    ({}, {**PRIVATE_LEDGER, "epsilon": "9.9"}, (), "no finite epsilon"),
])
def test_run_privacy_status_says_not_private_whenever_any_record_does(config, ledger, others,
                                                                       reason):
    private, why = run_privacy_status(config, ledger, *others)
    assert private is False and reason in why and not why.startswith("NOT PRIVATE")


def test_run_privacy_status_of_a_private_run():
    assert run_privacy_status({"privacy": {"non_private_control": False},
                               "derived": {"private": True}}, PRIVATE_LEDGER,
                              None, {"private": True}) == (True, "")
