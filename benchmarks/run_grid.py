"""The standard benchmark grid: {MNIST, Fashion-MNIST} x epsilon {1, 10}, delta 1e-5.

Each cell runs `dplatent train`, `dplatent sample` and `dplatent evaluate` as subprocesses and
records command, wall times, peak memory and metrics. Resumable per cell: a cell with a record
in benchmarks/results.json is skipped (use --force to redo it); a cell whose run directory
exists resumes training from its checkpoints. Run it in the background:

    nohup python benchmarks/run_grid.py --preset full > benchmarks/grid.log 2>&1 &

Writes benchmarks/results.json and the measured table of BENCHMARKS.md (between markers).

`--fid-only` re-measures FID alone, at `--fid-samples`, on the synthetic images of cells that
already have a record, and keeps every other number of the record; earlier FIDs stay in the
record under `fid_at` (samples -> FID).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import records

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
DATASETS = ("mnist", "fashion-mnist")
EPSILONS = (1.0, 10.0)


def shown(cmd: list[str]) -> str:
    """The command as a user would type it: no interpreter path, paths relative to the
    repository, and the data directory (a path of the machine it ran on) written as DIR."""
    exe = [sys.executable, "-m", "dplatent"]
    words = ["dplatent", *cmd[3:]] if cmd[:3] == exe else list(cmd)
    words = [w.removeprefix(f"{ROOT}/") for w in words]
    for i, w in enumerate(words[:-1]):
        if w == "--data-dir":
            words[i + 1] = "DIR"
    return shlex.join(words)


def run(cmd: list[str], log) -> tuple[float, int]:
    """Run a command; returns (wall seconds, peak RSS of this child in MB). The child's own
    resource usage (os.wait4), not RUSAGE_CHILDREN, whose peak is the largest of every child
    this process has waited for, i.e. of all earlier cells too."""
    log.write(f"$ {shown(cmd)}\n")
    log.flush()
    t = time.time()
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return time.time() - t, usage.ru_maxrss // 1024


def load_results() -> list[dict]:
    return records.load(RESULTS)


def save_results(results: list[dict]) -> None:
    records.save(RESULTS, results)


def cell_key(r: dict) -> tuple:
    return (r["dataset"], float(r["epsilon"]), r["preset"])


def run_dir_of(args, dataset: str, epsilon: float, preset: str) -> Path:
    run_dir = Path(args.runs) / f"{dataset}-eps{epsilon:g}-{preset}"
    return run_dir if run_dir.is_absolute() else ROOT / run_dir


def run_cell(args, dataset: str, epsilon: float, log, previous: dict | None = None) -> dict:
    """Train (or resume), sample and evaluate one cell. The record's `command` is always the
    command that trains the cell from scratch. A resumed finished run (re-evaluated) only
    loads the models, so its training peak memory is the one the run recorded
    (timings.json), or, for runs from before that, the peak of `previous`, its earlier record
    (which covered training), when that is higher."""
    exe = [sys.executable, "-m", "dplatent"]
    run_dir = run_dir_of(args, dataset, epsilon, args.preset)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    fresh_cmd = [*exe, "train", "--dataset", dataset, "--epsilon", f"{epsilon:g}",
                 "--delta", f"{args.delta:g}", "--preset", args.preset, "--out",
                 str(run_dir), "--no-progress", *data, *sum(
                     (["--set", s] for s in args.set), [])]
    resumed = (run_dir / "config.json").is_file()
    train_cmd = ([*exe, "train", "--resume", "--out", str(run_dir), "--no-progress", *data]
                 if resumed else fresh_cmd)
    train_wall, rss1 = run(train_cmd, log)
    timings = json.loads((run_dir / "timings.json").read_text())
    if resumed:
        earlier = timings.get("peak_rss_mb") or (previous or {}).get("peak_rss_mb", 0)
        rss1 = max(rss1, int(earlier))
    synth = run_dir / "synthetic.npz"
    sample_cmd = [*exe, "sample", "--run", str(run_dir), "--num", str(args.num_samples),
                  "--out", str(synth), "--no-progress"]
    sample_wall, rss2 = run(sample_cmd, log)
    eval_json = run_dir / "eval.json"
    eval_cmd = [*exe, "evaluate", "--synthetic", str(synth), "--dataset", dataset,
                "--metrics", args.metrics, "--fid-samples", str(args.fid_samples),
                "--out", str(eval_json), "--seeds", str(args.seeds), "--no-progress", *data,
                *(["--cnn-epochs", str(args.cnn_epochs)] if args.cnn_epochs else [])]
    eval_wall, rss3 = run(eval_cmd, log)
    ev = json.loads(eval_json.read_text())
    ledger = json.loads((run_dir / "privacy.json").read_text())
    saved = json.loads((run_dir / "config.json").read_text())
    sampling = sampling_of(saved)
    return {
        "dataset": dataset, "epsilon": epsilon, "delta": args.delta, "preset": args.preset,
        "public_data": False,
        "cnn_acc": ev.get("cnn_acc"), "cnn_acc_std": ev.get("cnn_acc_std"),
        "mlp_acc": ev.get("mlp_acc"), "logreg_acc": ev.get("logreg_acc"),
        "fid": ev.get("fid"), "fid_samples": ev.get("fid_samples"),
        "epsilon_ledger": ledger["epsilon"], "accountant": ledger["accountant"],
        "train_wall_s": round(timings.get("autoencoder_s", 0) + timings.get("diffusion_s", 0),
                              1),
        "autoencoder_wall_s": timings.get("autoencoder_s"),
        "diffusion_wall_s": timings.get("diffusion_s"),
        "train_command_wall_s": round(train_wall, 1),
        "sample_wall_s": round(sample_wall, 1), "eval_wall_s": round(eval_wall, 1),
        "num_samples": args.num_samples, "classifier_seeds": args.seeds,
        "cnn_epochs": args.cnn_epochs or 10, "evaluate_command": shown(eval_cmd),
        "peak_rss_mb": max(rss1, rss2, rss3),
        "command": shown(fresh_cmd), "resumed": resumed, "sampling": sampling,
        "latent_noise": latent_noise_of(saved),
        "autoencoder_share": saved["privacy"]["autoencoder_share"],
        "machine": records.machine(),
        "date": dt.date.today().isoformat(),
    }


# the sampling settings a record shows, with their values for configurations from before them
SAMPLING_SHOWN = {"guidance": 1.0, "temperature": 1.0, "sharpness": 1.0, "decode_noise": 0.0}


def sampling_of(saved: dict) -> dict:
    """The sampling settings of a run's saved configuration (its config.json)."""
    return {k: saved["sampling"].get(k, default) for k, default in SAMPLING_SHOWN.items()}


# the autoencoder's share of epsilon in every preset before records carried it
AUTOENCODER_SHARE_BEFORE = 0.25


def settings_shown(r: dict) -> str:
    """'guidance, T, sharpness; latent noise', then the decode noise where there is one and
    the autoencoder's share of epsilon where it is not the earlier 0.25."""
    shown_ = ", ".join(f"{r['sampling'][k]:g}" for k in ("guidance", "temperature", "sharpness"))
    # records from before the options existed were made without either noise
    shown_ += f"; {r.get('latent_noise', 0.0):g}"
    decode = r["sampling"].get("decode_noise", 0.0)
    shown_ += f"; decode noise {decode:g}" if decode else ""
    share = r.get("autoencoder_share", AUTOENCODER_SHARE_BEFORE)
    return shown_ + (f"; ε share of AE {share:g}" if share != AUTOENCODER_SHARE_BEFORE else "")


def latent_noise_of(saved: dict) -> float:
    """The stage-1 latent noise of a run's saved configuration (0 for runs from before the
    option)."""
    return saved["autoencoder"].get("latent_noise", 0.0)


def remeasure_fid(args, rec: dict, log) -> dict:
    """The record with FID re-measured at args.fid_samples on its existing synthetic images."""
    exe = [sys.executable, "-m", "dplatent"]
    run_dir = run_dir_of(args, *cell_key(rec))
    synth = run_dir / "synthetic.npz"
    if not synth.is_file():
        raise SystemExit(f"--fid-only: {synth} is missing; run the cell first")
    out = run_dir / f"eval-fid{args.fid_samples}.json"
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    cmd = [*exe, "evaluate", "--synthetic", str(synth), "--dataset", rec["dataset"],
           "--metrics", "fid", "--fid-samples", str(args.fid_samples), "--out", str(out),
           "--no-progress", *data]
    wall, rss = run(cmd, log)
    ev = json.loads(out.read_text())
    fid_at = dict(rec.get("fid_at") or {})
    if rec.get("fid") is not None:
        fid_at[str(rec["fid_samples"])] = rec["fid"]
    fid_at[str(ev["fid_samples"])] = ev["fid"]
    return {**rec, "fid": ev["fid"], "fid_samples": ev["fid_samples"], "fid_at": fid_at,
            "fid_command": shown(cmd), "fid_wall_s": round(wall, 1),
            "fid_peak_rss_mb": rss}


def fmt(v, pct: bool = False, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def table(results: list[dict]) -> str:
    head = ("| data set | ε (ledger) | preset (guidance, T, sharpness; latent noise) | CNN % "
            "| MLP % | LogReg % | FID (n) | classifiers trained on | train AE / diff. (s) "
            "| sample (s) | peak RSS (MB) | date |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in sorted(results, key=lambda r: (r["dataset"], -r["epsilon"], r["preset"])):
        cnn = fmt(r["cnn_acc"], True)
        if r.get("cnn_acc_std") is not None:
            cnn += f" ± {fmt(r['cnn_acc_std'], True)}"
        fid = "—" if r["fid"] is None else f"{r['fid']:.1f} ({r['fid_samples']})"
        fid += "".join(f"; {v:.1f} ({n})" for n, v in sorted(
            (r.get("fid_at") or {}).items(), key=lambda kv: -int(kv[0]))
            if int(n) != r["fid_samples"])
        settings = settings_shown(r)
        rows.append(
            f"| {r['dataset']} | {r['epsilon']:g} ({r['epsilon_ledger']:.2f}) | {r['preset']} "
            f"({settings}) "
            f"| {cnn} | {fmt(r['mlp_acc'], True)} | {fmt(r['logreg_acc'], True)} | {fid} "
            f"| {r['num_samples'] // 1000}k, CNN {r.get('cnn_epochs', 10)} ep. "
            f"× {r.get('classifier_seeds', 3)} "
            f"| {fmt(r['autoencoder_wall_s'], digits=0)} / {fmt(r['diffusion_wall_s'], digits=0)}"
            f" | {fmt(r['sample_wall_s'], digits=0)} | {r['peak_rss_mb']} | {r['date']} |")
    cmds = "\n".join(
        f"- `{r['dataset']}` ε={r['epsilon']:g}: `{r['command']}`; then "
        f"{r['num_samples']} samples; `{r.get('evaluate_command', 'evaluate')}` "
        f"(CNN {r.get('cnn_epochs', 10)} epochs × {r.get('classifier_seeds', 3)} seeds); "
        + (f"FID at {r['fid_samples']}: `{r['fid_command']}` ({r['fid_wall_s']:.0f} s); "
           if r.get("fid_command") else "")
        + f"{r['machine']}" for r in results)
    return head + "\n".join(rows) + "\n\nCommands:\n\n" + cmds + "\n"


def write_markdown(results: list[dict]) -> None:
    records.write_section("grid", table(results), "The standard grid (benchmarks/run_grid.py)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--data-dir", default=os.environ.get("DPLATENT_DATA"))
    ap.add_argument("--runs", default="benchmarks/runs", help="relative to the repository root")
    ap.add_argument("--num-samples", type=int, default=60000)
    ap.add_argument("--fid-samples", type=int, default=10000)
    ap.add_argument("--metrics", default="fid,cnn,mlp,logreg")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds")
    ap.add_argument("--cnn-epochs", type=int, default=None, help="CNN epochs (default 10)")
    ap.add_argument("--set", action="append", default=[], help="config override per cell")
    ap.add_argument("--force", action="store_true", help="redo cells that have results")
    ap.add_argument("--fid-only", action="store_true",
                    help="re-measure only FID (at --fid-samples) for cells with a record")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite BENCHMARKS.md from results.json and exit")
    args = ap.parse_args()
    results = load_results()
    if args.markdown_only:
        write_markdown(results)
        return
    log_path = ROOT / "benchmarks" / "grid.log"
    with open(log_path, "a") as log:
        for dataset in args.datasets.split(","):
            for eps in (float(e) for e in args.epsilons.split(",")):
                key = (dataset, eps, args.preset)
                done = [r for r in results if cell_key(r) == key]
                if args.fid_only:
                    if not done:
                        print(f"skip {key}: no record to re-measure", flush=True)
                        continue
                    print(f"FID of {key} at {args.fid_samples} ...", flush=True)
                    rec = remeasure_fid(args, done[0], log)
                elif done and not args.force:
                    print(f"skip {key}: already in {RESULTS.name}", flush=True)
                    continue
                else:
                    print(f"cell {key} ...", flush=True)
                    rec = run_cell(args, dataset, eps, log, done[0] if done else None)
                results = [r for r in results if cell_key(r) != key] + [rec]
                save_results(results)
                write_markdown(results)
                print(f"cell {key}: {json.dumps(rec)}", flush=True)


if __name__ == "__main__":
    main()
