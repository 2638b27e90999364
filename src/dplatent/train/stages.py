"""The two private stages and the whole training run.

stage 1: DP autoencoder on private images          -> ledger entry 'autoencoder'
         frozen encoder maps private images to latents (private; kept in memory only)
(with diffusion.gaussian_base)
         DP class Gaussians of the latents          -> ledger entry 'latent_gaussian'
         (with diffusion.gaussian_partition: first the cells' directions -> 'latent_partition')
stage 2: DP class-conditional denoiser on latents  -> ledger entry 'diffusion'
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dplatent import data as data_mod
from dplatent import device as device_mod
from dplatent import runtime
from dplatent import config as config_mod
from dplatent.config import RunConfig
from dplatent.diffusion import gaussian_base
from dplatent.diffusion.loss import denoising_loss
from dplatent.diffusion.schedule import alphas_cumprod
from dplatent.errors import ConfigError, PrivacyError
from dplatent.io import atomic_write, write_json
from dplatent.models.autoencoder import (Autoencoder, latent_shape, reconstruction_loss,
                                        standardise)
from dplatent.models.denoiser import ConvDenoiser, Denoiser, LatentDenoiser
from dplatent.privacy.accounting import GAUSSIAN_STAGE, PARTITION_STAGE, PrivacyPlan, resolved
from dplatent.privacy.accounting import plan as make_plan
from dplatent.privacy.ledger import FILENAME as LEDGER
from dplatent.privacy.ledger import Ledger
from dplatent.train import distributed
from dplatent.train.loop import StageSettings, checkpoint_path, load_checkpoint, train_stage


Gaussians = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # means, covariances, cell weights


def build_autoencoder(cfg: RunConfig, channels: int, image_size: int) -> Autoencoder:
    a = cfg.autoencoder
    return Autoencoder(in_channels=channels, image_size=image_size, channels=a.channels,
                       latent_channels=a.latent_channels, decoder_blocks=a.decoder_blocks,
                       upsample=a.upsample)


def build_denoiser(cfg: RunConfig, shape: tuple[int, int, int], num_classes: int,
                   gaussians: Gaussians | None = None) -> LatentDenoiser:
    """The denoiser of `diffusion.architecture` for latents of `shape` (C, H, W). With
    `diffusion.gaussian_base`, it carries the Gaussian base: set from `gaussians` (means,
    covariances, cell weights) when given, else left to a checkpoint to fill."""
    d = cfg.diffusion
    dim = int(np.prod(shape))
    base = None
    if d.gaussian_base:
        base = gaussian_base.GaussianBase(
            num_classes=num_classes, dim=dim, prediction=d.prediction,
            alphas_cumprod=alphas_cumprod(d.train_timesteps, d.beta_schedule),
            cells_per_class=2 ** d.gaussian_partition)
        if gaussians is not None:
            base.set_gaussians(*gaussians)
    if d.architecture == "conv":
        return ConvDenoiser(shape=shape, num_classes=num_classes, width=d.hidden,
                            blocks=d.blocks, coarse_blocks=d.coarse_blocks, base=base)
    return Denoiser(dim=dim, num_classes=num_classes, hidden=d.hidden, blocks=d.blocks,
                    expansion=d.expansion, base=base)


def denoiser_grad_mode(cfg: RunConfig) -> str:
    """Ghost clipping for the MLP (Linear and Embedding layers only); per-example gradients
    from hooks for the conv net (Opacus has no ghost norms for its patch convolutions, whose
    per-example gradient sums over an example's noise draws: privacy/grad_samplers.py)."""
    return "hooks" if cfg.diffusion.architecture == "conv" else "ghost"


def train_autoencoder(images: torch.Tensor, cfg: RunConfig, plan: PrivacyPlan, ledger: Ledger,
                      run_dir: Path, progress: bool = True) -> Autoencoder:
    model = build_autoencoder(cfg, images.shape[1], images.shape[2]).to(images.device)

    def loss_fn(module, idx, gen):
        return reconstruction_loss(module, images[idx.to(images.device)],
                                   cfg.autoencoder.latent_noise, gen)

    settings = StageSettings(name="autoencoder", plan=plan.stage("autoencoder"),
                             lr=cfg.autoencoder.lr,
                             physical_batch_size=cfg.autoencoder.physical_batch_size,
                             grad_mode="hooks", ema_decay=cfg.autoencoder.ema_decay or None,
                             checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)
    return train_stage(model, len(images), loss_fn, settings, ledger, run_dir, progress)


@torch.no_grad()
def encode(ae: Autoencoder, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Flat latents [N, D] of private images: private data, never written to disk."""
    return torch.cat([ae.encode(images[i:i + batch_size]).flatten(1)
                      for i in range(0, len(images), batch_size)])


def check_release_kept(run_dir: Path) -> None:
    """Before a resumed run rewrites its ledger: a release the ledger records must still be on
    disk, since releasing the latent Gaussians again would read the private data a second
    time outside the budget."""
    path = checkpoint_path(run_dir, GAUSSIAN_STAGE)
    if not (run_dir / LEDGER).is_file() or path.is_file():
        return
    ledger = Ledger.load(run_dir)
    if any(ledger.steps(s) for s in (PARTITION_STAGE, GAUSSIAN_STAGE)):
        raise PrivacyError(f"{run_dir}: the ledger records a release of the latent Gaussians "
                           f"but {path} is missing; releasing them again would read the "
                           "private data outside the budget. Start a new run.")


def release_gaussians(latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      cfg: RunConfig, plan: PrivacyPlan, ledger: Ledger,
                      run_dir: Path, autoencoder: Autoencoder | None = None) -> Gaussians:
    """The DP Gaussians of the latents (means, covariances and cell weights; `gaussian_base`),
    released once per run: the release is saved (ledger entries first, then the file), and a
    resumed run loads it instead of reading the private data again (`check_release_kept`
    guards a lost file). With diffusion.gaussian_partition, two releases (cells)."""
    path = checkpoint_path(run_dir, GAUSSIAN_STAGE)
    d = cfg.diffusion
    stages = [plan.stage(GAUSSIAN_STAGE)]
    if d.gaussian_partition:
        stages.insert(0, plan.stage(PARTITION_STAGE))
    kept = path.is_file()
    # Every process has looked for a kept release before the main one writes a new one: a
    # process that looked afterwards would load it and skip the collective below.
    distributed.barrier()
    if kept:
        ck = load_checkpoint(path)
        for stage in stages:
            ledger.record(stage.event(steps=1))
        return ck["means"], ck["covs"], ck.get("cell_weights", torch.ones(num_classes, 1))
    gen = torch.Generator().manual_seed(cfg.seed * 2 + 7)  # the same draw on every process
    saved = {}
    basis = None
    if d.gaussian_basis:
        if autoencoder is None:
            raise ValueError("diffusion.gaussian_basis needs the trained autoencoder")
        saved["basis"] = basis = release_basis(autoencoder, d.gaussian_basis, cfg.seed)
    if d.gaussian_partition:
        sums, saved["partition_centres"], saved["partition_directions"] = \
            gaussian_base.release_partitioned(
                latents, labels, num_classes, d.gaussian_partition,
                (stages[0].noise_multiplier, stages[1].noise_multiplier), gen,
                weights=d.gaussian_release, covariance=d.gaussian_covariance, basis=basis)
    else:
        sums = gaussian_base.release(latents, labels, num_classes, stages[0].noise_multiplier,
                                     gen, weights=d.gaussian_release, basis=basis)
    cells = 2 ** d.gaussian_partition
    means, covs = gaussian_base.gaussians(sums, d.gaussian_covariance, cells)
    weights = gaussian_base.cell_weights(sums, cells)
    for stage in stages:
        ledger.record(stage.event(steps=1))
    if distributed.is_main():
        ledger.save(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save(
            {"means": means, "covs": covs, "cell_weights": weights, **saved}, p))
    distributed.barrier()
    return means, covs, weights


BASIS_POINTS = 128  # random latents at which the decoder's Jacobian is taken


def check_basis_rank(rank: int, dim: int) -> None:
    """diffusion.gaussian_basis against the latent size (0: no basis)."""
    if rank >= dim:
        raise ConfigError(f"diffusion.gaussian_basis = {rank} must be below the latent size "
                          f"{dim}")


def release_basis(autoencoder: Autoencoder, rank: int, seed: int) -> torch.Tensor:
    """[D, rank] (diffusion.gaussian_basis): `gaussian_base.decoder_basis` of the DP-trained
    decoder at BASIS_POINTS latents drawn as the encoder's outputs lie (N(0, I), standardised
    per example), on the CPU (the decoder in float32, the Jacobians' Gram in float64). No
    private data. Only the main process computes it; the others receive its result."""
    shape = autoencoder.latent_shape
    check_basis_rank(rank, int(np.prod(shape)))
    gen = torch.Generator().manual_seed(seed * 2 + 11)
    points = standardise(torch.randn(BASIS_POINTS, *shape, generator=gen)).flatten(1)
    decoder = copy.deepcopy(autoencoder).cpu().float().eval()

    def decode(z: torch.Tensor) -> torch.Tensor:
        return decoder.decode(z.view(1, *shape)).flatten()

    basis = gaussian_base.decoder_basis(decode, points, rank) if distributed.is_main() else None
    return distributed.all_gather(basis)[0]


def train_diffusion(latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    shape: tuple[int, int, int], cfg: RunConfig, plan: PrivacyPlan,
                    ledger: Ledger, run_dir: Path, progress: bool = True,
                    gaussians: Gaussians | None = None) -> LatentDenoiser:
    d = cfg.diffusion
    model = build_denoiser(cfg, shape, num_classes, gaussians).to(latents.device)
    acp = alphas_cumprod(d.train_timesteps, d.beta_schedule).to(latents.device)

    def loss_fn(module, idx, gen):
        idx = idx.to(latents.device)
        return denoising_loss(module, latents[idx], labels[idx], alphas_cumprod=acp,
                              multiplicity=d.noise_multiplicity, label_dropout=d.label_dropout,
                              null_label=num_classes, prediction=d.prediction,
                              timestep_skew=d.timestep_skew, generator=gen)

    settings = StageSettings(name="diffusion", plan=plan.stage("diffusion"), lr=d.lr,
                             physical_batch_size=d.physical_batch_size,
                             grad_mode=denoiser_grad_mode(cfg),
                             ema_decay=d.ema_decay, checkpoint_every=cfg.checkpoint_every,
                             seed=cfg.seed + 1)
    return train_stage(model, len(latents), loss_fn, settings, ledger, run_dir, progress)


def subset_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The `size` training records (sorted indices into n) a run with `subset = size` trains
    on: uniformly at random from the run's seed, independently of the data. The audit draws
    the same indices to know which records are members."""
    return data_mod.random_subset(n, size, np.random.default_rng([seed, 0x5B5E7]))


def save_config(run_dir: Path, cfg: RunConfig, plan: PrivacyPlan, meta: dict) -> None:
    write_json(run_dir / config_mod.CONFIG_FILE, {**cfg.to_dict(), "derived": {
        "privacy_plan": plan.to_dict(), **meta}})


def train(*, dataset: str, data_dir: str | None, cfg: RunConfig, run_dir: Path,
          resume: bool = False, progress: bool = True) -> dict:
    """The whole private part of a run; returns timings. Writes only into run_dir.

    In a process group (train/distributed.py) every process calls this and shares each
    logical batch; only the main process writes."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise ConfigError(f"{run_dir} exists and is not empty; use --resume to continue it "
                          "or choose another --out")
    device_mod.check_processes(cfg.device, distributed.world_size())
    private = data_mod.load(dataset, "train", data_dir)
    shape = latent_shape(private.image_size, cfg.autoencoder.channels,
                         cfg.autoencoder.latent_channels)
    latent_dim = int(np.prod(shape))
    check_basis_rank(cfg.diffusion.gaussian_basis, latent_dim)
    device = device_mod.resolve(cfg.device)
    if resume:
        _check_resume_device(run_dir, device)
        check_release_kept(run_dir)
    source_records = len(private)
    # accounts for the records trained on (plan.n) and chooses the number of cells
    plan = make_plan(source_records, cfg, private.num_classes, latent_dim)
    if resume:
        _check_resume_cells(run_dir, plan.gaussian_partition)
    cfg = resolved(cfg, plan)
    if cfg.subset:
        idx = subset_indices(source_records, cfg.subset, cfg.seed)
        private = data_mod.LabelledImages(x=private.x[idx], y=private.y[idx],
                                          num_classes=private.num_classes,
                                          name=f"{private.name} (subset of {len(idx)})")
    n = len(private)
    if n != plan.n:
        raise RuntimeError(f"training on {n} records but the plan accounts for {plan.n}")
    distributed.barrier()  # every process has looked at run_dir before the main one writes
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    runtime.tune_allocator()
    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    meta = {"dataset": dataset, "n": n, "source_records": source_records,
            "private": plan.private, "num_classes": private.num_classes,
            "channels": private.channels, "image_size": private.image_size,
            "class_names": data_mod.class_names(dataset, private.num_classes),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processes": distributed.world_size(),
            "machine": platform.platform(), "device": str(device)}
    if main:
        save_config(run_dir, cfg, plan, meta)
    ledger = Ledger(accountant=plan.accountant, target_epsilon=plan.target_epsilon,
                    delta=plan.delta)  # target None: a non-private control run
    images = torch.from_numpy(private.to_float()).to(device)
    labels = torch.from_numpy(private.y).to(device)
    timings = {}
    t = time.time()
    ae = train_autoencoder(images, cfg, plan, ledger, run_dir, progress)
    timings["autoencoder_s"] = time.time() - t
    if main:  # now, so that a session stopped in stage 2 still counts its stage-1 time
        _write_timings(run_dir, {"autoencoder_s": timings["autoencoder_s"]},
                       runtime.peak_rss_mb(), finished=False)
    t = time.time()
    latents = encode(ae, images)
    gaussians = (release_gaussians(latents, labels, private.num_classes, cfg, plan, ledger,
                                   run_dir, ae) if cfg.diffusion.gaussian_base else None)
    den = train_diffusion(latents, labels, private.num_classes, shape, cfg, plan, ledger,
                          run_dir, progress, gaussians)
    timings["diffusion_s"] = time.time() - t
    del latents, images
    if main:
        _write_timings(run_dir, {"diffusion_s": timings["diffusion_s"]}, runtime.peak_rss_mb())
    return {"timings": timings, "ledger": ledger.to_dict(), "autoencoder": ae, "denoiser": den}


def _saved_derived(run_dir: Path) -> dict:
    """The "derived" part of a run's saved config.json ({} when there is none yet)."""
    saved = config_mod.read_saved(run_dir)
    return {} if saved is None else saved.derived


def _check_resume_cells(run_dir: Path, chosen: int) -> None:
    """A resumed run keeps the cells its plan chose at the start: the rule that chooses them
    (diffusion.min_cell_snr) may read its saved bound otherwise in another version (before
    2026-12-05 it did not scale with the latent's dimension)."""
    saved = _saved_derived(run_dir).get("privacy_plan", {}).get("gaussian_partition")
    if saved is not None and saved != chosen:
        raise ConfigError(f"{run_dir} was planned with {2 ** saved} cells per class, but its "
                          f"saved configuration now gives {2 ** chosen} (diffusion.min_cell_snr "
                          "counts records per unit of sigma * sqrt(latent dimension) since "
                          "2026-12-05); resume it with the version that started it, or set "
                          "diffusion.min_cell_snr in its config.json so that the plan chooses "
                          f"{2 ** saved} again")


def _check_resume_device(run_dir: Path, device: torch.device) -> None:
    """Checkpoints hold random generator states of the device they were written on."""
    saved = _saved_derived(run_dir).get("device", "cpu")
    if torch.device(saved).type != device.type:
        raise ConfigError(f"{run_dir} was trained on {saved}; resume it on the same kind of "
                          f"device (--device {torch.device(saved).type}), not on {device}")


def _write_timings(run_dir: Path, timings: dict, peak_mb: int | None = None, *,
                   finished: bool = True) -> None:
    """Add this session's seconds per stage to those already saved, so that resuming a
    finished run (to sample or evaluate it again) adds only the seconds it took to load
    instead of replacing the training time. Each stage's seconds are added when the stage
    ends (`finished` False after stage 1, True at the end of the session, which counts it in
    "sessions"), so a session killed in stage 2 still counts its stage-1 time; the seconds of
    a stage killed mid-way are not counted, so after a crash the timings undercount by them.
    `peak_rss_mb` is the largest peak memory of the main process over the sessions, so a
    resumed run that only loads the models keeps the peak of the session that trained them."""
    path = run_dir / "timings.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    total = {k: round(old.get(k, 0.0) + v, 2) for k, v in timings.items()}
    peaks = [p for p in (old.get("peak_rss_mb"), peak_mb) if p is not None]
    sessions = int(old.get("sessions", 0)) + int(finished)
    write_json(path, {**old, **total, "sessions": sessions,
                      **({"peak_rss_mb": max(peaks)} if peaks else {})})
