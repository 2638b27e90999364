"""Sampling latents from a trained denoiser: post-processing, no privacy cost.

Each sample's starting noise comes from its own seed (run seed, sample index), and the samplers
are deterministic, so sample i is the same whatever the batch it is drawn in. The starting noise
is drawn on the CPU (a few numbers per sample) and then moved to the model's device, so the
same seed starts from the same noise on every device.

Temperature T scales the starting noise. For data from a Gaussian N(mu, S) the deterministic
sampler (DDIM, the probability-flow ODE) maps starting noise e to about mu + S^(1/2) e, so T
scales each sample's spread about its mean by T (for a mixture, about its component's mean).
With eta > 0 (DDIM only) each step adds fresh noise, drawn per sample from its own stream
(seed, i, STEP_NOISE_STREAM), so sample i still does not depend on its batch; the samples then
forget part of their starting noise, and T acts less directly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dplatent.diffusion.schedule import sampler_scheduler

# initial_noise streams: 0 the starting noise, 1 the decode noise (sample.py), 2 the steps'
STEP_NOISE_STREAM = 2


def initial_noise(seed: int, indices: np.ndarray, dim: int, stream: int = 0) -> torch.Tensor:
    """Standard normal rows, row k from its own generator seeded by (seed, indices[k]); another
    `stream` gives independent draws for the same samples (stream 0: the starting noise)."""
    rows = []
    for i in indices:
        key = [seed, int(i)] + ([stream] if stream else [])
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(key)
                                              .generate_state(1, dtype=np.uint64)[0] >> 1))
        rows.append(torch.randn(dim, generator=g))
    return torch.stack(rows)


def guided_output(model: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               guidance: float, null_label: int) -> torch.Tensor:
    """out_uncond + w (out_cond - out_uncond); w = 1 is the plain conditional model.
    (Linear in the model output, so the same for epsilon- and v-prediction.)"""
    if guidance == 1.0:
        return model(z, t, y)
    both = model(torch.cat([z, z]), torch.cat([t, t]),
                 torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_latents(model: nn.Module, labels: np.ndarray, *, dim: int, seed: int, steps: int,
                   guidance: float, null_label: int, train_timesteps: int, beta_schedule: str,
                   sampler: str = "ddim", prediction: str = "v", batch_size: int = 2000,
                   temperature: float = 1.0, eta: float = 0.0,
                   progress: bool = True) -> torch.Tensor:
    """Latents [N, dim] on the model's device for the given labels; sample i uses seed
    (seed, i), its starting noise scaled by `temperature`; eta > 0: DDIM with that much of
    the ancestral step's noise (module docstring)."""
    if eta and sampler != "ddim":
        raise ValueError(f"eta > 0 needs the 'ddim' sampler, got {sampler!r}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        idx = np.arange(start, min(start + batch_size, len(labels)))
        y = torch.as_tensor(labels[idx], dtype=torch.long, device=device)
        z = initial_noise(seed, idx, dim).to(device) * temperature
        sched = sampler_scheduler(sampler, train_timesteps, beta_schedule, prediction)
        sched.set_timesteps(steps, device=device)
        z = z * sched.init_noise_sigma
        if eta:
            noise = initial_noise(seed, idx, len(sched.timesteps) * dim, stream=STEP_NOISE_STREAM)
            noise = noise.view(len(idx), -1, dim).to(device)
        for k, t in enumerate(sched.timesteps):
            tt = torch.full((len(idx),), int(t), dtype=torch.long, device=device)
            pred = guided_output(model, z, tt, y, guidance, null_label)
            if eta:
                z = sched.step(pred, t, z, eta=eta, variance_noise=noise[:, k]).prev_sample
            else:
                z = sched.step(pred, t, z).prev_sample
        out.append(z)
    return torch.cat(out)
