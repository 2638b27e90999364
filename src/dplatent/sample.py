"""Sampling and decoding: post-processing of the DP-trained models, free of privacy cost.

Writes `x` (N, H, W) or (N, H, W, C) uint8 and `y` (N,) int64, classes balanced by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dplatent import device as device_mod  # noqa: E402
from dplatent.config import CONFIG_FILE, RunConfig, SamplingConfig, read_saved  # noqa: E402
from dplatent.diffusion.sampler import initial_noise, sample_latents  # noqa: E402
from dplatent.errors import ConfigError, DplatentError  # noqa: E402
from dplatent.io import atomic_folder, atomic_write, sha256_file  # noqa: E402
from dplatent.models.autoencoder import Autoencoder  # noqa: E402
from dplatent.models.denoiser import LatentDenoiser  # noqa: E402
from dplatent.train.loop import checkpoint_path, final_weights, load_checkpoint  # noqa: E402
from dplatent.train.stages import build_autoencoder, build_denoiser  # noqa: E402


class TrainedRun:
    """The published part of a run: the DP-trained autoencoder (its decoder; its encoder too for
    `sampling.reencode`), the EMA denoiser and the resolved config.

    `device`: where the models run (auto, cpu, cuda, cuda:N or a torch.device); None takes the
    run's configured device (auto unless it was trained with --device)."""

    def __init__(self, run_dir: str | Path, device: str | torch.device | None = None):
        self.dir = Path(run_dir)
        saved = read_saved(self.dir)
        if saved is None:
            raise DplatentError(f"{self.dir}: not a run directory (no {CONFIG_FILE})")
        self.config_json: dict = saved.raw  # as saved, derived section included
        self.meta: dict = saved.derived
        try:
            self.cfg: RunConfig = saved.settings()
            self.num_classes = int(self.meta["num_classes"])
            self.device = (device if isinstance(device, torch.device)
                           else device_mod.resolve(self.cfg.device if device is None else device))
            ae_plan = self.meta["privacy_plan"]["stages"]
            self.planned_steps = {s["stage"]: int(s["steps"]) for s in ae_plan}
            self.autoencoder = self._load_ae()
            self.denoiser = self._load_denoiser()
        except DplatentError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            # A damaged or mismatched config.json or checkpoint: say so in one line.
            detail = " ".join(str(exc).split())[:300]
            raise DplatentError(f"{self.dir}: config.json and checkpoints do not form a valid "
                                f"run ({type(exc).__name__}: {detail})") from exc

    def _checkpoint(self, stage: str) -> dict:
        path = checkpoint_path(self.dir, stage)
        if not path.is_file():
            raise DplatentError(f"{self.dir}: stage {stage} has no checkpoint; "
                                f"run `dplatent train --resume --out {self.dir}` first")
        ck = load_checkpoint(path)
        if int(ck["step"]) < self.planned_steps[stage]:
            raise DplatentError(f"{self.dir}: stage {stage} is unfinished "
                                f"({ck['step']}/{self.planned_steps[stage]} steps); "
                                f"run `dplatent train --resume --out {self.dir}`")
        return ck

    def _load_ae(self) -> Autoencoder:
        ae = build_autoencoder(self.cfg, self.meta["channels"], self.meta["image_size"])
        ae.load_state_dict(final_weights(self._checkpoint("autoencoder")))
        return ae.to(self.device).eval()

    def _load_denoiser(self) -> LatentDenoiser:
        den = build_denoiser(self.cfg, self.autoencoder.latent_shape, self.num_classes)
        den.load_state_dict(final_weights(self._checkpoint("diffusion")))
        return den.to(self.device).eval()


def run_fingerprint(run_dir: str | Path) -> str:
    """SHA-256 over the digests of a run's two checkpoints: `sample` stores it in the npz, so
    an export can tell that the images were drawn from this run's trained models."""
    parts = [f"{stage}:{sha256_file(checkpoint_path(Path(run_dir), stage))}"
             for stage in ("autoencoder", "diffusion")]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def balanced_labels(num: int, num_classes: int) -> np.ndarray:
    return np.arange(num) % num_classes


DECODE_NOISE_STREAM = 1

# the sampling settings an npz's info records (with the seed)
SETTINGS_RECORDED = ("guidance", "steps", "sampler", "sharpness", "temperature", "decode_noise",
                     "reencode", "eta")


def settings_for(run: TrainedRun, *, guidance: float | None = None, steps: int | None = None,
                 sampler: str | None = None, sharpness: float | None = None,
                 temperature: float | None = None, decode_noise: float | None = None,
                 reencode: int | None = None, eta: float | None = None) -> SamplingConfig:
    """The run's sampling settings, each one given here (not None) put in its place; the
    result validates itself (ConfigError naming the setting and the value given)."""
    given = dict(guidance=guidance, steps=steps, sampler=sampler, sharpness=sharpness,
                 temperature=temperature, decode_noise=decode_noise, reencode=reencode,
                 eta=eta)
    return dataclasses.replace(run.cfg.sampling,
                               **{k: v for k, v in given.items() if v is not None})


@torch.no_grad()
def draw_latents(run: TrainedRun, num: int, *, seed: int = 0,
                 settings: SamplingConfig | None = None, labels: np.ndarray | None = None,
                 progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """(z [num, D], y) of `num` sampled latents as the decoder receives them (decode noise
    included), drawn with `settings` (default: the run's)."""
    if num < 1:
        raise ConfigError(f"number of samples must be >= 1, got {num}")
    s, d = settings or run.cfg.sampling, run.cfg.diffusion
    y = balanced_labels(num, run.num_classes) if labels is None else labels
    z = sample_latents(run.denoiser, y, dim=int(np.prod(run.autoencoder.latent_shape)),
                       seed=seed, steps=s.steps, guidance=s.guidance,
                       null_label=run.num_classes, train_timesteps=d.train_timesteps,
                       beta_schedule=d.beta_schedule, sampler=s.sampler,
                       prediction=d.prediction, batch_size=s.batch_size,
                       temperature=s.temperature, eta=s.eta, progress=progress)
    if s.decode_noise > 0:  # per sample (seed, i) like the starting noise, another stream
        z = z + s.decode_noise * initial_noise(seed, np.arange(len(z)), z.shape[1],
                                               stream=DECODE_NOISE_STREAM).to(z.device)
    return z, y


@torch.no_grad()
def decode_latents(run: TrainedRun, z: torch.Tensor, *, sharpness: float, batch_size: int,
                   reencode: int = 0) -> np.ndarray:
    """uint8 images [N, H, W] (one channel) or [N, H, W, C] of latents z [N, D]. With
    `reencode` k, each decoded image goes k more times through the autoencoder (encoded,
    decoded at `sharpness`): a sampled latent that lies off what the encoder produces decodes
    to a blend; encoding that image finds the latent the encoder gives such an image, and its
    decoding is nearer to what the autoencoder reconstructs. Post-processing by the DP-trained
    models, no privacy cost."""
    ae, shape = run.autoencoder, run.autoencoder.latent_shape
    images = []
    for i in range(0, len(z), batch_size):
        x = ae.decode(z[i:i + batch_size].view(-1, *shape), sharpness)
        for _ in range(reencode):
            x = ae.decode(ae.encode(x), sharpness)
        images.append(x)
    return to_uint8_images(torch.cat(images))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] in [0, 1] as uint8 [N, H, W] (one channel) or [N, H, W, C]."""
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def generate(run: TrainedRun, num: int, *, seed: int = 0, settings: SamplingConfig | None = None,
             labels: np.ndarray | None = None,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8, y int64) of `num` decoded samples, drawn with `settings` (default: the run's;
    `settings_for` changes some of them)."""
    s = settings or run.cfg.sampling
    z, y = draw_latents(run, num, seed=seed, settings=s, labels=labels, progress=progress)
    x = decode_latents(run, z, sharpness=s.sharpness, batch_size=s.batch_size,
                       reencode=s.reencode)
    return x, y.astype(np.int64)


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray, info: dict | None = None) -> Path:
    """x and y; `info` (the sampling settings) as a JSON string in array `info`."""
    extra = {} if info is None else {"info": np.array(json.dumps(info))}

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, x=x, y=y, **extra)
    return atomic_write(path, write)


def write_class_folders(root: Path, x: np.ndarray, y: np.ndarray, folders: list[str]) -> None:
    """root/<folders[c]>/<i>.png for row i of class c: 8-bit grey (L) or RGB, exact pixels."""
    for folder in folders:
        (root / folder).mkdir(parents=True)
    for i, (img, c) in enumerate(zip(x, y)):
        Image.fromarray(img).save(root / folders[int(c)] / f"{i:06d}.png")


def save_png_dir(folder: str | Path, x: np.ndarray, y: np.ndarray,
                 class_names: list[str]) -> Path:
    """One folder per class (`00_name`, ...). Written into a temporary folder beside `folder`
    and renamed into place, so an interrupted run leaves no partial tree; `folder` must not
    exist yet or be empty."""
    folders = [f"{c:02d}_{safe_name(name)}" for c, name in enumerate(class_names)]
    return atomic_folder(folder, lambda tmp: write_class_folders(tmp, x, y, folders))


def safe_name(name: str) -> str:
    """A class name as a file name: letters and digits kept, the rest '-'."""
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-") or "class"


def save_grid(path: str | Path, x: np.ndarray, y: np.ndarray, class_names: list[str],
              per_class: int = 10, banner: str | None = None) -> Path:
    """One row per class, `per_class` samples each; `banner`: a warning in red across the top
    (NOT PRIVATE for a non-private control run)."""
    classes = sorted(np.unique(y).tolist())
    fig, axes = plt.subplots(len(classes), per_class,
                             figsize=(per_class * 0.8 + 1.2, len(classes) * 0.8), squeeze=False)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(y == c)[:per_class]
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                img = x[idx[j]]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        axes[r][0].text(-4, x.shape[1] / 2, class_names[c], ha="right", va="center",
                        fontsize=8)
    fig.subplots_adjust(left=0.15, wspace=0.05, hspace=0.05,
                        top=1 - 0.6 / fig.get_figheight() if banner else None)
    if banner:
        fig.text(0.5, 1 - 0.05 / fig.get_figheight(), banner, ha="center", va="top",
                 fontsize=11, fontweight="bold", color="white", wrap=True,
                 bbox={"facecolor": "red", "edgecolor": "red", "pad": 4})
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return Path(path)
