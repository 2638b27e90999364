"""write_report on a fake run directory."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dplatent.errors import DataError  # noqa: E402
from dplatent.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PRIVACY = {
    "accountant": "prv", "target_epsilon": 10.0, "delta": 1e-5, "epsilon": 9.87,
    "entries": [
        {"stage": "autoencoder", "mechanism": "dp-sgd", "noise_multiplier": 1.31,
         "sample_rate": 0.0042, "steps": 1200, "clip_norm": 1.0, "epsilon_alone": 3.21},
        {"stage": "diffusion", "mechanism": "dp-sgd", "noise_multiplier": 0.97,
         "sample_rate": 0.0171, "steps": 5400, "clip_norm": 1.0, "epsilon_alone": 8.76},
    ],
}
EVAL = {"dataset": "mnist", "fid": 31.4159, "fid_samples": 2000, "fid_reference": "mnist/train",
        "fid_reference_samples": 2000,
        "fid_warning": "FID below 5,000 samples is dominated by small-sample bias (used 2,000)",
        "cnn_acc": 0.9512, "cnn_acc_std": 0.0031, "cnn_acc_per_seed": [0.95, 0.949, 0.955],
        "cnn_epochs": 10, "cnn_seconds": 120.0, "logreg_acc": 0.8801, "logreg_acc_std": 0.0012,
        "logreg_acc_per_seed": [0.88, 0.879, 0.881], "logreg_epochs": 20, "logreg_seconds": 9.0}


def train_log():
    for stage, steps in (("autoencoder", 30), ("diffusion", 50)):
        for step in range(0, steps, 5):
            yield {"stage": stage, "step": step, "loss": 1.0 / (step + 1),
                   "epsilon": 0.1 * step, "time": float(step)}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "mnist", "note": "<script>x</script>"}))
    (run / "privacy.json").write_text(json.dumps(PRIVACY))
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in train_log()) + "\n")
    (run / "eval.json").write_text(json.dumps(EVAL))
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(run / "samples.png")
    plt.close(fig)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 3)
    np.savez(run / "synthetic.npz", x=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), y=y)
    return run


def test_full_report(run_dir):
    md_path, html_path = write_report(run_dir)
    md, page = md_path.read_text(), html_path.read_text()
    for png in ("training_curves.png", "synthetic_grid.png"):
        assert (run_dir / png).read_bytes().startswith(PNG_MAGIC)
        assert f"]({png})" in md and f'src="{png}"' in page
    assert "](samples.png)" in md
    # privacy ledger: every stage with sigma, q, steps, epsilon alone, and the total
    for text in ("autoencoder", "diffusion", "1.31", "0.0042", "1200", "3.21",
                 "0.97", "0.0171", "5400", "8.76", "9.87", "prv"):
        assert text in md and text in page, text
    assert "| **total (composed)** |" in md and "<strong>total (composed)</strong>" in page
    # metrics
    assert "31.416" in md and "95.12% ± 0.31" in md and "88.01% ± 0.12" in md
    assert "small-sample bias" in md and "MLP" not in md and "| 3 seeds, " in md
    # config is shown, escaped in HTML
    assert "&lt;script&gt;" in page and "<script>" not in page
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_minimal_run_dir_says_what_is_missing(tmp_path):
    (tmp_path / "privacy.json").write_text(json.dumps(PRIVACY))
    md_path, _ = write_report(tmp_path)
    md = md_path.read_text()
    assert "No eval.json" in md and "No train_log.jsonl" in md
    assert "No samples.png or synthetic.npz" in md and "8.76" in md
    assert not (tmp_path / "training_curves.png").exists()
    assert "NOT PRIVATE" not in md


def test_run_without_a_ledger_is_reported_not_private_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"privacy": {}}))
    md = write_report(tmp_path)[0].read_text()
    assert md.splitlines()[0].endswith("— NOT PRIVATE")
    assert "NOT PRIVATE: the run has no privacy ledger (privacy.json)" in md


def test_malformed_log_line_is_reported_with_its_line_number(run_dir):
    with (run_dir / "train_log.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"train_log.jsonl:17"):
        write_report(run_dir)


def test_missing_run_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        write_report(tmp_path / "nope")


def test_class_mosaic_puts_each_class_on_its_own_row():
    from dplatent.data import LabelledImages
    from dplatent.report import class_mosaic

    y = np.array([2, 0, 2, 1, 2])
    x = np.stack([np.full((8, 8), 10 * (i + 1), np.uint8) for i in range(5)])
    mosaic = class_mosaic(LabelledImages(x, y, 3, "s"), per_class=2, pad=2)
    assert mosaic.shape == (3 * 10 + 2, 2 * 10 + 2)

    def cell(row, col):
        return mosaic[2 + row * 10:10 + row * 10, 2 + col * 10:10 + col * 10]

    assert (cell(0, 0) == 20).all() and (cell(0, 1) == 255).all()  # class 0: image 1 only
    assert (cell(1, 0) == 40).all()  # class 1: image 3
    assert (cell(2, 0) == 10).all() and (cell(2, 1) == 30).all()  # class 2: first two of three
