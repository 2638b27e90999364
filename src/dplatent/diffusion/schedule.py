"""Noise schedules from diffusers: the same betas serve training and sampling."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SAMPLERS = ("ddim", "dpm")


def alphas_cumprod(train_timesteps: int, beta_schedule: str) -> torch.Tensor:
    sched = DDPMScheduler(num_train_timesteps=train_timesteps, beta_schedule=beta_schedule)
    return sched.alphas_cumprod.clone().float()


PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


def sampler_scheduler(name: str, train_timesteps: int, beta_schedule: str,
                      prediction: str = "v"):
    """A deterministic diffusers scheduler for unbounded latents."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose from {sorted(PREDICTIONS)}")
    common = dict(num_train_timesteps=train_timesteps, beta_schedule=beta_schedule,
                  prediction_type=PREDICTIONS[prediction])
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++",
                                           solver_order=2)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")
