"""DP-SGD wiring on stock Opacus: per-example clipping, Gaussian noise, Poisson sampling.

One logical step = one Poisson-sampled batch (each example in with probability q), processed
in physical chunks whose clipped per-example gradients are summed; noise N(0, (sigma C)^2) is
added once per logical step, then the sum is divided by the expected batch size q n.

Two ways to get per-example gradient norms, both from Opacus:
  'hooks' - per-example gradients from module hooks (any layer Opacus supports; convs);
  'ghost' - ghost clipping: norms without materialising per-example gradients (Linear and
            Embedding layers), then a second backward pass on the clip-weighted loss.

Several processes (`distributed=True`, inside an initialised torch.distributed process group;
see dplatent.train.distributed): the model is wrapped in Opacus' DPDDP, which broadcasts rank
0's parameters once and leaves gradient communication to Opacus' distributed DP optimizers
(DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping). Each process clips its own
examples' gradients and sums them; rank 0 alone adds the noise; the optimizer all-reduces the
sums, so the result is the single-process one: (sum of all clipped gradients + one draw of
N(0, (sigma C)^2)) / expected batch size. PyTorch's own DistributedDataParallel is not used: it
would all-reduce the unclipped gradients in every backward pass (twice per chunk with ghost
clipping), on top of the optimizer's reduction of the clipped sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from dplatent.errors import ConfigError
from dplatent.privacy import grad_samplers  # noqa: F401  (registers PatchConv's sampler)

GRAD_MODES = ("hooks", "ghost")
# Opacus' hooks fire on module outputs when the input needs no gradient (always, here).
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class DPTrainer:
    """A model wrapped for per-example gradients and its DP optimizer."""

    module: nn.Module               # the wrapped module: call it in the loss
    raw: nn.Module                  # the plain model (shares parameters)
    optimizer: DPOptimizer
    mode: str
    distributed: bool = False       # one of several processes (see the module docstring)

    def backward(self, loss_per_example: torch.Tensor) -> None:
        if self.mode == "ghost":
            DPTensorFastGradientClipping(self.module, self.optimizer, loss_per_example,
                                         "mean").backward()
        else:
            loss_per_example.mean().backward()

    def step_logical(self, chunks: list[torch.Tensor],
                     loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> float:
        """One DP-SGD step over a logical batch given as index chunks; returns the mean loss.

        With several processes, `chunks` are this process's share of the logical batch; every
        process must call this once per logical step (an empty share too), and the returned
        loss is the mean over the whole logical batch."""
        total, count = 0.0, 0
        if not chunks:  # empty Poisson batch (or share): still a noisy step, as assumed
            self._zero_contribution()
            self.optimizer.signal_skip_step(do_skip=False)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for j, chunk in enumerate(chunks):
            self.optimizer.signal_skip_step(do_skip=j < len(chunks) - 1)
            loss = loss_fn(self.module, chunk)
            self.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach().sum())
            count += len(chunk)
        if self.distributed:
            both = torch.tensor([total, count], dtype=torch.float64,
                                device=self.optimizer.params[0].device)
            torch.distributed.all_reduce(both)
            total, count = float(both[0]), int(both[1])
        return total / count if count else float("nan")

    def close(self) -> None:
        """Detach Opacus' hooks and per-example attributes from the plain model."""
        self.module.remove_hooks()
        self.module.cleanup()

    def _zero_contribution(self) -> None:
        for p in self.optimizer.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def make_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str,
                 noise_multiplier: float, clip_norm: float, expected_batch_size: int,
                 noise_generator: torch.Generator | None = None,
                 distributed: bool = False) -> DPTrainer:
    """`expected_batch_size` is that of the whole logical batch (q n), over all processes.

    `distributed`: this process is one of the torch.distributed group's; all of them must call
    this with the same arguments. Only rank 0's `noise_generator` is used."""
    if mode not in GRAD_MODES:
        raise ConfigError(f"unknown per-example gradient mode {mode!r}; choose {GRAD_MODES}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors}")
    if distributed:
        # Opacus' convention: the optimizer divides by the per-process expected batch size,
        # then averages the all-reduced sums over the processes.
        expected_batch_size = expected_batch_size / torch.distributed.get_world_size()
        wrapped = DPDDP(model)  # broadcasts rank 0's parameters
    else:
        wrapped = model
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean",
                  generator=noise_generator)
    if mode == "ghost":
        module = GradSampleModuleFastGradientClipping(wrapped, batch_first=True,
                                                      loss_reduction="mean",
                                                      max_grad_norm=clip_norm,
                                                      use_ghost_clipping=True)
    else:
        module = GradSampleModule(wrapped, batch_first=True, loss_reduction="mean")
    optimizer_class = get_optimizer_class(clipping="flat", distributed=distributed,
                                          grad_sample_mode=mode)
    dp_opt = optimizer_class(optimizer, **common)
    return DPTrainer(module=module, raw=model, optimizer=dp_opt, mode=mode,
                     distributed=distributed)


def poisson_batches(*, n: int, sample_rate: float, steps: int, physical_batch_size: int,
                    generator: torch.Generator, rank: int = 0,
                    world_size: int = 1) -> Iterator[list[torch.Tensor]]:
    """For each of `steps` logical steps, the Poisson-sampled indices split into chunks.

    With several processes, each one passes a generator in the same state: all draw the same
    Poisson sample of the whole data set (each record in with probability `sample_rate`, the
    very sample a single process draws), and process `rank` keeps every `world_size`-th index
    of it from its `rank`-th on. The shares are disjoint and their union is the sample."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate,
                                            generator=generator, steps=steps)
    for idx in sampler:
        idx = torch.as_tensor(idx, dtype=torch.long)
        if world_size > 1:
            idx = idx[rank::world_size]
        yield list(idx.split(physical_batch_size)) if len(idx) else []
