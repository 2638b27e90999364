"""Examples/s of one DP-SGD step for each stage's model, on random data (no private data).

Usage: python benchmarks/dp_step_speed.py [--preset quick] [--steps 5] [--set KEY=VALUE ...]
(e.g. --set diffusion.architecture=conv --set autoencoder.latent_channels=1 for the conv
denoiser on a 1 x 14 x 14 latent map with --set autoencoder.channels=32)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dplatent import config, runtime
from dplatent.diffusion.loss import denoising_loss
from dplatent.diffusion.schedule import alphas_cumprod
from dplatent.models.autoencoder import latent_shape, reconstruction_loss
from dplatent.privacy.dp_training import make_trainer
from dplatent.train.stages import build_autoencoder, build_denoiser, denoiser_grad_mode


def measure(model, loss_fn, n_batch, physical, mode, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tr = make_trainer(model, opt, mode=mode, noise_multiplier=1.0, clip_norm=1.0,
                      expected_batch_size=n_batch)
    idx = torch.arange(n_batch)
    chunks = list(idx.split(physical))
    tr.step_logical(chunks, loss_fn)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        tr.step_logical(chunks, loss_fn)
    return n_batch * steps / (time.perf_counter() - t)


def autoencoder_rate(cfg, steps: int) -> float:
    """Examples/s of the preset's stage-1 DP step (per-example hooks) on random images."""
    torch.manual_seed(0)
    x = torch.rand(4096, 1, 28, 28)
    a = cfg.autoencoder
    return measure(build_autoencoder(cfg, 1, 28), lambda m, i: reconstruction_loss(m, x[i]),
                   a.batch_size, a.physical_batch_size, "hooks", steps)


def denoiser_rate(cfg, steps: int) -> tuple[float, int]:
    """(examples/s, parameters) of the preset's stage-2 DP step (ghost clipping for the MLP,
    hooks for the conv net) on random latents of the autoencoder's latent size."""
    torch.manual_seed(0)
    d, a = cfg.diffusion, cfg.autoencoder
    shape = latent_shape(28, a.channels, a.latent_channels)
    z, y = torch.randn(4096, math.prod(shape)), torch.randint(0, 10, (4096,))
    acp = alphas_cumprod(d.train_timesteps, d.beta_schedule)
    den = build_denoiser(cfg, shape, 10)

    def dloss(m, i):
        return denoising_loss(m, z[i], y[i], alphas_cumprod=acp,
                              multiplicity=d.noise_multiplicity, label_dropout=0.1,
                              null_label=10)
    rate = measure(den, dloss, d.batch_size, d.physical_batch_size, denoiser_grad_mode(cfg),
                   steps)
    return rate, sum(p.numel() for p in den.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-malloc-tuning", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, as `dplatent train --set` (repeatable)")
    args = ap.parse_args()
    if not args.no_malloc_tuning:
        runtime.tune_allocator()
    cfg = config.resolve(args.preset, config.parse_overrides(args.set))
    ae_rate = autoencoder_rate(cfg, args.steps)
    den_rate, nparams = denoiser_rate(cfg, args.steps)
    a, d = cfg.autoencoder, cfg.diffusion
    print(f"threads={torch.get_num_threads()} malloc_tuned={not args.no_malloc_tuning}")
    print(f"autoencoder (hooks): {ae_rate:.0f} examples/s, batch {a.batch_size}")
    print(f"denoiser ({denoiser_grad_mode(cfg)}, K={d.noise_multiplicity}, "
          f"{nparams/1e6:.2f}M params): {den_rate:.0f} examples/s, batch {d.batch_size}")


if __name__ == "__main__":
    main()
