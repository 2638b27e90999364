"""Privacy accounting that spans both private stages.

Every access to private data is a `DPEvent`: a Poisson-subsampled Gaussian mechanism run for
some steps (noise multiplier sigma, sampling rate q, clipping norm C). The total epsilon of a run
is the composition of all its events, computed by one of Opacus' accountants (PRV by default,
RDP on request). `plan` turns a total (epsilon, delta) and public quantities only (n, batch
sizes, epochs, the budget share of stage 1) into each stage's sigma; it never sees data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import asdict, dataclass

from opacus.accountants import PRVAccountant, RDPAccountant

from dplatent.config import RunConfig
from dplatent.diffusion.gaussian_base import SENSITIVITY as GAUSSIAN_SENSITIVITY
from dplatent.errors import PrivacyError

MECHANISM = "poisson_subsampled_gaussian"
# A non-private control run (privacy.non_private_control): the same Poisson sampling and
# clipping with noise multiplier 0. It has no finite epsilon, and `epsilon` says so (inf).
NO_NOISE = "no_noise_control"
NOT_PRIVATE = ("NOT PRIVATE: non-private control run (noise multiplier 0); "
               "no differential-privacy guarantee")
ACCOUNTANTS = {"prv": "Opacus PRV accountant (Gopi et al. 2021)",
               "rdp": "Opacus RDP accountant (Mironov 2017)"}
SIGMA_MAX = 1e4
PRV_EPS_ERROR = 0.01
# With diffusion.gaussian_base: one Gaussian mechanism on the normalised moment sums of all
# latents (diffusion/gaussian_base.py), i.e. sample rate 1, one step, clip norm = sensitivity.
GAUSSIAN_STAGE = "latent_gaussian"
# With diffusion.gaussian_partition > 0 the release is two such mechanisms: this one (its share
# privacy.partition_share of the precision 1/sigma^2) chooses the cells, GAUSSIAN_STAGE (the
# rest) releases them. Gaussian mechanisms compose exactly: 1/sigma^2 adds.
PARTITION_STAGE = "latent_partition"


@dataclass(frozen=True, kw_only=True)
class DPEvent:
    """One stage's use of private data: `steps` DP-SGD steps of a subsampled Gaussian.

    Assumptions: each example is included independently with probability `sample_rate`
    (Poisson sampling); per-example gradients are clipped to L2 norm `clip_norm`; Gaussian
    noise of standard deviation `noise_multiplier * clip_norm` is added to their sum.
    """

    stage: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    mechanism: str = MECHANISM

    def __post_init__(self) -> None:
        if self.mechanism not in (MECHANISM, NO_NOISE):
            raise PrivacyError(f"{self.stage}: unsupported mechanism {self.mechanism!r}")
        if self.mechanism == NO_NOISE and self.noise_multiplier != 0:
            raise PrivacyError(f"{self.stage}: noise multiplier of a no-noise control must be "
                               f"0, got {self.noise_multiplier}")
        if self.mechanism == MECHANISM and not self.noise_multiplier > 0:
            raise PrivacyError(f"{self.stage}: noise multiplier must be > 0, "
                               f"got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"{self.stage}: sample rate must be in (0, 1], "
                               f"got {self.sample_rate}")
        if self.steps < 0:
            raise PrivacyError(f"{self.stage}: steps must be >= 0, got {self.steps}")
        if not self.clip_norm > 0:
            raise PrivacyError(f"{self.stage}: clip norm must be > 0, got {self.clip_norm}")

    def to_dict(self) -> dict:
        return asdict(self)


def epsilon(events: list[DPEvent], delta: float, accountant: str = "prv") -> float:
    """Composed epsilon at `delta` of all events (0 for no steps; inf once a no-noise control
    event has taken a step: such a run has no finite epsilon)."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; choose from {sorted(ACCOUNTANTS)}")
    if any(e.mechanism == NO_NOISE and e.steps > 0 for e in events):
        return math.inf
    history = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps > 0)
    if not history:
        return 0.0
    return _epsilon_of_history(history, delta, accountant)


@functools.lru_cache(maxsize=512)
def _epsilon_of_history(history: tuple[tuple[float, float, int], ...], delta: float,
                        accountant: str) -> float:
    """Cached: the ledger and the calibration ask for the same compositions repeatedly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha"
        rdp = RDPAccountant()
        rdp.history = list(history)
        rdp_epsilon = float(rdp.get_epsilon(delta=delta))
        if accountant == "rdp" or not math.isfinite(rdp_epsilon):
            return rdp_epsilon
        prv = PRVAccountant()
        prv.history = list(history)
        # eps_error bounds the numerical error; the value returned is an upper bound.
        return float(prv.get_epsilon(delta=delta, eps_error=prv_eps_error(rdp_epsilon)))


def prv_eps_error(rdp_epsilon: float) -> float:
    """The PRV accountant's error bound: 0.01 up to epsilon 20, then 1/2000 of epsilon.

    Its grid has about (domain size) / eps_error points and the domain grows with epsilon, so a
    fixed absolute error makes very large budgets (epsilon in the hundreds) take minutes and
    gigabytes; a relative one keeps the grid the size it has at epsilon 20. The RDP epsilon, an
    upper bound of the PRV one and cheap to compute, sets the scale."""
    return max(PRV_EPS_ERROR, rdp_epsilon / 2000)


def calibrate_sigma(*, target_epsilon: float, delta: float, prior: list[DPEvent],
                    stage: str, sample_rate: float, steps: int, clip_norm: float,
                    accountant: str = "prv", rel_tol: float = 2e-3) -> float:
    """Smallest noise multiplier (to `rel_tol`) for a new stage such that the composition of
    `prior` and the new stage has epsilon <= target. Bisection on sigma; returns the upper end,
    which always satisfies the target."""

    def eps_at(sigma: float) -> float:
        new = DPEvent(stage=stage, noise_multiplier=sigma, sample_rate=sample_rate,
                      steps=steps, clip_norm=clip_norm)
        return epsilon([*prior, new], delta, accountant)

    if prior and epsilon(prior, delta, accountant) >= target_epsilon:
        raise PrivacyError("earlier stages already spend the whole budget")
    lo, hi = 0.0, 1.0
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > SIGMA_MAX:
            raise PrivacyError(f"{stage}: no noise multiplier up to {SIGMA_MAX} meets "
                               f"epsilon={target_epsilon}; use fewer steps or a larger budget")
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    stage: str
    batch_size: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    clip_norm: float
    epsilon_alone: float
    mechanism: str = MECHANISM

    def event(self, steps: int | None = None) -> DPEvent:
        return DPEvent(stage=self.stage, noise_multiplier=self.noise_multiplier,
                       sample_rate=self.sample_rate,
                       steps=self.steps if steps is None else steps, clip_norm=self.clip_norm,
                       mechanism=self.mechanism)


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """`n`: the records trained on (the subset when `subset` is set); `private` is False for a
    non-private control, whose target is None and whose epsilon is inf."""

    accountant: str
    target_epsilon: float | None
    delta: float
    n: int
    stages: tuple[StagePlan, ...]
    epsilon: float
    private: bool = True
    source_records: int | None = None
    # 2^gaussian_partition cells per class in the release (`cells_exponent`); the run's
    # diffusion.gaussian_partition after `resolved`
    gaussian_partition: int = 0

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready; an epsilon that is not finite (a control run) is written as None."""
        d = asdict(self)
        d["accountant_name"] = ACCOUNTANTS[self.accountant]
        d["epsilon"] = _finite_or_none(self.epsilon)
        for st in d["stages"]:
            st["epsilon_alone"] = _finite_or_none(st["epsilon_alone"])
        if not self.private:
            d["label"] = NOT_PRIVATE
        return d


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def split_release(event: DPEvent, partition_share: float) -> list[DPEvent]:
    """The release of the latent Gaussians as two Gaussian mechanisms whose composition is
    exactly `event` (one step each, sample rate 1): PARTITION_STAGE with precision share
    `partition_share` (sigma / sqrt(share)), then `event`'s stage with the rest."""
    if event.sample_rate != 1 or event.steps != 1:
        raise PrivacyError(f"{event.stage}: only a single full-batch Gaussian mechanism splits "
                           "exactly into two")
    sigma = event.noise_multiplier
    return [dataclasses.replace(event, stage=PARTITION_STAGE,
                                noise_multiplier=sigma / math.sqrt(partition_share)),
            dataclasses.replace(event, noise_multiplier=sigma / math.sqrt(1 - partition_share))]


def cells_exponent(sigma: float, n: int, num_classes: int, latent_dim: int,
                   cfg: RunConfig) -> int:
    """The number of cells per class, as B in 2^B, that a release of noise multiplier `sigma`
    (before `split_release`) affords: the largest B <= diffusion.gaussian_partition whose cells
    expect at least diffusion.min_cell_snr records per unit of the norm of the noise on their
    mean, n / (num_classes * 2^B) / (sigma_B * sqrt(latent_dim)), sigma_B the noise multiplier
    of the release that measures them. The noise on a cell's sums grows as sqrt(latent_dim)
    in norm, so a larger latent needs more records per cell. Public quantities only.
    With B = 0 there is no split (sigma_B = sigma); B = 0 also when none meets the bound."""
    d = cfg.diffusion
    if latent_dim < 1:
        raise PrivacyError(f"latent_dim must be >= 1, got {latent_dim}")
    sigma_b = sigma / math.sqrt(1 - cfg.privacy.partition_share)
    for b in range(d.gaussian_partition, 0, -1):
        if n / (num_classes * 2 ** b) >= d.min_cell_snr * sigma_b * math.sqrt(latent_dim):
            return b
    return 0


def resolved(cfg: RunConfig, p: PrivacyPlan) -> RunConfig:
    """`cfg` with the number of cells `plan` chose (diffusion.gaussian_partition); resolving
    it again gives the same plan, since the chosen B meets the bound."""
    return dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, gaussian_partition=p.gaussian_partition))


def steps_for(epochs: float, n: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n / batch_size))


def training_records(n: int, cfg: RunConfig) -> int:
    """The number of records a run trains on: `cfg.subset` of the `n` in the training split
    when set (a public choice), else all n."""
    if cfg.subset > n:
        raise PrivacyError(f"subset={cfg.subset} exceeds the {n} records of the training split")
    return cfg.subset or n


def plan(n: int, cfg: RunConfig, num_classes: int | None = None,
         latent_dim: int | None = None) -> PrivacyPlan:
    """Noise multipliers for every stage from public quantities only: the autoencoder, the
    latent Gaussians when `diffusion.gaussian_base` is set (calibrated as one Gaussian
    mechanism, then split into two by `split_release` when it affords cells:
    `cells_exponent`, which needs `num_classes` and `latent_dim`, the latent's number of
    coordinates, when diffusion.min_cell_snr is set), and the denoiser. The plan's
    `gaussian_partition` is the number of cells chosen (`resolved`).

    `n` is the size of the training split; the accounting uses the records actually trained
    on (`training_records`). A non-private control (`privacy.non_private_control`) gets noise
    multiplier 0 in every stage, no target and an infinite epsilon."""
    p, cap = cfg.privacy, cfg.diffusion.gaussian_partition
    if cap and cfg.diffusion.min_cell_snr and (num_classes is None or latent_dim is None):
        raise PrivacyError("diffusion.min_cell_snr: the plan needs the number of classes and "
                           "the latent's dimension")
    source, n = n, training_records(n, cfg)
    if p.delta >= 1.0 / n:
        raise PrivacyError(f"delta={p.delta:g} must be below 1/n = {1.0 / n:.3g} "
                           f"(n = {n} training records)")
    specs = []
    for name, sc in (("autoencoder", cfg.autoencoder), ("diffusion", cfg.diffusion)):
        if sc.batch_size > n:
            raise PrivacyError(f"{name}: batch size {sc.batch_size} exceeds n = {n}")
        specs.append((name, sc.batch_size, sc.batch_size / n,
                      steps_for(sc.epochs, n, sc.batch_size), sc.clip_norm))

    if cfg.diffusion.gaussian_base:  # one Gaussian mechanism on all records: q = 1, 1 step
        specs.insert(1, (GAUSSIAN_STAGE, n, 1.0, 1, GAUSSIAN_SENSITIVITY))
    if p.non_private_control:  # no noise: every cell is measured exactly
        if cap:
            specs.insert(1, (PARTITION_STAGE, n, 1.0, 1, GAUSSIAN_SENSITIVITY))
        stages = tuple(StagePlan(stage=name, batch_size=b, sample_rate=q, steps=t,
                                 noise_multiplier=0.0, clip_norm=c, mechanism=NO_NOISE,
                                 epsilon_alone=math.inf) for name, b, q, t, c in specs)
        return PrivacyPlan(accountant=p.accountant, target_epsilon=None, delta=p.delta, n=n,
                           stages=stages, epsilon=epsilon([s.event() for s in stages], p.delta,
                                                          p.accountant),
                           private=False, source_records=source, gaussian_partition=cap)
    # Cumulative targets: the autoencoder alone gets autoencoder_share; with the latent
    # Gaussians, both together get autoencoder_share + gaussian_share; the last stage the rest.
    targets = [p.epsilon * p.autoencoder_share]
    if cfg.diffusion.gaussian_base:
        targets.append(p.epsilon * (p.autoencoder_share + p.gaussian_share))
    targets.append(p.epsilon)
    events: list[DPEvent] = []
    batch_sizes: list[int] = []
    cells = 0
    for (name, b, q, t, c), target in zip(specs, targets):
        sigma = calibrate_sigma(target_epsilon=target, delta=p.delta, prior=events, stage=name,
                                sample_rate=q, steps=t, clip_norm=c, accountant=p.accountant)
        event = DPEvent(stage=name, noise_multiplier=sigma, sample_rate=q, steps=t,
                        clip_norm=c)
        if name == GAUSSIAN_STAGE and cap:
            cells = cells_exponent(sigma, n, num_classes or 1, latent_dim or 1, cfg)
        split = (split_release(event, p.partition_share)
                 if name == GAUSSIAN_STAGE and cells else [event])
        events.extend(split)
        batch_sizes.extend([b] * len(split))
    stages = tuple(
        StagePlan(stage=ev.stage, batch_size=b, sample_rate=ev.sample_rate,
                  steps=ev.steps, noise_multiplier=ev.noise_multiplier, clip_norm=ev.clip_norm,
                  epsilon_alone=epsilon([ev], p.delta, p.accountant))
        for ev, b in zip(events, batch_sizes))
    total = epsilon(events, p.delta, p.accountant)
    if total > p.epsilon:
        raise PrivacyError(f"calibration failed: composed epsilon {total} > {p.epsilon}")
    return PrivacyPlan(accountant=p.accountant, target_epsilon=p.epsilon, delta=p.delta, n=n,
                       stages=stages, epsilon=total, source_records=source,
                       gaussian_partition=cells)
