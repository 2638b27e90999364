"""The non-private control switch (privacy.non_private_control): noise multiplier 0 in both
stages, and no way to mistake the run for a private one. Also the training subset option
(`subset`), whose accounting must use the records actually trained on."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, train_smoke

from dplatent import config
from dplatent.cli import main
from dplatent.errors import DplatentError, PrivacyError
from dplatent.privacy.accounting import (MECHANISM, NO_NOISE, NOT_PRIVATE, DPEvent, epsilon,
                                         plan)
from dplatent.privacy.ledger import FILENAME, Ledger, recompute

DELTA = 1e-5
FAST = ["--preset", "smoke", "--set", "privacy.accountant=rdp"]


def strict_json(path: Path):
    """json.loads that refuses NaN and Infinity (not JSON; Python writes them for inf)."""
    def refuse(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def no_noise(stage="s", q=0.05, steps=10):
    return DPEvent(stage=stage, noise_multiplier=0.0, sample_rate=q, steps=steps,
                   clip_norm=1.0, mechanism=NO_NOISE)


# --- configuration and accounting ------------------------------------------------------------


def test_the_control_is_never_the_default():
    assert config.RunConfig().privacy.non_private_control is False
    for name in config.preset_names():
        assert config.resolve(name, {}).privacy.non_private_control is False, name
    cfg = config.resolve("smoke", {"privacy.non_private_control": "true"})
    assert cfg.privacy.non_private_control is True
    assert config.from_dict(cfg.to_dict()).privacy.non_private_control is True


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_no_finite_epsilon_for_noise_multiplier_zero(accountant):
    gaussian = DPEvent(stage="a", noise_multiplier=1.0, sample_rate=0.01, steps=100,
                       clip_norm=1.0)
    for q in (1e-4, 0.05, 1.0):
        for steps in (1, 1000):
            assert epsilon([no_noise(q=q, steps=steps)], DELTA, accountant) == math.inf
    # Composed with private stages, in any order: still no finite epsilon.
    assert epsilon([gaussian, no_noise()], DELTA, accountant) == math.inf
    assert epsilon([no_noise(), gaussian], DELTA, accountant) == math.inf
    assert math.isfinite(epsilon([gaussian], DELTA, accountant))
    # A Gaussian mechanism with sigma 0 cannot even be described; nor a no-noise one with noise.
    with pytest.raises(PrivacyError, match="noise multiplier must be > 0"):
        DPEvent(stage="a", noise_multiplier=0.0, sample_rate=0.01, steps=1, clip_norm=1.0)
    with pytest.raises(PrivacyError, match="must be 0"):
        DPEvent(stage="a", noise_multiplier=0.5, sample_rate=0.01, steps=1, clip_norm=1.0,
                mechanism=NO_NOISE)


def test_plan_of_a_control_run_has_sigma_zero_and_no_epsilon():
    base = {"privacy.accountant": "rdp", "privacy.delta": 1e-4}
    private = plan(2000, config.resolve("smoke", base))
    control = plan(2000, config.resolve("smoke", {**base,
                                                  "privacy.non_private_control": "true"}))
    assert private.private and not control.private
    assert control.target_epsilon is None and control.epsilon == math.inf
    for s, p in zip(control.stages, private.stages):
        assert s.noise_multiplier == 0.0 and s.mechanism == NO_NOISE
        assert s.epsilon_alone == math.inf and s.event().mechanism == NO_NOISE
        # the same sampling, steps and clipping as the private run: only the noise differs
        assert (s.stage, s.sample_rate, s.steps, s.clip_norm, s.batch_size) == (
            p.stage, p.sample_rate, p.steps, p.clip_norm, p.batch_size)
        assert p.noise_multiplier > 0 and p.mechanism == MECHANISM
    d = control.to_dict()
    assert d["epsilon"] is None and d["private"] is False and d["label"] == NOT_PRIVATE
    assert all(s["epsilon_alone"] is None for s in d["stages"])
    json.dumps(d, allow_nan=False)  # no Infinity in config.json
    assert "label" not in private.to_dict() and private.to_dict()["private"] is True


def test_control_ledger_writes_no_epsilon_and_a_private_ledger_refuses_no_noise(tmp_path):
    led = Ledger(accountant="prv", target_epsilon=None, delta=DELTA)
    # before any step: already NOT PRIVATE, never "epsilon 0"
    assert led.to_dict()["epsilon"] is None and led.to_dict()["private"] is False
    led.record(no_noise("autoencoder", steps=5))
    led.record(no_noise("diffusion", steps=7))
    d = led.save(tmp_path)
    stored = strict_json(tmp_path / FILENAME)
    assert stored == json.loads(json.dumps(d))
    assert stored["epsilon"] is None and stored["private"] is False
    assert stored["label"] == NOT_PRIVATE and stored["target_epsilon"] is None
    assert [e["noise_multiplier"] for e in stored["entries"]] == [0.0, 0.0]
    assert all(e["epsilon_alone"] is None for e in stored["entries"])
    assert recompute(tmp_path / FILENAME) == math.inf
    assert Ledger.load(tmp_path).epsilon() == math.inf
    # A ledger with a target (a private run) cannot take a no-noise entry...
    private = Ledger(accountant="rdp", target_epsilon=10.0, delta=DELTA)
    with pytest.raises(PrivacyError, match="non-private control"):
        private.record(no_noise())
    # ...nor load one (a private privacy.json edited into a control).
    bad = {**stored, "target_epsilon": 10.0}
    (tmp_path / FILENAME).write_text(json.dumps(bad))
    with pytest.raises(PrivacyError, match="unreadable privacy ledger"):
        Ledger.load(tmp_path)
    # Duplicate stages would be under-counted if merged: refused.
    entry = {k: v for k, v in stored["entries"][0].items() if k != "epsilon_alone"}
    (tmp_path / FILENAME).write_text(json.dumps({**stored, "entries": [entry, entry]}))
    with pytest.raises(PrivacyError, match="appears twice"):
        Ledger.load(tmp_path)


def test_a_private_ledger_never_saves_an_infinite_epsilon(tmp_path, monkeypatch):
    from dplatent.privacy import ledger as ledger_mod
    led = Ledger(accountant="rdp", target_epsilon=10.0, delta=DELTA)
    led.record(DPEvent(stage="a", noise_multiplier=1.0, sample_rate=0.01, steps=10,
                       clip_norm=1.0))
    monkeypatch.setattr(ledger_mod, "epsilon", lambda *a, **k: math.inf)
    assert led.to_dict()["epsilon"] is None
    with pytest.raises(PrivacyError, match="ledger epsilon inf exceeds the target 10.0"):
        led.save(tmp_path)
    assert not (tmp_path / FILENAME).exists()


def test_sigma_zero_trainer_adds_no_noise():
    """With noise multiplier 0 the update does not depend on the noise generator; with noise
    it does (so the comparison can fail)."""
    from dplatent.privacy.dp_training import make_trainer

    def one_step(sigma: float, noise_seed: int, mode: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        x = torch.randn(8, 4)
        trainer = make_trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), mode=mode,
                               noise_multiplier=sigma, clip_norm=0.5, expected_batch_size=8,
                               noise_generator=torch.Generator().manual_seed(noise_seed))
        trainer.step_logical([torch.arange(8)],
                             lambda m, idx: m(x[idx]).pow(2).sum(dim=1))
        trainer.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    for mode in ("hooks", "ghost"):
        assert torch.equal(one_step(0.0, 1, mode), one_step(0.0, 2, mode))
        assert not torch.equal(one_step(1.0, 1, mode), one_step(1.0, 2, mode))


# --- the command line ------------------------------------------------------------------------


def test_plan_prints_not_private_and_no_epsilon(monkeypatch, capsys):
    code, out, err = run_main(["plan", *FAST, "--n", "1000", "--delta", "1e-4",
                               "--non-private-control"], monkeypatch, capsys)
    assert code == 0, err
    assert "NOT PRIVATE" in err and "NOT PRIVATE" in out
    assert "composed epsilon: none (NOT PRIVATE)" in out
    assert not re.search(r"epsilon\w*[=:]\s*[0-9]", out), out
    assert out.count("sigma=0 (NOT PRIVATE)") == 2
    # the same through --set
    code, out2, _ = run_main(["plan", *FAST, "--n", "1000", "--delta", "1e-4", "--set",
                              "privacy.non_private_control=true"], monkeypatch, capsys)
    assert code == 0 and out2 == out
    # and a private plan says nothing of the kind
    code, out3, err3 = run_main(["plan", *FAST, "--n", "1000", "--delta", "1e-4"],
                                monkeypatch, capsys)
    assert code == 0 and "NOT PRIVATE" not in out3 + err3


@pytest.mark.parametrize("extra", [["--epsilon", "3"], ["--set", "privacy.epsilon=3"]])
def test_an_epsilon_with_the_control_is_refused(extra, monkeypatch, capsys):
    code, _, err = run_main(["plan", *FAST, "--n", "1000", "--delta", "1e-4",
                             "--non-private-control", *extra], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: a non-private control run has no epsilon; do not pass --epsilon "
        "(or privacy.epsilon) with --non-private-control"]


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.int64)
    x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    rows = np.linspace(2, 22, 10).astype(int)
    for c in range(10):
        x[y == c, rows[c]:rows[c] + 4, 3:25] = 220
    return x, y


def red_pixels(png: Path) -> int:
    import matplotlib.image
    img = matplotlib.image.imread(png)[..., :3]
    return int(((img[..., 0] > 0.9) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)).sum())


@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    """`dplatent train --non-private-control` on a toy npz (smoke preset, a few steps)."""
    folder = tmp_path_factory.mktemp("control")
    x, y = _toy(300, 0)
    np.savez(folder / "toy.npz", x=x, y=y)
    np.savez(folder / "toy-test.npz", x=_toy(100, 1)[0], y=_toy(100, 1)[1])
    mp = pytest.MonkeyPatch()
    out = folder / "run"
    argv = ["dplatent", "train", *FAST, "--dataset", str(folder / "toy.npz"), "--delta", "1e-3",
            "--threads", "1", "--no-progress", "--non-private-control", "--out", str(out)]
    mp.setattr(sys, "argv", argv)
    old = torch.get_num_threads()
    import contextlib
    import io
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, stderr.getvalue()
    finally:
        torch.set_num_threads(old)
        mp.undo()
    return out, stdout.getvalue(), stderr.getvalue(), folder


def test_train_control_run_is_labelled_everywhere(control_run):
    out, stdout, stderr, _ = control_run
    assert "NOT PRIVATE" in stderr and "trained: NOT PRIVATE" in stdout
    assert not re.search(r"epsilon=[0-9]", stdout)
    ledger = strict_json(out / "privacy.json")
    assert ledger["private"] is False and ledger["epsilon"] is None
    assert ledger["label"] == NOT_PRIVATE and ledger["target_epsilon"] is None
    assert {e["stage"] for e in ledger["entries"]} == {"autoencoder", "diffusion"}
    for e in ledger["entries"]:
        assert e["noise_multiplier"] == 0.0 and e["mechanism"] == NO_NOISE and e["steps"] >= 1
        assert e["epsilon_alone"] is None
    cfg = strict_json(out / "config.json")
    assert cfg["privacy"]["non_private_control"] is True
    assert cfg["derived"]["private"] is False
    assert cfg["derived"]["privacy_plan"]["epsilon"] is None
    assert cfg["derived"]["privacy_plan"]["label"] == NOT_PRIVATE
    for line in (out / "train_log.jsonl").read_text().splitlines():
        assert json.loads(line)["epsilon"] is None
    assert red_pixels(out / "samples.png") > 500  # the red NOT PRIVATE banner


def test_sample_grid_banner_only_when_asked(tmp_path):
    from dplatent.sample import save_grid
    x, y = _toy(30, 2)
    save_grid(tmp_path / "plain.png", x, y, [str(c) for c in range(10)])
    save_grid(tmp_path / "control.png", x, y, [str(c) for c in range(10)],
              banner="NOT PRIVATE")
    assert red_pixels(tmp_path / "plain.png") == 0
    assert red_pixels(tmp_path / "control.png") > 500


def test_sample_audit_and_resume_of_a_control_run(control_run, tmp_path, monkeypatch, capsys):
    out, _, _, folder = control_run
    code, so, se = run_main(["sample", "--run", str(out), "--num", "20", "--out",
                             str(tmp_path / "s.npz"), "--no-progress"], monkeypatch, capsys)
    assert code == 0, se
    assert "NOT PRIVATE" in se and "NOT PRIVATE" in so
    from dplatent.export import npz_info
    info = npz_info(tmp_path / "s.npz")  # the npz itself says so too
    assert info["private"] is False and info["label"].startswith("NOT PRIVATE: ")
    assert "epsilon" not in info
    from dplatent.audit import audit_command
    result = audit_command(out, None, 50, 50, 0, tmp_path / "audit.json", threads=1)
    printed = capsys.readouterr().out
    assert "NOT PRIVATE" in printed and "accounted epsilon: none, NOT PRIVATE" in printed
    assert result["private"] is False and result["label"] == NOT_PRIVATE
    assert result["accounted_epsilon"] is None
    assert strict_json(tmp_path / "audit.json")["private"] is False
    # --resume keeps the run's setting; the switch cannot be added or dropped on resume
    code, _, err = run_main(["train", "--resume", "--out", str(out), "--non-private-control"],
                            monkeypatch, capsys)
    assert code == 2 and "--non-private-control" in err


def test_report_of_an_audited_control_run(control_run):
    from dplatent.audit import audit
    from dplatent.report import write_report
    out = control_run[0]
    audit(out, None, n_members=30, n_nonmembers=30, num_synthetic=20, threads=1)
    md = write_report(out)[0].read_text()
    assert md.splitlines()[0].endswith("— NOT PRIVATE")
    audit_section = md.split("## Privacy audit\n", 1)[1]
    assert "| denoiser loss |" in audit_section
    assert "accounted ε: none (NOT PRIVATE)." in audit_section


# --- the training subset ---------------------------------------------------------------------


def test_plan_accounts_for_the_subset_actually_trained_on():
    base = {"privacy.accountant": "rdp", "privacy.delta": 1e-4, "autoencoder.epochs": 2,
            "diffusion.epochs": 3}
    sub = plan(60000, config.resolve("smoke", {**base, "subset": "1000"}))
    alone = plan(1000, config.resolve("smoke", base))
    assert sub.n == 1000 and sub.source_records == 60000
    assert sub.stages == alone.stages and sub.epsilon == alone.epsilon
    assert sub.stage("autoencoder").sample_rate == pytest.approx(64 / 1000)
    assert sub.stage("diffusion").steps == math.ceil(3 * 1000 / 64)
    assert plan(60000, config.resolve("smoke", {**base, "privacy.delta": 1e-5})).n == 60000
    # delta is checked against the records trained on
    with pytest.raises(PrivacyError, match=r"1/n .*n = 1000"):
        plan(60000, config.resolve("smoke", {**base, "subset": "1000",
                                             "privacy.delta": 2e-3}))
    with pytest.raises(PrivacyError, match="subset=70000 exceeds the 60000 records"):
        plan(60000, config.resolve("smoke", {**base, "subset": "70000"}))
    with pytest.raises(DplatentError, match="subset must be >= 0"):
        config.resolve("smoke", {"subset": "-1"})


def test_subset_indices_are_a_seeded_uniform_choice():
    from dplatent.train.stages import subset_indices
    a = subset_indices(1000, 100, seed=3)
    assert np.array_equal(a, subset_indices(1000, 100, seed=3))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and 0 <= a[0] and a[-1] < 1000
    assert not np.array_equal(a, subset_indices(1000, 100, seed=4))
    # roughly uniform: every tenth of the range is hit about equally often over many seeds
    hits = np.concatenate([subset_indices(1000, 100, seed=s) for s in range(200)]) // 100
    counts = np.bincount(hits, minlength=10)
    assert counts.min() > 0.85 * 2000 and counts.max() < 1.15 * 2000


def test_train_on_a_subset_and_audit_its_members(tmp_path, monkeypatch):
    from dplatent import audit as audit_mod
    from dplatent.train.stages import subset_indices
    x, y = _toy(400, 5)
    x[:, 0, :8] = np.arange(400)[:, None] % 251  # make every record distinguishable
    x[:, 1, :8] = np.arange(400)[:, None] // 251
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    train_smoke(tmp_path / "toy.npz", tmp_path / "run", subset="120", seed="7")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())["derived"]
    assert meta["n"] == 120 and meta["source_records"] == 400
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert {e["sample_rate"] for e in ledger["entries"]} == {64 / 120}
    assert meta["privacy_plan"]["n"] == 120
    # The audit's members are the subset's records, its non-members the others.
    seen = []
    real_scores = audit_mod._scores

    def spy(run, images, labels, synthetic, seed):
        seen.append((images.numpy() * 255).round().astype(np.uint8)[:, 0])
        return real_scores(run, images, labels, synthetic, seed)

    monkeypatch.setattr(audit_mod, "_scores", spy)
    result = audit_mod.audit(tmp_path / "run", None, n_members=50, n_nonmembers=60,
                             num_synthetic=20, threads=1)
    inside = set(subset_indices(400, 120, seed=7).tolist())

    def ids(images):
        return {int(a) + 251 * int(b) for a, b in zip(images[:, 0, 0], images[:, 1, 0])}

    assert len(ids(seen[0])) == 50 and ids(seen[0]) <= inside
    assert len(ids(seen[1])) == 60 and not ids(seen[1]) & inside
    assert result["members"]["count"] == 50 and result["nonmembers"]["count"] == 60
    assert "outside the subset" in result["nonmembers"]["source"]
    assert result["private"] is True and result["accounted_epsilon"] == ledger["epsilon"]
