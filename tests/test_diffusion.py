"""Latent diffusion: schedule, the per-example denoising loss, the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ExactGaussianDenoiser, loss_from_draws, predraw

from dplatent.diffusion.loss import denoising_loss, draw_timesteps
from dplatent.diffusion.sampler import guided_output, initial_noise, sample_latents
from dplatent.diffusion.schedule import alphas_cumprod, sampler_scheduler
from dplatent.models.denoiser import Denoiser

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")]

DIM, CLASSES, T = 6, 3, 100


def denoiser(seed=0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(dim=DIM, num_classes=CLASSES, hidden=16, blocks=1, expansion=2, time_dim=8)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_is_a_decreasing_schedule_in_the_unit_interval(schedule):
    # (diffusers' linear betas are made for 1000 steps: with 100 they end far from pure noise)
    acp = alphas_cumprod(1000, schedule)
    assert acp.shape == (1000,) and acp.dtype == torch.float32
    assert bool((acp > 0).all()) and bool((acp < 1).all())
    assert bool((acp[1:] < acp[:-1]).all())
    assert float(acp[0]) > 0.99 and float(acp[-1]) < 0.1


def loss_args(**kw):
    args = dict(alphas_cumprod=alphas_cumprod(T, "squaredcos_cap_v2"), multiplicity=3,
                label_dropout=0.3, null_label=CLASSES)
    return {**args, **kw}


def test_denoising_loss_is_per_example_and_the_mean_over_k_draws():
    den = denoiser()
    z0, y = torch.randn(5, DIM), torch.tensor([0, 1, 2, 0, 1])
    args = loss_args()
    loss = denoising_loss(den, z0, y, generator=torch.Generator().manual_seed(3), **args)
    assert loss.shape == (5,) and bool((loss > 0).all())
    # the same draws, one model call per draw k: the loss is the mean of the K per-draw losses
    t, noise, drop = predraw(torch.Generator().manual_seed(3), 5, 3, DIM, T, 0.3)
    per_draw = torch.stack([
        loss_from_draws(den, z0, y, args["alphas_cumprod"], t[:, k:k + 1], noise[:, k:k + 1],
                        drop[:, k:k + 1], CLASSES) for k in range(3)], dim=1)
    torch.testing.assert_close(loss, per_draw.mean(1), rtol=1e-5, atol=1e-7)
    # and each example's loss does not depend on the rest of the batch
    for i in range(5):
        sl = slice(i, i + 1)
        alone = loss_from_draws(den, z0[sl], y[sl], args["alphas_cumprod"], t[sl], noise[sl],
                                drop[sl], CLASSES)
        torch.testing.assert_close(alone[0], loss[i], rtol=1e-5, atol=1e-7)


def test_denoising_loss_is_reproducible_from_its_generator():
    den, z0, y = denoiser(), torch.randn(4, DIM), torch.arange(4) % CLASSES
    a = denoising_loss(den, z0, y, generator=torch.Generator().manual_seed(1), **loss_args())
    b = denoising_loss(den, z0, y, generator=torch.Generator().manual_seed(1), **loss_args())
    c = denoising_loss(den, z0, y, generator=torch.Generator().manual_seed(2), **loss_args())
    assert torch.equal(a, b) and not torch.equal(a, c)


class Recorder(torch.nn.Module):
    """Records the inputs a loss gives the model; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((z, t, y))
        return torch.zeros_like(z)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_denoising_loss_inputs_noise_levels_and_label_dropout(dropout):
    rec = Recorder()
    n, k = 4000, 2
    z0 = torch.zeros(n, DIM)
    y = torch.arange(n) % CLASSES
    loss = denoising_loss(rec, z0, y, generator=torch.Generator().manual_seed(0),
                          prediction="epsilon",
                          **loss_args(multiplicity=k, label_dropout=dropout))
    (zt, t, labels), = rec.calls
    assert zt.shape == (n, k, DIM) and t.shape == labels.shape == (n, k)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    null = labels == CLASSES
    assert float(null.float().mean()) == pytest.approx(dropout, abs=0.02)
    assert torch.equal(labels[~null], y.unsqueeze(1).expand(n, k)[~null])
    # z0 = 0: zt = sqrt(1 - abar_t) noise, and predicting 0 costs E|noise|^2 / D = 1
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.05)
    acp = alphas_cumprod(T, "squaredcos_cap_v2")
    var = zt.pow(2).mean(-1) / (1 - acp[t])
    assert float(var.mean()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("skew", [1.0, 2.0, 3.0])
def test_timestep_skew_draws_floor_t_u_to_the_skew(skew):
    gen = torch.Generator().manual_seed(0)
    t = draw_timesteps((200_000,), T, skew, gen, torch.device("cpu"))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == T - 1
    # P(t < m) = P(T u^skew < m) = (m / T)^(1 / skew)
    for m in (1, 10, 50):
        assert float((t < m).float().mean()) == pytest.approx((m / T) ** (1 / skew), abs=0.005)


def test_timestep_skew_reaches_the_loss_and_is_validated():
    rec = Recorder()
    z0, y = torch.zeros(20_000, DIM), torch.arange(20_000) % CLASSES
    denoising_loss(rec, z0, y, generator=torch.Generator().manual_seed(0), timestep_skew=3.0,
                   **loss_args(multiplicity=1, label_dropout=0.0))
    (_, t, _), = rec.calls
    assert float((t < 10).float().mean()) == pytest.approx(0.1 ** (1 / 3), abs=0.01)
    from dplatent.config import DiffusionConfig
    from dplatent.errors import ConfigError
    with pytest.raises(ConfigError, match=r"timestep_skew must be in \[1, 10\]"):
        DiffusionConfig(timestep_skew=0.5)


def test_initial_noise_is_per_index():
    all7 = initial_noise(4, np.arange(7), DIM)
    assert all7.shape == (7, DIM)
    for i in range(7):
        assert torch.equal(initial_noise(4, np.array([i]), DIM)[0], all7[i])
    assert not torch.equal(initial_noise(5, np.arange(7), DIM), all7)
    assert len({tuple(r.tolist()) for r in all7}) == 7


def test_another_noise_stream_is_independent_and_stream_0_keeps_its_draws():
    # stream 0 is the starting noise as it always was: row i from the seed (seed, i)
    key = int(np.random.SeedSequence([4, 3]).generate_state(1, dtype=np.uint64)[0] >> 1)
    expected = torch.randn(DIM, generator=torch.Generator().manual_seed(key))
    assert torch.equal(initial_noise(4, np.array([3]), DIM)[0], expected)
    zero = initial_noise(4, np.arange(400), DIM)
    one = initial_noise(4, np.arange(400), DIM, stream=1)
    assert torch.equal(initial_noise(4, np.array([3]), DIM, stream=1)[0], one[3])  # per index
    corr = float((zero * one).mean() / (zero.std() * one.std()))
    assert abs(corr) < 0.05                      # 400 * DIM pairs: |corr| ~ 1 / sqrt(n)
    assert float(one.std()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_sample_i_is_the_same_in_a_batch_of_one_or_seven(sampler):
    den = denoiser()
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    kw = dict(dim=DIM, steps=5, guidance=2.0, null_label=CLASSES, train_timesteps=T,
              beta_schedule="squaredcos_cap_v2", sampler=sampler, progress=False)
    batch = sample_latents(den, labels, seed=11, batch_size=7, **kw)
    singles = sample_latents(den, labels, seed=11, batch_size=1, **kw)
    threes = sample_latents(den, labels, seed=11, batch_size=3, **kw)
    assert batch.shape == (7, DIM) and bool(torch.isfinite(batch).all())
    torch.testing.assert_close(singles, batch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(threes, batch, rtol=1e-5, atol=1e-5)
    assert torch.equal(sample_latents(den, labels, seed=11, batch_size=7, **kw), batch)
    other = sample_latents(den, labels, seed=12, batch_size=7, **kw)
    assert not torch.allclose(other, batch, atol=1e-3)
    # different rows differ, and the label matters
    assert not torch.allclose(batch[0], batch[3], atol=1e-3)
    relabelled = sample_latents(den, (labels + 1) % CLASSES, seed=11, batch_size=7, **kw)
    assert not torch.allclose(relabelled, batch, atol=1e-3)


def test_eta_adds_each_samples_own_step_noise_whatever_its_batch():
    den = denoiser()
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    kw = dict(dim=DIM, steps=5, guidance=1.0, null_label=CLASSES, train_timesteps=T,
              beta_schedule="squaredcos_cap_v2", sampler="ddim", progress=False)
    plain = sample_latents(den, labels, seed=11, batch_size=7, **kw)
    assert torch.equal(sample_latents(den, labels, seed=11, batch_size=7, eta=0.0, **kw), plain)
    batch = sample_latents(den, labels, seed=11, batch_size=7, eta=1.0, **kw)
    singles = sample_latents(den, labels, seed=11, batch_size=1, eta=1.0, **kw)
    torch.testing.assert_close(singles, batch, rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(batch).all())
    assert not torch.allclose(batch, plain, atol=1e-3)
    half = sample_latents(den, labels, seed=11, batch_size=7, eta=0.5, **kw)
    # less step noise, closer to the deterministic path
    assert float((half - plain).norm()) < float((batch - plain).norm())


def test_eta_needs_the_ddim_sampler():
    kw = dict(dim=DIM, steps=2, guidance=1.0, null_label=CLASSES, train_timesteps=T,
              beta_schedule="squaredcos_cap_v2", seed=0, progress=False)
    with pytest.raises(ValueError, match="eta > 0 needs the 'ddim' sampler, got 'dpm'"):
        sample_latents(denoiser(), np.array([0]), sampler="dpm", eta=1.0, **kw)


def test_ancestral_steps_keep_a_gaussians_spread():
    """For data N(0, s^2 I) and its exact denoiser, eta = 1 is a DDPM sampler: with enough
    steps the samples' standard deviation is s, so the step noise enters at its scale (at 50
    steps both eta = 0 and eta = 1 fall short of s by a few per cent)."""
    s, timesteps = 0.5, 1000
    exact = ExactGaussianDenoiser(s, alphas_cumprod(timesteps, "squaredcos_cap_v2"))
    out = sample_latents(exact, np.zeros(2000, dtype=np.int64), dim=DIM, seed=0,
                         steps=timesteps, guidance=1.0, null_label=CLASSES,
                         train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", eta=1.0,
                         progress=False)
    assert float(out.std()) == pytest.approx(s, rel=0.03)


def test_guidance_combines_conditional_and_unconditional_predictions():
    den = denoiser()
    z, t, y = torch.randn(4, DIM), torch.full((4,), 30), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        cond = den(z, t, y)
        uncond = den(z, t, torch.full_like(y, CLASSES))
        torch.testing.assert_close(guided_output(den, z, t, y, 1.0, CLASSES), cond)
        torch.testing.assert_close(guided_output(den, z, t, y, 0.0, CLASSES), uncond,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(guided_output(den, z, t, y, 3.0, CLASSES),
                                   uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)


def test_sampler_scheduler_names():
    for name in ("ddim", "dpm"):
        sched = sampler_scheduler(name, T, "squaredcos_cap_v2")
        sched.set_timesteps(5)
        assert len(sched.timesteps) == 5
        # the sampler's schedule is the one the loss trains on
        torch.testing.assert_close(sched.alphas_cumprod.float(),
                                   alphas_cumprod(T, "squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_scheduler("euler", T, "linear")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_denoising_loss_targets_match_the_prediction_type(prediction):
    den = denoiser()
    z0, y = torch.randn(4, DIM), torch.tensor([0, 1, 2, 0])
    args = loss_args(label_dropout=0.0)
    loss = denoising_loss(den, z0, y, generator=torch.Generator().manual_seed(5),
                          prediction=prediction, **args)
    t, noise, drop = predraw(torch.Generator().manual_seed(5), 4, 3, DIM, T, 0.0)
    ref = loss_from_draws(den, z0, y, args["alphas_cumprod"], t, noise, drop, CLASSES,
                          prediction=prediction)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
