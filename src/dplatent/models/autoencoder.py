"""Convolutional autoencoder: pixels (C, S, S) <-> latent (L, S/2^k, S/2^k).

GroupNorm only (no BatchNorm: it mixes examples, which DP-SGD's per-example gradients forbid).
The encoder ends in a per-example standardisation, so every latent has zero mean and unit
variance across its own coordinates by construction: the latent scale that diffusion needs is
fixed in advance and no statistic of the private data is ever computed to normalise it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dplatent.config import UPSAMPLING
from dplatent.errors import ConfigError


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.GroupNorm(8, c_out), nn.SiLU())


def standardise(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-example zero mean / unit variance over all latent coordinates."""
    flat = h.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + eps)
    return flat.view_as(h)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: tuple[int, ...], latent_channels: int):
        super().__init__()
        layers, c = [], in_channels
        for width in channels:
            layers.append(_block(c, width, stride=2))
            c = width
        layers.append(_block(c, c))
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(self.out(self.body(x)))


class Residual(nn.Module):
    """x + conv block(x): extra decoder depth at the latent resolution, where a 3x3 conv's
    per-example gradient is cheapest (49 positions for 28x28 images and two stages)."""

    def __init__(self, width: int):
        super().__init__()
        self.block = _block(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _upsample(c_in: int, c_out: int, how: str) -> list[nn.Module]:
    """Double the side. 'nearest': repeat pixels, then a conv at the new size. 'shuffle':
    a conv at the old size to 4 x c_out channels, then PixelShuffle (sub-pixel convolution):
    each output pixel of a 2x2 block gets its own weights, at a quarter of the conv's
    positions."""
    if how == "nearest":
        return [nn.Upsample(scale_factor=2, mode="nearest"), _block(c_in, c_out)]
    return [_block(c_in, 4 * c_out), nn.PixelShuffle(2)]


class Decoder(nn.Module):
    """Mirror of the encoder, plus `blocks` residual blocks at the latent resolution. With
    'nearest' the last upsampling feeds the output conv directly, so no full-resolution hidden
    conv (the dominant per-example-gradient cost) is needed; with 'shuffle' the output conv
    itself runs at half resolution."""

    def __init__(self, out_channels: int, channels: tuple[int, ...], latent_channels: int,
                 blocks: int = 0, upsample: str = "nearest"):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ConfigError(f"autoencoder.upsample must be one of {UPSAMPLING}, "
                              f"got {upsample!r}")
        widths = list(reversed(channels))
        layers = [_block(latent_channels, widths[0])]
        layers += [Residual(widths[0]) for _ in range(blocks)]
        for i in range(1, len(widths)):
            layers += _upsample(widths[i - 1], widths[i], upsample)
        if upsample == "nearest":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        else:
            self.out = nn.Sequential(nn.Conv2d(widths[-1], 4 * out_channels, 3, padding=1),
                                     nn.PixelShuffle(2))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of pixel intensities in [0, 1]."""
        return self.out(self.body(z))


def latent_shape(image_size: int, channels: tuple[int, ...],
                 latent_channels: int) -> tuple[int, int, int]:
    """(L, S/2^k, S/2^k) for S x S images and k = len(channels) stride-2 stages; ConfigError
    when the size does not divide (e.g. 28, 32 and 64 all work with two stages)."""
    factor = 2 ** len(channels)
    if image_size % factor or image_size < factor:
        fits = [s for s in (28, 32, 64) if s % factor == 0]
        raise ConfigError(f"{image_size}x{image_size} images do not fit the autoencoder: "
                          f"its {len(channels)} downsampling stages (autoencoder.channels = "
                          f"{list(channels)}) need a side divisible by {factor}"
                          + (f", e.g. {', '.join(map(str, fits))}" if fits else ""))
    return (latent_channels, image_size // factor, image_size // factor)


class Autoencoder(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, channels: tuple[int, ...],
                 latent_channels: int, decoder_blocks: int = 0, upsample: str = "nearest"):
        super().__init__()
        self.latent_shape = latent_shape(image_size, channels, latent_channels)
        self.encoder = Encoder(in_channels, channels, latent_channels)
        self.decoder = Decoder(in_channels, channels, latent_channels, decoder_blocks,
                               upsample)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, sharpness: float = 1.0) -> torch.Tensor:
        """Images in [0, 1]: sigmoid(sharpness * logits). The decoder, trained with per-pixel
        cross-entropy, gives each pixel's expected intensity; sharpness > 1 moves the pixels
        that it leaves grey toward their nearer extreme (a temperature 1 / sharpness)."""
        return torch.sigmoid(sharpness * self.decoder(z))

    def forward(self, x: torch.Tensor, latent_noise: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits of the reconstruction. latent_noise s > 0 (training only) decodes the latent
        with N(0, s^2) added to each coordinate, drawn from `generator`, independently of x."""
        z = self.encoder(x)
        if latent_noise > 0:
            z = z + latent_noise * torch.randn(z.shape, generator=generator, device=z.device)
        return self.decoder(z)


def reconstruction_loss(model: nn.Module, x: torch.Tensor, latent_noise: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example binary cross-entropy of the reconstruction, shape [B] (latent noise: see
    Autoencoder.forward)."""
    logits = model(x, latent_noise, generator)
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).mean(1)
