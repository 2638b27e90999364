"""Image folders as user data: one sub-folder per class of PNG/JPEG files, grey or RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dplatent import data
from dplatent.errors import DataError

CLASSES = ("circle", "square", "triangle")


def shape_image(kind: str, size: int, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """A filled shape of a random colour and place on a noisy background."""
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    colour = tuple(int(v) for v in rng.integers(120, 256, size=3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img.convert(mode)


def make_folder(root: Path, per_class: int = 6, size: int = 32, mode: str = "RGB",
                classes=CLASSES, seed: int = 0, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(c, size, rng, mode).save(root / c / f"{i:03d}{suffix}")
    return root


def test_rgb_folder_reads_pixels_labels_and_class_names(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=4)
    images = data.read_image_folder(root)
    assert images.x.shape == (12, 32, 32, 3) and images.x.dtype == np.uint8
    assert images.channels == 3 and images.image_size == 32 and images.num_classes == 3
    assert images.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class folders
    # PNG is lossless: the very pixels written
    assert np.array_equal(images.x[5], np.asarray(Image.open(root / "square" / "001.png")))
    assert data.class_names(str(root), 3) == list(CLASSES)
    assert data.load(str(root), "train").x.shape == images.x.shape


def test_grey_folder_gives_n_h_w_and_jpeg_is_accepted(tmp_path):
    root = make_folder(tmp_path / "grey", per_class=3, size=28, mode="L", suffix=".JPG")
    images = data.read_image_folder(root)
    assert images.x.shape == (9, 28, 28) and images.channels == 1
    assert images.x.std() > 0


def test_class_order_is_the_sorted_folder_names_not_the_listing_order(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, classes=("zebra", "Ant", "bee"))
    assert data.class_names(str(root), 3) == ["Ant", "bee", "zebra"]
    assert data.read_image_folder(root).y.tolist() == [0, 0, 1, 1, 2, 2]


def test_test_split_is_the_sibling_folder_with_the_same_classes(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=3)
    with pytest.raises(DataError, match=r"no test split; provide the folder shapes-test beside"):
        data.load(str(root), "test")
    make_folder(tmp_path / "shapes-test", per_class=2, seed=1)
    test = data.load(str(root), "test")
    assert test.x.shape == (6, 32, 32, 3) and test.name.endswith("shapes-test")
    (tmp_path / "shapes-test" / "circle").rename(tmp_path / "shapes-test" / "disc")
    with pytest.raises(DataError, match=r"class folders \['disc', 'square', 'triangle'\] differ "
                                        r"from the training split's \['circle'"):
        data.load(str(root), "test")


def test_a_name_that_is_neither_builtin_nor_npz_nor_folder(tmp_path):
    with pytest.raises(DataError, match=r"unknown data set .*an \.npz path or an image folder"):
        data.load(str(tmp_path / "nowhere"), "train")


# ------------------------------------------------------------------------- hostile inputs


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode).save(path)


def _unreadable(root: Path) -> Path:
    (root / "circle" / "000.png").write_bytes(b"not an image at all")
    return root / "circle" / "000.png"


def _truncated(root: Path) -> Path:
    p = root / "circle" / "000.png"
    p.write_bytes(p.read_bytes()[:-200])
    return p


def _mixed_sizes(root: Path) -> Path:
    _png(root / "square" / "001.png", np.zeros((28, 28, 3), np.uint8))
    return root / "square" / "001.png"


def _mixed_modes(root: Path) -> Path:
    _png(root / "triangle" / "002.png", np.zeros((32, 32), np.uint8))
    return root / "triangle" / "002.png"


def _empty_class(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _one_class(root: Path) -> Path:
    for c in ("square", "triangle"):
        for p in (root / c).iterdir():
            p.unlink()
        (root / c).rmdir()
    return root


def _no_class_folders(root: Path) -> Path:
    for c in CLASSES:
        for p in (root / c).iterdir():
            p.rename(root / f"{c}-{p.name}")
        (root / c).rmdir()
    return root


def _other_file(root: Path) -> Path:
    (root / "circle" / "notes.txt").write_text("hello")
    return root / "circle" / "notes.txt"


def _nested(root: Path) -> Path:
    (root / "circle" / "more").mkdir()
    return root / "circle" / "more"


def _alpha(root: Path) -> Path:
    _png(root / "circle" / "000.png", np.zeros((32, 32, 4), np.uint8))
    return root / "circle" / "000.png"


def _not_square(root: Path) -> Path:
    _png(root / "circle" / "000.png", np.zeros((32, 28, 3), np.uint8))
    return root / "circle" / "000.png"


def _too_large(root: Path) -> Path:
    _png(root / "circle" / "000.png", np.zeros((2048, 2048), np.uint8))
    return root / "circle" / "000.png"


def _gif_named_png(root: Path) -> Path:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "circle" / "000.png", "GIF")
    return root / "circle" / "000.png"


def _sixteen_bit(root: Path) -> Path:
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(root / "circle" / "000.png")
    return root / "circle" / "000.png"


HOSTILE = {
    "unreadable": (_unreadable, r"png: unreadable image \(cannot identify image file\)$"),
    "truncated": (_truncated, r"png: unreadable image \("),
    "mixed-sizes": (_mixed_sizes, (r"28x28 RGB, but .*000\.png is 32x32 RGB; all images must "
                                   r"have one size and one mode")),
    "mixed-modes": (_mixed_modes, r"32x32 grey, but .*000\.png is 32x32 RGB"),
    "empty-class": (_empty_class, r"empty class folder \(no images\)"),
    "one-class": (_one_class, r"need at least 2 classes, found 1 class folder \('circle'\)"),
    "no-class-folders": (_no_class_folders, r"no class folders \(18 images lie directly in it\)"),
    "other-file": (_other_file, r"not a \.png, \.jpg or \.jpeg file"),
    "nested-folder": (_nested, r"a folder inside a class folder"),
    "alpha": (_alpha, r"has an alpha channel \(mode RGBA\)"),
    "not-square": (_not_square, r"images must be square, got 28x32"),
    "too-large": (_too_large, r"2048x2048 pixels; images over 1024x1024 are refused"),
    "gif-named-png": (_gif_named_png, r"a GIF image; the image folder takes PNG and JPEG only"),
    "16-bit": (_sixteen_bit, r"image mode I;16 is not supported"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_folders_are_one_data_error_naming_the_culprit(tmp_path, case):
    make_, pattern = HOSTILE[case]
    root = make_folder(tmp_path / "shapes", per_class=6)
    culprit = make_(root)
    with pytest.raises(DataError) as info:
        data.load(str(root), "train")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(culprit)), message
    import re
    assert re.search(pattern, message), message


def test_hidden_files_are_skipped(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=2)
    (root / "circle" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".cache").mkdir()
    assert len(data.read_image_folder(root)) == 6
