"""How much one DP training step slows down when another heavy job shares the CPU.

Runs one DP-SGD step of a preset (stage 2: the denoiser with ghost clipping on random latents;
stage 1: the autoencoder with per-example hooks on random images; no private data) in one
process alone, then in two processes at once, with the thread count and OpenMP wait policy of
each scenario, and prints each process's examples/s. The command-line tool warns
when it starts on a busy CPU with every core (dplatent.runtime.busy_warning).

Usage: python benchmarks/contention.py [--preset full] [--stage diffusion|autoencoder]
       [--steps 5]
       (worker mode, used by the script itself: --worker --threads N)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# (name, processes, threads per process, OMP_WAIT_POLICY: None = unset, OpenMP's default)
SCENARIOS = [
    ("alone, all threads", 1, 0, None),
    ("alone, all threads, PASSIVE", 1, 0, "PASSIVE"),
    ("two at once, all threads each", 2, 0, None),
    ("two at once, all threads each, PASSIVE", 2, 0, "PASSIVE"),
    ("two at once, 1 thread each", 2, 1, None),
    ("alone, 1 thread", 1, 1, None),
]


def worker(preset: str, stage: str, steps: int, threads: int) -> None:
    import torch
    from dp_step_speed import autoencoder_rate, denoiser_rate

    from dplatent import config, runtime

    runtime.tune_allocator()
    runtime.set_threads(threads)
    cfg = config.resolve(preset, {})
    rate = (autoencoder_rate(cfg, steps) if stage == "autoencoder"
            else denoiser_rate(cfg, steps)[0])
    print(f"RATE {rate:.1f} threads={torch.get_num_threads()}", flush=True)


def run_scenario(preset: str, stage: str, steps: int, procs: int, threads: int,
                 wait_policy: str | None) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--stage", stage,
           "--steps", str(steps), "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    started = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    outs = [p.communicate()[0] for p in started]
    return [line.split(" ", 1)[1] for out in outs for line in out.splitlines()
            if line.startswith("RATE ")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="full")
    ap.add_argument("--stage", choices=("diffusion", "autoencoder"), default="diffusion")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        worker(args.preset, args.stage, args.steps, args.threads)
        return
    print(f"cores: {os.cpu_count()}; preset {args.preset}, {args.stage} DP step, "
          f"{args.steps} steps")
    for name, procs, threads, policy in SCENARIOS:
        t = time.perf_counter()
        rates = run_scenario(args.preset, args.stage, args.steps, procs, threads, policy)
        print(f"{name}: examples/s per process {' | '.join(rates)} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
