"""DP class Gaussians of the latents and the exact Gaussian denoiser (diffusion/gaussian_base):
sensitivity of the release, noise scale, recovery without noise, PSD output, the posterior mean
against the direct formula, sampling a Gaussian through DDIM, the accounting of the release,
and that a resumed run never releases twice."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch

from dplatent import config
from dplatent.diffusion import gaussian_base as gb
from dplatent.diffusion.sampler import sample_latents
from dplatent.diffusion.schedule import alphas_cumprod
from dplatent.errors import ConfigError, PrivacyError
from dplatent.models.denoiser import Denoiser
from dplatent.privacy.accounting import GAUSSIAN_STAGE, epsilon, plan
from dplatent.train.stages import train

from conftest import train_smoke, write_synthetic_npz


def _flat(s: gb.NoisySums) -> torch.Tensor:
    return torch.cat([s.first.flatten(), s.count.flatten(), s.second.flatten()])


@pytest.mark.parametrize("weights", sorted(gb.RELEASE_WEIGHTS))
def test_one_record_moves_the_sums_by_at_most_the_sensitivity(weights):
    w = gb.RELEASE_WEIGHTS[weights]
    g = torch.Generator().manual_seed(0)
    z = 30 * torch.randn(50, 6, generator=g)         # far outside the norm bound
    y = torch.randint(0, 3, (50,), generator=g)
    radius = math.sqrt(5)
    full = _flat(gb.class_sums(z, y, 3, radius, w))
    for i in range(50):
        keep = torch.arange(50) != i
        moved = (full - _flat(gb.class_sums(z[keep], y[keep], 3, radius, w))).norm()
        assert moved <= gb.SENSITIVITY * (1 + 1e-9)
    # a record exactly on the bound moves them by exactly the sensitivity
    on = torch.zeros(1, 6, dtype=torch.float64)
    on[0, 0] = radius
    assert _flat(gb.class_sums(on, torch.tensor([1]), 3, radius, w)).norm().item() == \
        pytest.approx(gb.SENSITIVITY)


def test_noise_has_std_sigma_times_sensitivity():
    zero = gb.NoisySums(first=torch.zeros(10, 40, dtype=torch.float64),
                        count=torch.zeros(10, dtype=torch.float64),
                        second=torch.zeros(10, 40, 40, dtype=torch.float64), radius=1.0,
                        weights=gb.RELEASE_WEIGHTS["equal"])
    noisy = _flat(gb.add_noise(zero, 2.5, torch.Generator().manual_seed(1)))
    assert gb.SENSITIVITY == pytest.approx(1.0)
    assert noisy.std().item() == pytest.approx(2.5, rel=0.03)
    assert abs(noisy.mean().item()) < 0.05


@pytest.mark.parametrize("weights", sorted(gb.RELEASE_WEIGHTS))
def test_covariance_noise_is_sigma_r2_over_weight_and_count(weights):
    """The std the denoised estimate is told equals the spread of the second moments' entries
    over many releases of the same latents (and the means' noise is sigma R / (w_1 count));
    divided by the exact count, to leave out the count's own, much smaller noise."""
    w = gb.RELEASE_WEIGHTS[weights]
    z, y = _latents(400, 4, 2, seed=3)
    sigma, reps = 0.8, 400
    draws = [gb.release(z, y, 2, sigma, torch.Generator().manual_seed(i), weights=weights)
             for i in range(reps)]
    count = torch.tensor([200.0, 200.0], dtype=torch.float64)
    means = torch.stack([s.first / w[0] / count[:, None] * s.radius for s in draws])
    second = torch.stack([s.second / w[2] / count[:, None, None] * s.radius ** 2
                          for s in draws])
    expected = gb.covariance_noise_std(draws[0])
    assert expected.shape == (2,)
    np.testing.assert_allclose(expected.numpy(), sigma / w[2] * 3 / 200, rtol=0.1)  # noisy count
    for c in range(2):
        np.testing.assert_allclose(second.std(0)[c].numpy(), expected[c].item(), rtol=0.15)
        np.testing.assert_allclose(means.std(0)[c].numpy(), sigma / w[0] * math.sqrt(3) / 200,
                                   rtol=0.15)


def test_every_configurable_release_has_unit_norm_weights():
    assert tuple(gb.RELEASE_WEIGHTS) == config.GAUSSIAN_RELEASES
    for w in gb.RELEASE_WEIGHTS.values():
        assert math.hypot(*w) == pytest.approx(gb.SENSITIVITY)


def test_weighted_release_puts_less_noise_on_the_covariances_at_the_same_sigma():
    z, y = _latents(600, 5, 3, seed=2)
    std = {name: gb.covariance_noise_std(gb.release(z, y, 3, 0.1, torch.Generator(),
                                                    weights=name))
           for name in gb.RELEASE_WEIGHTS}
    ratio = 1 / (math.sqrt(3) * math.sqrt(0.9))  # (sigma / w_3) / (sqrt(3) sigma)
    np.testing.assert_allclose((std["weighted"] / std["equal"]).numpy(), ratio, rtol=0.02)
    with pytest.raises(ValueError, match="weights must be one of"):
        gb.release(z, y, 3, 1.0, torch.Generator(), weights="second")


def _latents(n: int, d: int, classes: int, seed: int):
    """Latents on the sphere of radius sqrt(d - 1), as the encoder's standardisation gives."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + 2 * torch.eye(classes, d)[y]
    return z / z.norm(dim=1, keepdim=True) * math.sqrt(d - 1), y


def test_without_noise_the_gaussians_are_the_class_moments():
    z, y = _latents(600, 5, 3, seed=2)
    sums = gb.release(z, y, 3, noise_multiplier=0.0, generator=torch.Generator())
    means, covs = gb.gaussians(sums)
    assert means.shape == (4, 5) and covs.shape == (4, 5, 5)
    for c in range(3):
        zc = z[y == c].numpy()
        np.testing.assert_allclose(means[c].numpy(), zc.mean(0), atol=1e-9)
        np.testing.assert_allclose(covs[c].numpy(), np.cov(zc.T, bias=True), atol=1e-9)
    # the null label: the balanced mixture's mean and covariance
    np.testing.assert_allclose(means[3].numpy(), means[:3].mean(0).numpy(), atol=1e-12)
    mix = (covs[:3] + torch.einsum("ci,cj->cij", means[:3], means[:3])).mean(0) \
        - torch.outer(means[3], means[3])
    np.testing.assert_allclose(covs[3].numpy(), mix.numpy(), atol=1e-9)


def test_covariances_stay_positive_definite_under_heavy_noise():
    z, y = _latents(30, 8, 2, seed=3)
    sums = gb.release(z, y, 2, noise_multiplier=50.0, generator=torch.Generator().manual_seed(4))
    _, covs = gb.gaussians(sums)
    evals = torch.linalg.eigvalsh(covs)
    assert (evals >= gb.EIG_FLOOR * (1 - 1e-6)).all()
    assert torch.allclose(covs, covs.transpose(1, 2))


def _base(means, covs, timesteps=1000, prediction="v"):
    base = gb.GaussianBase(num_classes=len(means) - 1, dim=means.shape[1], prediction=prediction,
                           alphas_cumprod=alphas_cumprod(timesteps, "squaredcos_cap_v2"))
    base.set_gaussians(means, covs)
    return base


def _random_gaussians(classes: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes + 1, d, generator=g)
    a = torch.randn(classes + 1, d, d, generator=g)
    covs = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)
    return means, covs


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_base_is_the_posterior_mean_of_the_direct_formula(prediction):
    means, covs = _random_gaussians(3, 4, seed=5)
    base = _base(means, covs, prediction=prediction)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(8, 2, 4, generator=g)
    t = torch.randint(0, 1000, (8, 2), generator=g)
    y = torch.randint(0, 4, (8, 2), generator=g)
    acp = alphas_cumprod(1000, "squaredcos_cap_v2").double()
    got = base(z, t, y).double()
    for i in range(8):
        for k in range(2):
            a, mu, s = acp[t[i, k]], means[y[i, k]].double(), covs[y[i, k]].double()
            zt = z[i, k].double()
            z0 = mu + a.sqrt() * s @ torch.linalg.solve(a * s + (1 - a) * torch.eye(4),
                                                        zt - a.sqrt() * mu)
            eps = (zt - a.sqrt() * z0) / (1 - a).sqrt()
            want = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
            torch.testing.assert_close(got[i, k], want, atol=2e-4, rtol=1e-4)


def test_denoiser_with_a_base_starts_as_the_base_and_samples_the_gaussians():
    torch.manual_seed(0)
    means, covs = _random_gaussians(2, 3, seed=7)
    base = _base(means, covs)
    den = Denoiser(dim=3, num_classes=2, hidden=16, blocks=1, expansion=2, base=base)
    z, t, y = torch.randn(5, 3), torch.randint(0, 1000, (5,)), torch.randint(0, 3, (5,))
    assert torch.equal(den(z, t, y), base(z, t, y))
    labels = np.repeat([0, 1], 3000)
    out = sample_latents(den, labels, dim=3, seed=0, steps=50, guidance=1.0, null_label=2,
                         train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         progress=False).double()
    for c in (0, 1):
        zc = out[torch.from_numpy(labels == c)]
        torch.testing.assert_close(zc.mean(0), means[c].double(), atol=0.08, rtol=0)
        torch.testing.assert_close(torch.cov(zc.T), covs[c].double(), atol=0.12, rtol=0.1)


def test_temperature_scales_each_samples_offset_from_its_class_mean():
    """For a Gaussian model the deterministic sampler is (nearly) linear in its starting noise,
    so temperature T moves every sample T times as far from its class mean, in the same
    direction, and the class covariance by T^2."""
    torch.manual_seed(0)
    means, covs = _random_gaussians(2, 3, seed=8)
    den = Denoiser(dim=3, num_classes=2, hidden=16, blocks=1, expansion=2,
                   base=_base(means, covs))
    labels = np.repeat([0, 1], 2000)
    out = {t: sample_latents(den, labels, dim=3, seed=1, steps=50, guidance=1.0, null_label=2,
                             train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                             temperature=t, progress=False).double() for t in (1.0, 1.5)}
    offset = {t: z - means.double()[torch.from_numpy(labels)] for t, z in out.items()}
    torch.testing.assert_close(offset[1.5], 1.5 * offset[1.0], atol=0.05, rtol=0.05)
    for c in (0, 1):
        zc = out[1.5][torch.from_numpy(labels == c)]
        torch.testing.assert_close(torch.cov(zc.T), 2.25 * covs[c].double(), atol=0.25,
                                   rtol=0.1)


def test_plan_gives_the_release_its_share_and_the_gaussian_mechanism_epsilon():
    cfg = config.resolve("quick", {"diffusion.gaussian_base": "true",
                                   "privacy.autoencoder_share": "0.2",
                                   "privacy.gaussian_share": "0.3"})
    p = plan(60000, cfg)
    assert [s.stage for s in p.stages] == ["autoencoder", GAUSSIAN_STAGE, "diffusion"]
    g = p.stage(GAUSSIAN_STAGE)
    assert (g.sample_rate, g.steps, g.clip_norm) == (1.0, 1, pytest.approx(1.0))
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(g.noise_multiplier))
    assert g.epsilon_alone == pytest.approx(pld.get_epsilon(1e-5), abs=0.03)
    first_two = epsilon([p.stages[0].event(), g.event()], 1e-5)
    assert 0.5 * 10 * 0.99 <= first_two <= 0.5 * 10
    assert 9.9 <= p.epsilon <= 10


def test_shares_leaving_nothing_for_the_denoiser_are_refused():
    with pytest.raises(ConfigError, match="gaussian_share"):
        config.resolve("quick", {"diffusion.gaussian_base": "true",
                                 "privacy.autoencoder_share": "0.5",
                                 "privacy.gaussian_share": "0.5"})
    config.resolve("quick", {"diffusion.gaussian_base": "false",  # unused without the base
                             "privacy.autoencoder_share": "0.5",
                             "privacy.gaussian_share": "0.5"})


def test_resume_loads_the_release_and_a_lost_release_is_refused(tmp_path, single_thread):
    npz = write_synthetic_npz(tmp_path / "d.npz", 300, seed=0)
    run = train_smoke(npz, tmp_path / "run", **{"diffusion.gaussian_base": "true"})
    ledger = json.loads((run / "privacy.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["autoencoder", GAUSSIAN_STAGE,
                                                       "diffusion"]
    released = torch.load(run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    den = torch.load(run / "checkpoints" / "diffusion.pt")["model"]
    torch.testing.assert_close(den["base.means"], released["means"].float())

    # a finished run resumed: the same release, the same ledger
    (run / "checkpoints" / "diffusion.pt").unlink()
    cfg = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                   "threads": "1", "diffusion.gaussian_base": "true"})
    train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, resume=True, progress=False)
    again = torch.load(run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    assert torch.equal(again["means"], released["means"])
    assert json.loads((run / "privacy.json").read_text())["epsilon"] == \
        pytest.approx(ledger["epsilon"])

    # the release is recorded but its file is gone: never released a second time
    (run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt").unlink()
    (run / "checkpoints" / "diffusion.pt").unlink()
    with pytest.raises(PrivacyError, match="outside the budget"):
        train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, resume=True,
              progress=False)
    kept = json.loads((run / "privacy.json").read_text())  # the refusal rewrote nothing
    assert GAUSSIAN_STAGE in [e["stage"] for e in kept["entries"]]


def test_denoised_covariance_without_noise_is_the_psd_one():
    z, y = _latents(600, 5, 3, seed=2)
    sums = gb.release(z, y, 3, noise_multiplier=0.0, generator=torch.Generator())
    for a, b in zip(gb.gaussians(sums, "psd"), gb.gaussians(sums, "denoised")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="covariance must be one of"):
        gb.gaussians(sums, "shrunk")


def test_denoised_covariance_recovers_a_spiked_covariance_that_psd_collapses():
    """True covariance: 4 spikes (variance 2.0) over an isotropic bulk (0.05) in 60-d, as the
    MNIST latents look; noise on the second-moment sums that buries the bulk. 'psd' sends
    most bulk directions to the floor; 'denoised' recovers the bulk and the spikes."""
    d, n, bulk = 60, 4000, 0.05
    g = torch.Generator().manual_seed(0)
    scale = torch.full((d,), bulk ** 0.5, dtype=torch.float64)
    scale[:4] = 2.0 ** 0.5
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    y = torch.zeros(n, dtype=torch.long)
    sums = gb.release(z, y, 1, noise_multiplier=1.0, generator=g)
    truth = torch.diag(scale ** 2)
    _, psd_covs = gb.gaussians(sums, "psd")
    _, den_covs = gb.gaussians(sums, "denoised")
    psd_evals = torch.linalg.eigvalsh(psd_covs[0])
    den_evals = torch.linalg.eigvalsh(den_covs[0])
    assert (psd_evals[:-4] <= 2 * gb.EIG_FLOOR).float().mean() > 0.3  # collapsed
    np.testing.assert_allclose(den_evals[:-4].numpy(), bulk, rtol=0.2)
    np.testing.assert_allclose(den_evals[-4:].numpy(), 2.0, rtol=0.15)
    # fresh data from the truth: far likelier under the denoised Gaussian than under the
    # collapsed one, and nearly as likely as under the truth (mean log-density per point)
    fresh = torch.randn(2000, d, generator=g, dtype=torch.float64) * scale
    def loglik(cov):
        return torch.distributions.MultivariateNormal(
            torch.zeros(d, dtype=torch.float64), cov).log_prob(fresh).mean().item()
    assert loglik(den_covs[0]) > loglik(truth) - 3 > loglik(psd_covs[0]) + 50


def test_pooled_bulk_of_a_single_group_is_the_denoised_covariance():
    """With one group the pooled covariance is the group's own, so its bulk, restricted to
    the directions below the edge and scaled to the trace left, is the flat 'denoised' one."""
    z, y = _latents(800, 12, 1, seed=3)
    sums = gb.release(z, y, 1, noise_multiplier=0.3, generator=torch.Generator().manual_seed(4))
    for a, b in zip(gb.gaussians(sums, "denoised"), gb.gaussians(sums, "pooled_bulk")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_pooled_bulk_recovers_the_shape_of_a_bulk_that_each_group_cannot_see():
    """Eight groups share a bulk whose variances fall from 0.2 to 0.005 over 56 directions and
    each has 4 spikes of its own; the noise on each group's covariance is above the whole
    bulk, so 'denoised' spreads the bulk's variance equally. The pooled estimate, about
    sqrt(8) less noisy, sees the bulk's shape: the covariances come out closer to the truth
    and fresh data are likelier under them. Both keep each group's trace."""
    d, groups, n = 60, 8, 3000
    g = torch.Generator().manual_seed(0)
    bulk = torch.logspace(math.log10(0.2), math.log10(0.005), d - 4, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    truths, zs = [], []
    for c in range(groups):
        own = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64))[0]
        cov = basis[:, 4:] @ torch.diag(bulk) @ basis[:, 4:].T + 2.0 * own @ own.T
        truths.append(cov)
        zs.append(torch.randn(n, d, generator=g, dtype=torch.float64)
                  @ torch.linalg.cholesky(cov).T)
    z = torch.cat(zs)
    y = torch.arange(groups).repeat_interleave(n)
    sums = gb.release(z, y, groups, noise_multiplier=0.5, generator=g)
    _, den = gb.gaussians(sums, "denoised")
    _, pool = gb.gaussians(sums, "pooled_bulk")
    truth = torch.stack(truths)
    den_err = (den[:groups] - truth).norm(dim=(1, 2))
    pool_err = (pool[:groups] - truth).norm(dim=(1, 2))
    assert (pool_err < 0.95 * den_err).all()
    torch.testing.assert_close(torch.diagonal(pool, dim1=1, dim2=2).sum(1),
                               torch.diagonal(den, dim1=1, dim2=2).sum(1), rtol=0.02, atol=0)
    def loglik(covs):
        return sum(torch.distributions.MultivariateNormal(
            torch.zeros(d, dtype=torch.float64), covs[c]).log_prob(
                torch.randn(500, d, generator=torch.Generator().manual_seed(c),
                            dtype=torch.float64) @ torch.linalg.cholesky(truth[c]).T).mean()
            for c in range(groups)).item() / groups
    assert loglik(pool) > loglik(den) + 1.5


# ------------------------------------------------- second moments in a public basis (rank K)


def _basis(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def test_one_record_moves_the_sums_in_a_basis_by_at_most_the_sensitivity():
    g = torch.Generator().manual_seed(0)
    z = 30 * torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    w, basis = gb.RELEASE_WEIGHTS["weighted"], _basis(6, 3, seed=1)
    full = _flat(gb.class_sums(z, y, 3, math.sqrt(5), w, basis))
    assert full.numel() == 3 * 6 + 3 + 3 * 3 * 3   # K x K second moments, not D x D
    for i in range(40):
        keep = torch.arange(40) != i
        moved = (full - _flat(gb.class_sums(z[keep], y[keep], 3, math.sqrt(5), w, basis)))
        assert moved.norm() <= gb.SENSITIVITY * (1 + 1e-9)


def test_without_noise_a_basis_keeps_the_projected_covariance_and_the_whole_trace():
    """B^T S B is the class covariance's, and the other D - K directions share what the
    trace leaves (known because every latent has norm R): the total variance is exact."""
    z, y = _latents(900, 6, 3, seed=5)
    basis = _basis(6, 3, seed=6)
    means, covs = gb.gaussians(gb.release(z, y, 3, 0.0, torch.Generator(), basis=basis),
                               "denoised")
    outside = torch.eye(6, dtype=torch.float64) - basis @ basis.T
    for c in range(3):
        exact = torch.from_numpy(np.cov(z[y == c].numpy().T, bias=True))
        np.testing.assert_allclose(means[c].numpy(), z[y == c].mean(0).numpy(), atol=1e-9)
        np.testing.assert_allclose((basis.T @ covs[c] @ basis).numpy(),
                                   (basis.T @ exact @ basis).numpy(), atol=1e-9)
        np.testing.assert_allclose(torch.trace(covs[c]).item(), torch.trace(exact).item(),
                                   rtol=1e-9)
        rest = (outside @ covs[c] @ outside).numpy()   # isotropic outside the basis
        np.testing.assert_allclose(rest, outside.numpy() * np.trace(rest) / 3, atol=1e-9)
        np.testing.assert_allclose((basis.T @ covs[c] @ outside).numpy(), 0, atol=1e-9)


def test_a_basis_lowers_the_noise_edge_with_its_rank():
    """The same sigma on K x K instead of D x D entries: a spike between the two edges is
    found in a basis that holds it and lost without one."""
    d, k, n = 256, 2, 4000
    g = torch.Generator().manual_seed(7)
    spike, centre = torch.eye(d, dtype=torch.float64)[[0, d - 1]]
    # noise std on a covariance entry s = sqrt(3) 255 / 4000 = 0.11, v = s^2 / 2: a spike is
    # seen above sqrt(v D) = 1.25 in the whole space, above sqrt(v K) = 0.11 in the basis
    # (the observed eigenvalue, 0.8 + v K / 0.8, clears that edge, 0.50, by far)
    z = math.sqrt(d - 1) * centre + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64) \
        + math.sqrt(0.8) * torch.randn(n, 1, generator=g, dtype=torch.float64) * spike
    z = z / z.norm(dim=1, keepdim=True) * math.sqrt(d - 1)
    y = torch.zeros(n, dtype=torch.long)
    basis = torch.eye(d, dtype=torch.float64)[:, :k]
    found = {}
    for name, b in (("whole", None), ("basis", basis)):
        sums = gb.release(z, y, 1, 1.0, torch.Generator().manual_seed(8), basis=b)
        means, covs = gb.gaussians(sums, "denoised")
        found[name] = (spike @ covs[0] @ spike).item()
    true = np.var(z[:, 0].numpy())
    assert found["basis"] == pytest.approx(true, rel=0.15)
    assert found["whole"] < 0.1 * true   # under the D-d edge: spread over the bulk


def test_decoder_basis_of_a_linear_decoder_is_its_top_right_singular_vectors():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(20, 8, generator=g, dtype=torch.float64)
    points = torch.randn(5, 8, generator=g, dtype=torch.float64)
    basis = gb.decoder_basis(lambda v: a @ v, points, 3)
    assert basis.shape == (8, 3)
    top = torch.linalg.svd(a)[2][:3].T
    torch.testing.assert_close(basis @ basis.T, top @ top.T)
    # each vector's sign is fixed by its largest entry, so a slightly perturbed decoder (one
    # trained by several processes) gives nearly the same vectors, not flipped ones
    peaks = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    assert (peaks > 0).all()
    b = a + 1e-6 * torch.randn(20, 8, generator=g, dtype=torch.float64)
    nearby = gb.decoder_basis(lambda v: b @ v, points, 3)
    torch.testing.assert_close(nearby, basis, rtol=0, atol=1e-4)
    for bad in (0, 8):
        with pytest.raises(ValueError, match=r"basis rank must be in \(0, 8\)"):
            gb.decoder_basis(lambda v: a @ v, points, bad)


def test_a_basis_of_the_wrong_shape_is_refused():
    z, y = _latents(30, 6, 2, seed=1)
    for bad in (_basis(5, 2, 0), _basis(6, 6, 0), torch.zeros(6)):
        with pytest.raises(ValueError, match="a basis for 6-d latents must be"):
            gb.release(z, y, 2, 1.0, torch.Generator(), basis=bad)


def test_a_run_with_a_basis_saves_it_and_spends_the_same_epsilon(tmp_path, single_thread):
    npz = write_synthetic_npz(tmp_path / "d.npz", 300, seed=0)
    runs = {k: train_smoke(npz, tmp_path / f"run{k}", **{"diffusion.gaussian_base": "true",
                                                        "diffusion.gaussian_basis": str(k)})
            for k in (0, 4)}
    eps = [json.loads((r / "privacy.json").read_text())["epsilon"] for r in runs.values()]
    assert eps[0] == pytest.approx(eps[1])
    released = torch.load(runs[4] / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    basis, d = released["basis"], released["means"].shape[1]
    assert basis.shape == (d, 4) and "basis" not in torch.load(
        runs[0] / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=basis.dtype))
    with pytest.raises(ConfigError, match=f"gaussian_basis = {d} must be below the latent "
                                          f"size {d}"):
        train_smoke(npz, tmp_path / "too-big", **{"diffusion.gaussian_base": "true",
                                                  "diffusion.gaussian_basis": str(d)})


def test_a_basis_needs_the_gaussian_base_and_a_rank_of_at_least_zero():
    with pytest.raises(ConfigError, match="gaussian_basis needs diffusion.gaussian_base"):
        config.resolve("smoke", {"diffusion.gaussian_basis": "4"})
    with pytest.raises(ConfigError, match="gaussian_basis must be >= 0"):
        config.resolve("smoke", {"diffusion.gaussian_base": "true",
                                 "diffusion.gaussian_basis": "-1"})
