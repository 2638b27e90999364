"""Export: Hugging Face `datasets` ImageFolder layout + data card, loaded back with `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dplatent import export
from dplatent.errors import ConfigError, DataError
from dplatent.io import sha256_file
from dplatent.sample import run_fingerprint, save_npz
from dplatent.train.loop import checkpoint_path

FASHION = ["T-shirt/top", "Trouser", "Pullover"]
LEDGER = {"accountant": "rdp", "accountant_name": "Opacus RDP accountant (Mironov 2017)",
          "target_epsilon": 4.0, "delta": 1e-5, "epsilon": 3.9871, "private": True,
          "entries": [{"stage": "autoencoder", "mechanism": "subsampled_gaussian",
                       "noise_multiplier": 1.2, "sample_rate": 0.01, "steps": 300,
                       "clip_norm": 1.0, "epsilon_alone": 1.5},
                      {"stage": "diffusion", "mechanism": "subsampled_gaussian",
                       "noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 900,
                       "clip_norm": 1.0, "epsilon_alone": 3.5}]}


def fake_run(root: Path, class_names: list[str], ledger: dict | None = LEDGER,
             dataset: str = "/private/holder/files/clinic-scans") -> Path:
    """A run directory as far as the export reads it: config.json and privacy.json."""
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "privacy": {"non_private_control": ledger is not None and not ledger.get("private")},
        "derived": {"dataset": dataset, "class_names": class_names}}))
    if ledger is not None:
        (run / "privacy.json").write_text(json.dumps(ledger))
    for stage in ("autoencoder", "diffusion"):  # stand-ins: the export only hashes them
        path = checkpoint_path(run, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{stage} weights".encode())
    return run


def drawn(path: Path, x, y, run: Path, **info) -> Path:
    """An npz as `dplatent sample` writes it from `run`: with the run's model fingerprint."""
    return save_npz(path, x, y, info={**info, "run_fingerprint": run_fingerprint(run)})


def images(n: int, classes: int, shape: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return x, (np.arange(n) % classes).astype(np.int64)


def load_back(folder: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset("imagefolder", data_dir=str(folder),
                                 cache_dir=str(tmp_path / "hf-cache"))["train"]


def test_folder_names_keep_the_label_order_when_sorted():
    assert export.folder_names(["0", "1", "2"]) == ["0", "1", "2"]
    assert export.folder_names(["cat", "dog"]) == ["cat", "dog"]
    prefixed = export.folder_names(FASHION)
    assert prefixed == ["00_T-shirt-top", "01_Trouser", "02_Pullover"]
    assert export.folder_names(["b", "a"]) == ["00_b", "01_a"]  # unsorted: prefixed
    assert export.folder_names(["a b", "c"]) == ["00_a-b", "01_c"]
    many = export.folder_names([f"c/{i}" for i in range(120)])
    assert many[5] == "005_c-5" and sorted(many) == many


def test_grey_export_loads_back_with_datasets_pixel_for_pixel(tmp_path):
    run = fake_run(tmp_path, FASHION)
    x, y = images(12, 3, (28, 28))
    npz = drawn(tmp_path / "s.npz", x, y, run, seed=7, guidance=1.0, steps=50, sampler="ddim")
    facts = export.export_run(tmp_path / "out", run, npz)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dplatent.json",
                                                     "privacy.json", "train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == export.folder_names(FASHION)
    assert Image.open(out / "train" / "01_Trouser" / "000004.png").mode == "L"
    ds = load_back(out, tmp_path)
    assert ds.num_rows == 12
    assert ds.features["label"].names == export.folder_names(FASHION)
    for row in ds:
        i = int(Path(row["image"].filename).stem)
        assert row["label"] == y[i]
        assert np.array_equal(np.asarray(row["image"]), x[i])
    assert facts["private"] and facts["sampling"]["seed"] == 7
    assert [c["name"] for c in facts["classes"]] == FASHION
    assert json.loads((out / "dplatent.json").read_text()) == facts
    assert json.loads((out / "privacy.json").read_text()) == LEDGER


def test_rgb_export_loads_back_as_rgb_and_from_its_card(tmp_path):
    datasets = pytest.importorskip("datasets")
    run = fake_run(tmp_path, ["circle", "square"])
    x, y = images(6, 2, (32, 32, 3), seed=1)
    export.export_run(tmp_path / "out", run, save_npz(tmp_path / "s.npz", x, y))
    ds = load_back(tmp_path / "out", tmp_path)
    assert ds.features["label"].names == ["circle", "square"]
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    i = int(Path(row["image"].filename).stem)
    assert np.array_equal(np.asarray(row["image"]), x[i]) and row["label"] == y[i]
    # the card's YAML header declares the same features and the train split
    from_card = datasets.load_dataset(str(tmp_path / "out"),
                                      cache_dir=str(tmp_path / "hf-cache-2"))
    assert list(from_card) == ["train"] and from_card["train"].num_rows == 6
    assert from_card["train"].features["label"].names == ["circle", "square"]


def test_card_states_method_budget_accountant_dates_and_no_private_path(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog"])
    x, y = images(4, 2, (28, 28))
    export.export_run(tmp_path / "out", run, drawn(tmp_path / "s.npz", x, y, run))
    card = (tmp_path / "out" / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert ('pretty_name: "Synthetic clinic-scans (differentially private, epsilon = 3.99)"'
            in header)
    assert "- differential-privacy" in header and "NOT PRIVATE" not in card
    assert "DP-SGD" in body and "- epsilon: 3.9871 (target 4)" in body
    assert "- delta: 1e-05" in body and "Opacus RDP accountant" in body
    assert "| diffusion | 1.1 | 0.02 | 900 | 1 | 3.5000 |" in body
    assert "- exported: 20" in body and "- trained: 20" in body
    assert "Not evaluated" in body
    assert "/private/holder" not in card  # only the data set's last path component


def test_not_private_run_is_labelled_in_title_banner_tags_and_facts(tmp_path):
    ledger = {**LEDGER, "epsilon": None, "private": False, "target_epsilon": None,
              "label": "NOT PRIVATE: non-private control run (noise multiplier 0); "
                       "no differential-privacy guarantee"}
    run = fake_run(tmp_path, ["cat", "dog"], ledger=ledger)
    x, y = images(4, 2, (28, 28))
    facts = export.export_run(tmp_path / "out", run, save_npz(tmp_path / "s.npz", x, y))
    card = (tmp_path / "out" / "README.md").read_text()
    assert facts["label"] == ledger["label"]  # not labelled twice
    assert 'pretty_name: "NOT PRIVATE: Synthetic clinic-scans' in card
    assert "\n# NOT PRIVATE: " in card and "> **NOT PRIVATE: " in card
    assert "- not-private" in card and "- differential-privacy" not in card
    assert "- epsilon: none (NOT PRIVATE)" in card


def test_a_run_without_a_ledger_claims_no_guarantee(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog"], ledger=None)
    x, y = images(4, 2, (28, 28))
    facts = export.export_run(tmp_path / "out", run, save_npz(tmp_path / "s.npz", x, y))
    assert not facts["private"] and "no privacy ledger" in facts["label"]
    assert not (tmp_path / "out" / "privacy.json").exists()
    assert "No privacy ledger: no guarantee is claimed." in (tmp_path / "out" / "README.md"
                                                              ).read_text()


def test_metrics_only_from_an_eval_json_of_exactly_these_images(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog"])
    x, y = images(4, 2, (28, 28))
    npz = save_npz(tmp_path / "s.npz", x, y)
    evaluation = {"dataset": "/private/holder/files/clinic-scans", "cnn_acc": 0.8125,
                  "cnn_acc_std": 0.01, "classifier_seeds": 3, "fid": 12.5, "fid_samples": 4,
                  "fid_reference": "/private/holder/files/clinic-scans",
                  "fid_reference_samples": 4, "fid_warning": None,
                  "fid_reference_split": "test",
                  "synthetic_sha256": sha256_file(npz)}
    (run / "eval.json").write_text(json.dumps(evaluation))
    facts = export.export_run(tmp_path / "out", run, npz)
    card = (tmp_path / "out" / "README.md").read_text()
    assert facts["metrics"]["cnn_acc"] == 0.8125
    assert "- CNN accuracy on the real test split: 81.25 % (± 1.00, 3 seeds)" in card
    assert "- FID: 12.50 (4 synthetic vs 4 real images, clinic-scans)" in card
    assert "/private/holder" not in card
    # another npz (one pixel changed): the metrics are not quoted
    x[0, 0, 0] ^= 1
    other = save_npz(tmp_path / "t.npz", x, y)
    facts = export.export_run(tmp_path / "out2", run, other)
    assert facts["metrics"] is None
    assert "Not evaluated" in (tmp_path / "out2" / "README.md").read_text()
    # seeds that do not start at 0 are named on the card and kept in the facts
    (run / "eval.json").write_text(json.dumps({**evaluation, "classifier_first_seed": 3}))
    facts = export.export_run(tmp_path / "out3", run, npz)
    assert facts["metrics"]["classifier_first_seed"] == 3
    assert "(± 1.00, 3 seeds (3-5))" in (tmp_path / "out3" / "README.md").read_text()


def test_refusals(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog", "eel"])
    x, y = images(4, 3, (28, 28))
    npz = save_npz(tmp_path / "s.npz", x, y)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="full exists and is not empty"):
        export.export_run(tmp_path / "full", run, npz)
    with pytest.raises(DataError, match=r"not a run directory \(no config.json\)"):
        export.export_run(tmp_path / "out", tmp_path, npz)
    few = save_npz(tmp_path / "few.npz", x[:2], y[:2])
    with pytest.raises(DataError, match=r"no images of class\(es\) \['eel'\]"):
        export.export_run(tmp_path / "out", run, few)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    export.export_run(tmp_path / "empty", run, npz)
    assert (tmp_path / "empty" / "README.md").is_file()


def test_images_not_drawn_from_the_run_are_labelled_not_private(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog"])
    x, y = images(4, 2, (28, 28))
    plain = export.export_run(tmp_path / "a", run, save_npz(tmp_path / "s.npz", x, y))
    assert not plain["private"] and "model fingerprint" in plain["label"]
    assert "NOT PRIVATE" in (tmp_path / "a" / "README.md").read_text()
    assert export.export_run(tmp_path / "b", run, drawn(tmp_path / "t.npz", x, y, run))["private"]
    # the models changed after sampling (e.g. training went on): no longer this run's images
    checkpoint_path(run, "diffusion").write_bytes(b"other weights")
    assert not export.export_run(tmp_path / "c", run, tmp_path / "t.npz")["private"]


def test_fid_against_the_private_training_split_is_not_published(tmp_path):
    run = fake_run(tmp_path, ["cat", "dog"])
    x, y = images(4, 2, (28, 28))
    npz = drawn(tmp_path / "s.npz", x, y, run)
    evaluation = {"dataset": "mnist", "cnn_acc": 0.9, "fid": 12.5, "fid_samples": 4,
                  "fid_reference": "mnist/train", "fid_reference_samples": 4,
                  "fid_reference_split": "train", "synthetic_sha256": sha256_file(npz)}
    (run / "eval.json").write_text(json.dumps(evaluation))
    facts = export.export_run(tmp_path / "out", run, npz)
    assert facts["metrics"]["cnn_acc"] == 0.9
    assert not any(k.startswith("fid") for k in facts["metrics"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- FID:" not in card and "12.5" not in card and "no FID" in card
