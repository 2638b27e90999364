"""sample --png-dir: one folder per class, exact pixels, written all at once or not at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dplatent import sample
from dplatent.errors import ConfigError


def _images(n: int = 6, classes: int = 3):
    x = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return x, (np.arange(n) % classes).astype(np.int64)


def test_class_folders_hold_the_exact_pixels(tmp_path):
    x, y = _images()
    out = sample.save_png_dir(tmp_path / "png", x, y, ["zero", "a b", "c/d"])
    assert sorted(p.name for p in out.iterdir()) == ["00_zero", "01_a-b", "02_c-d"]
    for i in range(len(y)):
        folder = ["00_zero", "01_a-b", "02_c-d"][y[i]]
        assert np.array_equal(np.asarray(Image.open(out / folder / f"{i:06d}.png")), x[i])
    assert [p.name for p in tmp_path.iterdir()] == ["png"]  # no temporary folder left


def test_a_used_folder_is_refused_and_an_empty_one_is_fine(tmp_path):
    x, y = _images()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="used exists and is not empty"):
        sample.save_png_dir(tmp_path / "used", x, y, ["a", "b", "c"])
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert len(list(sample.save_png_dir(tmp_path / "empty", x, y, ["a", "b", "c"])
                    .rglob("*.png"))) == len(y)


def test_an_interrupted_write_leaves_no_partial_tree(tmp_path, monkeypatch):
    x, y = _images()
    saved = []

    def failing_save(self, path, *args, **kwargs):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(path)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sample.save_png_dir(tmp_path / "png", x, y, ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder
