"""Per-class mixtures from two releases (diffusion.gaussian_partition): the cells, the
sensitivity of the cells' release, the exact composition of the two releases in the plan and
the ledger, the mixture denoiser against its direct formula, sampling the mixture, and that a
resumed run never releases twice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dplatent import config
from dplatent.diffusion import gaussian_base as gb
from dplatent.diffusion.sampler import sample_latents
from dplatent.diffusion.schedule import alphas_cumprod
from dplatent.errors import ConfigError, PrivacyError
from dplatent.models.denoiser import Denoiser
from dplatent.privacy.accounting import (GAUSSIAN_STAGE, PARTITION_STAGE, DPEvent,
                                         cells_exponent, epsilon, plan, resolved,
                                         split_release)
from dplatent.train.stages import train

from conftest import run_main, train_smoke, write_synthetic_npz


def _two_blob_classes(n: int, seed: int):
    """Class 0: two blobs at +-3 e_0 (shares 0.75 / 0.25); class 1: one blob at 3 e_1; in 4-d,
    on the sphere of radius sqrt(3) (as the encoder's standardisation gives)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2)
    side = torch.where(torch.rand(n, generator=g) < 0.75, 1.0, -1.0).double()
    centre = torch.zeros(n, 4, dtype=torch.float64)
    centre[y == 0, 0] = 3 * side[y == 0]
    centre[y == 1, 1] = 3
    z = centre + 0.3 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True) * math.sqrt(3), y


def test_cell_is_the_sign_pattern_along_the_class_directions():
    centres = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    dirs = torch.zeros(2, 3, 2, dtype=torch.float64)
    dirs[0, 0, 0] = dirs[0, 1, 1] = 1       # class 0: bit 0 = sign of x, bit 1 = sign of y
    dirs[1, 2, 0] = dirs[1, 0, 1] = -1      # class 1: bit 0 = z < 1, bit 1 = x < 1
    z = torch.tensor([[1, 1, 0], [-1, 1, 0], [1, -1, 5], [-1, -1, 5],
                      [0, 0, 0], [0, 0, 2], [2, 0, 0], [2, 0, 2]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert gb.cell_of(z, y, centres, dirs).tolist() == [3, 2, 1, 0, 3, 2, 1, 0]


def test_without_noise_the_cells_are_the_halves_of_a_class_along_its_main_direction():
    z, y = _two_blob_classes(4000, seed=0)
    sums, centres, dirs = gb.release_partitioned(z, y, 2, 1, (0.0, 0.0), torch.Generator())
    assert dirs.shape == (2, 4, 1) and centres.shape == (2, 4)
    assert abs(dirs[0, 0, 0].item()) == pytest.approx(1.0, abs=1e-3)  # class 0 splits on x
    w = gb.cell_weights(sums, 2)
    side = 1 if dirs[0, 0, 0] > 0 else 0  # the cell of the +x blob (bit set: positive)
    assert w[0, side].item() == pytest.approx(
        (z[y == 0, 0] > 0).double().mean().item(), abs=1e-12)
    assert w[0, side].item() == pytest.approx(0.75, abs=0.03)
    means, covs = gb.gaussians(sums, "psd", cells_per_class=2)
    assert means.shape == (5, 4) and covs.shape == (5, 4, 4)
    plus = z[(y == 0) & (z[:, 0] > 0)]
    np.testing.assert_allclose(means[side].numpy(), plus.mean(0).numpy(), atol=1e-9)
    exact = gb.psd(torch.from_numpy(np.cov(plus.T.numpy(), bias=True)))  # radial var < floor
    np.testing.assert_allclose(covs[side].numpy(), exact.numpy(), atol=1e-9)
    # the null label: the balanced class mixture, each class's cells weighted by their counts
    np.testing.assert_allclose(means[4].numpy(), z.mean(0).numpy(), atol=0.02)  # 2000 / class
    share = torch.cat([w[0] / 2, w[1] / 2])
    np.testing.assert_allclose(means[4].numpy(), (share @ means[:4]).numpy(), atol=1e-12)


def test_each_record_moves_the_cells_sums_by_at_most_the_sensitivity():
    """Given the public partition, every record is in exactly one cell of its class, so
    release B's sums have the class release's sensitivity."""
    z, y = _two_blob_classes(60, seed=1)
    z = 10 * z  # outside the norm bound
    _, centres, dirs = gb.release_partitioned(z, y, 2, 2, (0.0, 0.0), torch.Generator())
    cells = y * 4 + gb.cell_of(z, y, centres, dirs)
    w = gb.RELEASE_WEIGHTS["weighted"]
    radius = math.sqrt(3)

    def flat(s):
        return torch.cat([s.first.flatten(), s.count.flatten(), s.second.flatten()])
    full = flat(gb.class_sums(z, cells, 8, radius, w))
    for i in range(60):
        keep = torch.arange(60) != i
        moved = (full - flat(gb.class_sums(z[keep], cells[keep], 8, radius, w))).norm()
        assert moved <= gb.SENSITIVITY * (1 + 1e-9)


def test_split_release_composes_exactly_to_the_single_mechanism():
    single = DPEvent(stage=GAUSSIAN_STAGE, noise_multiplier=0.8, sample_rate=1.0, steps=1,
                     clip_norm=1.0)
    a, b = split_release(single, 0.1)
    assert (a.stage, b.stage) == (PARTITION_STAGE, GAUSSIAN_STAGE)
    assert a.noise_multiplier == pytest.approx(0.8 / math.sqrt(0.1))
    assert a.noise_multiplier ** -2 + b.noise_multiplier ** -2 == pytest.approx(0.8 ** -2)
    assert epsilon([a, b], 1e-5, "rdp") == pytest.approx(epsilon([single], 1e-5, "rdp"),
                                                         rel=1e-9)
    assert epsilon([a, b], 1e-5, "prv") == pytest.approx(epsilon([single], 1e-5, "prv"),
                                                         abs=0.02)
    with pytest.raises(PrivacyError, match="single full-batch"):
        split_release(DPEvent(stage="diffusion", noise_multiplier=1.0, sample_rate=0.1,
                              steps=10, clip_norm=1.0), 0.1)


def test_plan_with_cells_has_the_release_of_the_plan_without():
    def cfg(partition: str):
        return config.resolve("quick", {"diffusion.gaussian_base": "true",
                                        "diffusion.gaussian_partition": partition,
                                        "privacy.partition_share": "0.2"})
    one, two = plan(60000, cfg("0")), plan(60000, cfg("2"))
    assert [s.stage for s in two.stages] == ["autoencoder", PARTITION_STAGE, GAUSSIAN_STAGE,
                                             "diffusion"]
    sigma = one.stage(GAUSSIAN_STAGE).noise_multiplier
    assert two.stage(PARTITION_STAGE).noise_multiplier == pytest.approx(sigma / math.sqrt(0.2))
    assert two.stage(GAUSSIAN_STAGE).noise_multiplier == pytest.approx(sigma / math.sqrt(0.8))
    assert two.stage("diffusion").noise_multiplier == pytest.approx(
        one.stage("diffusion").noise_multiplier, rel=0.01)
    assert 9.9 <= two.epsilon <= 10
    control = plan(60000, config.resolve("quick", {
        "diffusion.gaussian_base": "true", "diffusion.gaussian_partition": "1",
        "privacy.non_private_control": "true"}))
    assert [s.noise_multiplier for s in control.stages] == [0.0] * 4


def _rule(cap: int, snr: float, share: float = 0.1, **extra: str):
    return config.resolve("quick", {"diffusion.gaussian_base": "true",
                                    "diffusion.gaussian_partition": str(cap),
                                    "diffusion.min_cell_snr": str(snr),
                                    "privacy.partition_share": str(share), **extra})


def test_cells_are_the_most_whose_records_per_noise_meet_the_bound():
    # n / (C 2^B) records per cell against snr * sigma / sqrt(1 - share) * sqrt(D)
    sigma_b = lambda sigma: sigma / math.sqrt(0.9)  # noqa: E731
    edge = 1500 * math.sqrt(0.9) / 1000  # B = 2: 60000 / 40 = 1500 records = 1000 sigma_b
    assert sigma_b(edge) * 1000 == pytest.approx(1500)
    assert cells_exponent(edge * (1 - 1e-9), 60000, 10, 1, _rule(3, 1000)) == 2
    assert cells_exponent(edge * 1.01, 60000, 10, 1, _rule(3, 1000)) == 1
    assert cells_exponent(edge * 0.49, 60000, 10, 1, _rule(3, 1000)) == 3  # room for 3, cap 3
    assert cells_exponent(edge * 0.49, 60000, 10, 1, _rule(2, 1000)) == 2  # never above cap
    assert cells_exponent(edge * 0.49, 60000, 20, 1, _rule(3, 1000)) == 2  # twice the classes
    assert cells_exponent(edge * 4.1, 60000, 10, 1, _rule(3, 1000)) == 0   # not even two cells
    assert cells_exponent(100.0, 60000, 10, 1, _rule(3, 0)) == 3           # no bound: the cap
    # the share of the first release takes precision from the cells' release
    assert cells_exponent(edge * 0.9, 60000, 10, 1, _rule(3, 1000, share=0.5)) == 1


def test_a_larger_latent_needs_more_records_per_cell():
    # the noise on a cell's mean grows as sqrt(D): 4 dimensions need twice the records of 1
    edge = 1500 * math.sqrt(0.9) / 1000  # B = 2 just fits at D = 1
    assert cells_exponent(edge * 0.49, 60000, 10, 1, _rule(3, 1000)) == 3
    assert cells_exponent(edge * 0.49, 60000, 10, 4, _rule(3, 1000)) == 2
    assert cells_exponent(edge * 0.51, 60000, 10, 4, _rule(3, 1000)) == 1
    assert cells_exponent(edge / 2 * (1 - 1e-9), 60000, 10, 4, _rule(3, 1000)) == 2
    # `full`'s bound at epsilon = 1 (PRV: the release's sigma 4.72): 2 cells at 98-d, 1 at 196-d
    full = config.resolve("full", {"privacy.epsilon": "1"})
    assert full.diffusion.gaussian_partition == 3 and full.diffusion.min_cell_snr == 50
    assert cells_exponent(4.72, 60000, 10, 98, full) == 1
    assert cells_exponent(4.72, 60000, 10, 196, full) == 0
    with pytest.raises(PrivacyError, match="latent_dim"):
        cells_exponent(1.0, 60000, 10, 0, full)


def test_plan_chooses_fewer_cells_at_small_epsilon_and_resolving_keeps_the_plan():
    # RDP: the release's sigma_b is 9.3 at epsilon 1 and 1.07 at 10
    small, large = (plan(60000, _rule(3, 50, **{"privacy.epsilon": e,
                                                "privacy.accountant": "rdp"}), 10, 98)
                    for e in ("1", "10"))
    assert small.gaussian_partition == 0 and PARTITION_STAGE not in [
        s.stage for s in small.stages]
    assert large.gaussian_partition == 3 and PARTITION_STAGE in [s.stage for s in large.stages]
    # the release's noise is that of a plan without cells, split or not
    plain = plan(60000, _rule(0, 0, **{"privacy.epsilon": "1", "privacy.accountant": "rdp"}))
    assert small.stage(GAUSSIAN_STAGE) == plain.stage(GAUSSIAN_STAGE)
    cfg = resolved(_rule(3, 50, **{"privacy.epsilon": "1", "privacy.accountant": "rdp"}),
                   small)
    assert cfg.diffusion.gaussian_partition == 0
    assert plan(60000, cfg, 10, 98) == small
    for classes, dim in ((None, None), (10, None), (None, 98)):
        with pytest.raises(PrivacyError, match="number of classes and the latent's dimension"):
            plan(60000, _rule(3, 1000), classes, dim)
    control = plan(60000, _rule(3, 1e9, **{"privacy.non_private_control": "true"}), 10, 98)
    assert control.gaussian_partition == 3  # no noise: every cell measured exactly


def test_plan_command_shows_the_cells_and_needs_the_classes_of_a_user_data_set(
        monkeypatch, capsys):
    args = ["plan", "--preset", "quick", "--set", "privacy.accountant=rdp", "--set",
            "diffusion.gaussian_base=true", "--set", "diffusion.gaussian_partition=3",
            "--set", "diffusion.min_cell_snr=50"]
    code, out, err = run_main([*args, "--epsilon", "10"], monkeypatch, capsys)
    assert code == 0, err
    assert "cells per class: 8" in out and PARTITION_STAGE in out
    code, out, err = run_main([*args, "--epsilon", "1"], monkeypatch, capsys)
    assert code == 0 and "cells per class: 1" in out and PARTITION_STAGE not in out
    code, out, err = run_main([*args, "--dataset", "mine.npz", "--n", "60000"], monkeypatch,
                              capsys)
    assert code != 0 and "--classes" in err
    user = [*args, "--dataset", "mine.npz", "--n", "60000", "--classes", "100", "--epsilon",
            "10"]
    code, out, err = run_main(user, monkeypatch, capsys)
    assert code != 0 and "--image-size" in err
    code, out, err = run_main([*user, "--image-size", "28"], monkeypatch, capsys)
    assert code == 0 and "cells per class: 1" in out  # 600 records a class: no room
    code, out, err = run_main([*user, "--classes", "10", "--image-size", "30"], monkeypatch,
                              capsys)
    assert code != 0 and "divisible by 4" in err
    # a larger latent needs more records per cell: 8 cells at 98-d, 4 at 392-d (56 x 56)
    code, out, err = run_main([*user, "--classes", "10", "--image-size", "56"], monkeypatch,
                              capsys)
    assert code == 0 and "cells per class: 4" in out


@pytest.mark.parametrize("settings, message", [
    ({"diffusion.gaussian_base": "true", "diffusion.min_cell_snr": "-1"}, "min_cell_snr"),
    ({"diffusion.gaussian_base": "false", "diffusion.gaussian_partition": "1"},
     "needs diffusion.gaussian_base"),
    ({"diffusion.gaussian_base": "true", "diffusion.gaussian_partition": "7"}, r"\[0, 6\]"),
    ({"diffusion.gaussian_base": "true", "privacy.partition_share": "1"}, "partition_share"),
])
def test_invalid_partitions_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve("quick", settings)


def _mixture_base(seed: int, classes: int = 2, cells: int = 2, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    groups = classes * cells + 1
    means = 2 * torch.randn(groups, d, generator=g)
    a = torch.randn(groups, d, d, generator=g)
    covs = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)
    weights = torch.rand(classes, cells, generator=g) + 0.2
    weights = weights / weights.sum(1, keepdim=True)
    base = gb.GaussianBase(num_classes=classes, dim=d, prediction="epsilon",
                           alphas_cumprod=alphas_cumprod(1000, "squaredcos_cap_v2"),
                           cells_per_class=cells)
    base.set_gaussians(means, covs, weights)
    return base, means.double(), covs.double(), weights.double()


def test_mixture_base_is_the_posterior_mean_of_the_direct_formula():
    base, means, covs, weights = _mixture_base(seed=3)
    g = torch.Generator().manual_seed(4)
    z = 2 * torch.randn(40, 3, generator=g)
    t = torch.randint(0, 1000, (40,), generator=g)
    y = torch.arange(40) % 3                      # label 2 is the null label
    acp = alphas_cumprod(1000, "squaredcos_cap_v2").double()
    got = base.denoised(z, t, y).double()
    for i in range(40):
        a, zt = acp[t[i]], z[i].double()
        groups = [4] if y[i] == 2 else [2 * y[i].item() + k for k in range(2)]
        prior = [1.0] if y[i] == 2 else weights[y[i]].tolist()
        post, like = [], []
        for gi, w in zip(groups, prior):
            cov = a * covs[gi] + (1 - a) * torch.eye(3, dtype=torch.float64)
            mu = means[gi]
            like.append(math.log(w) + torch.distributions.MultivariateNormal(
                a.sqrt() * mu, cov).log_prob(zt))
            post.append(mu + a.sqrt() * covs[gi] @ torch.linalg.solve(cov, zt - a.sqrt() * mu))
        resp = torch.softmax(torch.stack(like), 0)
        want = sum(r * p for r, p in zip(resp, post))
        torch.testing.assert_close(got[i], want, atol=3e-4, rtol=1e-4)


def test_denoiser_with_a_mixture_base_samples_the_cells_in_their_weights():
    torch.manual_seed(0)
    base = gb.GaussianBase(num_classes=1, dim=2, prediction="v",
                           alphas_cumprod=alphas_cumprod(1000, "squaredcos_cap_v2"),
                           cells_per_class=2)
    means = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.0]])
    covs = 0.1 * torch.eye(2).repeat(3, 1, 1)
    base.set_gaussians(means, covs, torch.tensor([[0.8, 0.2]]))
    den = Denoiser(dim=2, num_classes=1, hidden=8, blocks=1, expansion=2, base=base)
    out = sample_latents(den, np.zeros(4000, dtype=np.int64), dim=2, seed=0, steps=50,
                         guidance=1.0, null_label=1, train_timesteps=1000,
                         beta_schedule="squaredcos_cap_v2", progress=False).double()
    right = out[:, 0] > 0
    assert right.double().mean().item() == pytest.approx(0.8, abs=0.02)
    torch.testing.assert_close(out[right].mean(0), means[0].double(), atol=0.05, rtol=0)
    assert out[right, 1].std().item() == pytest.approx(math.sqrt(0.1), rel=0.1)


def test_a_base_with_cells_needs_their_weights():
    base = gb.GaussianBase(num_classes=2, dim=3, prediction="v", cells_per_class=2,
                           alphas_cumprod=alphas_cumprod(1000, "squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="weights"):
        base.set_gaussians(torch.zeros(5, 3), torch.eye(3).repeat(5, 1, 1))


def test_resume_with_cells_loads_both_releases_and_a_lost_release_is_refused(tmp_path,
                                                                             single_thread):
    npz = write_synthetic_npz(tmp_path / "d.npz", 300, seed=0)
    settings = {"diffusion.gaussian_base": "true", "diffusion.gaussian_partition": "1"}
    run = train_smoke(npz, tmp_path / "run", **settings)
    ledger = json.loads((run / "privacy.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["autoencoder", PARTITION_STAGE,
                                                       GAUSSIAN_STAGE, "diffusion"]
    released = torch.load(run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    classes = int(json.loads((run / "config.json").read_text())["derived"]["num_classes"])
    assert released["means"].shape[0] == 2 * classes + 1
    assert released["partition_directions"].shape[-1] == 1
    torch.testing.assert_close(released["cell_weights"].sum(1),
                               torch.ones(classes, dtype=torch.float64))
    den = torch.load(run / "checkpoints" / "diffusion.pt")["model"]
    torch.testing.assert_close(den["base.log_cell_weights"],
                               released["cell_weights"].log().float())

    (run / "checkpoints" / "diffusion.pt").unlink()
    cfg = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                   "threads": "1", **settings})
    train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, resume=True, progress=False)
    again = torch.load(run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    assert torch.equal(again["means"], released["means"])
    assert json.loads((run / "privacy.json").read_text())["entries"] == ledger["entries"]

    (run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt").unlink()
    (run / "checkpoints" / "diffusion.pt").unlink()
    with pytest.raises(PrivacyError, match="outside the budget"):
        train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, resume=True,
              progress=False)


def test_a_run_saves_the_cells_the_plan_chose_and_resumes_with_them(tmp_path, single_thread):
    npz = write_synthetic_npz(tmp_path / "d.npz", 300, seed=0)
    run = train_smoke(npz, tmp_path / "run", **{"diffusion.gaussian_base": "true",
                                                "diffusion.gaussian_partition": "2",
                                                "diffusion.min_cell_snr": "1e6"})
    saved = json.loads((run / "config.json").read_text())
    assert saved["diffusion"]["gaussian_partition"] == 0
    assert saved["derived"]["privacy_plan"]["gaussian_partition"] == 0
    stages = [e["stage"] for e in json.loads((run / "privacy.json").read_text())["entries"]]
    assert stages == ["autoencoder", GAUSSIAN_STAGE, "diffusion"]
    assert "partition_directions" not in torch.load(run / "checkpoints" / f"{GAUSSIAN_STAGE}.pt")
    from dplatent.sample import TrainedRun, generate
    x, y = generate(TrainedRun(run), 4, seed=0, progress=False)  # the saved config loads
    assert len(x) == len(y) == 4


def test_a_resumed_run_keeps_the_cells_its_plan_chose(tmp_path, single_thread):
    """A run planned under another reading of diffusion.min_cell_snr (before it scaled with
    the latent's dimension) must not be continued with other cells."""
    npz = write_synthetic_npz(tmp_path / "d.npz", 300, seed=0)
    settings = {"diffusion.gaussian_base": "true", "diffusion.gaussian_partition": "1",
                "diffusion.min_cell_snr": "1e-3"}
    run = train_smoke(npz, tmp_path / "run", **settings)
    assert json.loads((run / "config.json").read_text())["diffusion"]["gaussian_partition"] == 1
    (run / "checkpoints" / "diffusion.pt").unlink()
    strict = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                      "threads": "1", **settings,
                                      "diffusion.min_cell_snr": "1e6"})
    with pytest.raises(ConfigError, match="planned with 2 cells per class, but its saved "
                                          "configuration now gives 1"):
        train(dataset=str(npz), data_dir=None, cfg=strict, run_dir=run, resume=True,
              progress=False)
    assert not (run / "checkpoints" / "diffusion.pt").exists()
