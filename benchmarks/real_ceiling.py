"""Reference ceiling: the evaluator applied to the real training set as if it were synthetic.

Downstream classifiers train on the real training split (epoch chosen on a held-out part of
it) and are tested on the real test split; FID compares the real training split with the real
test split (reference = test, so the two sides are different images). These are the numbers a
perfect synthesizer would get, and a check that the evaluator reproduces the known values
(CNN >= 99 % on MNIST, >= 90 % on Fashion-MNIST; FID train vs test small).

    python benchmarks/real_ceiling.py --datasets mnist fashion-mnist --threads 1

Writes benchmarks/ceiling.json (one record per data set; resumable: a data set with a record
is skipped unless --force) and the ceiling table of BENCHMARKS.md (between markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import records
from dplatent import data
from dplatent.eval.evaluate import evaluate
from dplatent.runtime import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "ceiling.json"


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table(results: list[dict]) -> str:
    rows = ["| data set | CNN % (epochs × seeds) | MLP % | LogReg % "
            "| FID train vs test (n per side) | wall (s) | peak RSS (MB) | date |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cnn = "—" if r.get("cnn_acc") is None else (
            f"{pct(r['cnn_acc'])} ± {pct(r['cnn_acc_std'])} ({r['cnn_epochs']} × {r['seeds']})")
        fid = "—" if r.get("fid") is None else f"{r['fid']:.1f} ({r['fid_samples']})"
        rows.append(f"| {r['dataset']} | {cnn} | {pct(r.get('mlp_acc'))} | "
                    f"{pct(r.get('logreg_acc'))} | {fid} | {r['wall_s']:.0f} | "
                    f"{r['peak_rss_mb']} | {r['date']} |")
    cmds = sorted({c for r in results for c in r["command"].split("; ")})
    return "\n".join(rows) + "\n\nCommands: " + "; ".join(f"`{c}`" for c in cmds) + "\n"


def write_markdown(results: list[dict]) -> None:
    records.write_section("ceiling", table(results),
                          "Reference ceiling (benchmarks/real_ceiling.py)")


def merge(previous: dict, new: dict) -> dict:
    """A data set measured again for other metrics keeps the earlier metrics; the record lists
    every command and every date that contributed, and the wall times add up."""
    merged = {**previous, **{k: v for k, v in new.items() if v is not None}}
    merged["wall_s"] = previous["wall_s"] + new["wall_s"]
    merged["peak_rss_mb"] = max(previous["peak_rss_mb"], new["peak_rss_mb"])
    if new["command"] not in previous["command"]:
        merged["command"] = f"{previous['command']}; {new['command']}"
    if new["date"] not in previous["date"]:
        merged["date"] = f"{previous['date']}, {new['date']}"
    return merged


def run_one(args, dataset: str) -> dict:
    real = data.load(dataset, "train", args.data_dir)
    metrics = [m for m in args.metrics.split(",") if m]
    epochs = {"cnn": args.cnn_epochs} if args.cnn_epochs else {}
    t = time.time()
    res = evaluate(real, dataset, args.data_dir, metrics=metrics, fid_samples=args.fid_samples,
                   fid_reference="test", seeds=args.seeds, epochs=epochs, threads=args.threads,
                   progress=not args.no_progress)
    return {
        "dataset": dataset, "cnn_acc": res.get("cnn_acc"), "cnn_acc_std": res.get("cnn_acc_std"),
        "cnn_epochs": res.get("cnn_epochs"), "seeds": args.seeds,
        "mlp_acc": res.get("mlp_acc"), "logreg_acc": res.get("logreg_acc"),
        "fid": res.get("fid"), "fid_samples": res.get("fid_samples"),
        "wall_s": time.time() - t,
        "peak_rss_mb": peak_rss_mb(),
        "command": args.command,
        "machine": records.machine(),
        "date": dt.date.today().isoformat(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None, help="default: $DPLATENT_DATA, else download")
    p.add_argument("--metrics", default="cnn,mlp,logreg,fid")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--cnn-epochs", type=int, default=None, help="default: the evaluator's")
    p.add_argument("--fid-samples", type=int, default=10_000)
    records.add_run_options(p)
    args = p.parse_args()
    args.command = records.shown_command(Path(__file__).name, sys.argv[1:],
                                         drop=("--force",))
    results = records.load(RESULTS)
    if not args.markdown_only:
        for dataset in args.datasets:
            previous = next((r for r in results if r["dataset"] == dataset), None)
            wanted = {m for m in args.metrics.split(",") if m}
            if previous and not args.force and all(
                    previous.get(f"{m}_acc" if m != "fid" else "fid") is not None for m in wanted):
                print(f"{dataset}: {sorted(wanted)} already measured (use --force to redo)")
                continue
            record = run_one(args, dataset)
            results = [r for r in results if r["dataset"] != dataset] + [
                merge(previous, record) if previous and not args.force else record]
            records.save(RESULTS, results)
            print(json.dumps(record, indent=1), flush=True)
    write_markdown(results)


if __name__ == "__main__":
    main()
