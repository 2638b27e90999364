"""Private labelled image data: IDX, npz and image-folder readers, validation, local lookup and
download.

Only public metadata (data set name, image shape, class count, number of records) leaves this
module without a DP mechanism; the arrays themselves are private.

Readers never allocate from an untrusted header beyond what the file actually holds: the
payload is read in one bounded call and its length compared with the header's claim.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dplatent.errors import DataError

BUILTIN = ("mnist", "fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# MD5 of the original gzip archives, as published with the data sets; used to verify downloads.
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
ENV_DATA_DIR = "DPLATENT_DATA"
IDX_MAX_BYTES = 1 << 32  # refuse headers that claim more than 4 GiB of payload
IDX_DTYPES = {0x08: np.uint8}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")   # image folders: file names, any case
IMAGE_FORMATS = ("PNG", "JPEG")              # ... and what Pillow finds inside
MAX_IMAGE_SIDE = 1024                        # refused before decoding (decompression bombs)
TEST_SUFFIX = "-test"                        # NAME-test.npz / NAME-test/ beside NAME


@dataclass(frozen=True)
class LabelledImages:
    """Images (N, H, W) or (N, H, W, C) uint8 and labels (N,) int64 in [0, num_classes)."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        validate_arrays(self.x, self.y, self.num_classes, source=self.name)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return 1 if self.x.ndim == 3 else self.x.shape[3]

    @property
    def image_size(self) -> int:
        return self.x.shape[1]

    def to_float(self) -> np.ndarray:
        """Images as float32 (N, C, H, W) in [0, 1]."""
        x = self.x[:, None] if self.x.ndim == 3 else self.x.transpose(0, 3, 1, 2)
        return x.astype(np.float32) / 255.0


def validate_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, source: str) -> None:
    """Raise DataError naming `source` for the first problem found in (x, y)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {getattr(x, 'dtype', type(x))}")
    if x.ndim not in (3, 4):
        raise DataError(f"{source}: images must be N x H x W or N x H x W x C, got shape {x.shape}")
    if x.ndim == 4 and x.shape[3] not in (1, 3):
        raise DataError(f"{source}: images must have 1 or 3 channels, got {x.shape[3]}")
    if x.shape[1] != x.shape[2] or x.shape[1] < 8:
        raise DataError(f"{source}: images must be square and at least 8x8, got {x.shape[1:3]}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be a 1-D integer array, got "
                        f"{getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{source}: no records")
    if num_classes < 2:
        raise DataError(f"{source}: need at least 2 classes, got {num_classes}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{source}: labels must lie in [0, {num_classes - 1}], "
                        f"found {int(y.min())}..{int(y.max())}")


def _read_bounded(f, size: int, block: int = 1 << 24) -> bytes:
    """Up to `size` bytes, read in blocks so that memory follows what the file holds, not
    what its header claims (a single f.read(size) allocates `size` bytes up front)."""
    parts = []
    while size > 0:
        part = f.read(min(size, block))
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) of unsigned bytes, checking its header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0:
                raise DataError(f"{path}: not an IDX file (bad magic number {header.hex()})")
            dtype_code, ndim = header[2], header[3]
            if dtype_code not in IDX_DTYPES:
                raise DataError(f"{path}: unsupported IDX data type 0x{dtype_code:02x} "
                                "(only unsigned bytes, 0x08)")
            if ndim not in (1, 3):
                raise DataError(f"{path}: IDX with {ndim} dimensions; expected 1 (labels) "
                                "or 3 (images)")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated header")
            dims = tuple(int.from_bytes(dims_raw[4 * i:4 * i + 4], "big") for i in range(ndim))
            expected = int(np.prod(dims, dtype=np.int64))
            if expected == 0 or expected > IDX_MAX_BYTES:
                raise DataError(f"{path}: header claims dimensions {dims}, which is implausible")
            payload = _read_bounded(f, expected)
            if len(payload) < expected:
                raise DataError(f"{path}: truncated: header claims {expected} bytes of data, "
                                f"file holds {len(payload)}")
            if f.read(1):
                raise DataError(f"{path}: trailing bytes after the {expected} bytes the "
                                "header describes")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_npz(path: str | Path, num_classes: int | None = None) -> LabelledImages:
    """Read a user's npz with arrays `x` (uint8 N x H x W[x C]) and `y` (integer labels).

    The class count is public metadata: given by the caller, or else taken as max(y) + 1
    (documented as a public assumption of the data holder).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            magic = f.read(2)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if magic != b"PK":  # an npz is a zip archive; numpy would call anything else a pickle
        raise DataError(f"{path}: not a readable npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; "
                                f"found {sorted(f.files)}")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as exc:  # zipfile, pickle refusal, corrupt member
        raise DataError(f"{path}: not a readable npz file ({exc})") from exc
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64)
    if num_classes is None and np.issubdtype(y.dtype, np.integer) and y.size:
        num_classes = int(y.max()) + 1
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    return LabelledImages(x=x, y=y, num_classes=num_classes or 0, name=str(path))


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The option wins, then the environment variable; None means 'use the download cache'."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dplatent" / "data"


def _find_local(name: str, filename: str, data_dir: Path) -> Path | None:
    for folder in (data_dir / name, data_dir / name.replace("-", "_"), data_dir):
        for candidate in (folder / filename, folder / filename.removesuffix(".gz")):
            if candidate.is_file():
                return candidate
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, filename: str, target_dir: Path) -> Path:
    """Download one file of a built-in data set from its mirrors, verifying the MD5."""
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / filename
    expected = MD5[name][filename]
    if target.is_file() and _md5(target) == expected:
        return target
    errors = []
    for mirror in MIRRORS[name]:
        url = mirror + filename
        with tempfile.NamedTemporaryFile(dir=target_dir, delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, tmp_path.open("wb") as out:
                shutil.copyfileobj(resp, out)
            got = _md5(tmp_path)
            if got != expected:
                raise DataError(f"checksum mismatch (md5 {got}, expected {expected})")
            os.replace(tmp_path, target)
            return target
        except Exception as exc:  # network errors: try the next mirror
            errors.append(f"{url}: {exc}")
        finally:
            tmp_path.unlink(missing_ok=True)
    raise DataError(f"could not download {name}/{filename}; tried:\n  " + "\n  ".join(errors)
                    + f"\nPlace the file in a folder and pass --data-dir or set {ENV_DATA_DIR}.")


def load_builtin(name: str, split: str, data_dir: str | Path | None = None) -> LabelledImages:
    """MNIST or Fashion-MNIST, `split` in {'train', 'test'}."""
    if name not in BUILTIN:
        raise DataError(f"unknown data set {name!r}; choose from {BUILTIN} or give an npz path")
    if split not in FILES:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = resolve_data_dir(data_dir)
    paths = []
    for filename in FILES[split]:
        local = _find_local(name, filename, root) if root else None
        if local is None:
            if root is not None:
                raise DataError(f"{root}: no {filename} for {name} (looked in {root / name} "
                                f"and {root}); omit --data-dir and {ENV_DATA_DIR} to download")
            local = download(name, filename, cache_dir() / name)
        paths.append(local)
    x, y = read_idx(paths[0]), read_idx(paths[1])
    if x.ndim != 3:
        raise DataError(f"{paths[0]}: expected a 3-D image file, got {x.ndim}-D")
    if y.ndim != 1:
        raise DataError(f"{paths[1]}: expected a 1-D label file, got {y.ndim}-D")
    if len(x) != len(y):
        raise DataError(f"{paths[0]} has {len(x)} images but {paths[1]} has {len(y)} labels")
    if y.max() >= NUM_CLASSES[name]:
        raise DataError(f"{paths[1]}: labels must lie in [0, {NUM_CLASSES[name] - 1}], "
                        f"found {int(y.max())}")
    return LabelledImages(x=x, y=y.astype(np.int64), num_classes=NUM_CLASSES[name],
                          name=f"{name}/{split}")


def _class_folders(path: Path) -> list[Path]:
    """The class sub-folders of an image folder, sorted by name (hidden ones skipped)."""
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise DataError(f"{path}: cannot list the folder ({exc})") from exc
    classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        loose = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
        raise DataError(f"{path}: no class folders"
                        + (f" ({loose} images lie directly in it)" if loose else "")
                        + "; put each class's images in a sub-folder named after the class")
    if len(classes) < 2:
        raise DataError(f"{path}: need at least 2 classes, found 1 class folder "
                        f"({classes[0].name!r})")
    return classes


def _read_image(path: Path) -> tuple[np.ndarray, str]:
    """One PNG/JPEG as uint8 (H, W) for grey or (H, W, 3) for RGB, and 'grey' or 'RGB'."""
    try:
        with Image.open(path) as img:
            if img.format not in IMAGE_FORMATS:
                raise DataError(f"{path}: a {img.format} image; the image folder takes PNG "
                                "and JPEG only")
            w, h = img.size
            if max(w, h) > MAX_IMAGE_SIDE:
                raise DataError(f"{path}: {w}x{h} pixels; images over {MAX_IMAGE_SIDE}x"
                                f"{MAX_IMAGE_SIDE} are refused")
            if w != h:
                raise DataError(f"{path}: images must be square, got {w}x{h}")
            mode = img.mode
            if mode in ("L", "1"):
                return np.array(img.convert("L"), dtype=np.uint8), "grey"
            if mode == "RGB" or (mode == "P" and "transparency" not in img.info):
                return np.array(img.convert("RGB"), dtype=np.uint8), "RGB"
            if mode in ("RGBA", "LA", "PA", "P"):
                raise DataError(f"{path}: has an alpha channel (mode {mode}); flatten it onto "
                                "a background first (grey or RGB images only)")
            raise DataError(f"{path}: image mode {mode} is not supported; use 8-bit grey (L) "
                            "or RGB")
    except DataError:
        raise
    except Exception as exc:  # Pillow: unidentified, truncated, corrupt, decompression bomb
        detail = str(exc).replace(f" {str(path)!r}", "")  # Pillow repeats the path
        detail = " ".join(detail.split())[:200] or type(exc).__name__
        raise DataError(f"{path}: unreadable image ({detail})") from exc


def read_image_folder(path: str | Path, class_names: list[str] | None = None) -> LabelledImages:
    """Read a folder with one sub-folder per class, each holding PNG or JPEG images.

    Labels are the indices of the sorted class-folder names (public metadata, like the class
    count). All images must have one square size and one mode: all grey or all RGB. Files whose
    names start with a dot are skipped; anything else that is not a .png/.jpg/.jpeg file is an
    error, so no record is dropped silently. `class_names`: the class list the folder must have
    (a test split must match its training split).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: folder not found")
    classes = _class_folders(path)
    names = [c.name for c in classes]
    if class_names is not None and names != list(class_names):
        raise DataError(f"{path}: class folders {names} differ from the training split's "
                        f"{list(class_names)}")
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(classes):
        try:
            members = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise DataError(f"{folder}: cannot list the folder ({exc})") from exc
        if not members:
            raise DataError(f"{folder}: empty class folder (no images)")
        for p in members:
            if p.is_dir():
                raise DataError(f"{p}: a folder inside a class folder; class folders hold "
                                "image files only")
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{p}: not a .png, .jpg or .jpeg file; class folders hold "
                                "PNG and JPEG images only")
        files += members
        labels += [label] * len(members)
    x = None
    first: tuple[Path, tuple, str] | None = None
    for i, p in enumerate(files):
        img, kind = _read_image(p)
        if first is None:
            first = (p, img.shape, kind)
            x = np.empty((len(files), *img.shape), dtype=np.uint8)
        elif (img.shape, kind) != first[1:]:
            raise DataError(f"{p}: {_describe(img.shape, kind)}, but {first[0]} is "
                            f"{_describe(*first[1:])}; all images must have one size and one "
                            "mode (all grey or all RGB)")
        x[i] = img
    return LabelledImages(x=x, y=np.asarray(labels, dtype=np.int64), num_classes=len(classes),
                          name=str(path))


def _describe(shape: tuple, kind: str) -> str:
    return f"{shape[1]}x{shape[0]} {kind}"


def random_subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """min(n, k) distinct indices into n, drawn uniformly at random from `rng`, sorted."""
    return np.sort(rng.choice(n, size=min(n, k), replace=False))


def sibling_test_path(path: str | Path) -> Path:
    """NAME-test.npz beside NAME.npz, NAME-test/ beside the folder NAME/."""
    path = Path(path)
    if path.suffix == ".npz":
        return path.with_name(path.stem + TEST_SUFFIX + ".npz")
    return path.with_name(path.name + TEST_SUFFIX)


def check_name(dataset: str) -> None:
    """A DataError unless `dataset` is a built-in data set's name, an .npz path or a folder."""
    path = Path(dataset)
    if dataset not in BUILTIN and not path.is_dir() and path.suffix != ".npz":
        raise DataError(f"unknown data set {dataset!r}; choose from {BUILTIN}, or give an .npz "
                        "path or an image folder")


def load(dataset: str, split: str = "train", data_dir: str | Path | None = None) -> LabelledImages:
    """Load a built-in data set by name, a user's npz or a user's image folder by path.

    Split 'train' reads the file or folder given; split 'test' reads its sibling with suffix
    `-test` (NAME-test.npz, or the folder NAME-test/ with the same class folders).
    """
    if dataset in BUILTIN:
        return load_builtin(dataset, split, data_dir)
    check_name(dataset)
    path = Path(dataset)
    if split not in FILES:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    if path.is_dir():
        if split == "train":
            return read_image_folder(path)
        sibling = sibling_test_path(path)
        if sibling.is_dir():
            return read_image_folder(sibling, class_names=class_names(dataset, 0))
        raise DataError(f"{path}: no test split; provide the folder {sibling.name} beside it, "
                        "with the same class folders")
    if split == "train":
        return read_npz(path)
    sibling = sibling_test_path(path)
    if sibling.is_file():
        return read_npz(sibling)
    raise DataError(f"{path}: no test split; provide {sibling.name} beside it")


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Class names: the built-in lists, an image folder's sorted class-folder names, else the
    label numbers."""
    if dataset not in BUILTIN and Path(dataset).is_dir():
        return [p.name for p in _class_folders(Path(dataset))]
    return CLASS_NAMES.get(dataset, [str(i) for i in range(num_classes)])
