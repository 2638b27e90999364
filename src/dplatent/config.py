"""Frozen, keyword-only configuration objects; presets from `configs/*.toml`.

A run's configuration is: defaults <- preset file <- `--set section.key=value` overrides.
Every object validates itself on construction and raises ConfigError naming the field.
The resolved configuration is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dplatent.device import check_spec as check_device
from dplatent.errors import ConfigError, DataError
from dplatent.io import read_json

# Estimates of the released class covariances (diffusion/gaussian_base.py)
GAUSSIAN_COVARIANCES = ("psd", "denoised", "pooled_bulk")
GAUSSIAN_RELEASES = ("equal", "weighted")
MAX_PARTITION = 6                     # diffusion.gaussian_partition: at most 64 cells
MAX_TEMPERATURE = 3.0                 # sampling.temperature
MAX_DECODE_NOISE = 3.0                # sampling.decode_noise (the latent has unit variance)
MAX_REENCODE = 10                     # sampling.reencode (passes through the autoencoder)
UPSAMPLING = ("nearest", "shuffle")   # autoencoder.upsample
PREDICTIONS = ("v", "epsilon")        # diffusion.prediction
ARCHITECTURES = ("mlp", "conv")       # diffusion.architecture

PRESET_DIRS = (Path(__file__).resolve().parents[2] / "configs",)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """ConfigError "key: must be 'a' or 'b', got 'c'" unless value is in allowed."""
    _check(value in allowed, f"{key}: must be {' or '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """Stage 1: convolutional autoencoder trained with DP-SGD (Opacus hooks mode)."""

    channels: tuple[int, ...] = (32, 64)   # one stride-2 stage per entry
    latent_channels: int = 4
    epochs: float = 4.0
    batch_size: int = 512                  # expected logical batch (Poisson sampling)
    physical_batch_size: int = 256
    lr: float = 2e-3
    clip_norm: float = 1.0
    decoder_blocks: int = 0                # residual blocks at the latent resolution
    upsample: str = "nearest"              # decoder upsampling: 'nearest' or 'shuffle'
    # Std of Gaussian noise added to the (standardised) latent before the decoder in training
    # only: the decoder learns to decode a neighbourhood of each latent, not the point, and the
    # encoder to keep what matters in directions larger than the noise. Drawn independently of
    # the data, so the privacy analysis is unchanged. 0: off.
    latent_noise: float = 0.0
    # Decay of an exponential moving average of the DP-SGD iterates (with warm-up, as stage 2's);
    # the average is the autoencoder used downstream. Post-processing of the noisy iterates, no
    # privacy cost. 0: off (the last iterate).
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(len(self.channels) >= 1, "autoencoder.channels: need at least one stage")
        _check(self.decoder_blocks >= 0, "autoencoder.decoder_blocks must be >= 0")
        _check(0 <= self.latent_noise < float("inf"),
               f"autoencoder.latent_noise must be >= 0 and finite, got {self.latent_noise}")
        _one_of("autoencoder.upsample", self.upsample, UPSAMPLING)
        _check(all(c > 0 and c % 8 == 0 for c in self.channels),
               "autoencoder.channels: each must be a positive multiple of 8 (GroupNorm)")
        _check(self.latent_channels > 0, "autoencoder.latent_channels must be > 0")
        _check(self.epochs > 0, "autoencoder.epochs must be > 0")
        _check(self.batch_size > 0 and self.physical_batch_size > 0,
               "autoencoder batch sizes must be > 0")
        _check(self.lr > 0 and self.clip_norm > 0, "autoencoder.lr and clip_norm must be > 0")
        _check(0 <= self.ema_decay < 1,
               f"autoencoder.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Stage 2: class-conditional denoiser of the latent, DP-SGD."""

    # 'mlp': residual MLP on the flat latent (ghost clipping); 'conv': residual 3x3 conv net
    # on the latent's C x H x W map (per-example gradients from hooks; models/denoiser.py).
    architecture: str = "mlp"
    hidden: int = 512                      # MLP: hidden units; conv: channels (multiple of 8)
    blocks: int = 4
    # conv only: residual blocks at half the latent's resolution, between the first and the
    # second half of `blocks` (models/denoiser.py); 0: one resolution
    coarse_blocks: int = 0
    expansion: int = 2
    epochs: float = 20.0
    batch_size: int = 1024
    physical_batch_size: int = 1024
    lr: float = 1e-3
    clip_norm: float = 1.0
    noise_multiplicity: int = 4            # K noise draws averaged inside each example's loss
    label_dropout: float = 0.1             # for classifier-free guidance
    ema_decay: float = 0.999
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "v"                  # network target: 'v' or 'epsilon'
    # Training timesteps t = floor(T u^skew), u uniform: 1 is uniform; > 1 draws low-noise
    # steps more often (where the Gaussian base is furthest from the data; BENCHMARKS.md).
    timestep_skew: float = 1.0
    # Start from the exact denoiser of DP class Gaussians of the latents (one Gaussian
    # mechanism, privacy.gaussian_share of the budget) and learn only the correction.
    gaussian_base: bool = False
    # How the released class covariances are estimated: 'psd' (projection), 'denoised'
    # (uses the public noise std) or 'pooled_bulk' (as 'denoised', the directions below the
    # noise edge shaped like the pooled covariance; diffusion/gaussian_base.py)
    gaussian_covariance: str = "psd"
    # How the release's noise is shared between the class means and the covariances: 'equal'
    # or 'weighted' (less on the covariances; diffusion/gaussian_base.py). Same epsilon.
    gaussian_release: str = "equal"
    # Per-class mixtures: 0 releases one Gaussian per class; B > 0 splits each class into 2^B
    # cells by the signs along its top B principal directions (taken from a first, noisier
    # release: privacy.partition_share of the release's precision) and releases one Gaussian
    # per cell, weighted by the cell's released count. Same epsilon (diffusion/gaussian_base.py).
    gaussian_partition: int = 0
    # 0: the class second moments are released over the whole latent space (D x D entries of
    # noise each). K > 0: only in the K latent directions the DP decoder's images change most
    # (public: computed from the trained decoder; the rest of the variance, known from the
    # latents' fixed norm, spread over the other D - K), so the noise edge grows with K, not D.
    # Same epsilon (diffusion/gaussian_base.py).
    gaussian_basis: int = 0
    # With gaussian_partition: the fewest records a cell must expect per unit of the noise's
    # norm on its mean, n / (classes * 2^B) / (sigma * sqrt(D)) for a D-dimensional latent.
    # The run uses the largest B up to gaussian_partition that meets it (from public
    # quantities; privacy/accounting.py), so the number of cells follows the budget and the
    # latent's size: fewer, larger cells at small epsilon or in more dimensions. 0: always
    # gaussian_partition.
    min_cell_snr: float = 0.0

    def __post_init__(self) -> None:
        _check(self.hidden > 0 and self.blocks > 0 and self.expansion > 0,
               "diffusion.hidden, blocks and expansion must be > 0")
        _one_of("diffusion.architecture", self.architecture, ARCHITECTURES)
        _check(self.coarse_blocks >= 0, "diffusion.coarse_blocks must be >= 0")
        _check(self.architecture == "conv" or not self.coarse_blocks,
               "diffusion.coarse_blocks needs architecture 'conv' (the MLP has no map to "
               "pool)")
        _check(self.architecture != "conv" or self.hidden % 8 == 0,
               f"diffusion.hidden must be a multiple of 8 with architecture 'conv' (its "
               f"channels, in groups of 8), got {self.hidden}")
        _check(self.epochs > 0, "diffusion.epochs must be > 0")
        _check(self.batch_size > 0 and self.physical_batch_size > 0,
               "diffusion batch sizes must be > 0")
        _check(self.lr > 0 and self.clip_norm > 0, "diffusion.lr and clip_norm must be > 0")
        _check(self.noise_multiplicity >= 1, "diffusion.noise_multiplicity must be >= 1")
        _check(0 <= self.label_dropout < 1, "diffusion.label_dropout must be in [0, 1)")
        _check(0 <= self.ema_decay < 1, "diffusion.ema_decay must be in [0, 1)")
        _check(self.train_timesteps >= 10, "diffusion.train_timesteps must be >= 10")
        _check(self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
               f"diffusion.beta_schedule: unknown {self.beta_schedule!r}")
        _check(1 <= self.timestep_skew <= 10, "diffusion.timestep_skew must be in [1, 10]")
        _one_of("diffusion.gaussian_covariance", self.gaussian_covariance, GAUSSIAN_COVARIANCES)
        _one_of("diffusion.gaussian_release", self.gaussian_release, GAUSSIAN_RELEASES)
        _check(0 <= self.gaussian_partition <= MAX_PARTITION,
               f"diffusion.gaussian_partition must be in [0, {MAX_PARTITION}] (2^B cells per "
               f"class), got {self.gaussian_partition}")
        _check(self.gaussian_base or not self.gaussian_partition,
               "diffusion.gaussian_partition needs diffusion.gaussian_base = true")
        _check(self.gaussian_basis >= 0,
               f"diffusion.gaussian_basis must be >= 0 (0: the whole latent space), got "
               f"{self.gaussian_basis}")
        _check(self.gaussian_base or not self.gaussian_basis,
               "diffusion.gaussian_basis needs diffusion.gaussian_base = true")
        _check(self.min_cell_snr >= 0, "diffusion.min_cell_snr must be >= 0")
        _one_of("diffusion.prediction", self.prediction, PREDICTIONS)


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """The total budget and how it is shared between the two private stages."""

    epsilon: float = 10.0
    delta: float = 1e-5
    accountant: str = "prv"                # 'prv' (tighter) or 'rdp'
    autoencoder_share: float = 0.25        # the autoencoder alone gets this share of epsilon
    # with diffusion.gaussian_base: the autoencoder and the latent Gaussians together get
    # (autoencoder_share + gaussian_share) of epsilon; the denoiser the rest
    gaussian_share: float = 0.25
    # with diffusion.gaussian_partition > 0: the share of the release's precision (1/sigma^2)
    # spent on the first release, which only chooses the cells' directions
    partition_share: float = 0.1
    # True trains both stages with noise multiplier 0 (clipping kept): NOT PRIVATE, no epsilon.
    # Only to show that the privacy audit detects leakage; never the default.
    non_private_control: bool = False

    def __post_init__(self) -> None:
        # inf would never be exceeded, and calibrating sigma for it never ends.
        _check(0 < self.epsilon < float("inf"),
               f"privacy.epsilon must be > 0 and finite, got {self.epsilon}")
        _check(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _check(self.accountant in ("prv", "rdp"),
               f"privacy.accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        _check(0 < self.autoencoder_share < 1, "privacy.autoencoder_share must be in (0, 1)")
        _check(0 < self.gaussian_share < 1, "privacy.gaussian_share must be in (0, 1)")
        _check(0 < self.partition_share < 1, "privacy.partition_share must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    steps: int = 50
    guidance: float = 1.0                  # 1.0 = plain conditional; > 1 classifier-free guidance
    batch_size: int = 2000
    sampler: str = "ddim"                  # 'ddim' or 'dpm' (DPM-Solver++, diffusers)
    # decoded images are sigmoid(sharpness * decoder logits); 1 = the decoder's own output
    sharpness: float = 1.0
    # the sampler's starting noise is scaled by this; for a Gaussian latent model the
    # deterministic sampler is linear in it, so it scales each sample's spread about its
    # class (cell) mean; 1 = the model's own spread (diffusion/sampler.py)
    temperature: float = 1.0
    # each sampled latent gets N(0, decode_noise^2) per coordinate before it is decoded: for a
    # decoder trained on noisy latents (autoencoder.latent_noise), a draw from the
    # neighbourhood it learned to decode; 0 = decode the sampled latent itself
    decode_noise: float = 0.0
    # each decoded image is encoded and decoded again this many times (at `sharpness`): the
    # DP-trained autoencoder moves a sample toward what it reconstructs (sample.py,
    # decode_latents); 0 = the decoded sample itself
    reencode: int = 0
    # DDIM's eta: 0 = the deterministic sampler; 1 = ancestral (DDPM-like) steps, each adding
    # fresh noise per sample (seed, i), so the samples still do not depend on the batch
    eta: float = 0.0

    def __post_init__(self) -> None:
        _check(self.sampler in ("ddim", "dpm"), f"sampling.sampler: unknown {self.sampler!r}")
        _check(0 <= self.eta <= 1, f"sampling.eta must be in [0, 1], got {self.eta}")
        _check(self.eta == 0 or self.sampler == "ddim",
               f"sampling.eta {self.eta} needs sampler 'ddim' (got {self.sampler!r})")
        _check(0 <= self.reencode <= MAX_REENCODE,
               f"sampling.reencode must be in [0, {MAX_REENCODE}], got {self.reencode}")
        _check(0 <= self.decode_noise <= MAX_DECODE_NOISE,
               f"sampling.decode_noise must be in [0, {MAX_DECODE_NOISE:g}], "
               f"got {self.decode_noise}")
        _check(0 < self.sharpness <= 10,
               f"sampling.sharpness must be in (0, 10], got {self.sharpness}")
        _check(0 < self.temperature <= MAX_TEMPERATURE,
               f"sampling.temperature must be in (0, {MAX_TEMPERATURE:g}], "
               f"got {self.temperature}")
        _check(self.steps >= 1, f"sampling.steps must be >= 1, got {self.steps}")
        _check(0 <= self.guidance < float("inf"),
               f"sampling.guidance must be >= 0 and finite, got {self.guidance}")
        _check(self.batch_size >= 1, "sampling.batch_size must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    preset: str = "default"
    seed: int = 0
    threads: int = 0                       # 0 = all cores
    device: str = "auto"                   # auto (a CUDA GPU when present), cpu, cuda, cuda:N
    checkpoint_every: int = 200            # logical steps between checkpoints
    subset: int = 0                        # train on this many training records, drawn at
                                           # random (seed) independently of the data; 0 = all
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        _check(self.threads >= 0, "threads must be >= 0")
        check_device(self.device)
        _check(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        _check(self.subset >= 0, f"subset must be >= 0 (0 = all records), got {self.subset}")
        shares = self.privacy.autoencoder_share + self.privacy.gaussian_share
        _check(not self.diffusion.gaussian_base or shares < 1,
               f"privacy.autoencoder_share + privacy.gaussian_share = {shares:g} leaves no "
               "budget for the denoiser; their sum must be below 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"autoencoder": AutoencoderConfig, "diffusion": DiffusionConfig,
            "privacy": PrivacyConfig, "sampling": SamplingConfig}


def _coerce(cls: type, key: str, value: Any, where: str) -> Any:
    """Convert `value` to the type of field `key` of `cls`; unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(cls)}
    if key not in names or key in SECTIONS:
        raise ConfigError(f"{where}: unknown key {key!r}; known: {sorted(names - set(SECTIONS))}")
    kind = type(getattr(cls(), key))
    try:
        if kind is bool:
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text in ("true", "1")
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items)
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError("expected an integer")
            return int(number)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value {value!r} for {key} ({exc})") from exc


def build(preset: dict[str, Any], overrides: dict[str, Any], name: str) -> RunConfig:
    """Merge a preset mapping and dotted overrides into a validated RunConfig."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {"preset": name}
    for key, value in preset.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"preset {name}: [{key}] must be a table")
            for k, v in value.items():
                merged[key][k] = _coerce(SECTIONS[key], k, v, f"preset {name} [{key}]")
        else:
            top[key] = _coerce(RunConfig, key, value, f"preset {name}")
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key and section in SECTIONS:
            merged[section][key] = _coerce(SECTIONS[section], key, value, f"--set {dotted}")
        elif not key:
            top[section] = _coerce(RunConfig, section, value, f"--set {dotted}")
        else:
            raise ConfigError(f"--set {dotted}: unknown section {section!r}; "
                              f"known: {sorted(SECTIONS)}")
    try:
        sections = {s: SECTIONS[s](**merged[s]) for s in SECTIONS}
        return RunConfig(**top, **sections)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def preset_names() -> list[str]:
    return sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.toml")})


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        for d in PRESET_DIRS:
            if (d / f"{name_or_path}.toml").is_file():
                path = d / f"{name_or_path}.toml"
                break
        else:
            raise ConfigError(f"unknown preset {name_or_path!r}; known: {preset_names()}")
    if not path.is_file():
        raise ConfigError(f"preset file {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset file {path}: {exc}") from exc


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def resolve(preset: str, overrides: dict[str, Any]) -> RunConfig:
    return build(load_preset(preset), overrides, Path(preset).stem)


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its saved resolved form (config.json)."""
    top = {k: v for k, v in d.items() if k not in SECTIONS}
    name = top.pop("preset", "saved")
    preset = {**top, **{s: d.get(s, {}) for s in SECTIONS}}
    return build(preset, {}, name)


CONFIG_FILE = "config.json"  # in every run directory: resolved settings + what training derived


@dataclass(frozen=True)
class SavedConfig:
    """A run directory's config.json as `dplatent train` wrote it: the resolved settings and,
    under "derived", what training found (data set, classes, privacy plan, device)."""

    path: Path
    raw: dict[str, Any]  # as saved, "derived" included
    derived: dict[str, Any]

    def settings(self) -> RunConfig:
        return from_dict({k: v for k, v in self.raw.items() if k != "derived"})


def read_saved(run_dir: str | Path) -> SavedConfig | None:
    """The run directory's saved configuration; None when it has no config.json. A file that
    is not a JSON object with a "derived" object raises a one-line ConfigError."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        raw = read_json(path)
    except DataError as exc:
        raise ConfigError(f"not a configuration that `dplatent train` wrote: {exc}") from exc
    if raw is None:
        return None
    derived = raw.get("derived")
    if not isinstance(derived, dict):
        raise ConfigError(f"{path}: not a configuration that `dplatent train` wrote (no "
                          "'derived' section)")
    return SavedConfig(path=path, raw=raw, derived=derived)
