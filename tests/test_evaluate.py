"""evaluate(): orchestration, eval.json, input checks; and the CLI command bodies."""

from __future__ import annotations

from conftest import quadrant_images

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dplatent import data
from dplatent.errors import ConfigError, DataError
from dplatent.eval import commands, evaluate as ev

SIZE, CLASSES = 12, 4


def make_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return quadrant_images(n, seed, SIZE, CLASSES)


@pytest.fixture
def real(tmp_path) -> str:
    """A real data set given as npz (train) with a -test.npz sibling."""
    path = tmp_path / "real.npz"
    np.savez(path, *(), **dict(zip("xy", make_set(300, 0))))
    np.savez(tmp_path / "real-test.npz", **dict(zip("xy", make_set(120, 1))))
    return str(path)


class TinyExtractor(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def synthetic(n: int = 200, seed: int = 2) -> data.LabelledImages:
    x, y = make_set(n, seed)
    return data.LabelledImages(x, y, CLASSES, "synthetic")


def test_evaluate_reports_requested_metrics_and_writes_json(real, tmp_path):
    result = ev.evaluate(synthetic(), real, metrics=["logreg", "fid"], fid_samples=100,
                         fid_model=TinyExtractor(), fid_cache_dir=tmp_path / "stats",
                         fid_batch_size=50, seeds=2, epochs={"logreg": 5}, batch_size=32,
                         threads=1, progress=False)
    assert result["metrics"] == ["fid", "logreg"]
    assert "cnn_acc" not in result and "mlp_acc" not in result
    assert result["logreg_acc"] > 0.9 and len(result["logreg_acc_per_seed"]) == 2
    assert 0 <= result["logreg_acc_std"] < 0.1 and result["logreg_epochs"] == 5
    assert result["fid_samples"] == 100 and result["fid_reference_samples"] == 100
    assert result["fid_reference"].endswith("real.npz") and result["fid"] >= 0
    assert "small-sample bias" in result["fid_warning"]
    out = ev.write_eval_json(result, tmp_path / "runs" / "eval.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left


def test_fid_against_test_split_on_request(real, tmp_path):
    result = ev.evaluate(synthetic(), real, metrics=["fid"], fid_samples=50,
                         fid_reference="test", fid_model=TinyExtractor(),
                         fid_cache_dir=tmp_path, progress=False)
    assert result["fid_reference"].endswith("real-test.npz")


def test_write_eval_json_replaces_nan_by_null(tmp_path):
    path = ev.write_eval_json({"fid": float("nan"), "acc": [0.5, float("inf")]},
                              tmp_path / "e.json")
    assert json.loads(path.read_text()) == {"fid": None, "acc": [0.5, None]}


def test_metric_names_are_validated():
    assert ev.parse_metrics("logreg, FID") == ["fid", "logreg"]
    with pytest.raises(ConfigError, match="unknown metric"):
        ev.parse_metrics("fid,inception_score")
    with pytest.raises(ConfigError):
        ev.parse_metrics("")


def test_shape_and_class_count_must_match_the_real_set(real):
    x, y = make_set(50, 3)
    bigger = data.LabelledImages(np.zeros((50, 16, 16), np.uint8), y, CLASSES, "synth.npz")
    with pytest.raises(DataError, match=r"synth.npz: images have shape \(16, 16\)"):
        ev.evaluate(bigger, real, metrics=["logreg"])
    fewer = data.LabelledImages(x, y % 2, 2, "synth.npz")
    with pytest.raises(DataError, match="2 classes"):
        ev.evaluate(fewer, real, metrics=["logreg"])


def test_missing_weights_fail_before_any_training(real, tmp_path, monkeypatch):
    def must_not_train(*args):
        raise AssertionError("classifier trained although FID cannot run")

    monkeypatch.setattr(ev.classifier, "downstream_accuracy", must_not_train)
    with pytest.raises(ConfigError, match="fetch-fid-weights"):
        ev.evaluate(synthetic(), real, metrics=["cnn", "fid"], fid_weights=tmp_path / "no.pt")


# ----------------------------------------------------------------------------- commands


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,message", [
    (dict(x=np.zeros((10, SIZE, SIZE), np.float32), y=np.zeros(10, np.int64)), "uint8"),
    (dict(x=np.zeros((10, SIZE), np.uint8), y=np.zeros(10, np.int64)), "shape"),
    (dict(x=np.zeros((10, SIZE, SIZE), np.uint8), y=np.full(10, CLASSES)), r"\[0, 3\]"),
    (dict(x=np.zeros((10, SIZE, SIZE), np.uint8), y=np.zeros(9, np.int64)), "9 labels"),
    (dict(images=np.zeros((10, SIZE, SIZE), np.uint8)), "missing array"),
])
def test_malformed_synthetic_npz_is_a_data_error_naming_the_file(real, tmp_path, arrays,
                                                                 message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        commands.evaluate_command(synthetic=path, dataset=real, metrics="logreg",
                                  out=tmp_path / "e.json")
    assert "bad.npz" in str(info.value)


def test_run_dir_without_synthetic_npz_says_how_to_make_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataError, match=r"dplatent sample --run .*run --out .*synthetic.npz"):
        commands.evaluate_command(run=run, dataset="mnist")


def test_exactly_one_input_is_required(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        commands.evaluate_command(dataset="mnist", out=tmp_path / "e.json")
    with pytest.raises(ConfigError, match="exactly one"):
        commands.evaluate_command(synthetic=tmp_path / "s.npz", run=tmp_path, dataset="mnist")


def test_run_dir_evaluation_reads_dataset_from_config_and_writes_eval_json(real, tmp_path,
                                                                           capsys):
    run = tmp_path / "run"
    run.mkdir()
    x, y = make_set(150, 4)
    save_npz(run / "synthetic.npz", x=x, y=y)
    (run / "config.json").write_text(json.dumps({"seed": 0, "derived": {"dataset": real}}))
    result = commands.evaluate_command(run=run, metrics="logreg", seeds=1, threads=1,
                                       progress=False)
    saved = json.loads((run / "eval.json").read_text())
    assert saved["logreg_acc"] == result["logreg_acc"] > 0.8
    assert "logreg" in capsys.readouterr().out


def test_bad_classifier_options_fail_before_any_work(real, monkeypatch):
    monkeypatch.setattr(ev.data, "load", lambda *a: pytest.fail("loaded data before checking"))
    with pytest.raises(ConfigError, match="unknown classifier"):
        ev.evaluate(synthetic(), real, metrics=["cnn"], epochs={"cnnn": 3})
    with pytest.raises(ConfigError, match="positive"):
        ev.evaluate(synthetic(), real, metrics=["mlp"], seeds=0)
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        ev.evaluate(synthetic(), real, metrics=["fid"], fid_reference="val")


def test_a_missing_gpu_fails_before_any_work(real, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ev.classifier, "downstream_accuracy",
                        lambda *a, **k: pytest.fail("trained before checking the device"))
    with pytest.raises(ConfigError, match="device 'cuda': no CUDA GPU is available"):
        ev.evaluate(synthetic(), real, metrics=["logreg"], device="cuda")


def test_auto_evaluates_on_the_cpu_and_eval_json_names_the_device_and_file(real, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x, y = make_set(150, 4)
    path = tmp_path / "s.npz"
    np.savez(path, x=x, y=y)
    result = commands.evaluate_command(synthetic=path, dataset=real, metrics="logreg", seeds=1,
                                       threads=1, out=tmp_path / "e.json", progress=False)
    import hashlib
    assert result["device"] == "cpu"
    assert result["synthetic_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "e.json").read_text())["synthetic_sha256"] == (
        result["synthetic_sha256"])


def test_seeds_label_names_the_seeds_only_when_they_do_not_start_at_zero():
    assert ev.seeds_label({"classifier_seeds": 3, "classifier_first_seed": 0}) == "3 seeds"
    assert ev.seeds_label({"classifier_seeds": 2, "classifier_first_seed": 2}) \
        == "2 seeds (2-3)"
    # eval.json from before the seed keys: counted from the per-seed accuracies
    assert ev.seeds_label({"cnn_acc_per_seed": [0.9, 0.8]}) == "2 seeds"
    assert ev.seeds_label({}) == "? seeds"
