"""Class-conditional residual-MLP denoiser on the flat latent.

Chosen for quality per CPU-second under DP-SGD: its layers are Linear and Embedding only, for
which Opacus' ghost clipping computes per-example gradient norms without materialising
per-example gradients. LayerNorm has no affine parameters, so every weight is ghost-clippable.
Inputs may carry an extra axis of K noise draws per example ([B, K, D]): Linear layers treat it
as a sequence, and the per-example gradient covers all K draws.

Label index `num_classes` is the null label used for classifier-free guidance.

With a `base` (diffusion/gaussian_base.py: the exact denoiser of the DP class Gaussians) the
network's output is added to the base's, and the output layer starts at zero, so training
starts from the Gaussian model and learns only the correction.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, hidden: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden * expansion)
        self.fc2 = nn.Linear(hidden * expansion, hidden)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        a = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(F.silu(a))))


class Denoiser(nn.Module):
    """Predicts the noise epsilon from (noisy latent, timestep, label)."""

    def __init__(self, *, dim: int, num_classes: int, hidden: int, blocks: int, expansion: int,
                 time_dim: int = 128, base: nn.Module | None = None):
        super().__init__()
        self.dim, self.num_classes, self.time_dim = dim, num_classes, time_dim
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(time_dim, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.cond = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, expansion) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out = nn.Linear(hidden, dim)
        self.base = base
        if base is not None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: [..., D]; t and y: [...] matching z's leading axes."""
        cond = self.cond(F.silu(self.time(timestep_embedding(t, self.time_dim))
                                + self.label(y)))
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, cond)
        out = self.out(F.silu(self.norm(h)))
        return out if self.base is None else out + self.base(z, t, y)
