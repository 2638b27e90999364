"""Message gaps closed: a non-zip .npz, `plan` with an unknown data set name, `sample --steps`
below 1 and negative or non-finite `--guidance` each get one clear line (exit status 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, run_main, train_smoke

from dplatent import data
from dplatent.errors import DataError


# --- a file named .npz that is not a zip archive -------------------------------------------

@pytest.mark.parametrize("kind", ["text", "empty", "npy"])
def test_npz_that_is_not_a_zip_archive_says_so(kind, tmp_path, monkeypatch, capsys):
    path = tmp_path / f"{kind}.npz"
    if kind == "text":
        path.write_bytes(b"x,y\n1,2\n" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a single-array .npy file renamed: numpy would hand back a bare array
        with open(path, "wb") as f:
            np.save(f, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError) as info:
        data.read_npz(path)
    assert str(info.value) == f"{path}: not a readable npz file (not a zip archive)"
    assert "pickle" not in str(info.value)
    code, _, err = run_main(["train", "--preset", "smoke", "--dataset", str(path), "--out",
                             str(tmp_path / "run")], monkeypatch, capsys)
    expected = f"error: {path}: not a readable npz file (not a zip archive)"
    assert one_line_error(code, err) == expected
    assert not (tmp_path / "run").exists()


# --- plan with a data set name that is not one ----------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "notes.txt"])
def test_plan_says_an_unknown_data_set_is_unknown(name, monkeypatch, capsys):
    code, out, err = run_main(["plan", "--preset", "smoke", "--dataset", name],
                              monkeypatch, capsys)
    line = one_line_error(code, err)
    # the same words as `train` with that name (data.load)
    assert line == (f"error: unknown data set {name!r}; choose from ('mnist', "
                    "'fashion-mnist'), or give an .npz path or an image folder"), line
    assert out == ""


def test_plan_of_a_user_file_or_folder_still_asks_for_n(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for dataset in (str(tmp_path / "data.npz"), str(folder)):
        code, _, err = run_main(["plan", "--preset", "smoke", "--dataset", dataset],
                                monkeypatch, capsys)
        assert "pass --n" in one_line_error(code, err)
        code, out, err = run_main(["plan", "--preset", "smoke", "--set",
                                   "privacy.accountant=rdp", "--dataset", dataset, "--n", "1000",
                                   "--delta", "1e-4"], monkeypatch, capsys)
        assert code == 0 and "composed epsilon" in out, err


# --- sample --steps and --guidance ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("msg")
    rng = np.random.default_rng(0)
    np.savez(folder / "d.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
             y=np.arange(200) % 10)
    return train_smoke(folder / "d.npz", folder / "run")


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "sampling.steps must be >= 1, got 0"),
    (["--steps", "-2"], "sampling.steps must be >= 1, got -2"),
    (["--guidance", "-1"], "sampling.guidance must be >= 0 and finite, got -1.0"),
    (["--guidance", "nan"], "sampling.guidance must be >= 0 and finite, got nan"),
    (["--guidance", "inf"], "sampling.guidance must be >= 0 and finite, got inf"),
])
def test_sample_refuses_bad_steps_and_guidance(args, message, tiny_run, tmp_path, monkeypatch,
                                               capsys):
    out = tmp_path / "s.npz"
    code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "10", "--out", str(out),
                             "--no-progress", *args], monkeypatch, capsys)
    assert one_line_error(code, err) == f"error: {message}"
    assert not out.exists()


def test_sample_steps_and_guidance_are_honoured(tiny_run, tmp_path, monkeypatch, capsys):
    def draw(*args) -> np.ndarray:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        code, _, err = run_main(["sample", "--run", str(tiny_run), "--num", "20", "--out",
                                 str(out), "--no-progress", *args], monkeypatch, capsys)
        assert code == 0, err
        with np.load(out) as f:
            return f["x"]

    default = draw()                     # the smoke preset samples with 5 steps
    assert np.array_equal(default, draw("--steps", "5"))
    assert not np.array_equal(default, draw("--steps", "1"))
    assert np.array_equal(default, draw("--guidance", "1"))   # the preset's guidance
    assert not np.array_equal(default, draw("--guidance", "0"))
