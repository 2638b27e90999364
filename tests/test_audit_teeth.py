"""The audit has teeth: a non-private control (noise multiplier 0) trained on a small random
subset is caught by the denoiser-loss attack, and the same configuration at epsilon = 10 is not.
Members are the subset, non-members the records left out (exchangeable by construction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bar_images

from dplatent import config
from dplatent.audit import audit
from dplatent.train.stages import train

SETTINGS = {"privacy.accountant": "rdp", "privacy.delta": "1e-3", "threads": "1",
            "subset": "100", "seed": "0", "checkpoint_every": "1000",
            "autoencoder.epochs": "3", "autoencoder.batch_size": "50",
            "autoencoder.physical_batch_size": "50",
            "diffusion.epochs": "200", "diffusion.hidden": "128", "diffusion.batch_size": "50",
            "diffusion.physical_batch_size": "50"}


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("teeth")
    x, y = bar_images(600, 0)
    np.savez(folder / "toy.npz", x=x, y=y)
    old = torch.get_num_threads()
    results = {}
    try:
        for name, extra in (("control", {"privacy.non_private_control": "true"}),
                            ("dp", {"privacy.epsilon": "10"})):
            cfg = config.resolve("smoke", {**SETTINGS, **extra})
            train(dataset=str(folder / "toy.npz"), data_dir=None, cfg=cfg,
                  run_dir=folder / name, progress=False)
            results[name] = audit(folder / name, None, n_members=100, n_nonmembers=100,
                                  num_synthetic=50, threads=1)
    finally:
        torch.set_num_threads(old)
    return results


def test_the_audit_catches_the_non_private_control(audits):
    control = audits["control"]
    assert control["private"] is False and control["accounted_epsilon"] is None
    attack = control["attacks"]["denoiser_loss"]
    assert attack["auc"] > 0.8
    assert attack["epsilon_lower_bound"] > 1.0
    assert control["empirical_epsilon_lower_bound"] >= attack["epsilon_lower_bound"]


def test_the_same_configuration_at_epsilon_10_is_not_caught(audits):
    dp, control = audits["dp"], audits["control"]
    assert dp["private"] is True and 9 < dp["accounted_epsilon"] <= 10
    assert dp["attacks"]["denoiser_loss"]["auc"] < control["attacks"]["denoiser_loss"]["auc"] - 0.2
    assert dp["empirical_epsilon_lower_bound"] < 1.0 <= dp["accounted_epsilon"]
