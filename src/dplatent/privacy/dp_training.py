"""DP-SGD wiring on stock Opacus: per-example clipping, Gaussian noise, Poisson sampling.

One logical step = one Poisson-sampled batch (each example in with probability q), processed
in physical chunks whose clipped per-example gradients are summed; noise N(0, (sigma C)^2) is
added once per logical step, then the sum is divided by the expected batch size q n.

Two ways to get per-example gradient norms, both from Opacus:
  'hooks' - per-example gradients from module hooks (any layer Opacus supports; convs);
  'ghost' - ghost clipping: norms without materialising per-example gradients (Linear and
            Embedding layers), then a second backward pass on the clip-weighted loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from dplatent.errors import ConfigError

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

    def backward(self, loss_per_example: torch.Tensor) -> None:
        if self.mode == "ghost":
            DPTensorFastGradientClipping(self.module, self.optimizer, loss_per_example,
                                         "mean").backward()
        else:
            loss_per_example.mean().backward()

    def step_logical(self, chunks: list[torch.Tensor],
                     loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> float:
        """One DP-SGD step over a logical batch given as index chunks; returns the mean loss."""
        total, count = 0.0, 0
        if not chunks:  # empty Poisson batch: still a noisy step, as the analysis assumes
            self._zero_contribution()
            self.optimizer.signal_skip_step(do_skip=False)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        for j, chunk in enumerate(chunks):
            self.optimizer.signal_skip_step(do_skip=j < len(chunks) - 1)
            loss = loss_fn(self.module, chunk)
            self.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach().sum())
            count += len(chunk)
        return total / count

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
                 noise_generator: torch.Generator | None = None) -> DPTrainer:
    if mode not in GRAD_MODES:
        raise ConfigError(f"unknown per-example gradient mode {mode!r}; choose {GRAD_MODES}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors}")
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean",
                  generator=noise_generator)
    if mode == "ghost":
        module = GradSampleModuleFastGradientClipping(model, batch_first=True,
                                                      loss_reduction="mean",
                                                      max_grad_norm=clip_norm,
                                                      use_ghost_clipping=True)
        dp_opt = DPOptimizerFastGradientClipping(optimizer, **common)
    else:
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        dp_opt = DPOptimizer(optimizer, **common)
    return DPTrainer(module=module, raw=model, optimizer=dp_opt, mode=mode)


def poisson_batches(*, n: int, sample_rate: float, steps: int, physical_batch_size: int,
                    generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """For each of `steps` logical steps, the Poisson-sampled indices split into chunks."""
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate,
                                            generator=generator, steps=steps)
    for idx in sampler:
        idx = torch.as_tensor(idx, dtype=torch.long)
        yield list(idx.split(physical_batch_size)) if len(idx) else []
