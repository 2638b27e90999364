"""Membership-inference audit: the statistics on known inputs, and the audit end to end on a
tiny smoke run with canaries."""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from dplatent.audit import (attack_metrics, audit, audit_command, canary_images,
                            clopper_pearson_upper, epsilon_lower_bound,
                            make_canary_dataset, roc_auc, tpr_at_fpr)
from dplatent.errors import ConfigError, DataError



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and shares a busy machine best."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- statistics ------------------------------------------------------------------------------


def test_clopper_pearson_upper_known_values():
    # k = 0: the upper end solves (1 - p)^n = alpha / 2.
    assert clopper_pearson_upper(0, 10) == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)
    assert clopper_pearson_upper(0, 1000) == pytest.approx(1 - 0.025 ** 0.001, rel=1e-9)
    assert clopper_pearson_upper(10, 10) == 1.0
    # Textbook value: 5 of 20 at 95% -> (0.0866, 0.4910).
    assert clopper_pearson_upper(5, 20) == pytest.approx(0.4910, abs=1e-4)
    ub = clopper_pearson_upper(np.arange(0, 101), 100)
    assert np.all(np.diff(ub) > 0) and np.all(ub > np.arange(0, 101) / 100 - 1e-12)


def test_epsilon_lower_bound_perfect_separation_n1000():
    members, nonmembers = np.ones(1000), np.zeros(1000)
    delta = 1e-5
    lb = epsilon_lower_bound(members, nonmembers, delta)
    u = 1 - 0.025 ** (1 / 1000)
    assert lb["epsilon"] == pytest.approx(math.log((1 - delta - u) / u), rel=1e-9)
    assert 5.5 < lb["epsilon"] < 5.7 and math.isfinite(lb["epsilon"])
    assert lb["fpr"] == 0 and lb["fnr"] == 0
    # Higher confidence, fewer records: weaker bounds.
    assert epsilon_lower_bound(members, nonmembers, delta, 0.99)["epsilon"] < lb["epsilon"]
    assert epsilon_lower_bound(members[:100], nonmembers[:100], delta)["epsilon"] < lb["epsilon"]


def test_epsilon_lower_bound_identical_distributions_is_about_zero():
    rng = np.random.default_rng(0)
    same = rng.normal(size=1000)
    assert epsilon_lower_bound(same, same.copy(), 1e-5)["epsilon"] == 0.0
    bounds = [epsilon_lower_bound(rng.normal(size=1000), rng.normal(size=1000), 1e-5)["epsilon"]
              for _ in range(5)]
    assert max(bounds) < 0.15


def test_epsilon_lower_bound_grows_with_separation():
    rng = np.random.default_rng(1)
    non = rng.normal(size=2000)
    bounds = [epsilon_lower_bound(rng.normal(loc=d, size=2000), non, 1e-5)["epsilon"]
              for d in (0.0, 1.0, 3.0)]
    assert bounds[0] < 0.15 < bounds[1] < bounds[2]
    # The attack's direction is fixed in advance ('member iff score >= t'): flipping it after
    # seeing the scores would be a second test, so a reversed attack earns nothing.
    assert epsilon_lower_bound(non, non + 10, 1e-5)["epsilon"] == 0.0


def test_roc_auc_on_synthetic_scores():
    rng = np.random.default_rng(2)
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.ones(5), np.ones(7)) == 0.5
    m, o = rng.normal(1.0, size=300), rng.normal(size=200)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a, b in product(m, o)])
    assert roc_auc(m, o) == pytest.approx(brute, abs=1e-12)
    # Normal scores with unit shift: AUC = Phi(1 / sqrt 2) = 0.760.
    big = roc_auc(rng.normal(1.0, size=20000), rng.normal(size=20000))
    assert big == pytest.approx(0.7602, abs=0.01)


def test_tpr_at_fpr():
    non = np.arange(1000, dtype=float)            # scores 0..999
    mem = np.array([999.5, 998.5, 990.5, 500.0])
    assert tpr_at_fpr(mem, non, 0.0) == 0.25       # only 999.5 beats every non-member
    assert tpr_at_fpr(mem, non, 0.001) == 0.5      # one false positive allowed
    assert tpr_at_fpr(mem, non, 0.01) == 0.75
    metrics = attack_metrics(mem, non, 1e-5)
    assert set(metrics["tpr_at_fpr"]) == {"0.001", "0.01"}
    assert 0 <= metrics["auc"] <= 1


def test_canary_images_are_deterministic_and_unlike_each_other():
    a, b = canary_images(8, 28, 1, seed=3), canary_images(8, 28, 1, seed=3)
    assert a.dtype == np.uint8 and a.shape == (8, 28, 28)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, canary_images(8, 28, 1, seed=4))
    assert canary_images(2, 32, 3, seed=0).shape == (2, 32, 32, 3)


# --- end to end ------------------------------------------------------------------------------

def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.int64)
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    rows = np.linspace(2, 22, 10).astype(int)
    for c in range(10):
        x[y == c, rows[c]:rows[c] + 4, 3:25] = 220
    return x, y


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A smoke run (one DP step per stage) on a toy set with 10 of 20 canaries inserted."""
    from dplatent import config
    from dplatent.train.stages import train
    folder = tmp_path_factory.mktemp("audit")
    x, y = _toy(200, 0)
    np.savez(folder / "toy.npz", x=x, y=y)
    xt, yt = _toy(90, 1)
    np.savez(folder / "toy-test.npz", x=xt, y=yt)
    info = make_canary_dataset(str(folder / "toy.npz"), None, folder / "audit.npz", k=10,
                               label=3, seed=0)
    cfg = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                   "threads": "1"})
    old = torch.get_num_threads()
    try:
        train(dataset=info["train"], data_dir=None, cfg=cfg, run_dir=folder / "run",
              progress=False)
    finally:
        torch.set_num_threads(old)
    return folder / "run", Path(info["canaries"]), info


def test_make_canary_dataset_layout(canary_run):
    _, canaries, info = canary_run
    assert info["n"] == 210 and info["k"] == 10
    with np.load(info["train"]) as f:
        x, y = f["x"], f["y"]
    with np.load(canaries) as f:
        cx, cy, member = f["x"], f["y"], f["member"]
    assert x.shape == (210, 28, 28) and len(cx) == 20 and member.sum() == 10
    assert np.all(cy == 3)
    inserted = {c.tobytes() for c in cx[member]}
    held_out = {c.tobytes() for c in cx[~member]}
    in_train = {im.tobytes() for im in x}
    assert inserted <= in_train and not held_out & in_train
    canary_rows = np.array([im.tobytes() in inserted for im in x])
    assert canary_rows.sum() == 10 and np.all(y[canary_rows] == 3)
    with np.load(info["test"]) as f:
        assert len(f["y"]) == 90


def test_audit_end_to_end(canary_run, tmp_path, capsys):
    run, canaries, _ = canary_run
    out = tmp_path / "audit.json"
    result = audit_command(run, None, 120, 80, 0, out, canaries=canaries, threads=1)
    printed = capsys.readouterr().out
    assert "empirical epsilon lower bound" in printed and "denoiser_loss" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["members"]["count"] == 120 and result["nonmembers"]["count"] == 80
    assert result["delta"] == 1e-3
    ledger = json.loads((run / "privacy.json").read_text())
    assert result["accounted_epsilon"] == ledger["epsilon"]
    groups = [result["attacks"], result["canaries"]["attacks"]]
    for attacks in groups:
        assert set(attacks) == {"denoiser_loss", "reconstruction_loss", "nearest_synthetic"}
        for a in attacks.values():
            assert 0.0 <= a["auc"] <= 1.0
            assert set(a["tpr_at_fpr"]) == {"0.001", "0.01"}
            assert a["epsilon_lower_bound"] >= 0 and math.isfinite(a["epsilon_lower_bound"])
    assert result["canaries"]["inserted"] == 10 and result["canaries"]["held_out"] == 10
    assert result["empirical_epsilon_lower_bound"] == max(
        a["epsilon_lower_bound"] for g in groups for a in g.values())
    # Deterministic for a seed; the default output is RUN/audit.json.
    again = audit(run, None, n_members=120, n_nonmembers=80, seed=0, canaries=canaries,
                  threads=1)
    assert again["attacks"] == result["attacks"]
    assert (run / "audit.json").is_file()


def test_audit_refuses_bad_arguments(canary_run, tmp_path):
    run, _, _ = canary_run
    with pytest.raises(ConfigError, match="must be >= 1"):
        audit(run, None, n_members=0)
    with pytest.raises(DataError, match="canary file not found"):
        audit(run, None, n_members=20, n_nonmembers=20, num_synthetic=20,
              canaries=tmp_path / "none.npz")
    from dplatent.errors import DplatentError
    with pytest.raises(DplatentError, match="not a run directory"):
        audit(tmp_path, None)
