"""benchmarks/stage2_diagnostics.py churn: without churn it is `sample`'s sampler, each sample
keeps its own noise whatever its batch, and with the exact denoiser of a Gaussian churn
narrows the spread, less with more steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ExactGaussianDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stage2_diagnostics as diag  # noqa: E402

from dplatent.diffusion.sampler import sample_latents  # noqa: E402
from dplatent.diffusion.schedule import alphas_cumprod  # noqa: E402
from dplatent.models.denoiser import Denoiser  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")]

DIM, CLASSES, T = 6, 3, 100
LABELS = np.array([0, 1, 2, 0, 1, 2, 1])


def denoiser() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(dim=DIM, num_classes=CLASSES, hidden=16, blocks=1, expansion=2, time_dim=8)


def common(**kw) -> dict:
    return dict(dim=DIM, seed=11, steps=5, train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                null_label=CLASSES, **kw)


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_without_churn_it_is_the_samplers_ddim(prediction, eta):
    den = denoiser()
    ours = diag.churned_latents(den, LABELS, prediction=prediction, eta=eta, gamma=0.0,
                                temperature=1.2, **common())
    theirs = sample_latents(den, LABELS, prediction=prediction, eta=eta, temperature=1.2,
                            guidance=1.0, progress=False, **common())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_churn_noise_is_each_samples_own():
    den = denoiser()
    kw = common(prediction="v", eta=1.0, gamma=0.3)
    batch = diag.churned_latents(den, LABELS, batch_size=7, **kw)
    singles = diag.churned_latents(den, LABELS, batch_size=1, **kw)
    torch.testing.assert_close(singles, batch, rtol=1e-5, atol=1e-5)
    plain = diag.churned_latents(den, LABELS, **{**kw, "gamma": 0.0})
    assert not torch.allclose(batch, plain, atol=1e-3)


def test_churn_shrinks_a_gaussians_spread_less_with_more_steps():
    """Data N(0, s^2 I) and its exact denoiser: without churn 200 DDIM steps keep the spread
    s; raising the noise level before each step and then stepping from there loses some of it
    (as EDM notes of its churn), the more the larger the raise and the fewer the steps."""
    s, timesteps = 0.5, 1000
    exact = ExactGaussianDenoiser(s, alphas_cumprod(timesteps, "squaredcos_cap_v2"))

    def spread(gamma: float, steps: int) -> float:
        out = diag.churned_latents(exact, np.zeros(2000, dtype=np.int64), dim=DIM, seed=0,
                                   steps=steps, train_timesteps=timesteps, eta=0.0,
                                   beta_schedule="squaredcos_cap_v2", prediction="v",
                                   null_label=CLASSES, gamma=gamma)
        return float(out.std())

    assert spread(0.0, 200) == pytest.approx(s, rel=0.02)
    assert spread(0.3, 200) < spread(0.1, 200) < spread(0.0, 200)
    assert spread(0.3, 50) < spread(0.3, 200) < s
