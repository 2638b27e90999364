"""Per-example denoising loss with noise multiplicity (DPDM).

Each private example contributes one loss value: the mean over K independent (timestep, noise)
draws of the epsilon-prediction error. Averaging inside the example, before clipping, lowers
the variance of the example's gradient at no privacy cost, since the sensitivity is still one
clipped gradient per example.
"""

from __future__ import annotations

import torch
from torch import nn


def denoising_loss(model: nn.Module, z0: torch.Tensor, y: torch.Tensor, *,
                   alphas_cumprod: torch.Tensor, multiplicity: int, label_dropout: float,
                   null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """z0: [B, D] clean latents, y: [B] labels -> loss per example [B]."""
    b, d = z0.shape
    k = multiplicity
    t = torch.randint(0, len(alphas_cumprod), (b, k), generator=generator)
    noise = torch.randn(b, k, d, generator=generator)
    ab = alphas_cumprod[t].unsqueeze(-1)
    zt = ab.sqrt() * z0.unsqueeze(1) + (1 - ab).sqrt() * noise
    labels = y.unsqueeze(1).expand(b, k)
    if label_dropout > 0:
        drop = torch.rand(b, k, generator=generator) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    pred = model(zt, t, labels)
    return (pred - noise).pow(2).mean(dim=(1, 2))
