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

import math
import os
from unittest import mock

import pytest
import torch
from test_dp_training import (EXPECTED_BATCH, N_EXAMPLES, STAGES, RecordingSGD, dp_step,
                              median_clip, norm, per_example_grads)

from dplatent.privacy.dp_training import make_trainer, poisson_batches
from dplatent.train import distributed

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing",
                                         "ignore::DeprecationWarning:diffusers")]

WORLD = 2


@pytest.fixture(autouse=True)
def one_thread_per_process():
    """The launched processes inherit the environment: one thread each."""
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "DPLATENT_KEEP_MALLOC": "1"}):
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
        if STAGES[name].mode == "hooks":
            # the loss draws nothing at random: the same batches, clipped sums and noise as one
            # process, up to the order of floating-point sums
            solo, solo_losses, solo_before, _ = _trajectory(name, steps, sigma, False)
            for step in range(steps):
                torch.testing.assert_close(params[step], solo[step], rtol=1e-4, atol=1e-6)
            assert losses == pytest.approx(solo_losses, rel=1e-5, nan_ok=True)
            assert before == solo_before
            # (random images: the reconstruction loss cannot fall much below 0.5 here)
            assert after < 0.99 * before, f"{name}: training lowers the loss"
