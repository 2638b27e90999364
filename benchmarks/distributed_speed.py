"""One small training configuration timed with 1 and with 2 training processes (gloo, CPU).

Each variant runs `dplatent train ... --nproc K --threads T` as a subprocess into a fresh run
directory under benchmarks/runs/distributed/ and records the command's wall time (process
start, planning and both stages), the two stages' own times (timings.json) and the expected
examples per second of the stages (planned steps x expected logical batch size / stage time),
plus the ledger's epsilon, which must be the same for every variant. The machine's load
average is recorded before each run: on a shared machine only large differences mean much.

    python benchmarks/distributed_speed.py [--data-dir DIR] [--variants 1x1 2x1 1x2]

Writes benchmarks/distributed_speed.json and the table of BENCHMARKS.md between the
<!-- distributed:begin --> and <!-- distributed:end --> markers (appended when absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import records

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs" / "distributed"
RESULTS = ROOT / "benchmarks" / "distributed_speed.json"
# The quick preset's models, a fraction of its epochs; RDP keeps planning short.
CONFIG = ["--preset", "quick", "--epsilon", "10", "--delta", "1e-5", "--seed", "0",
          "--set", "autoencoder.epochs=0.25", "--set", "diffusion.epochs=1",
          "--set", "privacy.accountant=rdp", "--device", "cpu"]


def run_variant(dataset: str, data_dir: str | None, nproc: int, threads: int, log) -> dict:
    out = RUNS / f"{dataset}-nproc{nproc}-threads{threads}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--dataset", dataset, *CONFIG, "--threads", str(threads), "--nproc",
            str(nproc), "--no-grid", "--no-progress"]
    cmd = [sys.executable, "-m", "dplatent", *args, "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    load = os.getloadavg()[0]
    log.write(f"$ dplatent {shlex.join(args)}\n")
    log.flush()
    t = time.time()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.time() - t
    timings = json.loads((out / "timings.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    stages = {s["stage"]: s for s in cfg["derived"]["privacy_plan"]["stages"]}
    examples = {k: stages[k]["steps"] * stages[k]["batch_size"]
                for k in ("autoencoder", "diffusion")}
    stage_s = timings["autoencoder_s"] + timings["diffusion_s"]
    return {
        "command": f"dplatent {shlex.join(args)}", "nproc": nproc, "threads": threads,
        "processes_recorded": cfg["derived"]["processes"],
        "wall_s": round(wall, 1), "autoencoder_s": timings["autoencoder_s"],
        "diffusion_s": timings["diffusion_s"],
        "autoencoder_examples_per_s": round(examples["autoencoder"] / timings["autoencoder_s"]),
        "diffusion_examples_per_s": round(examples["diffusion"] / timings["diffusion_s"]),
        "examples_per_s": round(sum(examples.values()) / stage_s),
        "epsilon": json.loads((out / "privacy.json").read_text())["epsilon"],
        "load_before": round(load, 2),
        "machine": records.machine(),
        "torch": cfg["derived"]["torch"], "date": dt.date.today().isoformat(),
    }


def table(results: list[dict]) -> str:
    rows = ["| processes × threads | command wall (s) | stages (s): AE / diffusion | "
            "examples/s: AE / diffusion / both | ε (ledger) | load avg before | date |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['nproc']} × {r['threads']} | {r['wall_s']:.1f} | "
            f"{r['autoencoder_s']:.1f} / {r['diffusion_s']:.1f} | "
            f"{r['autoencoder_examples_per_s']:,} / {r['diffusion_examples_per_s']:,} / "
            f"{r['examples_per_s']:,} | {r['epsilon']:.4f} | {r['load_before']:.1f} | "
            f"{r['date']} |")
    cmds = "\n".join(f"    {r['command']}" for r in results)
    machine = results[0]["machine"] if results else ""
    return ("\n".join(rows) + f"\n\nMachine: {machine}, torch {results[0]['torch']}; "
            "examples/s are the expected examples (planned steps × expected batch) over the "
            "stage's time.\nCommands (plus `--out RUN`):\n\n" + cmds + "\n")


def write_markdown(results: list[dict]) -> None:
    records.write_section("distributed", table(results),
                          "Multi-process training (benchmarks/distributed_speed.py)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None, help="default: $DPLATENT_DATA, else download")
    p.add_argument("--variants", nargs="+", default=["1x1", "2x1", "1x2"],
                   help="PROCESSESxTHREADS each")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite BENCHMARKS.md from the saved results and exit")
    args = p.parse_args()
    if args.markdown_only:
        write_markdown(json.loads(RESULTS.read_text()))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    results = []
    with open(RUNS / "log.txt", "w") as log:
        for v in args.variants:
            nproc, threads = (int(x) for x in v.split("x"))
            r = run_variant(args.dataset, args.data_dir, nproc, threads, log)
            print(f"{v}: wall {r['wall_s']} s, stages {r['autoencoder_s']} + "
                  f"{r['diffusion_s']} s, {r['examples_per_s']} examples/s, "
                  f"epsilon {r['epsilon']:.4f}", flush=True)
            results.append(r)
    if len({r["epsilon"] for r in results}) != 1:
        raise SystemExit(f"the variants' ledgers differ: {[r['epsilon'] for r in results]}")
    records.save(RESULTS, results)
    write_markdown(results)


if __name__ == "__main__":
    main()
