"""Class-conditional denoisers of the latent: a residual MLP on the flat latent (default) and
a residual convolutional net on the latent's map (`diffusion.architecture = "conv"`).

The MLP is chosen for quality per CPU-second under DP-SGD: its layers are Linear and Embedding
only, for which Opacus' ghost clipping computes per-example gradient norms without
materialising per-example gradients. LayerNorm has no affine parameters, so every weight is
ghost-clippable.
Inputs may carry an extra axis of K noise draws per example ([B, K, D]): Linear layers treat it
as a sequence, and the per-example gradient covers all K draws.

Label index `num_classes` is the null label used for classifier-free guidance.

The convolutional net keeps the latent's C x H x W layout, so neighbouring latent positions
(neighbouring image regions) are modelled by shared local filters instead of one dense map.
Its 3x3 convolutions run as F.conv2d over all of an example's K noise draws; their
per-example gradient (privacy/grad_samplers.py) sums over the draws, so they stay inside that
example (an Opacus Conv2d would see B*K separate inputs). Its normalisations have no parameters.
It needs per-example gradients from hooks (grad mode 'hooks'), not ghost clipping.

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


class Conditioned(nn.Module):
    """What both denoisers share: the null label, and the conditioning vector of (timestep,
    label) from their `time`, `label` and `cond` layers, which each sets up at its width."""

    num_classes: int
    time_dim: int

    @property
    def null_label(self) -> int:
        return self.num_classes

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.cond(F.silu(self.time(timestep_embedding(t, self.time_dim))
                                + self.label(y)))


class Denoiser(Conditioned):
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

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: [..., D]; t and y: [...] matching z's leading axes."""
        cond = self.condition(t, y)
        h = self.inp(z)
        for block in self.blocks:
            h = block(h, cond)
        out = self.out(F.silu(self.norm(h)))
        return out if self.base is None else out + self.base(z, t, y)


def _group_norm(h: torch.Tensor, groups: int) -> torch.Tensor:
    """Parameter-free GroupNorm of [..., C, H, W] (any leading axes)."""
    return F.group_norm(h.reshape(-1, *h.shape[-3:]), groups).view_as(h)


class PatchConv(nn.Conv2d):
    """A k x k convolution with zero padding k // 2 on [..., C, H, W]: any leading axes (an
    example's K noise draws) are folded into the batch of the Conv2d. Its per-example
    gradient, which sums over the leading axes after the first, is registered with Opacus for
    this class in privacy/grad_samplers.py (Opacus' Conv2d one would give one per draw).
    Conv2d's initialisation is that of the Linear on unfolded patches this layer was until
    2026-12-06 (same draws, same values); checkpoints of that layout load (below)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead, (c, height, width) = h.shape[:-3], h.shape[-3:]
        # channels-last: sampling 1.17x faster on CPU, the DP step as fast (BENCHMARKS.md);
        # the output stays channels-last, which the norms and activations after it keep
        h = h.reshape(-1, c, height, width).contiguous(memory_format=torch.channels_last)
        return super().forward(h).reshape(*lead, -1, height, width)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before 2026-12-06 hold a Linear on patches: `linear.weight`
        # [C_out, C_in k k] (the same numbers as `weight`) and `linear.bias`
        for name in ("weight", "bias"):
            old = prefix + "linear." + name
            if old in state_dict:
                param = getattr(self, name)
                state_dict[prefix + name] = state_dict.pop(old).reshape(param.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConvBlock(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.groups = groups
        self.film = nn.Linear(width, 2 * width)
        self.conv1 = PatchConv(width, width)
        self.conv2 = PatchConv(width, width)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[..., None, None].chunk(2, dim=-3)
        a = F.silu(_group_norm(h, self.groups) * (1 + scale) + shift)
        return h + self.conv2(F.silu(_group_norm(self.conv1(a), self.groups)))


def _halve(h: torch.Tensor) -> torch.Tensor:
    """2 x 2 average pooling of [..., C, H, W]; an odd side keeps its last row or column as a
    window of its own (ceil mode), so 7 x 7 becomes 4 x 4."""
    lead, chw = h.shape[:-3], h.shape[-3:]
    out = F.avg_pool2d(h.reshape(-1, *chw), 2, ceil_mode=True)
    return out.reshape(*lead, *out.shape[-3:])


def _expand(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of [..., C, h, w] to [..., C, *size] (_halve's inverse
    layout: each coarse position fills the window it was pooled from)."""
    lead, chw = h.shape[:-3], h.shape[-3:]
    out = F.interpolate(h.reshape(-1, *chw), size=size, mode="nearest")
    return out.reshape(*lead, chw[0], *size)


class ConvDenoiser(Conditioned):
    """Predicts the noise epsilon from (noisy flat latent, timestep, label), on the latent's
    map `shape` = (C, H, W). `width` channels throughout, `blocks` residual blocks of two 3x3
    convolutions each, FiLM-conditioned on timestep and label. The output convolution starts
    at zero (with a base: training starts from the Gaussian model, as for the MLP).

    With `coarse_blocks` > 0, a second level sits between the first and the second half of
    the blocks: the map is average-pooled to half its resolution, passed through that many
    blocks, and what they add is upsampled (nearest) and added back (a one-step U-Net)."""

    GROUPS = 8

    def __init__(self, *, shape: tuple[int, int, int], num_classes: int, width: int,
                 blocks: int, coarse_blocks: int = 0, time_dim: int = 128,
                 base: nn.Module | None = None):
        super().__init__()
        if width % self.GROUPS:
            raise ValueError(f"width must be a multiple of {self.GROUPS}, got {width}")
        if coarse_blocks < 0:
            raise ValueError(f"coarse_blocks must be >= 0, got {coarse_blocks}")
        self.shape, self.num_classes, self.time_dim = tuple(shape), num_classes, time_dim
        self.dim = int(math.prod(shape))
        self.inp = PatchConv(shape[0], width)
        self.time = nn.Linear(time_dim, width)
        self.label = nn.Embedding(num_classes + 1, width)
        self.cond = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ConvBlock(width, self.GROUPS) for _ in range(blocks))
        self.coarse = nn.ModuleList(ConvBlock(width, self.GROUPS) for _ in range(coarse_blocks))
        self.out = PatchConv(width, shape[0])
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.base = base

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: [..., D] (D = C H W); t and y: [...] matching z's leading axes."""
        cond = self.condition(t, y)
        h = self.inp(z.reshape(*z.shape[:-1], *self.shape))
        split = len(self.blocks) // 2 if len(self.coarse) else len(self.blocks)
        for block in self.blocks[:split]:
            h = block(h, cond)
        if len(self.coarse):
            c = pooled = _halve(h)
            for block in self.coarse:
                c = block(c, cond)
            h = h + _expand(c - pooled, self.shape[1:])
        for block in self.blocks[split:]:
            h = block(h, cond)
        out = self.out(F.silu(_group_norm(h, self.GROUPS))).reshape(z.shape)
        return out if self.base is None else out + self.base(z, t, y)


# Either architecture: what `diffusion.architecture` builds (train/stages.py).
LatentDenoiser = Denoiser | ConvDenoiser
