"""Crash and resume: a run killed mid-stage and resumed ends exactly where an uninterrupted run
ends, and the on-disk ledger never counts fewer DP steps than the saved checkpoints hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_state
from typer.testing import CliRunner

from dplatent import config
from dplatent.data import read_npz
from dplatent.privacy.accounting import plan as make_plan
from dplatent.train.loop import checkpoint_path, load_checkpoint

N_TRAIN = 480
# Small and quick: 6 autoencoder steps, 12 denoiser steps, a checkpoint every 2 steps; RDP keeps
# the ledger's epsilon computation (done at every checkpoint) fast.
SETS = {"checkpoint_every": "2", "privacy.accountant": "rdp",
        "autoencoder.epochs": "0.5", "diffusion.epochs": "1.0"}
EPSILON, DELTA, SEED = "10", "1e-3", "3"


def write_npz(folder: Path, n: int = N_TRAIN, seed: int = 0) -> Path:
    """A labelled 28x28 uint8 data set (class-dependent bar plus noise) and its test split."""
    def make(count: int, s: int):
        rng = np.random.default_rng(s)
        y = (np.arange(count) % 10).astype(np.int64)
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        rows = np.linspace(2, 22, 10).astype(int)
        for c in range(10):
            x[y == c, rows[c]:rows[c] + 4, 3:25] = 220
        return x, y
    folder.mkdir(parents=True, exist_ok=True)
    x, y = make(n, seed)
    np.savez(folder / "toy.npz", x=x, y=y)
    xt, yt = make(120, seed + 1)
    np.savez(folder / "toy-test.npz", x=xt, y=yt)
    return folder / "toy.npz"


def train_args(npz: Path, out: Path) -> list[str]:
    args = ["train", "--dataset", str(npz), "--preset", "smoke", "--epsilon", EPSILON,
            "--delta", DELTA, "--seed", SEED, "--threads", "1", "--no-progress", "--no-grid",
            "--out", str(out)]
    for k, v in SETS.items():
        args += ["--set", f"{k}={v}"]
    return args


def ledger_steps(run: Path) -> dict[str, int]:
    d = json.loads((run / "privacy.json").read_text())
    return {e["stage"]: e["steps"] for e in d["entries"]}


def ckpt_step(run: Path, stage: str) -> int:
    path = checkpoint_path(run, stage)
    return int(load_checkpoint(path)["step"]) if path.is_file() else 0


def planned_steps() -> dict[str, int]:
    cfg = config.resolve("smoke", {**SETS, "privacy.epsilon": EPSILON,
                                   "privacy.delta": DELTA})
    return {s.stage: s.steps for s in make_plan(N_TRAIN, cfg).stages}


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tmp_path):
    npz = write_npz(tmp_path / "data")
    planned = planned_steps()
    assert planned["diffusion"] >= 8, planned
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # 1. Start a run and SIGKILL it right after its second denoiser checkpoint appears.
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "dplatent", *train_args(npz, killed)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    ck = checkpoint_path(killed, "diffusion")
    seen, last, deadline = 0, None, time.time() + 180
    try:
        while seen < 2:
            if proc.poll() is not None:
                pytest.fail(f"training ended (rc {proc.returncode}) before it could be killed: "
                            + (tmp_path / "killed.log").read_text()[-2000:])
            if time.time() > deadline:
                pytest.fail("no denoiser checkpoint within 180 s")
            try:
                mtime = ck.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime is not None and mtime != last:
                seen, last = seen + 1, mtime
            else:
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # 2. The saved state is mid-stage and the ledger counts exactly the saved steps.
    step = ckpt_step(killed, "diffusion")
    assert 0 < step < planned["diffusion"]
    assert ckpt_step(killed, "autoencoder") == planned["autoencoder"]
    assert ledger_steps(killed) == {"autoencoder": planned["autoencoder"], "diffusion": step}
    # stage 1 ended in the killed session: its seconds are saved, stage 2's are not yet
    killed_timings = json.loads((killed / "timings.json").read_text())
    assert killed_timings["autoencoder_s"] > 0 and killed_timings["sessions"] == 0
    assert "diffusion_s" not in killed_timings
    from dplatent.errors import DplatentError
    from dplatent.sample import TrainedRun
    with pytest.raises(DplatentError, match=f"stage diffusion is unfinished \\({step}/"
                       f"{planned['diffusion']} steps\\); run `dplatent train --resume --out"):
        TrainedRun(killed)

    # 3. Resume to completion (a fresh process, as after a crash).
    res = subprocess.run([sys.executable, "-m", "dplatent", "train", "--resume", "--out",
                          str(killed), "--no-progress", "--no-grid"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "trained: epsilon=" in res.stdout
    resumed_timings = json.loads((killed / "timings.json").read_text())
    assert resumed_timings["sessions"] == 1 and resumed_timings["diffusion_s"] > 0
    assert resumed_timings["autoencoder_s"] >= killed_timings["autoencoder_s"]

    # 4. The same configuration and seed, uninterrupted (in this process).
    whole = tmp_path / "whole"
    old_threads = torch.get_num_threads()
    try:
        from dplatent.cli import app
        r = CliRunner().invoke(app, train_args(npz, whole))
    finally:
        torch.set_num_threads(old_threads)
    assert r.exit_code == 0, r.output + repr(r.exception)

    # 5. Same ledger and epsilon; bit-identical models, EMA, optimizer and RNG states.
    led_k = json.loads((killed / "privacy.json").read_text())
    led_w = json.loads((whole / "privacy.json").read_text())
    assert led_k["epsilon"] == led_w["epsilon"]
    assert led_k == led_w
    assert ledger_steps(killed) == planned
    for stage in ("autoencoder", "diffusion"):
        a = load_checkpoint(checkpoint_path(killed, stage))
        b = load_checkpoint(checkpoint_path(whole, stage))
        assert_same_state(a, b, stage)

    # 6. The resumed run is usable: sampling writes a valid npz.
    out = tmp_path / "synth.npz"
    r = CliRunner().invoke(app, ["sample", "--run", str(killed), "--num", "30", "--out",
                                 str(out), "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    synth = read_npz(out)
    assert synth.x.shape == (30, 28, 28) and synth.x.dtype == np.uint8
    assert sorted(np.unique(synth.y).tolist()) == list(range(10))


class Crash(Exception):
    """Stands in for the process dying."""


def test_crash_between_checkpoint_and_ledger_writes_never_understates(tmp_path, monkeypatch):
    """The final save writes two files (checkpoint, ledger). Die right after the first of them
    lands, whichever it is: privacy.json must never count fewer steps than a checkpoint holds,
    so a run whose checkpoints look finished always has a complete ledger."""
    from dplatent.train.stages import train
    npz = write_npz(tmp_path / "data")
    sets = {**SETS, "diffusion.epochs": "0.5", "privacy.epsilon": EPSILON,
            "privacy.delta": DELTA, "threads": "1", "seed": SEED}
    cfg = config.resolve("smoke", sets)
    planned = {s.stage: s.steps for s in make_plan(N_TRAIN, cfg).stages}
    run = tmp_path / "run"

    real_replace = os.replace
    state = {"crashed": False}

    def is_final_diffusion_write(src: str, dst: Path) -> bool:
        if dst.name == "diffusion.pt":
            return int(torch.load(src, weights_only=True)["step"]) == planned["diffusion"]
        if dst.name == "privacy.json":
            steps = {e["stage"]: e["steps"] for e in json.loads(Path(src).read_text())["entries"]}
            return steps.get("diffusion") == planned["diffusion"]
        return False

    def replace(src, dst):
        final = not state["crashed"] and is_final_diffusion_write(src, Path(dst))
        real_replace(src, dst)
        if final:
            state["crashed"] = True
            raise Crash

    old_threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Crash):
            train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, progress=False)
        monkeypatch.undo()

        on_disk = ledger_steps(run)
        for stage in ("autoencoder", "diffusion"):
            assert on_disk.get(stage, 0) >= ckpt_step(run, stage), (
                f"privacy.json counts {on_disk.get(stage, 0)} {stage} steps but the checkpoint "
                f"holds {ckpt_step(run, stage)}")

        result = train(dataset=str(npz), data_dir=None, cfg=cfg, run_dir=run, resume=True,
                       progress=False)
    finally:
        torch.set_num_threads(old_threads)
    assert ledger_steps(run) == planned
    assert result["ledger"]["epsilon"] == json.loads((run / "privacy.json").read_text())["epsilon"]


def test_timings_add_up_over_sessions(tmp_path):
    from dplatent.train.stages import _write_timings
    _write_timings(tmp_path, {"autoencoder_s": 30.0, "diffusion_s": 100.0})
    _write_timings(tmp_path, {"autoencoder_s": 0.5, "diffusion_s": 20.25})
    saved = json.loads((tmp_path / "timings.json").read_text())
    assert saved == {"autoencoder_s": 30.5, "diffusion_s": 120.25, "sessions": 2}


def test_timings_of_a_finished_stage_1_count_no_session(tmp_path):
    """Stage 1's seconds are saved when it ends; only the end of the session counts it."""
    from dplatent.train.stages import _write_timings
    _write_timings(tmp_path, {"autoencoder_s": 30.0}, 3500, finished=False)
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "autoencoder_s": 30.0, "sessions": 0, "peak_rss_mb": 3500}
    _write_timings(tmp_path, {"diffusion_s": 100.0}, 3600)
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "autoencoder_s": 30.0, "diffusion_s": 100.0, "sessions": 1, "peak_rss_mb": 3600}


def test_timings_keep_the_largest_peak_memory_over_sessions(tmp_path):
    from dplatent.runtime import peak_rss_mb
    from dplatent.train.stages import _write_timings
    _write_timings(tmp_path, {"autoencoder_s": 30.0}, 3500)
    _write_timings(tmp_path, {"autoencoder_s": 0.5}, 900)       # a resumed finished run
    assert json.loads((tmp_path / "timings.json").read_text())["peak_rss_mb"] == 3500
    _write_timings(tmp_path, {"autoencoder_s": 0.5}, 4100)
    assert json.loads((tmp_path / "timings.json").read_text())["peak_rss_mb"] == 4100
    # this process has at least imported torch: tens of MB, not KiB or bytes
    assert 20 < peak_rss_mb() < 64 * 1024
