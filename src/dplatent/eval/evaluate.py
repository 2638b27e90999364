"""Evaluate a synthetic labelled image set against a real one: FID and downstream accuracy.

`evaluate` returns a flat JSON-ready dict; `write_eval_json` stores it atomically. Accuracies
are fractions in [0, 1]. Keys (present for the requested metrics):

    dataset, synthetic, n_synthetic, metrics, device, wall_seconds,
    cnn_acc, cnn_acc_std, cnn_acc_per_seed, cnn_val_acc, cnn_best_epoch, cnn_epochs, cnn_seconds
    (likewise mlp_*, logreg_*), classifier_seeds, classifier_first_seed,
    fid, fid_samples, fid_reference, fid_reference_samples, fid_warning, fid_seconds,
    fid_images_per_second, fid_weights_sha256
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from dplatent import data
from dplatent import device as device_mod
from dplatent.data import LabelledImages
from dplatent.errors import ConfigError
from dplatent.io import atomic_write
from dplatent.eval import classifier, fid
from dplatent.eval.classifier import ClassifierConfig

METRICS = ("fid", "cnn", "mlp", "logreg")
DEFAULT_METRICS = METRICS


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """'fid,cnn' or ['fid', 'cnn'] -> validated list in canonical order, no duplicates."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not names:
        raise ConfigError(f"no metrics requested; choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


def evaluate(synthetic: LabelledImages, dataset: str, data_dir: str | Path | None = None, *,
             metrics: Sequence[str] = DEFAULT_METRICS,
             fid_samples: int = 10_000,
             fid_reference: str = "train",
             fid_weights: str | Path | None = None,
             fid_batch_size: int = 50,
             fid_cache_dir: str | Path | None = None,
             fid_model: torch.nn.Module | None = None,
             seeds: int = 3,
             first_seed: int = 0,
             epochs: dict[str, int] | None = None,
             batch_size: int = 256,
             val_fraction: float = 0.1,
             threads: int | None = None,
             device: str | torch.device = "auto",
             progress: bool = True) -> dict:
    """Compute the requested metrics of `synthetic` against the real data set `dataset`.

    FID compares with the real `fid_reference` split ('train' by default, or 'test');
    reference statistics are cached in `fid_cache_dir` (default ~/.cache/dplatent/fid-stats).
    `fid_model` replaces the Inception network (tests); otherwise the verified weights at
    `fid_weights` / $DPLATENT_FID_WEIGHTS / the cache default are loaded, never downloaded.
    Classifiers use `seeds` seeds from `first_seed` on and `epochs[kind]` epochs (defaults in
    classifier.DEFAULT_EPOCHS); the real test set is used only for the final accuracies.
    Classifiers and the FID network run on `device` (auto: a CUDA GPU when present).
    """
    start = time.perf_counter()
    metrics = parse_metrics(metrics)
    configs = classifier_configs([m for m in metrics if m in classifier.KINDS], epochs or {},
                                 seeds, batch_size, val_fraction, threads, first_seed)
    if fid_reference not in ("train", "test"):
        raise ConfigError(f"FID reference must be 'train' or 'test', got {fid_reference!r}")
    dev = device if isinstance(device, torch.device) else device_mod.resolve(device)
    real_test = data.load(dataset, "test", data_dir)
    classifier.check_compatible(synthetic, real_test)
    result: dict = {"dataset": dataset, "synthetic": synthetic.name,
                    "n_synthetic": len(synthetic), "metrics": metrics, "device": str(dev)}
    if "fid" in metrics:  # load (and verify) the network first: fail before hours of training
        model, weights_sha = _fid_model(fid_model, fid_weights)
        model = model.to(dev)
        reference = real_test if fid_reference == "test" else data.load(dataset, "train", data_dir)
        options = fid.FidOptions(
            samples=fid_samples, batch_size=fid_batch_size, threads=threads, progress=progress,
            cache_dir=Path(fid_cache_dir) if fid_cache_dir else fid.default_stats_dir(),
            device=dev)
        result.update(fid_entries(synthetic, reference, model, weights_sha, options))
        result["fid_reference_split"] = fid_reference
    for kind, config in configs.items():
        res = classifier.downstream_accuracy(kind, synthetic, real_test, config, dev)
        result.update({f"{kind}_acc": res.accuracy, f"{kind}_acc_std": res.std,
                       f"{kind}_acc_per_seed": res.per_seed, f"{kind}_val_acc": res.val_accuracy,
                       f"{kind}_best_epoch": res.best_epoch, f"{kind}_epochs": res.epochs,
                       f"{kind}_seconds": res.seconds, "classifier_seeds": seeds,
                       "classifier_first_seed": first_seed})
    result["wall_seconds"] = time.perf_counter() - start
    return result


def seeds_label(result: dict) -> str:
    """'3 seeds', or '2 seeds (2-3)' when the classifier seeds did not start at 0."""
    n = result.get("classifier_seeds") or next(
        (len(v) for k, v in result.items() if k.endswith("_acc_per_seed") and v), None)
    if n is None:
        return "? seeds"
    first = result.get("classifier_first_seed") or 0
    return f"{n} seeds" + (f" ({first}-{first + n - 1})" if first else "")


def classifier_configs(kinds: list[str], epochs: dict[str, int], seeds: int, batch_size: int,
                       val_fraction: float, threads: int | None,
                       first_seed: int = 0) -> dict[str, ClassifierConfig]:
    """Validated configuration per requested classifier (before any expensive work)."""
    unknown = sorted(set(epochs) - set(classifier.KINDS))
    if unknown:
        raise ConfigError(f"epochs given for unknown classifier(s) {unknown}; "
                          f"choose from {classifier.KINDS}")
    epochs = {**classifier.DEFAULT_EPOCHS, **epochs}
    return {kind: ClassifierConfig(epochs=epochs[kind], batch_size=batch_size,
                                   val_fraction=val_fraction, seeds=seeds,
                                   first_seed=first_seed, threads=threads)
            for kind in kinds}


def fid_entries(synthetic: LabelledImages, reference: LabelledImages, model: torch.nn.Module,
                weights_sha: str, options: fid.FidOptions) -> dict:
    res = fid.compute_fid(synthetic.x, reference.x, reference.name, model, weights_sha, options)
    if res.warning:
        print(f"warning: {res.warning}", flush=True)
    return {"fid": res.fid, "fid_samples": res.samples, "fid_reference": res.reference,
            "fid_reference_samples": res.reference_samples, "fid_warning": res.warning,
            "fid_seconds": res.seconds, "fid_images_per_second": res.images_per_second,
            "fid_reference_cached": res.reference_cached, "fid_weights_sha256": weights_sha}


def _fid_model(model: torch.nn.Module | None, weights: str | Path | None) -> tuple[torch.nn.Module,
                                                                                    str]:
    if model is not None:
        return model, f"custom:{type(model).__name__}"
    return fid.load_inception(weights)


def write_eval_json(result: dict, path: str | Path) -> Path:
    """Write `result` as JSON via a temporary file and an atomic rename."""
    text = json.dumps(_jsonable(result), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _jsonable(value):
    """Floats that are not finite become None (JSON has no NaN); tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
