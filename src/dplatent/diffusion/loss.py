"""Per-example denoising loss with noise multiplicity (DPDM).

Targets: 'v' (default) predicts v = sqrt(a) eps - sqrt(1 - a) z0 (a = alpha-bar of the
timestep). Unlike epsilon-prediction, a v-predictor never has to reproduce its input: at high
noise v ~ -z0 (a class mean), at low noise the error in v is scaled down by sqrt(1 - a) when
z0 is recovered. Under DP-SGD's gradient noise this matters: an epsilon-predictor that cannot
learn the identity at high noise makes the first sampling steps diverge. Unweighted v-loss is
the epsilon-loss weighted by (SNR + 1), close to EDM's weighting.

Each private example contributes one loss value: the mean over K independent (timestep, noise)
draws of the epsilon-prediction error. Averaging inside the example, before clipping, lowers
the variance of the example's gradient at no privacy cost, since the sensitivity is still one
clipped gradient per example.

Timesteps are drawn as t = floor(T u^skew) with u uniform on [0, 1): skew 1 is the usual
uniform draw; skew > 1 spends more of the draws at low noise. The draw is independent of the
data, so it changes what is learned, not the privacy analysis.
"""

from __future__ import annotations

import torch
from torch import nn


def denoising_loss(model: nn.Module, z0: torch.Tensor, y: torch.Tensor, *,
                   alphas_cumprod: torch.Tensor, multiplicity: int, label_dropout: float,
                   null_label: int, prediction: str = "v", timestep_skew: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z0: [B, D] clean latents, y: [B] labels -> loss per example [B]."""
    b, d = z0.shape
    k = multiplicity
    dev = z0.device  # the generator, if given, lives on the same device
    t = draw_timesteps((b, k), len(alphas_cumprod), timestep_skew, generator, dev)
    noise = torch.randn(b, k, d, generator=generator, device=dev)
    ab = alphas_cumprod[t].unsqueeze(-1)
    zt = ab.sqrt() * z0.unsqueeze(1) + (1 - ab).sqrt() * noise
    labels = y.unsqueeze(1).expand(b, k)
    if label_dropout > 0:
        drop = torch.rand(b, k, generator=generator, device=dev) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    pred = model(zt, t, labels)
    target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z0[:, None]
    return (pred - target).pow(2).mean(dim=(1, 2))


def draw_timesteps(shape: tuple[int, ...], num_timesteps: int, skew: float,
                   generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Integer timesteps floor(T u^skew) in [0, T); uniform for skew 1."""
    if skew == 1.0:
        return torch.randint(0, num_timesteps, shape, generator=generator, device=device)
    u = torch.rand(shape, generator=generator, device=device)
    return (num_timesteps * u.pow(skew)).long().clamp_max(num_timesteps - 1)
