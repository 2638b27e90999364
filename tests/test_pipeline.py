"""End to end through the command line: plan, train (smoke preset), sample, resume.

The commands run in-process through `dplatent.cli.main`, the console entry point, so the exit
codes and one-line error messages are the ones a user sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import assert_same_state, train_tiny_autoencoder, write_synthetic_npz

from dplatent.cli import main
from dplatent.privacy.ledger import recompute

N = 600
EPSILON = 2.0
DELTA = 1e-4           # below 1/N
# The smoke preset, with 6 DP steps per stage (so that checkpoint_every = 5 matters) and the RDP
# accountant: Opacus' PRV accountant costs about a second per call here, and a run makes dozens.
BUDGET = ["--preset", "smoke", "--epsilon", str(EPSILON), "--delta", str(DELTA),
          "--set", "privacy.accountant=rdp", "--set", "autoencoder.epochs=0.6",
          "--set", "diffusion.epochs=0.6", "--set", "autoencoder.ema_decay=0.9"]
SMOKE = [*BUDGET, "--seed", "1", "--threads", "1"]
STEPS = 6

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing",
                                        "ignore::DeprecationWarning:diffusers")


def cli(*args) -> tuple[int, str, str]:
    """Run `dplatent ARGS`; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    # (DPLATENT_KEEP_MALLOC: leave this test process's allocator settings alone)
    with (mock.patch.object(sys, "argv", ["dplatent", *map(str, args)]),
          mock.patch.dict(os.environ, {"DPLATENT_KEEP_MALLOC": "1"}),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "private.npz", N, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> tuple[Path, str]:
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("runs") / "smoke"
    try:
        code, out, err = cli("train", "--out", run, "--dataset", dataset, *SMOKE,
                             "--no-progress")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return run, out


@pytest.mark.slow
def test_train_writes_a_complete_run_within_budget(trained):
    run, out = trained
    assert "trained: epsilon=" in out and "RDP" in out
    for name in ("config.json", "privacy.json", "timings.json", "train_log.jsonl",
                 "checkpoints/autoencoder.pt", "checkpoints/diffusion.pt"):
        assert (run / name).is_file(), name
    assert (run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = json.loads((run / "config.json").read_text())
    derived = cfg["derived"]
    assert cfg["preset"] == "smoke" and cfg["seed"] == 1
    assert cfg["privacy"]["epsilon"] == EPSILON and cfg["privacy"]["delta"] == DELTA
    assert derived["n"] == N and derived["num_classes"] == 10
    assert derived["dataset"].endswith("private.npz")
    planned = {s["stage"]: s for s in derived["privacy_plan"]["stages"]}

    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["accountant"] == "rdp" and ledger["delta"] == DELTA
    assert ledger["target_epsilon"] == EPSILON
    assert 0 < ledger["epsilon"] <= EPSILON
    assert ledger["epsilon"] == pytest.approx(recompute(run / "privacy.json"), rel=1e-9)
    assert ledger["epsilon"] == pytest.approx(derived["privacy_plan"]["epsilon"], rel=1e-9)
    # the ledger holds exactly the planned DP steps and mechanisms of both stages
    assert [e["stage"] for e in ledger["entries"]] == ["autoencoder", "diffusion"]
    for e in ledger["entries"]:
        p = planned[e["stage"]]
        assert e["steps"] == p["steps"] == STEPS
        assert e["noise_multiplier"] == p["noise_multiplier"] > 0
        assert e["sample_rate"] == pytest.approx(p["batch_size"] / N)

    for stage in ("autoencoder", "diffusion"):
        ck = torch.load(run / "checkpoints" / f"{stage}.pt", map_location="cpu",
                        weights_only=True)
        assert ck["step"] == planned[stage]["steps"]
        assert ck["model"] and all(torch.isfinite(v).all() for v in ck["model"].values()
                                   if v.is_floating_point())
    # both stages keep an EMA of their iterates (the autoencoder's by the override above), and
    # that average is what sampling loads, not the last iterate
    from dplatent.sample import TrainedRun
    from dplatent.train.loop import final_weights
    loaded = TrainedRun(run, device="cpu")
    for stage, model in (("autoencoder", loaded.autoencoder), ("diffusion", loaded.denoiser)):
        ck = torch.load(run / "checkpoints" / f"{stage}.pt", weights_only=True)
        assert ck["ema"], stage
        state = model.state_dict()
        assert_same_state(state, final_weights(ck), stage)
        assert any(not torch.equal(state[k], ck["model"][k]) for k in state), stage

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"autoencoder", "diffusion"}
    assert all(r["epsilon"] <= EPSILON for r in log)


@pytest.mark.slow
def test_sample_writes_balanced_uint8_images(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "synthetic.npz"
    code, stdout, err = cli("sample", "--run", run, "--num", 40, "--out", out, "--seed", 5,
                            "--no-progress")
    assert code == 0, err
    assert "wrote 40 samples" in stdout
    with np.load(out, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    assert x.dtype == np.uint8 and x.shape == (40, 28, 28)
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [4] * 10
    assert x.std() > 0
    # sampling is post-processing: the ledger is untouched, and the same seed gives the same set
    code, _, err = cli("sample", "--run", run, "--num", 40, "--out", tmp_path / "again.npz",
                       "--seed", 5, "--no-progress")
    assert code == 0, err
    with np.load(tmp_path / "again.npz") as f:
        assert np.array_equal(f["x"], x)


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(trained, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    before = {p.relative_to(run): digest(p)
              for p in [run / "privacy.json", *sorted((run / "checkpoints").iterdir())]}
    ledger = json.loads((run / "privacy.json").read_text())
    code, out, err = cli("train", "--out", run, "--resume", "--no-grid", "--no-progress")
    assert code == 0, err
    assert f"epsilon={ledger['epsilon']:.4f}" in out
    after = {p.relative_to(run): digest(p)
             for p in [run / "privacy.json", *sorted((run / "checkpoints").iterdir())]}
    assert after == before
    # a resumed run keeps its saved configuration: changing it is refused
    code, _, err = cli("train", "--out", run, "--resume", "--epsilon", "8", "--no-progress")
    assert code == 2 and "--resume continues a run with its saved configuration" in err
    assert digest(run / "privacy.json") == before[Path("privacy.json")]


def test_train_refuses_an_existing_run_dir_without_resume(tmp_path, dataset):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    code, _, err = cli("train", "--out", tmp_path / "run", "--dataset", dataset, *SMOKE,
                       "--no-progress")
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_plan_names_the_accountant_and_matches_the_trained_run(dataset, trained):
    code, out, err = cli("plan", "--dataset", dataset, "--n", N, *BUDGET)
    assert code == 0, err
    assert "accountant: Opacus RDP accountant" in out
    assert f"n={N}" in out
    lines = {line.split()[0]: line for line in out.splitlines() if "sigma=" in line}
    assert set(lines) == {"autoencoder", "diffusion"}
    composed = float(out.split("composed epsilon: ")[1].split()[0])
    assert EPSILON * 0.97 < composed <= EPSILON
    # plan uses public quantities only, so it predicts exactly what train will use
    derived = json.loads((trained[0] / "config.json").read_text())["derived"]["privacy_plan"]
    for s in derived["stages"]:
        line = lines[s["stage"]]
        assert f"sigma={s['noise_multiplier']:.4f}" in line and f"steps={s['steps']}" in line
    assert f"composed epsilon: {derived['epsilon']:.4f}" in out


@pytest.mark.parametrize("delta", [0.01, 1 / N])
def test_plan_refuses_delta_at_least_one_over_n(delta):
    code, out, err = cli("plan", "--dataset", "mnist", "--n", N, "--preset", "smoke",
                         "--delta", delta)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "must be below 1/n" in lines[0] and f"n = {N}" in lines[0]


def test_plan_of_a_user_data_set_needs_n(dataset):
    code, _, err = cli("plan", "--dataset", dataset, "--preset", "smoke")
    assert code == 2 and "--n" in err


def test_train_with_a_data_dir_missing_the_files_fails_with_one_line(tmp_path):
    code, out, err = cli("train", "--out", tmp_path / "run", "--dataset", "mnist",
                         "--data-dir", tmp_path / "empty", *SMOKE, "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "empty") in lines[0]
    assert "train-images-idx3-ubyte.gz" in lines[0]
    assert not (tmp_path / "run").exists(), "nothing is written before the data is read"


def test_sample_from_a_directory_that_is_not_a_run(tmp_path):
    code, _, err = cli("sample", "--run", tmp_path, "--num", 5, "--no-progress")
    assert code == 2 and "not a run directory" in err


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_models_and_ledger(trained, dataset, tmp_path,
                                                               monkeypatch):
    """Stop the denoiser stage during step 6 (after the checkpoint at step 5), then resume."""
    from dplatent.privacy.dp_training import DPTrainer
    real_step = DPTrainer.step_logical
    ghost_steps = []

    def step_then_interrupt(self, chunks, loss_fn):
        if self.mode == "ghost":
            ghost_steps.append(1)
            if len(ghost_steps) == STEPS:
                raise KeyboardInterrupt
        return real_step(self, chunks, loss_fn)

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    monkeypatch.setattr(DPTrainer, "step_logical", step_then_interrupt)
    try:
        code, _, err = cli("train", "--out", run, "--dataset", dataset, *SMOKE,
                           "--no-progress")
        assert code == 130 and "--resume" in err
        # the ledger counts exactly what the checkpoints hold: all of stage 1, 5 steps of stage 2
        ledger = json.loads((run / "privacy.json").read_text())
        assert {e["stage"]: e["steps"] for e in ledger["entries"]} == {"autoencoder": STEPS,
                                                                        "diffusion": 5}
        assert torch.load(run / "checkpoints" / "diffusion.pt", weights_only=True)["step"] == 5
        assert ledger["epsilon"] < json.loads((trained[0] / "privacy.json").read_text())[
            "epsilon"]
        monkeypatch.setattr(DPTrainer, "step_logical", real_step)
        code, _, err = cli("train", "--out", run, "--resume", "--no-grid", "--no-progress")
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    # same ledger as the uninterrupted run, and the very same trained weights
    done = json.loads((run / "privacy.json").read_text())
    assert done == json.loads((trained[0] / "privacy.json").read_text())
    for stage in ("autoencoder", "diffusion"):
        a = torch.load(run / "checkpoints" / f"{stage}.pt", weights_only=True)
        b = torch.load(trained[0] / "checkpoints" / f"{stage}.pt", weights_only=True)
        assert a["step"] == b["step"] == STEPS
        for part in ("model", "ema"):
            assert_same_state(a[part], b[part], f"{stage} {part}")


def test_training_loop_survives_empty_poisson_batches(tmp_path, single_thread):
    """With a tiny sampling rate every batch is empty: each step is still a noisy, counted
    step (the accounting assumes it), and the progress display must not trip over the missing
    loss."""
    before, out, ledger = train_tiny_autoencoder(tmp_path, n=20, batch_size=1, sample_rate=1e-4,
                                                 steps=3, progress=True)
    assert ledger.steps("autoencoder") == 3
    assert json.loads((tmp_path / "privacy.json").read_text())["entries"][0]["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] is None for r in log)
    # noise alone moved the weights
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())


@pytest.mark.slow
def test_the_conv_denoiser_trains_samples_and_resumes_through_the_cli(dataset, tmp_path):
    """`diffusion.architecture = conv`: the run's ledger is the MLP's (same plan), its
    checkpoint holds the conv net, `sample` rebuilds it from the saved config, and a resume
    of the finished run leaves it as it was."""
    run = tmp_path / "conv"
    threads = torch.get_num_threads()
    try:
        code, out, err = cli("train", "--out", run, "--dataset", dataset, *SMOKE,
                             "--set", "diffusion.architecture=conv",
                             "--set", "diffusion.hidden=8", "--set", "diffusion.blocks=1",
                             "--no-progress", "--no-grid")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())["diffusion"]
    assert saved["architecture"] == "conv" and saved["hidden"] == 8
    weights = torch.load(run / "checkpoints" / "diffusion.pt", weights_only=True)
    names = set(weights["model"])
    assert any("blocks.0.conv1.weight" in k for k in names), sorted(names)[:5]
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["epsilon"] <= EPSILON * (1 + 1e-6)
    code, stdout, err = cli("sample", "--run", run, "--num", 20, "--out", tmp_path / "s.npz",
                            "--no-progress")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        assert f["x"].shape == (20, 28, 28) and f["x"].std() > 0
    before = digest(run / "checkpoints" / "diffusion.pt")
    code, _, err = cli("train", "--out", run, "--resume", "--no-grid", "--no-progress")
    assert code == 0, err
    assert digest(run / "checkpoints" / "diffusion.pt") == before
