"""Latent diffusion: noise schedule, per-example training loss, sampler."""
