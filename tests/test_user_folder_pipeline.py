"""A user's RGB image folder end to end through the command line: train (smoke preset), sample,
evaluate (CNN on RGB; FID with a stand-in feature extractor), export, load the export back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_folder import CLASSES, make_folder
from test_pipeline import cli

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing",
                                        "ignore::DeprecationWarning:diffusers")

PER_CLASS, SIZE, KEPT_TRIANGLES = 36, 32, 12
TRAIN = ["--preset", "smoke", "--epsilon", "4", "--delta", "1e-3", "--set",
         "privacy.accountant=rdp", "--seed", "1", "--threads", "1", "--device", "cpu",
         "--no-progress"]


class RecordingExtractor(torch.nn.Module):
    """Stands in for Inception: pooled pixels as features; keeps every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    make_folder(root / "shapes-test", per_class=12, size=SIZE, seed=1)
    folder = make_folder(root / "shapes", per_class=PER_CLASS, size=SIZE, seed=0)
    for p in sorted((folder / "triangle").iterdir())[KEPT_TRIANGLES:]:
        p.unlink()  # an unbalanced private set: 36, 36, 12
    return folder


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "shapes"
    threads = torch.get_num_threads()
    try:
        code, stdout, err = cli("train", "--out", out, "--dataset", folder, *TRAIN)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "trained: epsilon=" in stdout
    return out


@pytest.mark.slow
def test_train_takes_channels_size_and_classes_from_the_folder(run, folder):
    saved = json.loads((run / "config.json").read_text())
    derived = saved["derived"]
    assert derived["channels"] == 3 and derived["image_size"] == SIZE
    assert derived["class_names"] == list(CLASSES) and derived["num_classes"] == 3
    assert derived["n"] == 2 * PER_CLASS + KEPT_TRIANGLES and derived["device"] == "cpu"
    assert saved["device"] == "cpu"
    ae = torch.load(run / "checkpoints" / "autoencoder.pt", weights_only=True)["model"]
    assert ae["encoder.body.0.0.weight"].shape[1] == 3  # RGB in
    assert ae["decoder.out.weight"].shape[0] == 3       # RGB out
    grid = Image.open(run / "samples.png")
    assert grid.format == "PNG"


@pytest.mark.slow
def test_sample_evaluate_export_and_load_back(run, folder, tmp_path, monkeypatch):
    npz = run / "synthetic.npz"
    code, out, err = cli("sample", "--run", run, "--num", 30, "--out", npz, "--seed", 2,
                         "--png-dir", tmp_path / "pngs", "--no-progress", "--device", "cpu")
    assert code == 0, err
    with np.load(npz) as f:
        x, y = f["x"], f["y"]
    assert x.shape == (30, SIZE, SIZE, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [10, 10, 10]  # balanced, not the private 36:36:12
    png = Image.open(tmp_path / "pngs" / "01_square" / "000004.png")
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), x[4])

    # evaluate from the run: the real set is the training folder, its test split shapes-test/
    extractor = RecordingExtractor()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("dplatent.eval.fid.load_inception", lambda path=None: (extractor, "x"))
    code, out, err = cli("evaluate", "--run", run, "--metrics", "cnn,fid", "--fid-samples", 30,
                         "--fid-batch-size", 16, "--seeds", 1, "--cnn-epochs", 1,
                         "--threads", 1, "--device", "cpu", "--no-progress")
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["cnn_acc"] <= 1.0 and result["fid"] >= 0
    assert result["device"] == "cpu" and result["fid_reference"].endswith("shapes")
    # RGB went into the feature extractor as RGB: the three channels differ
    seen = torch.cat(extractor.batches)
    assert seen.shape[1:] == (3, 299, 299) and len(seen) == 30 + 30
    assert not torch.equal(seen[:, 0], seen[:, 1])

    code, out, err = cli("export", "--run", run, "--out", tmp_path / "export")
    assert code == 0, err
    assert "exported 30 images" in out and "metrics from eval.json" in out
    card = (tmp_path / "export" / "README.md").read_text()
    assert "CNN accuracy on the real test split" in card and "NOT PRIVATE" not in card
    assert sorted(p.name for p in (tmp_path / "export" / "train").iterdir()) == list(CLASSES)

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "export"),
                               cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.num_rows == 30 and ds.features["label"].names == list(CLASSES)
    for row in ds.select(range(0, 30, 7)):
        i = int(Path(row["image"].filename).stem)
        assert row["label"] == y[i] and np.array_equal(np.asarray(row["image"]), x[i])


@pytest.mark.slow
def test_sample_with_export_dir_and_a_used_folder(run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    code, _, err = cli("sample", "--run", run, "--num", 6, "--out", tmp_path / "a.npz",
                       "--export-dir", tmp_path / "taken", "--no-progress")
    assert code == 2 and "taken exists and is not empty" in err
    assert not (tmp_path / "a.npz").exists()  # refused before sampling
    code, out, err = cli("sample", "--run", run, "--num", 6, "--out", tmp_path / "a.npz",
                         "--seed", 9, "--export-dir", tmp_path / "exp", "--no-progress")
    assert code == 0, err
    assert "exported 6 images" in out and "metrics" not in out
    facts = json.loads((tmp_path / "exp" / "dplatent.json").read_text())
    assert facts["sampling"]["seed"] == 9 and facts["private"] is True
    assert facts["channels"] == 3 and facts["mode"] == "RGB"


@pytest.mark.slow
def test_a_non_private_control_run_exports_labelled_not_private(folder, tmp_path):
    out = tmp_path / "control"
    threads = torch.get_num_threads()
    try:
        code, _, err = cli("train", "--out", out, "--dataset", folder, "--no-grid",
                           *[a for a in TRAIN if a not in ("--epsilon", "4")],
                           "--non-private-control")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    code, stdout, err = cli("sample", "--run", out, "--num", 6, "--no-progress",
                            "--export-dir", tmp_path / "exp")
    assert code == 0, err
    assert "labelled NOT PRIVATE" in stdout
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "\n# NOT PRIVATE: Synthetic shapes (no differential-privacy guarantee)\n" in card
    assert "> **NOT PRIVATE: non-private control run (noise multiplier 0)" in card
    assert "NOT PRIVATE: NOT PRIVATE" not in card


def test_a_size_the_autoencoder_cannot_halve_is_refused_before_anything_is_written(tmp_path):
    folder = make_folder(tmp_path / "odd", per_class=4, size=30)
    code, out, err = cli("train", "--out", tmp_path / "run", "--dataset", folder, *TRAIN)
    assert code == 2 and out == ""
    assert err.strip() == ("error: 30x30 images do not fit the autoencoder: its 2 downsampling "
                           "stages (autoencoder.channels = [8, 16]) need a side divisible by 4, "
                           "e.g. 28, 32, 64")
    assert not (tmp_path / "run").exists()
