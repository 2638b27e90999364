"""benchmarks/autoencoder_floor.py: the non-private training it measures learns, the
reconstructions are the autoencoder's own quantised, and the table shows each record."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import autoencoder_floor as floor  # noqa: E402

from dplatent import data  # noqa: E402
from dplatent.config import AutoencoderConfig, RunConfig  # noqa: E402
from dplatent.models.autoencoder import reconstruction_loss  # noqa: E402
from dplatent.train.stages import build_autoencoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_images(n=64, size=8, seed=0) -> data.LabelledImages:
    """Noise-free bars (conftest's toy sets carry pixel noise, whose cross-entropy no
    autoencoder removes, so the loss could not halve on them)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size), np.uint8)
    y = rng.integers(0, 2, n)
    x[y == 0, 2:6, 3:5] = 255          # class 0: a vertical bar, class 1: a horizontal one
    x[y == 1, 3:5, 2:6] = 255
    return data.LabelledImages(x, y.astype(np.int64), 2, "tiny")


def tiny_autoencoder(images: data.LabelledImages):
    shape = AutoencoderConfig(channels=(8,), latent_channels=2)
    return build_autoencoder(RunConfig(autoencoder=shape), images.channels, images.image_size)


def test_training_lowers_the_reconstruction_loss():
    images = tiny_images()
    x = torch.from_numpy(images.to_float())
    ae = tiny_autoencoder(images)
    with torch.no_grad():
        before = reconstruction_loss(ae, x).mean().item()
    last = floor.train(ae, x, epochs=30, batch_size=16, lr=1e-2, latent_noise=0.0, seed=0,
                       progress=False)
    with torch.no_grad():
        after = reconstruction_loss(ae, x).mean().item()
    assert after < 0.5 * before
    assert last < before


def test_reconstructions_are_the_decoded_encodings_quantised_to_uint8():
    images = tiny_images(n=10)
    x = torch.from_numpy(images.to_float())
    ae = tiny_autoencoder(images)
    recon = floor.reconstruct(ae, x, sharpness=1.5)
    assert recon.shape == (10, 8, 8) and recon.dtype == np.uint8
    with torch.no_grad():
        expected = torch.sigmoid(1.5 * ae.decoder(ae.encoder(x)))[:, 0].numpy()
    np.testing.assert_array_less(np.abs(recon / 255.0 - expected), 0.5 / 255 + 1e-6)


def test_table_has_a_row_per_record_with_each_sharpness_fid():
    record = {"dataset": "mnist", "label": "full", "channels": [16, 32], "latent_channels": 2,
              "decoder_blocks": 0, "latent_dim": 98, "parameters": 19747, "latent_noise": 0.3,
              "epochs": 10, "batch_size": 256, "steps": 2350, "loss": 0.0778,
              "fid": {"1": 23.05, "1.5": 18.09}, "fid_samples": 2000, "train_s": 179.4,
              "peak_rss_mb": 1200, "command": "python benchmarks/autoencoder_floor.py --label full",
              "date": "2026-12-04"}
    text = floor.table([record, {**record, "label": "wide"}])
    rows = [r for r in text.splitlines() if r.startswith("| mnist")]
    assert len(rows) == 2
    assert "1: 23.1, 1.5: 18.1 (2000)" in rows[0] and "(98-d)" in rows[0]
    assert "`python benchmarks/autoencoder_floor.py --label full`" in text


def test_a_records_command_drops_the_run_flags_and_hides_the_data_folder():
    import records
    argv = ["--label", "a wide one", "--data-dir", "/some/where", "--force", "--no-progress"]
    assert records.shown_command("x.py", argv, drop=("--force", "--no-progress")) == (
        "python benchmarks/x.py --label 'a wide one' --data-dir DIR")
    assert records.shown_command("x.py", argv, drop=("--force",)).endswith("DIR --no-progress")
