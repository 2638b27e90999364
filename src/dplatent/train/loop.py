"""One DP training loop for both stages: step, EMA, checkpoint, resume, progress, log.

Checkpoint policy (what makes resume sound): a stage's checkpoint holds the model, optimizer,
EMA, the step count and every random generator's state. Right before a checkpoint is written
(atomically), the ledger entry of the stage is set to that step count and saved (atomically).
So the ledger counts the DP steps whose results are in a saved model, and never fewer (a crash
between the two writes leaves it ahead by one checkpoint interval, never behind). Steps computed
after the last checkpoint and lost in a crash never reach any output; on resume they are
redone from the checkpoint. On resume the ledger is rebuilt from the checkpoints, which undoes
the over-count of a crash between the two writes.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from dplatent.io import atomic_write
from dplatent.privacy.accounting import StagePlan
from dplatent.privacy.dp_training import make_trainer, poisson_batches
from dplatent.privacy.ledger import Ledger
from dplatent.train import distributed

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class StageSettings:
    name: str
    plan: StagePlan
    lr: float
    physical_batch_size: int
    grad_mode: str             # 'hooks' or 'ghost'
    ema_decay: float | None    # None: no EMA
    checkpoint_every: int
    seed: int


def ema_decay_at(decay: float, updates: int) -> float:
    """EMA decay with warm-up: min(decay, (1 + k) / (10 + k)) after k updates, so a short run's
    average is not dominated by the initial weights."""
    return min(decay, (1 + updates) / (10 + updates))


def ema_avg_fn(decay: float):
    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor):
        d = ema_decay_at(decay, int(num_averaged))
        return d * averaged + (1 - d) * current
    return avg


def checkpoint_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{stage}.pt"


def match_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter optimizer state (Adam's moments) its parameter's shape where
    only the layout differs: checkpoints written before 2026-12-06 hold the conv denoiser's
    weights as 2-D Linear matrices (the same numbers, models/denoiser.py PatchConv)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if (torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape
                        and value.numel() == param.numel()):
                    optimizer.state[param][key] = value.reshape(param.shape)


def load_checkpoint(path: Path) -> dict:
    """Load tensors and plain containers only (weights_only=True refuses pickled objects)."""
    from dplatent.errors import DplatentError
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # One line; torch's own message suggests weights_only=False, which would run the code.
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = re.search(r"WeightsUnpickler error: (.*)", text)
        reason = (f"it holds a pickled object ({found.group(1)}), not only tensors" if found
                  else detail.group(1) if detail
                  else (text.strip().splitlines() or [type(exc).__name__])[0])
        raise DplatentError(f"{path}: cannot load checkpoint safely ({reason})") from exc


def stage_steps_done(run_dir: Path, stage: str) -> int:
    path = checkpoint_path(run_dir, stage)
    return int(load_checkpoint(path)["step"]) if path.is_file() else 0


def _rank_seed(*parts: int) -> int:
    """A seed for one process's own random stream, from the stage seed, rank (and step)."""
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


def _log(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train_stage(model: nn.Module, n: int, loss_fn: LossFn, s: StageSettings, ledger: Ledger,
                run_dir: Path, progress: bool = True) -> nn.Module:
    """Train `model` under DP-SGD for s.plan.steps steps (resuming if a checkpoint exists).

    `loss_fn(module, indices, generator)` returns the per-example losses of those records.
    Returns the model to use downstream: the EMA copy when s.ema_decay is set.

    In a process group (train/distributed.py) every process calls this; each computes its
    share of every logical batch, and only the main process writes files.
    """
    plan = s.plan
    ema = (AveragedModel(model, avg_fn=ema_avg_fn(s.ema_decay))
           if s.ema_decay is not None else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    # Poisson sampling draws indices on the CPU; gradient noise and the loss's draws are made
    # on the model's device, so their generators live there.
    device = next(model.parameters()).device
    sample_gen = torch.Generator().manual_seed(s.seed * 2 + 1)
    noise_gen = torch.Generator(device=device).manual_seed(s.seed * 2 + 2)
    loss_gen = torch.Generator(device=device).manual_seed(s.seed * 2 + 3)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    if rank > 0:  # the loss's draws (diffusion times, noise) for this process's own examples
        loss_gen.manual_seed(_rank_seed(s.seed * 2 + 3, rank))
    start = 0
    path = checkpoint_path(run_dir, s.name)
    if path.is_file():
        ck = load_checkpoint(path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        match_state_shapes(optimizer)
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        for gen, key in ((sample_gen, "sample_rng"), (noise_gen, "noise_rng"),
                         (loss_gen, "loss_rng")):
            gen.set_state(ck[key])
        start = int(ck["step"])
        per_rank = ck.get("loss_rng_ranks")
        if world > 1 and per_rank is not None and len(per_rank) == world:
            loss_gen.set_state(per_rank[rank])
        elif rank > 0:  # saved by another number of processes: a fresh stream of its own
            loss_gen.manual_seed(_rank_seed(s.seed * 2 + 3, rank, start))
        ledger.record(plan.event(steps=start))
        if main:
            ledger.save(run_dir)
    if start >= plan.steps:
        return _final(model, ema)

    trainer = make_trainer(model, optimizer, mode=s.grad_mode,
                           noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                           expected_batch_size=plan.batch_size, noise_generator=noise_gen,
                           distributed=world > 1)
    def save(step: int) -> float | None:
        loss_states = distributed.all_gather(loss_gen.get_state())  # every process calls save
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "ema": ema.state_dict() if ema is not None else {}, "step": step,
                 "sample_rng": sample_gen.get_state(), "noise_rng": noise_gen.get_state(),
                 "loss_rng": loss_gen.get_state()}
        if world > 1:
            state["loss_rng_ranks"] = loss_states
        # Ledger first: a crash between the two writes leaves the ledger counting more steps
        # than the checkpoint holds (safe; fixed on resume), never fewer.
        ledger.record(plan.event(steps=step))
        if not main:
            return None
        spent = ledger.save(run_dir)["epsilon"]
        atomic_write(path, lambda p: torch.save(state, p))
        return spent

    def bound_loss(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(module, idx, loss_gen)

    model.train()
    t0 = time.time()
    log_every = max(1, plan.steps // 100)
    bar = tqdm(total=plan.steps, initial=start, desc=s.name, unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    batches = poisson_batches(n=n, sample_rate=plan.sample_rate, steps=plan.steps - start,
                              physical_batch_size=s.physical_batch_size, generator=sample_gen,
                              rank=rank, world_size=world)
    running, spent = None, ledger.reported_epsilon()  # None: a non-private control run
    for step, chunks in enumerate(batches, start=start + 1):
        loss = trainer.step_logical(chunks, bound_loss)
        if ema is not None:
            ema.update_parameters(model)
        if loss == loss:  # not NaN (empty batch)
            running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % s.checkpoint_every == 0 or step == plan.steps:
            saved = save(step)
            if main:  # the other processes write nothing and keep the value they had
                spent = saved
        if step % log_every == 0 or step == plan.steps:
            # epsilon: the ledger's total for the steps saved so far (all stages).
            bar.set_postfix(loss="n/a" if running is None else f"{running:.4f}",
                            eps="NOT PRIVATE" if spent is None else f"{spent:.2f}")
            if main:
                _log(run_dir, {"stage": s.name, "step": step, "loss": running,
                               "epsilon": spent, "time": time.time() - t0})
        bar.update(1)
    bar.close()
    trainer.close()
    distributed.barrier()  # the stage's last checkpoint is written before any process goes on
    return _final(model, ema)


def final_weights(checkpoint: dict) -> dict:
    """The weights a stage hands on, from its checkpoint: the EMA's when the stage keeps one
    (`_final`), else the last iterate's."""
    ema = checkpoint.get("ema") or {}
    state = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return state or checkpoint["model"]


def _final(model: nn.Module, ema: AveragedModel | None) -> nn.Module:
    out = copy.deepcopy(ema.module if ema is not None else model)
    out.eval()
    return out
