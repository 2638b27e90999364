"""Data readers: the real IDX files, corrupt copies, user npz files, folder lookup, download."""

from __future__ import annotations

import gzip
import hashlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV_DATA, idx_bytes, synthetic_images, write_builtin_copy, write_idx

from dplatent import data
from dplatent.errors import DataError

MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path):
    """No test may reach the network or the user's cache."""
    def refuse(name, filename, target_dir):
        raise AssertionError(f"test tried to download {name}/{filename}")
    monkeypatch.setattr(data, "download", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name,split,counts", [
    ("mnist", "train", MNIST_TRAIN), ("mnist", "test", MNIST_TEST),
    ("fashion-mnist", "train", [6000] * 10), ("fashion-mnist", "test", [1000] * 10)])
def test_real_files_load_with_the_published_label_counts(real_data_dir, name, split, counts):
    d = data.load(name, split, real_data_dir)
    assert d.x.shape == (sum(counts), 28, 28) and d.x.dtype == np.uint8
    assert d.y.dtype == np.int64 and d.num_classes == 10
    assert np.bincount(d.y, minlength=10).tolist() == counts
    assert d.channels == 1 and d.image_size == 28 and len(d) == sum(counts)
    assert d.name == f"{name}/{split}"
    # real images, not blank: both ink and background
    assert d.x.min() == 0 and d.x.max() == 255
    assert 0.05 < float((d.x[:1000] > 127).mean()) < 0.6


def test_environment_variable_names_the_data_folder(real_data_dir, monkeypatch):
    monkeypatch.setenv(ENV_DATA, str(real_data_dir))
    d = data.load("mnist", "test")
    assert np.bincount(d.y).tolist() == MNIST_TEST


def test_truncated_copy_of_a_real_file_is_refused(real_data_dir, tmp_path):
    src = real_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    bad = tmp_path / "mnist" / src.name
    bad.parent.mkdir()
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DataError, match=str(bad)):
        data.read_idx(bad)


# ------------------------------------------------------------------------- folder resolution


def small_copy(folder: Path, name: str = "mnist", n: int = 12, **kw) -> tuple[np.ndarray, ...]:
    x, y = synthetic_images(n)
    write_builtin_copy(folder, name, x, y, **kw)
    return x, y


def test_environment_variable_is_honoured_and_the_option_wins(tmp_path, monkeypatch):
    good, empty = tmp_path / "good", tmp_path / "empty"
    empty.mkdir()
    x, y = small_copy(good)
    monkeypatch.setenv(ENV_DATA, str(good))
    d = data.load("mnist", "test")
    assert np.array_equal(d.x, x) and np.array_equal(d.y, y)
    # the option beats the variable
    with pytest.raises(DataError, match=str(empty)):
        data.load("mnist", "test", data_dir=empty)
    monkeypatch.setenv(ENV_DATA, str(empty))
    assert np.array_equal(data.load("mnist", "test", data_dir=good).x, x)
    assert data.resolve_data_dir(None) == empty
    monkeypatch.delenv(ENV_DATA)
    assert data.resolve_data_dir(None) is None


def test_missing_files_in_the_data_folder_are_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATA, raising=False)
    with pytest.raises(DataError) as info:
        data.load("fashion-mnist", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg
    # only the label file missing: named too
    x, y = synthetic_images(5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", x)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", data_dir=tmp_path)


def test_uncompressed_files_and_underscore_folder_are_found(tmp_path):
    x, y = small_copy(tmp_path, name="fashion_mnist", compress=False)
    d = data.load("fashion-mnist", "test", data_dir=tmp_path)
    assert np.array_equal(d.x, x) and np.array_equal(d.y, y)
    assert d.name == "fashion-mnist/test"


def test_without_folder_the_download_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATA, raising=False)
    x, y = synthetic_images(6)
    calls = []

    def fake_download(name, filename, target_dir):
        calls.append((name, filename, target_dir))
        arr = x if "images" in filename else y.astype(np.uint8)
        return write_idx(target_dir / filename, arr)
    monkeypatch.setattr(data, "download", fake_download)
    d = data.load("mnist", "train")
    assert np.array_equal(d.x, x)
    assert [c[1] for c in calls] == list(data.FILES["train"])
    assert all(c[2] == tmp_path / "cache" / "dplatent" / "data" / "mnist" for c in calls)


def test_unknown_names_and_splits_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        data.load("cifar")
    with pytest.raises(DataError, match="unknown split"):
        data.load("mnist", "valid", data_dir=tmp_path)


# ------------------------------------------------------------------------------ corrupt IDX

IMAGES = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28).astype(np.uint8)


def header(dtype_code: int, *dims: int) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


CORRUPT_IDX = {
    "bad-magic": (b"\x01\x02" + idx_bytes(IMAGES)[2:], "bad magic"),
    "wrong-dtype": (header(0x0D, 3, 28, 28) + IMAGES.tobytes(), "data type 0x0d"),
    "two-dims": (header(0x08, 84, 28) + IMAGES.tobytes(), "2 dimensions"),
    "short-header": (header(0x08, 3, 28, 28)[:9], "truncated header"),
    "truncated": (idx_bytes(IMAGES)[:-100], "truncated: header claims 2352 bytes"),
    "trailing": (idx_bytes(IMAGES) + b"\x00\x07", "trailing bytes"),
    "absurd-dims": (header(0x08, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + b"\0" * 64,
                    "implausible"),
    "zero-dims": (header(0x08, 0, 28, 28), "implausible"),
    "empty": (b"", "bad magic"),
}


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("kind", list(CORRUPT_IDX))
def test_corrupt_idx_is_a_data_error_naming_the_file(tmp_path, kind, compress):
    raw, message = CORRUPT_IDX[kind]
    path = tmp_path / ("bad.idx.gz" if compress else "bad.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError, match=message) as info:
        data.read_idx(path)
    assert str(info.value).startswith(str(path))


def test_truncated_gzip_stream_is_a_data_error(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.random.default_rng(0).integers(
        0, 255, (50, 28, 28), dtype=np.uint8)))[:-300])
    with pytest.raises(DataError, match=str(path)):
        data.read_idx(path)
    assert data.read_idx(write_idx(tmp_path / "ok.gz", IMAGES)).tolist() == IMAGES.tolist()


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_header_claiming_a_huge_payload_fails_without_allocating_it(tmp_path, compress):
    """A 100-byte file whose header claims 900 MB must not make the reader allocate 900 MB."""
    raw = header(0x08, 10000, 300, 300) + b"\x05" * 100
    path = tmp_path / "huge.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"reader allocated {peak / 1e6:.0f} MB for a 100-byte payload"


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_idx(tmp_path / "nothing.gz")


def test_images_and_labels_count_mismatch_names_both_files(tmp_path):
    x, y = synthetic_images(5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", y[:4].astype(np.uint8))
    with pytest.raises(DataError, match="5 images but .*t10k-labels-idx1-ubyte.gz has 4"):
        data.load("mnist", "test", data_dir=tmp_path)


def test_labels_out_of_range_name_the_label_file(tmp_path):
    x, y = synthetic_images(5)
    y[2] = 12
    write_builtin_copy(tmp_path, "mnist", x, y)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: labels must lie in \[0, 9\]"):
        data.load("mnist", "test", data_dir=tmp_path)


def test_swapped_image_and_label_files_are_refused(tmp_path):
    x, y = synthetic_images(5)
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", y.astype(np.uint8))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", x)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: expected a 3-D image file"):
        data.load("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------- npz


def save_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_valid_npz_round_trip(tmp_path):
    x, y = synthetic_images(30, num_classes=3)
    d = data.read_npz(save_npz(tmp_path / "d.npz", x=x, y=y.astype(np.int32)))
    assert np.array_equal(d.x, x) and d.y.dtype == np.int64 and np.array_equal(d.y, y)
    assert d.num_classes == 3 and d.name == str(tmp_path / "d.npz")
    f = d.to_float()
    assert f.shape == (30, 1, 28, 28) and f.dtype == np.float32
    assert f.min() >= 0 and f.max() <= 1 and f.max() == pytest.approx(220 / 255)
    # N x H x W x 1 is squeezed; RGB is kept and to_float puts channels first
    assert data.read_npz(save_npz(tmp_path / "c1.npz", x=x[..., None], y=y)).x.shape == x.shape
    rgb = data.read_npz(save_npz(tmp_path / "rgb.npz", x=np.repeat(x[..., None], 3, 3), y=y))
    assert rgb.channels == 3 and rgb.to_float().shape == (30, 3, 28, 28)
    # a declared class count larger than the labels need is kept
    assert data.read_npz(tmp_path / "d.npz", num_classes=5).num_classes == 5


def test_npz_test_split_is_the_sibling_file(tmp_path):
    x, y = synthetic_images(20)
    save_npz(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match="d-test.npz"):
        data.load(str(tmp_path / "d.npz"), "test")
    save_npz(tmp_path / "d-test.npz", x=x[:10], y=y[:10])
    assert len(data.load(str(tmp_path / "d.npz"), "test")) == 10
    with pytest.raises(DataError, match="unknown data set"):
        data.load(str(tmp_path / "d.npy"))


X, Y = synthetic_images(20, num_classes=4)
NAN_IMAGES = X.astype(np.float32)
NAN_IMAGES[0, 0, 0] = np.nan

BAD_NPZ = {
    "float-images": (dict(x=X.astype(np.float32) / 255, y=Y), "must be uint8"),
    "nan-images": (dict(x=NAN_IMAGES, y=Y), "must be uint8"),
    "int64-images": (dict(x=X.astype(np.int64), y=Y), "must be uint8"),
    "flat-images": (dict(x=X.reshape(20, -1), y=Y), "N x H x W"),
    "5d-images": (dict(x=X[:, None, :, :, None], y=Y), "N x H x W"),
    "two-channels": (dict(x=np.stack([X, X], -1), y=Y), "1 or 3 channels"),
    "not-square": (dict(x=X[:, :, :20], y=Y), "square"),
    "too-small": (dict(x=X[:, :4, :4], y=Y), "at least 8x8"),
    "float-labels": (dict(x=X, y=Y.astype(np.float64)), "integer array"),
    "2d-labels": (dict(x=X, y=Y[:, None]), "1-D integer"),
    "negative-label": (dict(x=X, y=np.where(np.arange(20) == 3, -1, Y)), r"labels must lie in"),
    "single-class": (dict(x=X, y=np.zeros(20, np.int64)), "at least 2 classes"),
    "count-mismatch": (dict(x=X, y=Y[:19]), "20 images but 19 labels"),
    "no-records": (dict(x=X[:0], y=Y[:0]), "no records"),
    "missing-y": (dict(x=X), r"missing array\(s\) \['y'\]"),
    "missing-both": (dict(images=X, labels=Y), r"missing array\(s\) \['x', 'y'\]"),
    "pickled-object": (dict(x=np.array([X[0], "evil"], dtype=object), y=Y),
                       "not a readable npz"),
}


@pytest.mark.parametrize("kind", list(BAD_NPZ))
def test_malformed_npz_is_a_data_error_naming_the_file(tmp_path, kind):
    arrays, message = BAD_NPZ[kind]
    path = save_npz(tmp_path / f"{kind}.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        data.load(str(path))
    assert str(path) in str(info.value)


def test_declared_class_count_below_the_labels_is_refused(tmp_path):
    path = save_npz(tmp_path / "d.npz", x=X, y=Y)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\], found 0..3"):
        data.read_npz(path, num_classes=3)


def test_npz_that_is_not_a_zip_file(tmp_path):
    for name, content in (("junk.npz", b"not a zip at all"), ("cut.npz", b"PK\x03\x04 cut")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"{path}: not a readable npz"):
            data.read_npz(path)
    with pytest.raises(DataError, match="file not found"):
        data.read_npz(tmp_path / "absent.npz")


def test_pickled_npz_is_never_unpickled(tmp_path, monkeypatch):
    import pickle
    loads = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: loads.append(a))
    path = save_npz(tmp_path / "p.npz", x=np.array([object()], dtype=object), y=Y)
    with pytest.raises(DataError):
        data.read_npz(path)
    assert not loads


# ----------------------------------------------------------------------------------- download


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_verifies_the_checksum_and_tries_every_mirror(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real download function, with a fake network
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return FakeResponse(b"tampered bytes")
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    name, filename = "mnist", "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="checksum mismatch") as info:
        data.download(name, filename, tmp_path)
    assert urls == [m + filename for m in data.MIRRORS[name]]
    assert "--data-dir" in str(info.value)
    assert list(tmp_path.iterdir()) == [], "nothing unverified may be left behind"
    # the right bytes (pretend the published checksum is theirs) are kept under the file name
    good = b"the published archive"
    monkeypatch.setitem(data.MD5[name], filename, hashlib.md5(good).hexdigest())
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(good))
    path = data.download(name, filename, tmp_path)
    assert path == tmp_path / filename and path.read_bytes() == good
    # a verified file already present is not fetched again
    monkeypatch.setattr(data.urllib.request, "urlopen", None)
    assert data.download(name, filename, tmp_path) == path
