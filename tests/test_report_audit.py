"""The report's privacy-audit section, and the NOT PRIVATE label of a non-private control."""

from __future__ import annotations

import copy
import json
import re

import pytest

from dplatent.errors import DataError
from dplatent.report import write_report

PRIVACY = {
    "accountant": "prv", "accountant_name": "Opacus PRV accountant", "target_epsilon": 10.0,
    "delta": 1e-5, "epsilon": 9.87, "private": True,
    "entries": [
        {"stage": "autoencoder", "mechanism": "poisson_subsampled_gaussian",
         "noise_multiplier": 1.31, "sample_rate": 0.1, "steps": 300, "clip_norm": 1.0,
         "epsilon_alone": 3.21},
        {"stage": "diffusion", "mechanism": "poisson_subsampled_gaussian",
         "noise_multiplier": 0.97, "sample_rate": 0.1, "steps": 2000, "clip_norm": 1.0,
         "epsilon_alone": 8.76},
    ],
}
CONTROL_PRIVACY = {
    "accountant": "prv", "accountant_name": "Opacus PRV accountant", "target_epsilon": None,
    "delta": 1e-5, "epsilon": None, "private": False,
    "label": "NOT PRIVATE: non-private control run (noise multiplier 0); no "
             "differential-privacy guarantee",
    "entries": [
        {"stage": "autoencoder", "mechanism": "no_noise_control", "noise_multiplier": 0.0,
         "sample_rate": 0.1, "steps": 300, "clip_norm": 1.0, "epsilon_alone": None},
        {"stage": "diffusion", "mechanism": "no_noise_control", "noise_multiplier": 0.0,
         "sample_rate": 0.1, "steps": 2000, "clip_norm": 1.0, "epsilon_alone": None},
    ],
}


def attack(auc, t1, t2, lb):
    return {"auc": auc, "tpr_at_fpr": {"0.001": t1, "0.01": t2}, "epsilon_lower_bound": lb}


AUDIT = {
    "run": "r", "dataset": "mnist", "seed": 0, "private": True,
    "members": {"source": "random training subset of 500", "count": 500},
    "nonmembers": {"source": "training records outside the subset", "count": 400},
    "synthetic": "generated 2000 with seed 0", "delta": 1e-5, "confidence": 0.95,
    "accounted_epsilon": 9.87, "empirical_epsilon_lower_bound": 0.4321,
    "attacks": {"denoiser_loss": attack(0.5123, 0.0021, 0.0147, 0.4321),
                "reconstruction_loss": attack(0.4987, 0.0, 0.0083, 0.0),
                "nearest_synthetic": attack(0.5011, 0.0019, 0.0111, 0.1234)},
    "canaries": None,
    "notes": ["The maximum over thresholds is chosen on the audited records (optimistic)."],
}


def control_audit() -> dict:
    a = copy.deepcopy(AUDIT)
    a.update(private=False, label="NOT PRIVATE: non-private control run", accounted_epsilon=None,
             empirical_epsilon_lower_bound=1.2345)
    a["attacks"]["denoiser_loss"] = attack(0.8771, 0.0432, 0.1876, 1.2345)
    return a


def make_run(tmp_path, privacy, audit=None, control=False):
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"privacy": {"non_private_control": control}, "derived": {"dataset": "mnist"}}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "privacy.json").write_text(json.dumps(privacy))
    if audit is not None:
        (run / "audit.json").write_text(json.dumps(audit))
    return run


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_audit_table_beside_the_accounted_epsilon(tmp_path):
    md_path, html_path = write_report(make_run(tmp_path, PRIVACY, AUDIT))
    md, page = md_path.read_text(), html_path.read_text()
    audit = section(md, "Privacy audit")
    assert ("| attack | AUC | TPR @ 0.1% FPR | TPR @ 1% FPR | empirical ε lower bound | "
            "accounted ε |") in audit
    assert "| denoiser loss | 0.512 | 0.0021 | 0.0147 | 0.432 | 9.87 |" in audit
    assert "| reconstruction loss | 0.499 | 0 | 0.0083 | 0 | 9.87 |" in audit
    assert "| nearest synthetic | 0.501 | 0.0019 | 0.0111 | 0.123 | 9.87 |" in audit
    assert "500 members (random training subset of 500)" in audit
    assert "400 non-members (training records outside the subset)" in audit
    assert "Largest empirical ε lower bound: 0.4321; accounted ε: 9.87." in audit
    assert "optimistic" in audit
    assert "<td>denoiser loss</td><td>0.512</td>" in page
    assert "NOT PRIVATE" not in md and "NOT PRIVATE" not in page
    assert "Warning" not in audit


def test_canary_attacks_and_a_bound_above_the_accounted_epsilon_are_shown(tmp_path):
    a = copy.deepcopy(AUDIT)
    a["canaries"] = {"inserted": 10, "held_out": 10,
                     "attacks": {"denoiser_loss": attack(0.99, 0.9, 0.9, 12.5)}}
    a["empirical_epsilon_lower_bound"] = 12.5
    md = write_report(make_run(tmp_path, PRIVACY, a))[0].read_text()
    audit = section(md, "Privacy audit")
    assert "| canary: denoiser loss | 0.99 | 0.9 | 0.9 | 12.5 | 9.87 |" in audit
    assert "Warning: the empirical lower bound exceeds the accounted ε" in audit


def test_control_run_is_labelled_not_private_with_no_epsilon(tmp_path):
    md_path, html_path = write_report(make_run(tmp_path, CONTROL_PRIVACY, control_audit(),
                                               control=True))
    md, page = md_path.read_text(), html_path.read_text()
    assert md.splitlines()[0] == "# dplatent run report: run — NOT PRIVATE"
    assert md.splitlines()[2].startswith("**NOT PRIVATE: non-private control run")
    assert "<title>dplatent run report: run — NOT PRIVATE</title>" in page
    assert "<p><strong>NOT PRIVATE: non-private control run" in page
    ledger = section(md, "Privacy ledger")
    assert "NOT PRIVATE" in ledger and "total ε spent = none (NOT PRIVATE)" in ledger
    assert "| **total (composed)** |  |  |  |  |  | none (NOT PRIVATE) |" in ledger
    audit = section(md, "Privacy audit")
    assert "| denoiser loss | 0.877 | 0.0432 | 0.188 | 1.23 | none (NOT PRIVATE) |" in audit
    assert "accounted ε: none (NOT PRIVATE)." in audit
    # no finite epsilon is claimed anywhere in the privacy sections
    for text in (ledger, audit):
        assert not re.search(r"accounted ε: [0-9]|ε spent = [0-9]", text)


@pytest.mark.parametrize("marker", ["config", "privacy", "audit"])
def test_any_one_file_marking_the_control_labels_the_report(tmp_path, marker):
    privacy = dict(PRIVACY) if marker != "privacy" else {**PRIVACY, "private": False}
    audit = AUDIT if marker != "audit" else {**AUDIT, "private": False}
    md = write_report(make_run(tmp_path, privacy, audit, control=marker == "config"))[0]
    assert md.read_text().splitlines()[0].endswith("— NOT PRIVATE")


def test_no_audit_says_how_to_make_one_and_a_broken_one_is_a_data_error(tmp_path):
    run = make_run(tmp_path, PRIVACY)
    assert "No audit.json; run `dplatent audit --run RUN`." in write_report(run)[0].read_text()
    (run / "audit.json").write_text("{not json")
    with pytest.raises(DataError, match="audit.json: not valid JSON"):
        write_report(run)
