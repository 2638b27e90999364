"""Empirical privacy audit of a trained run: membership-inference attacks and the epsilon lower
bound they imply.

Members are records of the run's training split, non-members are records of its test split;
for a run trained on a random subset (`subset`), non-members are the training records left out,
which makes the two groups exchangeable. A non-private control run (noise multiplier 0) is
audited like any other and its audit.json says `"private": false` with the NOT PRIVATE label.
Each attack gives every record a score (higher = "more likely a member"):

  denoiser_loss        minus the EMA denoiser's training loss (epsilon- or v-prediction error)
                       on the record's latent (the run's encoder), averaged over fixed timesteps
                       and fixed noise draws
  reconstruction_loss  minus the autoencoder's reconstruction loss (binary cross-entropy)
  nearest_synthetic    minus the L2 distance (pixels in [0, 1]) to the nearest synthetic sample

For each attack: ROC AUC, TPR at 0.1% and 1% FPR, and an empirical lower bound on epsilon at
the run's delta. For a threshold t ("member if score >= t"), a mechanism that is (eps, delta)-DP
forces FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta. With Clopper-Pearson upper
confidence bounds on FPR and FNR,

    eps_lb(t) = max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub))

and the reported bound is the maximum over thresholds (clipped at 0).

Caveats, also written into audit.json: the bound is a valid statistical lower bound on the
privacy loss of the training algorithm only when members and non-members are exchangeable
(drawn from one pool, membership decided at random). A data set's train and test splits
usually are not quite (MNIST's test writers differ from its training writers), so a positive
bound from them can reflect that shift and not a privacy failure; the maximum over thresholds
is also optimistic (the threshold is chosen on the same records). The canary audit
(`make_canary_dataset`; design in docs/bad-inputs.md, "Privacy audit") has exchangeable members
and non-members by construction. Record-level attacks on one trained model typically give bounds
far below the accounted epsilon: they are a smoke alarm, not a measurement of epsilon.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from dplatent import data as data_mod
from dplatent.errors import ConfigError, DataError, DplatentError
from dplatent.io import write_json
from dplatent.privacy.accounting import NOT_PRIVATE
from dplatent.privacy.ledger import run_privacy_status

FILENAME = "audit.json"
FPR_LEVELS = (0.001, 0.01)
TIMESTEP_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
CANARY_SUFFIX = "-canaries.npz"


# --- statistics ------------------------------------------------------------------------------

def clopper_pearson_upper(k: np.ndarray | int, n: int, confidence: float = 0.95) -> np.ndarray:
    """Upper end of the two-sided Clopper-Pearson interval for k successes out of n."""
    k = np.asarray(k, dtype=float)
    alpha = 1.0 - confidence
    with np.errstate(all="ignore"):
        ub = stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return np.where(k >= n, 1.0, ub)


def _counts(members: np.ndarray, nonmembers: np.ndarray):
    """Thresholds (every distinct score, plus +inf) and, for 'member iff score >= t', the
    false-positive and false-negative counts at each."""
    m = np.sort(np.asarray(members, dtype=float))
    o = np.sort(np.asarray(nonmembers, dtype=float))
    thresholds = np.append(np.unique(np.concatenate([m, o])), np.inf)
    fp = len(o) - np.searchsorted(o, thresholds, side="left")
    fn = np.searchsorted(m, thresholds, side="left")
    return thresholds, fp, fn


def epsilon_lower_bound(members: np.ndarray, nonmembers: np.ndarray, delta: float,
                        confidence: float = 0.95) -> dict:
    """Largest epsilon that the attack's error rates rule out, with Clopper-Pearson bounds."""
    if len(members) == 0 or len(nonmembers) == 0:
        raise ConfigError("the audit needs at least one member and one non-member")
    thresholds, fp, fn = _counts(members, nonmembers)
    fpr_ub = clopper_pearson_upper(fp, len(nonmembers), confidence)
    fnr_ub = clopper_pearson_upper(fn, len(members), confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log((1 - delta - fnr_ub) / fpr_ub)
        b = np.log((1 - delta - fpr_ub) / fnr_ub)
    eps = np.fmax(a, b)
    eps = np.where(np.isfinite(eps), eps, -np.inf)   # numerator <= 0: no evidence
    i = int(np.argmax(eps))
    best = float(max(eps[i], 0.0))
    return {"epsilon": best, "threshold": float(thresholds[i]),
            "fpr": float(fp[i] / len(nonmembers)), "fnr": float(fn[i] / len(members)),
            "fpr_upper": float(fpr_ub[i]), "fnr_upper": float(fnr_ub[i]),
            "confidence": confidence}


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a random member > that of a random non-member), ties counting half."""
    m, o = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    ranks = stats.rankdata(np.concatenate([m, o]))
    return float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(o)))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """Highest TPR over thresholds whose empirical FPR is at most `fpr`."""
    _, fp, fn = _counts(members, nonmembers)
    ok = fp / len(nonmembers) <= fpr
    return float((1 - fn[ok] / len(members)).max())


def attack_metrics(members: np.ndarray, nonmembers: np.ndarray, delta: float,
                   confidence: float = 0.95) -> dict:
    lb = epsilon_lower_bound(members, nonmembers, delta, confidence)
    return {"auc": roc_auc(members, nonmembers),
            "tpr_at_fpr": {f"{f:g}": tpr_at_fpr(members, nonmembers, f) for f in FPR_LEVELS},
            "epsilon_lower_bound": lb["epsilon"], "best_threshold": lb,
            "member_score_median": float(np.median(members)),
            "nonmember_score_median": float(np.median(nonmembers))}


# --- attack scores ---------------------------------------------------------------------------

def _images(x: np.ndarray) -> torch.Tensor:
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x).astype(np.float32) / 255.0)


@torch.no_grad()
def reconstruction_scores(autoencoder, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    from dplatent.models.autoencoder import reconstruction_loss
    out = [reconstruction_loss(autoencoder, images[i:i + batch])
           for i in range(0, len(images), batch)]
    return -torch.cat(out).cpu().numpy().astype(float)


@torch.no_grad()
def denoiser_scores(run, images: torch.Tensor, labels: np.ndarray, *, seed: int,
                    draws: int = 4, fractions=TIMESTEP_FRACTIONS,
                    batch: int = 500) -> np.ndarray:
    """Minus the denoiser's training loss (its own target: epsilon or v) averaged over fixed
    timesteps and noise draws (the same draws for every record, so members and non-members see
    identical noise)."""
    from dplatent.diffusion.schedule import alphas_cumprod
    from dplatent.train.stages import encode
    d = run.cfg.diffusion
    prediction = getattr(d, "prediction", "epsilon")
    acp = alphas_cumprod(d.train_timesteps, d.beta_schedule)
    steps = sorted({min(d.train_timesteps - 1, max(0, round(f * d.train_timesteps)))
                    for f in fractions})
    latents = encode(run.autoencoder, images)
    dim = latents.shape[1]
    dev = latents.device  # fixed noise drawn on the CPU: the same draws on every device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(steps), draws, dim, generator=gen).to(dev)
    y_all = torch.as_tensor(labels, dtype=torch.long, device=dev)
    errors = torch.zeros(len(latents), device=dev)
    for i in range(0, len(latents), batch):
        z0, y = latents[i:i + batch], y_all[i:i + batch]
        b = len(z0)
        yk = y[:, None].expand(b, draws)
        total = torch.zeros(b, device=dev)
        for j, t in enumerate(steps):
            ab = acp[t]
            eps = noise[j].expand(b, draws, dim)
            zt = ab.sqrt() * z0[:, None] + (1 - ab).sqrt() * eps
            pred = run.denoiser(zt, torch.full((b, draws), t, dtype=torch.long, device=dev), yk)
            target = (eps if prediction == "epsilon"
                      else ab.sqrt() * eps - (1 - ab).sqrt() * z0[:, None])
            total += (pred - target).pow(2).mean(dim=(1, 2))
        errors[i:i + batch] = total / len(steps)
    return -errors.cpu().numpy().astype(float)


@torch.no_grad()
def nearest_synthetic_scores(images: torch.Tensor, synthetic: torch.Tensor,
                             batch: int = 256) -> np.ndarray:
    s = synthetic.flatten(1)
    out = []
    for i in range(0, len(images), batch):
        out.append(torch.cdist(images[i:i + batch].flatten(1), s).min(dim=1).values)
    return -torch.cat(out).cpu().numpy().astype(float)


# --- the audit -------------------------------------------------------------------------------

def _synthetic(run, run_dir: Path, num: int, seed: int) -> tuple[torch.Tensor, str]:
    path = run_dir / "synthetic.npz"
    if path.is_file():
        synth = data_mod.read_npz(path, num_classes=run.num_classes)
        return _images(synth.x[:num]), f"{path.name} (first {min(num, len(synth))})"
    from dplatent.sample import generate
    x, _ = generate(run, num, seed=seed, progress=False)
    return _images(x), f"generated {num} with seed {seed}"


def _scores(run, images: torch.Tensor, labels: np.ndarray, synthetic: torch.Tensor,
            seed: int) -> dict[str, np.ndarray]:
    images, synthetic = images.to(run.device), synthetic.to(run.device)
    return {"denoiser_loss": denoiser_scores(run, images, labels, seed=seed),
            "reconstruction_loss": reconstruction_scores(run.autoencoder, images),
            "nearest_synthetic": nearest_synthetic_scores(images, synthetic)}


def audit(run_dir: str | Path, data_dir: str | Path | None = None, *, n_members: int = 1000,
          n_nonmembers: int = 1000, seed: int = 0, num_synthetic: int = 2000,
          confidence: float = 0.95, canaries: str | Path | None = None,
          out: str | Path | None = None, threads: int | None = None,
          device: str | None = None) -> dict:
    """Run the membership-inference attacks on a trained run; write and return audit.json.

    `threads`: CPU threads for this call (default: the run's `threads` setting, 0 = all).
    `device`: where the models score the records (default: the run's device setting).
    """
    from dplatent.sample import TrainedRun
    if n_members < 1 or n_nonmembers < 1:
        raise ConfigError(f"--members and --nonmembers must be >= 1, got {n_members} and "
                          f"{n_nonmembers}")
    if num_synthetic < 1:
        raise ConfigError(f"number of synthetic samples must be >= 1, got {num_synthetic}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    t0 = time.time()
    run_dir = Path(run_dir)
    run = TrainedRun(run_dir, device=device)
    ledger_path = run_dir / "privacy.json"
    try:
        ledger = json.loads(ledger_path.read_text())
        delta, accounted = float(ledger["delta"]), ledger["epsilon"]
        accounted = None if accounted is None else float(accounted)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DplatentError(f"{ledger_path}: unreadable privacy ledger ({exc})") from exc
    private, _ = run_privacy_status(run.cfg.to_dict(), ledger)
    dataset = run.meta["dataset"]
    train = data_mod.load(dataset, "train", data_dir)
    source_records = int(run.meta.get("source_records", run.meta["n"]))
    if len(train) != source_records:
        raise DataError(f"{dataset}: the training split has {len(train)} records but the run "
                        f"was trained on {source_records}; not the same data")
    rng = np.random.default_rng(seed)
    if 0 < run.cfg.subset < len(train):
        # Members: the run's random subset; non-members: the training records left out. Who
        # is in was decided by a coin independent of the data, so the two are exchangeable.
        from dplatent.train.stages import subset_indices
        inside = subset_indices(len(train), run.cfg.subset, run.cfg.seed)
        outside = np.setdiff1d(np.arange(len(train)), inside)
        mi = inside[data_mod.random_subset(len(inside), n_members, rng)]
        oi = outside[data_mod.random_subset(len(outside), n_nonmembers, rng)]
        non_x, non_y = train.x[oi], train.y[oi]
        sources = (f"random training subset of {len(inside)} (subset={run.cfg.subset}, "
                   f"seed={run.cfg.seed})",
                   f"training records outside the subset ({len(outside)}); exchangeable "
                   "with the members")
    else:
        test = data_mod.load(dataset, "test", data_dir)
        if test.x.shape[1:] != train.x.shape[1:]:
            raise DataError(f"{dataset}: test images {test.x.shape[1:]} differ from training "
                            f"images {train.x.shape[1:]}")
        mi = data_mod.random_subset(len(train), n_members, rng)
        oi = data_mod.random_subset(len(test), n_nonmembers, rng)
        non_x, non_y = test.x[oi], test.y[oi]
        sources = ("training split", "test split")

    old_threads = torch.get_num_threads()
    try:
        threads = run.cfg.threads if threads is None else threads
        if threads > 0:
            torch.set_num_threads(threads)
        synthetic, synth_source = _synthetic(run, run_dir, num_synthetic, seed)
        mem = _scores(run, _images(train.x[mi]), train.y[mi], synthetic, seed)
        non = _scores(run, _images(non_x), non_y, synthetic, seed)
        attacks = {name: attack_metrics(mem[name], non[name], delta, confidence)
                   for name in mem}
        canary = _canary_audit(run, Path(canaries), synthetic, seed, delta, confidence) \
            if canaries else None
    finally:
        torch.set_num_threads(old_threads)

    bounds = [a["epsilon_lower_bound"] for a in attacks.values()]
    if canary:
        bounds += [a["epsilon_lower_bound"] for a in canary["attacks"].values()]
    result = {
        "run": str(run_dir), "dataset": dataset, "seed": seed,
        "private": private,
        **({} if private else {"label": NOT_PRIVATE}),
        "members": {"source": sources[0], "count": len(mi)},
        "nonmembers": {"source": sources[1], "count": len(oi)},
        "synthetic": synth_source, "delta": delta, "confidence": confidence,
        "accounted_epsilon": accounted if private else None,
        "empirical_epsilon_lower_bound": max(bounds),
        "attacks": attacks,
        "canaries": canary,
        "notes": [
            "Score: higher means 'more likely a member'; each attack's bound is the maximum "
            "over thresholds of the Clopper-Pearson epsilon lower bound at the run's delta.",
            ("Members and non-members come from one pool split by a coin independent of the "
             "data (the run's random subset), so they are exchangeable."
             if 0 < run.cfg.subset < len(train) else
             "Training and test splits are not guaranteed exchangeable (e.g. different writers "
             "in MNIST); a positive bound from them can reflect that shift.")
            + " Canary members and non-members are exchangeable by construction.",
            "The maximum over thresholds is chosen on the audited records (optimistic).",
        ],
        "seconds": round(time.time() - t0, 2),
    }
    write_json(Path(out) if out else run_dir / FILENAME, result)
    return result


# --- canaries --------------------------------------------------------------------------------

def canary_images(k: int, size: int, channels: int, seed: int) -> np.ndarray:
    """k out-of-distribution images: random rectangles of random intensity on uniform noise,
    unlike any digit or garment; uint8 (k, size, size[, channels])."""
    rng = np.random.default_rng(seed)
    shape = (k, size, size) if channels == 1 else (k, size, size, channels)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for i in range(k):
        for _ in range(3):
            r, c = rng.integers(0, size - 4, size=2)
            h, w = rng.integers(3, size // 2, size=2)
            x[i, r:r + h, c:c + w] = rng.integers(0, 256)
    return x


def make_canary_dataset(dataset: str, data_dir: str | Path | None, out: str | Path, *,
                        k: int = 50, label: int = 0, seed: int = 0) -> dict:
    """Write an audit training set: the training split plus k of 2k canaries.

    2k canaries (fixed label) are drawn; a fair random half (exactly k) is inserted into the
    training records (out.npz), the other half is held out. out-test.npz is the original test
    split, and out-canaries.npz holds all 2k canaries with their membership. Train an audit run
    on out.npz, then `audit(run, canaries=out-canaries.npz)` compares the inserted canaries'
    scores with the held-out ones: exchangeable by construction, so the bound is sound.
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"{out}: the canary data set must be an .npz path")
    if k < 1:
        raise ConfigError(f"number of canaries must be >= 1, got {k}")
    train = data_mod.load(dataset, "train", data_dir)
    test = data_mod.load(dataset, "test", data_dir)
    if not 0 <= label < train.num_classes:
        raise ConfigError(f"canary label must lie in [0, {train.num_classes - 1}], got {label}")
    x_can = canary_images(2 * k, train.image_size, train.channels, seed)
    rng = np.random.default_rng(seed + 1)
    member = np.zeros(2 * k, dtype=bool)
    member[rng.choice(2 * k, size=k, replace=False)] = True
    x = np.concatenate([train.x, x_can[member]])
    y = np.concatenate([train.y, np.full(k, label, dtype=np.int64)])
    order = rng.permutation(len(y))
    from dplatent.sample import save_npz
    save_npz(out, x[order], y[order])
    save_npz(out.with_name(out.stem + "-test.npz"), test.x, test.y)
    can_path = out.with_name(out.stem + CANARY_SUFFIX)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, x=x_can, y=np.full(2 * k, label, dtype=np.int64),
                                member=member)
    from dplatent.io import atomic_write
    atomic_write(can_path, write)
    return {"train": str(out), "test": str(out.with_name(out.stem + "-test.npz")),
            "canaries": str(can_path), "n": int(len(y)), "k": k, "label": label,
            "max_delta": 1.0 / len(y)}


def _canary_audit(run, path: Path, synthetic: torch.Tensor, seed: int, delta: float,
                  confidence: float) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: canary file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y, member = f["x"], f["y"].astype(np.int64), f["member"].astype(bool)
    except Exception as exc:
        raise DataError(f"{path}: not a canary file from make_canary_dataset ({exc})") from exc
    if member.all() or not member.any():
        raise DataError(f"{path}: needs both inserted and held-out canaries")
    scores = _scores(run, _images(x), y, synthetic, seed)
    return {"file": str(path), "inserted": int(member.sum()), "held_out": int((~member).sum()),
            "attacks": {name: attack_metrics(s[member], s[~member], delta, confidence)
                        for name, s in scores.items()}}


# --- command body ----------------------------------------------------------------------------

def audit_command(run: Path, data_dir: str | None, members: int, nonmembers: int, seed: int,
                  out: Path | None, canaries: Path | None = None,
                  threads: int | None = None, device: str | None = None) -> dict:
    """Body of `dplatent audit`: run the attacks, write audit.json, print a summary."""
    import typer
    result = audit(run, data_dir, n_members=members, n_nonmembers=nonmembers, seed=seed,
                   canaries=canaries, out=out, threads=threads, device=device)
    if not result["private"]:
        typer.echo(f"*** {result['label']} ***")
    typer.echo(f"audit of {run} ({result['members']['count']} members, "
               f"{result['nonmembers']['count']} non-members, delta={result['delta']:g})")
    rows = [("", result["attacks"])]
    if result["canaries"]:
        rows.append(("canary ", result["canaries"]["attacks"]))
    for prefix, attacks in rows:
        for name, a in attacks.items():
            t = a["tpr_at_fpr"]
            typer.echo(f"  {prefix + name:28s} AUC={a['auc']:.3f} "
                       f"TPR@0.1%={t['0.001']:.3f} TPR@1%={t['0.01']:.3f} "
                       f"eps_lb={a['epsilon_lower_bound']:.3f}")
    eps_lb = result["empirical_epsilon_lower_bound"]
    accounted = result["accounted_epsilon"]
    typer.echo(f"empirical epsilon lower bound: {eps_lb:.3f}  (accounted epsilon: "
               + ("none, NOT PRIVATE)" if accounted is None else f"{accounted:.3f})"))
    typer.echo(f"wrote {Path(out) if out else Path(run) / FILENAME}")
    if accounted is not None and math.isfinite(eps_lb) and eps_lb > accounted:
        typer.echo("WARNING: the empirical lower bound exceeds the accounted epsilon; "
                   "check the members/non-members caveat in audit.json, then the training "
                   "code", err=True)
    return result
