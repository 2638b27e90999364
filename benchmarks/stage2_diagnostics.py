"""Stage-2 diagnostics (tuning records; they read PRIVATE training data, so their results are
development information, never published outputs of a run).

    recon      all training images through a trained run's DP autoencoder (encoded and
               decoded): the downstream ceiling that any stage 2 faces with it
    gaussians  the run's class-Gaussian release repeated from the private latents with a
               chosen noise multiplier (0: exact moments), or per-class mixtures from two
               releases (--cells B): release A (--partition-sigma) gives each class's top B
               principal directions, each record's cell is its sign pattern along them
               (2^B cells per class), release B the cells' moments (gaussian_base.partition and
               cell_of, as diffusion.gaussian_partition does), with B's sigma chosen
               so that the two compose to --sigma (1/sigma^2 = 1/sA^2 + 1/sB^2). Latents are
               drawn from the Gaussians alone (no DP-trained correction) and decoded;
               --temperature scales each draw's offset from its cell mean, --sharpness
               (also for recon) the decoder's logits, as `sample` does; --basis K releases
               the second moments in the decoder's top-K basis (diffusion.gaussian_basis,
               the basis a run with the run's seed would use)
    spread     (reads no private data) sampled latents, drawn as the run samples them, against
               the sphere the encoder puts every latent on (per-sample mean 0, standard
               deviation 1): prints the spread of their per-sample means and standard
               deviations; with --out, also decodes them after re-standardising each one
               (moving it back onto that sphere)
    filter     (reads no private data) latents sampled as the run samples them, more than
               needed, each scored by the released mixture's posterior of its own class
               (the cells' Gaussians with covariances scaled by --filter-temperature^2,
               classes equally likely); a sample is kept when that posterior is at least
               --threshold, and the first kept ones of each class are decoded
    cnnfilter  (reads no private data) images sampled as the run samples them, more than
               needed, split into two halves; the evaluator's CNN trained on each half
               (selected on a held-out part of it) predicts the other half, a sample is kept
               when its predicted class is its label, and the first kept ones of each class
               are written
    churn      (reads no private data) latents sampled like `sample` with DDIM steps of
               --eta, but before each step the sample's noise level is first raised by the
               factor 1 + --gamma (in EDM's sigma = sqrt((1 - a) / a), to the nearest
               training timestep at or above it) with fresh noise, and the step then runs
               from that level (EDM's "churn" on the DDIM sampler); gamma 0 is `sample`'s
               sampler

Each writes a labelled npz (spread only with --out); score it with
`dplatent evaluate --synthetic NPZ --dataset DS --metrics cnn --seeds 1`. Example:

    python benchmarks/stage2_diagnostics.py gaussians --run RUN --dataset mnist \\
        --sigma 0.607 --cells 2 --partition-sigma 2.0 --weights weighted --out cells2.npz
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from dplatent import data
from dplatent.data import LabelledImages
from dplatent.diffusion import gaussian_base as gb
from dplatent.diffusion.sampler import STEP_NOISE_STREAM, guided_output, initial_noise
from dplatent.diffusion.schedule import sampler_scheduler
from dplatent.eval.classifier import (ClassifierConfig, make_model, predict,
                                      split_indices, to_tensors, train_select)
from dplatent.models.autoencoder import standardise
from dplatent.sample import (TrainedRun, balanced_labels, decode_latents, draw_latents, generate,
                             save_npz)
from dplatent.train.stages import encode, release_basis

BATCH = 2000


def recon(run: TrainedRun, dataset: str, data_dir: str | None,
          sharpness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    train = data.load(dataset, "train", data_dir)
    with torch.no_grad():
        z = encode(run.autoencoder.eval(), torch.from_numpy(train.to_float()), BATCH)
    return decode_latents(run, z, sharpness=sharpness, batch_size=BATCH), train.y.astype(np.int64)


def spread(run: TrainedRun, num: int) -> tuple[dict, torch.Tensor, np.ndarray]:
    """Per-sample mean and standard deviation of `num` latents sampled with the run's
    settings (sampling seed 0), summarised; and the latents re-standardised, with labels."""
    z, y = draw_latents(run, num, progress=True)
    flat = z.flatten(1)
    mean, std = flat.mean(1), flat.std(1)
    stats = {"num": num, "dim": flat.shape[1],
             "sample_std": {"mean": std.mean().item(), "sd": std.std().item(),
                            "min": std.min().item(), "max": std.max().item()},
             "sample_mean": {"mean": mean.mean().item(), "sd": mean.std().item()}}
    return stats, standardise(flat), y


def class_log_likelihoods(run: TrainedRun, z: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, C]: log density of each latent under each class's released mixture (post-processing
    of the run's release), the cells' covariances scaled by temperature^2."""
    base = run.denoiser.base
    if base is None:
        raise SystemExit("filter needs a run trained with diffusion.gaussian_base")
    classes, cells = base.num_classes, base.cells
    logw = (base.log_cell_weights if cells > 1
            else torch.zeros(classes, 1)).double()
    out = torch.empty(len(z), classes, cells, dtype=torch.float64)
    zd = z.double()
    for g in range(classes * cells):
        lam = base.evals[g].double() * temperature ** 2
        u = (zd - base.means[g].double()) @ base.evecs[g].double()
        out[:, g // cells, g % cells] = -0.5 * (u * u / lam + lam.log()).sum(1)
    return torch.logsumexp(out + logw[None], dim=2)


def filtered(run: TrainedRun, num: int, *, threshold: float, temperature: float,
             oversample: float) -> tuple[dict, torch.Tensor, np.ndarray]:
    """The first num / C latents of each class whose own-class posterior under the release
    is at least `threshold`, drawn from ceil(num * oversample) samples (sampling seed 0)."""
    z, y = draw_latents(run, math.ceil(num * oversample), progress=True)
    ll = class_log_likelihoods(run, z, temperature)
    post = torch.softmax(ll, dim=1)[torch.arange(len(y)), torch.from_numpy(y)]
    keep = (post >= threshold).numpy()
    order, stats = first_kept(y, keep, run.num_classes, num)
    return {**stats, "threshold": threshold, "temperature": temperature}, z[order], y[order]


def first_kept(y: np.ndarray, keep: np.ndarray, classes: int, num: int
               ) -> tuple[np.ndarray, dict]:
    """Row indices of the first num / C kept rows of each class, balanced and interleaved
    like `sample`'s labels, and the kept shares."""
    per_class = num // classes
    rows = []
    for c in range(classes):
        idx = np.flatnonzero((y == c) & keep)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"class {c}: only {len(idx)} of {per_class} kept; "
                             "raise --oversample")
        rows.append(idx)
    stats = {"drawn": len(y), "kept_share": float(keep.mean()),
             "kept_share_per_class": [round(float(keep[y == c].mean()), 4)
                                      for c in range(classes)]}
    return np.stack(rows, axis=1).reshape(-1), stats


def cross_fit_agreement(x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int
                        ) -> np.ndarray:
    """[N] bool: whether a CNN trained on the other half (a random halving) predicts y."""
    images = LabelledImages(x=x, y=y, num_classes=num_classes, name="synthetic")
    xt, yt = to_tensors(images)
    perm = np.random.default_rng(0).permutation(len(y))
    halves = [np.sort(perm[:len(y) // 2]), np.sort(perm[len(y) // 2:])]
    agree = np.zeros(len(y), dtype=bool)
    config = ClassifierConfig(epochs=epochs, seeds=1)
    for fold, (fit, judge) in enumerate((halves, halves[::-1])):
        torch.manual_seed(fold)
        tr, va = split_indices(len(fit), config.val_fraction, np.random.default_rng(fold))
        model = make_model("cnn", images.channels, images.image_size, num_classes)
        model, val_acc, _ = train_select(model, (xt[fit[tr]], yt[fit[tr]]),
                                         (xt[fit[va]], yt[fit[va]]), config, fold)
        agree[judge] = (predict(model, xt[judge], 2048) == yt[judge]).numpy()
        print(f"fold {fold}: synthetic validation {val_acc:.4f}, "
              f"agreement {agree[judge].mean():.4f}", flush=True)
    return agree


def cnn_filtered(run: TrainedRun, num: int, *, oversample: float, epochs: int
                 ) -> tuple[dict, np.ndarray, np.ndarray]:
    """The first num / C images of each class that the cross-fitted CNN agrees with, from
    ceil(num * oversample) sampled with the run's settings (sampling seed 0)."""
    x, y = generate(run, math.ceil(num * oversample), progress=True)
    keep = cross_fit_agreement(x, y, run.num_classes, epochs)
    order, stats = first_kept(y, keep, run.num_classes, num)
    return stats, x[order], y[order]


MEANS_ONLY = (0.95, math.sqrt(1 - 0.95 ** 2), 0.0)   # release B with --shared-covariance


def shared_within(first: gb.NoisySums, sums: gb.NoisySums, per_class: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell means [C K, D] from B's first moments and counts, and covariances [C K, D, D]:
    each class's covariance from release A less the count-weighted scatter of its cells'
    means about their mixture mean, projected onto PSD matrices (post-processing)."""
    class_means, class_covs = gb.gaussians(first, "denoised")
    classes = len(class_means) - 1
    means = gb.group_means(sums)
    w = gb.cell_weights(sums, per_class)                       # [C, K]
    m = means.view(classes, per_class, -1)
    centre = torch.einsum("ck,ckd->cd", w, m)
    dev = m - centre[:, None]
    scatter = torch.einsum("ck,cki,ckj->cij", w, dev, dev)
    within = gb.psd(class_covs[:classes] - scatter)
    return means, within.repeat_interleave(per_class, dim=0)


def gaussians(run: TrainedRun, dataset: str, data_dir: str | None, *, sigma: float,
              cells: int | None, partition_sigma: float, weights: str, num: int,
              shared: bool = False, temperature: float = 1.0, sharpness: float = 1.0,
              basis: int = 0):
    """cells None: one release at `sigma`; cells B >= 0: two releases composing to `sigma`
    (B = 0 keeps one cell per class: release B alone, at its share of the noise)."""
    train = data.load(dataset, "train", data_dir)
    with torch.no_grad():
        z = encode(run.autoencoder, torch.from_numpy(train.to_float())).double()
    y = torch.from_numpy(train.y).long()
    b = release_basis(run.autoencoder, basis, run.cfg.seed) if basis else None
    two = cells is not None
    classes, per_class = int(y.max()) + 1, 2 ** (cells or 0)
    labels, sigma_b = y, sigma
    if two:
        if partition_sigma <= sigma:
            raise SystemExit("--partition-sigma must exceed --sigma")
        sigma_b = (sigma ** -2 - partition_sigma ** -2) ** -0.5
        first = gb.release(z, y, classes, partition_sigma, torch.Generator().manual_seed(7),
                           weights=weights, basis=b)
        labels = y * per_class + gb.cell_of(z, y, *gb.partition(first, "denoised", cells))
    gen_b = torch.Generator().manual_seed(8 if two else 7)
    if shared:
        if not two or b is not None:
            raise SystemExit("--shared-covariance needs --cells and no --basis")
        radius = math.sqrt(z.shape[1] - 1)
        sums = gb.add_noise(gb.class_sums(z, labels, classes * per_class, radius, MEANS_ONLY),
                            sigma_b, gen_b)
        means, covs = shared_within(first, sums, per_class)
    else:
        sums = gb.release(z, labels, classes * per_class, sigma_b, gen_b, weights=weights,
                          basis=b)
        means, covs = gb.gaussians(sums, "denoised")
    print(f"sigma {sigma} (release B {sigma_b:.3f}), {per_class} cell(s) per class", flush=True)
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(num) % classes
    draw = ys
    if two:
        pick = torch.multinomial(gb.cell_weights(sums, per_class), num, replacement=True,
                                 generator=g)
        draw = ys * per_class + pick[ys, torch.arange(num)]
    evals, evecs = torch.linalg.eigh(covs[:classes * per_class])
    parts = []
    for i in range(0, num, BATCH):
        lb = draw[i:i + BATCH]
        e = temperature * torch.randn(len(lb), z.shape[1], generator=g, dtype=torch.float64)
        scaled = evecs[lb] * evals[lb].clamp_min(gb.EIG_FLOOR).sqrt()[:, None, :]
        z_lb = (means[lb] + torch.einsum("nij,nj->ni", scaled, e)).float()
        parts.append(decode_latents(run, z_lb, sharpness=sharpness, batch_size=BATCH))
    return np.concatenate(parts), ys.numpy()


CHURN_NOISE_STREAM = 3  # beside sampler.py's streams 0 (start), 1 (decode), 2 (steps)


@torch.no_grad()
def churned_latents(model: torch.nn.Module, labels: np.ndarray, *, dim: int, seed: int,
                    steps: int, train_timesteps: int, beta_schedule: str, prediction: str,
                    null_label: int, guidance: float = 1.0, temperature: float = 1.0,
                    gamma: float = 0.0, eta: float = 0.0, batch_size: int = BATCH
                    ) -> torch.Tensor:
    """Latents [N, dim]: DDIM with `eta` from the same starting and step noise as
    `sample_latents` (so gamma 0 gives its samples up to rounding), each step preceded by
    raising the noise level to (1 + gamma) times EDM's sigma with noise of its own stream.
    The timesteps and the schedule are those of the sampler's DDIM scheduler; the step is
    written out because that scheduler steps only from a timestep of its own spacing."""
    sched = sampler_scheduler("ddim", train_timesteps, beta_schedule, prediction)
    sched.set_timesteps(steps)
    ab = sched.alphas_cumprod.double()
    sigma = ((1 - ab) / ab).sqrt()
    timesteps = [int(t) for t in sched.timesteps]
    # each step lands on the next timestep of the spacing, the last on the final alpha
    a_prevs = [ab[t] for t in timesteps[1:]] + [sched.final_alpha_cumprod.double()]
    out = []
    for start in range(0, len(labels), batch_size):
        idx = np.arange(start, min(start + batch_size, len(labels)))
        y = torch.as_tensor(labels[idx], dtype=torch.long)
        z = initial_noise(seed, idx, dim).double() * temperature

        def stream(k: int) -> torch.Tensor:
            return initial_noise(seed, idx, len(timesteps) * dim, k).view(len(idx), -1, dim)
        step_noise, churn_noise = stream(STEP_NOISE_STREAM), stream(CHURN_NOISE_STREAM)
        for k, (t, a_prev) in enumerate(zip(timesteps, a_prevs)):
            if gamma > 0:
                # sigma increases with t, so t_hat > t
                t_hat = int(torch.searchsorted(sigma, sigma[t] * (1 + gamma))
                            .clamp(max=train_timesteps - 1))
                r = ab[t_hat] / ab[t]
                z = r.sqrt() * z + (1 - r).sqrt() * churn_noise[:, k].double()
                t = t_hat
            a = ab[t]
            tt = torch.full((len(idx),), t, dtype=torch.long)
            pred = guided_output(model, z.float(), tt, y, guidance, null_label).double()
            if prediction == "v":
                x0, eps = a.sqrt() * z - (1 - a).sqrt() * pred, (1 - a).sqrt() * z + a.sqrt() * pred
            else:
                x0, eps = (z - (1 - a).sqrt() * pred) / a.sqrt(), pred
            s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
            z = (a_prev.sqrt() * x0 + (1 - a_prev - s * s).sqrt() * eps
                 + s * step_noise[:, k].double())
        out.append(z.float())
    return torch.cat(out)


def churned(run: TrainedRun, num: int, *, seed: int, gamma: float, eta: float
            ) -> tuple[torch.Tensor, np.ndarray]:
    s, d = run.cfg.sampling, run.cfg.diffusion
    y = balanced_labels(num, run.num_classes)
    z = churned_latents(run.denoiser, y, dim=int(np.prod(run.autoencoder.latent_shape)),
                        seed=seed, steps=s.steps, train_timesteps=d.train_timesteps,
                        beta_schedule=d.beta_schedule, prediction=d.prediction,
                        null_label=run.num_classes, guidance=s.guidance,
                        temperature=s.temperature, gamma=gamma, eta=eta)
    return z, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("recon", "gaussians", "spread", "filter", "cnnfilter",
                                    "churn"))
    p.add_argument("--run", type=Path, required=True, help="trained run directory")
    p.add_argument("--dataset", help="recon, gaussians: the run's data set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, help="npz to write (spread: optional)")
    p.add_argument("--sigma", type=float, default=0.607, help="release noise multiplier")
    p.add_argument("--cells", type=int, default=None,
                   help="B: two releases, 2^B cells per class (default: one release)")
    p.add_argument("--partition-sigma", type=float, default=2.0)
    p.add_argument("--weights", choices=sorted(gb.RELEASE_WEIGHTS), default="equal")
    p.add_argument("--shared-covariance", action="store_true",
                   help="release B: cell means and counts only; cells share their class's "
                        "within-cell covariance")
    p.add_argument("--basis", type=int, default=0,
                   help="gaussians: second moments in the decoder's top-K basis (0: none)")
    p.add_argument("--num", type=int, default=60000)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="gaussians: each draw's offset from its cell mean scaled by this")
    p.add_argument("--sharpness", type=float, default=1.0,
                   help="recon, gaussians: images decoded at this sharpness")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="filter: least posterior of a sample's own class")
    p.add_argument("--filter-temperature", type=float, default=1.0,
                   help="filter: the release's covariances scaled by its square")
    p.add_argument("--oversample", type=float, default=1.3,
                   help="filter, cnnfilter: draw this many times --num")
    p.add_argument("--epochs", type=int, default=5, help="cnnfilter: CNN epochs per half")
    p.add_argument("--gamma", type=float, default=0.2,
                   help="churn: each step's sigma first raised to (1 + gamma) times itself")
    p.add_argument("--eta", type=float, default=None,
                   help="churn: DDIM's eta after the raise (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="churn: the sampling seed")
    a = p.parse_args()
    if a.what in ("recon", "gaussians") and (a.dataset is None or a.out is None):
        p.error(f"{a.what} needs --dataset and --out")
    if a.what in ("filter", "cnnfilter", "churn") and a.out is None:
        p.error(f"{a.what} needs --out")
    run = TrainedRun(a.run, device="cpu")
    if a.what == "spread":
        stats, z, y = spread(run, a.num)
        print(json.dumps(stats, indent=1))
        if a.out is None:
            return
        s = run.cfg.sampling
        x = decode_latents(run, z, sharpness=s.sharpness, batch_size=s.batch_size,
                           reencode=s.reencode)
    elif a.what == "filter":
        stats, z, y = filtered(run, a.num, threshold=a.threshold,
                               temperature=a.filter_temperature, oversample=a.oversample)
        print(json.dumps(stats, indent=1))
        s = run.cfg.sampling
        x = decode_latents(run, z, sharpness=s.sharpness, batch_size=s.batch_size,
                           reencode=s.reencode)
    elif a.what == "churn":
        s = run.cfg.sampling
        z, y = churned(run, a.num, seed=a.seed, gamma=a.gamma,
                       eta=s.eta if a.eta is None else a.eta)
        x = decode_latents(run, z, sharpness=s.sharpness, batch_size=s.batch_size)
    elif a.what == "cnnfilter":
        stats, x, y = cnn_filtered(run, a.num, oversample=a.oversample, epochs=a.epochs)
        print(json.dumps(stats, indent=1))
    elif a.what == "recon":
        x, y = recon(run, a.dataset, a.data_dir, a.sharpness)
    else:
        x, y = gaussians(run, a.dataset, a.data_dir, sigma=a.sigma, cells=a.cells,
                         partition_sigma=a.partition_sigma, weights=a.weights, num=a.num,
                         shared=a.shared_covariance, temperature=a.temperature,
                         sharpness=a.sharpness, basis=a.basis)
    save_npz(a.out, x, y)
    print(f"wrote {len(y)} images to {a.out}")


if __name__ == "__main__":
    main()
