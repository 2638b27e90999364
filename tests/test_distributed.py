"""Several training processes (gloo on CPU): the same DP-SGD step and the same privacy ledger as
a single process.

The processes are started by the library's launcher (`distributed.launch`, torch.distributed's
elastic launcher), so each test also exercises the process-group set-up. The step mechanics are
checked against the explicit per-example loop of test_dp_training: with W = 2 processes one
logical step must still apply

    (sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / expected_batch_size

with one noise draw (not one per process: std sigma C, not sqrt(2) sigma C).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import assert_same_state, write_synthetic_npz
from test_dp_training import (EXPECTED_BATCH, N_EXAMPLES, STAGES, RecordingSGD, dp_step,
                              median_clip, norm, per_example_grads)

from dplatent.errors import DplatentError
from dplatent.privacy.accounting import GAUSSIAN_STAGE
from dplatent.privacy.dp_training import make_trainer, poisson_batches
from dplatent.train import distributed
from dplatent.train.loop import checkpoint_path, load_checkpoint

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing",
                                         "ignore::DeprecationWarning:diffusers")]

WORLD = 2


@pytest.fixture(autouse=True)
def one_thread_per_process():
    """The launched processes inherit the environment: one thread each, and a process that
    hangs fails its run within minutes instead of holding the suite for torch's 30."""
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "DPLATENT_KEEP_MALLOC": "1",
                                      distributed.TIMEOUT_ENV: "300"}):
        yield


# ---------------------------------------------------------------------------- Poisson shares


def test_poisson_shares_are_disjoint_and_their_union_is_the_single_process_sample():
    def draw(rank: int, world: int):
        gen = torch.Generator().manual_seed(7)
        return [torch.cat(c).tolist() if c else [] for c in
                poisson_batches(n=50, sample_rate=0.2, steps=40, physical_batch_size=3,
                                generator=gen, rank=rank, world_size=world)]
    single = draw(0, 1)
    shares = [draw(r, 3) for r in range(3)]
    assert any(len(s) >= 3 for s in single)
    for step, whole in enumerate(single):
        parts = [shares[r][step] for r in range(3)]
        assert sorted(sum(parts, [])) == sorted(whole), f"step {step}: union != sample"
        assert len(set(sum(parts, []))) == len(whole), f"step {step}: shares overlap"
        assert max(map(len, parts)) - min(map(len, parts)) <= 1, "shares are balanced"
    with pytest.raises(ValueError, match="rank"):
        next(poisson_batches(n=5, sample_rate=0.5, steps=1, physical_batch_size=2,
                             generator=torch.Generator(), rank=2, world_size=2))


# ---------------------------------------------------------------------- one distributed step


def _step_worker(cases):
    """In each process: the gradient one logical step applies, for each (stage, per-rank
    chunks, C, sigma); all processes' results, by rank."""
    with distributed.process_group():
        torch.set_num_threads(1)
        rank = distributed.rank()
        out = []
        for stage_name, shares, clip, sigma in cases:
            stage = STAGES[stage_name]()
            opt = RecordingSGD(stage.model.parameters())
            trainer = make_trainer(stage.model, opt, mode=stage.mode, noise_multiplier=sigma,
                                   clip_norm=clip, expected_batch_size=EXPECTED_BATCH,
                                   noise_generator=torch.Generator().manual_seed(0),
                                   distributed=True)
            try:
                trainer.step_logical([torch.tensor(c) for c in shares[rank]], stage.loss)
            finally:
                trainer.close()
            assert len(opt.seen) == 1, "one optimizer step per logical step"
            out.append(opt.seen[0])
        return distributed.all_gather(out)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def reference(stage_name: str, shares) -> dict[int, list[torch.Tensor]]:
    """Each example's gradient alone; each process replays its own loss draws."""
    ref = {}
    for chunks in shares:
        ref.update(per_example_grads(STAGES[stage_name](), [torch.tensor(c) for c in chunks]))
    return ref


def clipped_sum(grads, clip: float) -> torch.Tensor:
    return sum(flat(g) * min(1.0, clip / (norm(g) + 1e-6)) for g in grads)


@pytest.mark.parametrize("stage_name", list(STAGES))
def test_two_processes_apply_the_clipped_sum_plus_one_noise_draw(stage_name):
    # every other example to each process, in physical chunks of 2
    split = [[[0, 2], [4, 6]], [[1, 3], [5]]]
    assert sorted(sum(sum(split, []), [])) == list(range(N_EXAMPLES))
    ref = reference(stage_name, split)
    clip, sigma = median_clip(ref), 3.0
    # the second process alone holds one example, clipped hard
    lone = 5
    tiny = 0.05 * min(norm(g) for g in ref.values())
    one_sided = [[], [[lone]]]
    cases = [(stage_name, split, clip, 0.0), (stage_name, split, clip, sigma),
             (stage_name, one_sided, tiny, 0.0)]
    by_rank = distributed.launch(WORLD, _step_worker, cases)

    # every process applies the very same gradient
    for case in range(len(cases)):
        for r in range(1, WORLD):
            assert torch.equal(flat(by_rank[0][case]), flat(by_rank[r][case])), (case, r)
    noiseless, noisy, lone_grad = (flat(g) for g in by_rank[0])

    # noiseless: the clipped per-example gradients of both processes, summed, over q n
    want = clipped_sum(ref.values(), clip) / EXPECTED_BATCH
    assert float((noiseless - want).norm() / want.norm()) < 1e-4
    norms = sorted(norm(g) for g in ref.values())
    assert norms[0] < clip < norms[-1], "some examples clipped, some not"

    # clipping on the process that adds no noise: its one example contributes norm C
    g = flat(reference(stage_name, one_sided)[lone])  # (the denoiser's draws differ here)
    got = lone_grad * EXPECTED_BATCH
    assert float(got.norm()) <= tiny * (1 + 1e-6)
    torch.testing.assert_close(got, g * tiny / (float(g.norm()) + 1e-6), rtol=1e-4,
                               atol=1e-6 * tiny)

    # noise: one draw of std sigma C in total (two would give sqrt(2) sigma C) ...
    resid = (noisy - noiseless) * EXPECTED_BATCH
    n = resid.numel()
    assert n > 2000
    assert float(resid.std()) == pytest.approx(sigma * clip, rel=6 / math.sqrt(2 * n))
    assert abs(float(resid.mean())) < 6 * sigma * clip / math.sqrt(n)
    # ... and the very draw a single process makes from the same noise generator
    single, _ = dp_step(STAGES[stage_name](), [], clip=clip, sigma=sigma, noise_seed=0)
    torch.testing.assert_close(resid, flat(single) * EXPECTED_BATCH, rtol=1e-4,
                               atol=1e-5 * sigma * clip)


# ------------------------------------------------------------------- several training steps


def _trajectory(stage_name: str, steps: int, sigma: float, distributed_: bool):
    """Parameters after each of `steps` DP-SGD steps on Poisson batches, the step losses, and
    the whole data set's loss before and after. (Plain SGD: Adam's normalisation would turn
    float rounding in a near-zero gradient coordinate into a visible difference.)"""
    stage = STAGES[stage_name]()
    opt = torch.optim.SGD(stage.model.parameters(), lr=0.5)
    trainer = make_trainer(stage.model, opt, mode=stage.mode, noise_multiplier=sigma,
                           clip_norm=1.0, expected_batch_size=4,
                           noise_generator=torch.Generator().manual_seed(1),
                           distributed=distributed_)
    everything = torch.arange(N_EXAMPLES)

    def whole_loss() -> float:
        with torch.no_grad():
            return float(stage.loss(stage.model, everything).mean())

    before = whole_loss()
    params, losses = [], []
    try:
        for chunks in poisson_batches(n=N_EXAMPLES, sample_rate=4 / N_EXAMPLES, steps=steps,
                                      physical_batch_size=2,
                                      generator=torch.Generator().manual_seed(2),
                                      rank=distributed.rank(),
                                      world_size=distributed.world_size()):
            losses.append(trainer.step_logical(chunks, stage.loss))
            params.append(torch.cat([p.detach().flatten() for p in stage.model.parameters()]))
    finally:
        trainer.close()
    return params, losses, before, whole_loss()


def _trajectory_worker(stage_names, steps, sigma):
    with distributed.process_group():
        torch.set_num_threads(1)
        return distributed.all_gather([_trajectory(s, steps, sigma, True) for s in stage_names])


def test_processes_hold_identical_parameters_and_follow_the_single_process_run():
    steps, sigma = 12, 0.05
    names = list(STAGES)
    by_rank = distributed.launch(WORLD, _trajectory_worker, names, steps, sigma)
    for i, name in enumerate(names):
        params, losses, before, after = by_rank[0][i]
        assert len(params) == steps
        for r in range(1, WORLD):
            other = by_rank[r][i]
            for step in range(steps):
                assert torch.equal(params[step], other[0][step]), (
                    f"{name}: process {r} differs from process 0 after step {step + 1}")
            assert other[1] == pytest.approx(losses, nan_ok=True), "the global batch's loss"
        start = torch.cat([p.detach().flatten() for p in STAGES[name]().model.parameters()])
        moved = [start, *params]
        assert all(not torch.equal(a, b) for a, b in zip(moved, moved[1:])), (
            f"{name}: every step moves the parameters")
        if not STAGES[name].random_loss:
            # the loss draws nothing at random: the same batches, clipped sums and noise as one
            # process, up to the order of floating-point sums
            solo, solo_losses, solo_before, _ = _trajectory(name, steps, sigma, False)
            for step in range(steps):
                torch.testing.assert_close(params[step], solo[step], rtol=1e-4, atol=1e-6)
            assert losses == pytest.approx(solo_losses, rel=1e-5, nan_ok=True)
            assert before == solo_before
            # (random images: the reconstruction loss cannot fall much below 0.5 here)
            assert after < 0.99 * before, f"{name}: training lowers the loss"


# ------------------------------------------------------------------ the command, end to end

N = 600
SMOKE = ["--preset", "smoke", "--epsilon", "2", "--delta", "1e-4", "--seed", "1", "--threads",
         "1", "--set", "privacy.accountant=rdp", "--set", "autoencoder.epochs=0.6",
         "--set", "diffusion.epochs=0.6", "--set", "diffusion.gaussian_base=true",
         "--set", "diffusion.gaussian_basis=4", "--no-progress"]
STEPS = 6  # per DP-SGD stage; the smoke preset checkpoints every 5


def cli(*args) -> tuple[int, str, str]:
    from dplatent.cli import main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    threads = torch.get_num_threads()
    with (mock.patch.object(sys, "argv", ["dplatent", *map(str, args)]),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "private.npz", N, seed=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> dict[int, Path]:
    """The same configuration trained by one process and by two."""
    out = {}
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "DPLATENT_KEEP_MALLOC": "1"}):
        for nproc in (1, WORLD):
            run = tmp_path_factory.mktemp("runs") / f"nproc{nproc}"
            code, stdout, err = cli("train", "--out", run, "--dataset", dataset, *SMOKE,
                                    "--no-grid", "--nproc", nproc)
            assert code == 0, err
            assert stdout.count("trained: epsilon=") == 1
            out[nproc] = run
    return out


def read(path: Path):
    return json.loads(path.read_text())


def test_two_processes_spend_exactly_the_single_process_epsilon(runs):
    one, two = (read(runs[k] / "privacy.json") for k in (1, WORLD))
    assert two["epsilon"] == one["epsilon"] and 0 < two["epsilon"] <= 2
    assert two == one  # the same entries: sigma, q, steps, C per stage
    assert {e["stage"]: e["steps"] for e in two["entries"]} == {
        "autoencoder": STEPS, GAUSSIAN_STAGE: 1, "diffusion": STEPS}
    cfg = read(runs[WORLD] / "config.json")
    assert cfg["derived"]["processes"] == WORLD
    assert read(runs[1] / "config.json")["derived"]["processes"] == 1
    assert cfg["derived"]["privacy_plan"] == read(runs[1] / "config.json")["derived"][
        "privacy_plan"]


def test_only_the_first_process_writes_and_training_follows_the_single_process_run(runs):
    logs = {k: [json.loads(line) for line in (runs[k] / "train_log.jsonl").read_text()
                .splitlines()] for k in runs}
    assert [(r["stage"], r["step"]) for r in logs[WORLD]] == [
        (r["stage"], r["step"]) for r in logs[1]], "one log line per step, not one per process"
    assert sorted(p.name for p in (runs[WORLD] / "checkpoints").iterdir()) == [
        "autoencoder.pt", "diffusion.pt", f"{GAUSSIAN_STAGE}.pt"]
    assert not list(runs[WORLD].glob("*.tmp*")) and (runs[WORLD] / "timings.json").is_file()
    # autoencoder (hooks, no random draws in the loss): the same batches and noise as one
    # process, so the same model up to the order of floating-point sums
    a = load_checkpoint(checkpoint_path(runs[1], "autoencoder"))
    b = load_checkpoint(checkpoint_path(runs[WORLD], "autoencoder"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)
    # the latent Gaussians: one release, the single process's draw (every process computes
    # the same sums of the same latents, in the basis the main process took from its decoder,
    # and adds the same noise draw)
    g1, g2 = (load_checkpoint(checkpoint_path(runs[k], GAUSSIAN_STAGE)) for k in (1, WORLD))
    assert g2["basis"].shape == (2 * 7 * 7, 4)  # the smoke latent: 2 channels at 7 x 7
    for k in ("basis", "means", "covs"):
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5)
    # denoiser: each process draws its own diffusion times and noise, so it differs from
    # the single-process model, but it was trained (not left at its initial weights)
    d1 = load_checkpoint(checkpoint_path(runs[1], "diffusion"))
    d2 = load_checkpoint(checkpoint_path(runs[WORLD], "diffusion"))
    assert d2["step"] == STEPS and len(d2["loss_rng_ranks"]) == WORLD
    assert "loss_rng_ranks" not in d1
    assert not torch.equal(d2["loss_rng_ranks"][0], d2["loss_rng_ranks"][1])
    assert any(not torch.equal(d1["model"][k], d2["model"][k]) for k in d1["model"])
    assert all(math.isfinite(r["loss"]) for r in logs[WORLD])


def test_a_two_process_run_samples_like_any_run(runs, tmp_path):
    out = tmp_path / "synth.npz"
    code, _, err = cli("sample", "--run", runs[WORLD], "--num", 20, "--out", out,
                       "--no-progress")
    assert code == 0, err
    with np.load(out) as z:
        assert z["x"].shape == (20, 28, 28) and z["x"].dtype == np.uint8


def test_nproc_must_match_the_launcher(monkeypatch, tmp_path):
    with pytest.raises(DplatentError, match="--nproc must be >= 1, got 0"):
        distributed.train(0, dataset="mnist", data_dir=None, cfg=None, run_dir=tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DplatentError, match="--nproc 2 but the launcher started 3"):
        with distributed.process_group(2):
            pass


@pytest.mark.parametrize("text", ["0", "-5", "soon", "inf", "nan"])
def test_the_collective_timeout_must_be_a_positive_number_of_seconds(monkeypatch, text):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
    with pytest.raises(DplatentError, match=f"{distributed.TIMEOUT_ENV}={text!r} is not a "
                                            "positive number of seconds"):
        distributed.collective_timeout()


def test_the_collective_timeout_is_read_in_seconds(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.collective_timeout().total_seconds() == 2.5
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.collective_timeout() is None  # torch's default


def _one_process_late(delay: float) -> None:
    """Rank 1 reaches the barrier `delay` seconds after rank 0."""
    import time
    with distributed.process_group():
        if distributed.rank() == 1:
            time.sleep(delay)
        distributed.barrier()


def test_a_process_that_does_not_arrive_fails_the_run_after_the_collective_timeout(
        monkeypatch):
    import time
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2")
    start = time.monotonic()
    with pytest.raises(DplatentError, match=r"training process 0 failed: .*Timed out.*another "
                                            r"process did not reach .*in time; \$" +
                                            distributed.TIMEOUT_ENV):
        distributed.launch(WORLD, _one_process_late, 60.0)
    assert time.monotonic() - start < 45  # not the 60 s rank 1 sleeps


def test_a_late_process_makes_the_same_release_decision_as_the_main_one(monkeypatch,
                                                                           tmp_path):
    """Two ranks as threads around `release_gaussians`, rank 1 arriving late (as when it
    encodes more slowly): it must not find the release the main process has just written,
    load it and skip the barrier the main process waits at (which hung a two-process run)."""
    import threading
    import time

    from dplatent import config
    from dplatent.privacy.accounting import plan
    from dplatent.privacy.ledger import Ledger
    from dplatent.train import stages

    cfg = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                   "diffusion.gaussian_base": "true"})
    p = plan(300, cfg, 3)
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    local, gate = threading.local(), threading.Barrier(2, timeout=20)
    monkeypatch.setattr(distributed, "is_main", lambda: local.rank == 0)
    monkeypatch.setattr(distributed, "barrier", gate.wait)
    out, errors = {}, []

    def rank(r: int) -> None:
        local.rank = r
        if r == 1:
            time.sleep(1.0)  # the main process has released and written by now, unless it waits
        try:
            ledger = Ledger(accountant="rdp", target_epsilon=p.target_epsilon, delta=p.delta)
            out[r] = (stages.release_gaussians(latents, labels, 3, cfg, p, ledger, tmp_path),
                      [e.stage for e in ledger.events])
        except Exception as exc:  # noqa: BLE001 - reported below, with the rank
            errors.append((r, exc))
            gate.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert out[0][1] == out[1][1] == [GAUSSIAN_STAGE]
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)  # the same draw on both ranks


class Crash(Exception):
    """Stands in for the processes dying."""


def _crashing_train(kwargs, at_step):
    """Both processes stop during denoiser step `at_step` (after the checkpoint before it)."""
    from dplatent.privacy.dp_training import DPTrainer
    real, seen = DPTrainer.step_logical, []

    def step(self, chunks, loss_fn):
        if self.mode == "ghost":
            seen.append(1)
            if len(seen) == at_step:
                raise Crash(f"stopped at denoiser step {at_step}")
        return real(self, chunks, loss_fn)
    DPTrainer.step_logical = step
    return distributed._train_worker(kwargs)


@pytest.mark.slow
def test_two_process_runs_resume_exactly(runs, dataset, tmp_path):
    from dplatent import config
    whole = runs[WORLD]
    saved = read(whole / "config.json")
    saved.pop("derived")
    cfg = config.from_dict(saved)

    # a finished run: resuming changes nothing
    before = {s: load_checkpoint(checkpoint_path(whole, s))
              for s in ("autoencoder", GAUSSIAN_STAGE, "diffusion")}
    code, _, err = cli("train", "--resume", "--out", whole, "--no-grid", "--no-progress",
                       "--nproc", WORLD)
    assert code == 0, err
    for s, ck in before.items():
        assert_same_state(load_checkpoint(checkpoint_path(whole, s)), ck, s)

    # stopped mid-stage, then resumed: the very states of the uninterrupted run
    run = tmp_path / "run"
    kwargs = dict(dataset=str(dataset), data_dir=None, cfg=cfg, run_dir=run, resume=False,
                  progress=False)
    with pytest.raises(DplatentError, match="Crash: stopped at denoiser step 6"):
        distributed.launch(WORLD, _crashing_train, kwargs, STEPS)
    assert {e["stage"]: e["steps"] for e in read(run / "privacy.json")["entries"]} == {
        "autoencoder": STEPS, GAUSSIAN_STAGE: 1, "diffusion": 5}
    assert load_checkpoint(checkpoint_path(run, "diffusion"))["step"] == 5
    code, _, err = cli("train", "--resume", "--out", run, "--no-grid", "--no-progress",
                       "--nproc", WORLD)
    assert code == 0, err
    assert read(run / "privacy.json") == read(whole / "privacy.json")
    for s in ("autoencoder", GAUSSIAN_STAGE, "diffusion"):
        assert_same_state(load_checkpoint(checkpoint_path(run, s)),
                          load_checkpoint(checkpoint_path(whole, s)), s)
