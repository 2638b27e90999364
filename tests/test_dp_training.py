"""DP-SGD step mechanics against an explicit per-example loop.

For each stage's model (the autoencoder with its reconstruction loss in 'hooks' mode, the
denoiser with the denoising loss, K = 2 noise draws, in 'ghost' mode) one logical step of the
trainer must give

    p.grad = (sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / expected_batch_size

where g_i is the gradient of example i's loss alone, computed by a plain copy of the model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import loss_from_draws, predraw
from torch import nn
from torch.nn import functional as F

from dplatent.diffusion.loss import denoising_loss
from dplatent.diffusion.schedule import alphas_cumprod
from dplatent.errors import ConfigError
from dplatent.models.autoencoder import Autoencoder, reconstruction_loss
from dplatent.models.denoiser import ConvDenoiser, Denoiser
from dplatent.privacy.dp_training import make_trainer, poisson_batches

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

EXPECTED_BATCH = 5        # deliberately not the actual batch size: the divisor must be this one
N_EXAMPLES = 7
CLASSES = 3
K = 2                     # noise multiplicity of the denoiser's loss
LABEL_DROPOUT = 0.4       # so that the null label's embedding row is used too
T_TRAIN = 50


class RecordingSGD(torch.optim.SGD):
    """Keeps a copy of the gradients it is asked to apply; lr = 0 leaves the model unchanged."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups
                          for p in g["params"]])
        return super().step(closure)


# ------------------------------------------------------------------------------ the two stages


class Stage:
    """A model, the library's loss for index chunks, and a per-example reference loss."""

    mode: str
    model: nn.Module
    random_loss = False    # whether the loss draws random numbers (the denoisers' noise draws)

    def loss(self, module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_losses(self, model: nn.Module, chunks: list[torch.Tensor]):
        """Yield (example index, that example's loss alone) in the order the trainer sees them."""
        raise NotImplementedError


class AutoencoderStage(Stage):
    mode = "hooks"

    def __init__(self, contiguous: bool = True, decoder_blocks: int = 0,
                 upsample: str = "nearest", latent_noise: float = 0.0):
        torch.manual_seed(0)
        self.latent_noise = latent_noise
        self.model = Autoencoder(in_channels=1, image_size=16, channels=(8, 16),
                                 latent_channels=2, decoder_blocks=decoder_blocks,
                                 upsample=upsample)
        x = torch.rand(N_EXAMPLES, 1, 16, 16)
        if not contiguous:  # same values, transposed memory layout
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
            assert not x.is_contiguous()
        self.x = x

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        # Basic slicing of a non-contiguous tensor stays non-contiguous; fancy indexing copies.
        if self.x.is_contiguous():
            return self.x[idx]
        return self.x.transpose(2, 3)[idx].transpose(2, 3)

    def _noise_gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(77)

    def loss(self, module, idx):
        return reconstruction_loss(module, self._images(idx), self.latent_noise,
                                   self._noise_gen())

    def reference_losses(self, model, chunks):
        for chunk in chunks:
            # the draw the batched loss makes for this chunk, row j for its j-th example
            noise = self.latent_noise * torch.randn((len(chunk), *model.latent_shape),
                                                    generator=self._noise_gen())
            for j, i in enumerate(chunk.tolist()):
                x = self._images(torch.tensor([i]))
                logits = model.decoder(model.encode(x) + noise[j:j + 1])
                yield i, F.binary_cross_entropy_with_logits(logits, x)


class DenoiserStage(Stage):
    mode = "ghost"
    random_loss = True
    dim = 6
    seed = 123

    def __init__(self):
        torch.manual_seed(1)
        self.model = Denoiser(dim=self.dim, num_classes=CLASSES, hidden=16, blocks=2,
                              expansion=2, time_dim=8)
        self.z = torch.randn(N_EXAMPLES, self.dim)
        self.y = torch.arange(N_EXAMPLES) % CLASSES
        self.acp = alphas_cumprod(T_TRAIN, "squaredcos_cap_v2")
        self.gen = torch.Generator().manual_seed(self.seed)

    def loss(self, module, idx):
        return denoising_loss(module, self.z[idx], self.y[idx], alphas_cumprod=self.acp,
                              multiplicity=K, label_dropout=LABEL_DROPOUT, null_label=CLASSES,
                              generator=self.gen)

    def reference_losses(self, model, chunks):
        gen = torch.Generator().manual_seed(self.seed)  # replay the trainer's draws, chunk by chunk
        for chunk in chunks:
            t, noise, drop = predraw(gen, len(chunk), K, self.dim, T_TRAIN, LABEL_DROPOUT)
            for j, i in enumerate(chunk.tolist()):
                sl = slice(j, j + 1)
                yield i, loss_from_draws(model, self.z[i:i + 1], self.y[i:i + 1], self.acp,
                                         t[sl], noise[sl], drop[sl], CLASSES)[0]


class ConvDenoiserStage(DenoiserStage):
    """The conv denoiser on a 2 x 3 x 3 latent map: per-example gradients from hooks, with
    the K noise draws of an example on an extra axis of every convolution."""
    mode = "hooks"
    shape = (2, 3, 3)
    dim = 18
    coarse_blocks = 0
    out_std = 0.3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.model = ConvDenoiser(shape=self.shape, num_classes=CLASSES, width=16, blocks=1,
                                  coarse_blocks=self.coarse_blocks, time_dim=8)
        with torch.no_grad():  # its output layer starts at zero; give every weight a gradient
            self.model.out.weight.normal_(0, self.out_std)
        # latents of different scales, so the per-example norms spread (median_clip's need)
        self.z = self.z * torch.linspace(0.2, 3.0, N_EXAMPLES)[:, None]


class CoarseConvDenoiserStage(ConvDenoiserStage):
    """The conv denoiser with a coarse level: its blocks' convolutions run on the pooled map
    (3 x 3 pooled to 2 x 2), so the per-example gradients cover both resolutions. A smaller
    output layer keeps the per-example norms spread (median_clip's need)."""
    coarse_blocks = 1
    out_std = 0.03


STAGES = {"autoencoder-hooks": AutoencoderStage, "denoiser-ghost": DenoiserStage,
          "conv-denoiser-hooks": ConvDenoiserStage,
          "coarse-conv-denoiser-hooks": CoarseConvDenoiserStage}


def per_example_grads(stage: Stage, chunks: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Gradient of each example's loss alone, by a plain copy of the (unwrapped) model."""
    ref = copy.deepcopy(stage.model)
    params = [p for p in ref.parameters() if p.requires_grad]
    return {i: list(torch.autograd.grad(loss, params))
            for i, loss in stage.reference_losses(ref, chunks)}


def norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def clipped_mean(grads: dict[int, list[torch.Tensor]], clip: float, divisor: int):
    """sum_i clip(g_i, C) / divisor, with Opacus' clip factor min(1, C / (|g_i| + 1e-6))."""
    total = None
    for g in grads.values():
        f = min(1.0, clip / (norm(g) + 1e-6))
        total = [f * x for x in g] if total is None else [a + f * x for a, x in zip(total, g)]
    return [t / divisor for t in total]


def chunked(n: int, size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(size))


def dp_step(stage: Stage, chunks, *, clip: float, sigma: float, noise_seed: int = 0):
    """One logical step of the library's trainer; returns the gradients it applied."""
    opt = RecordingSGD(stage.model.parameters())
    trainer = make_trainer(stage.model, opt, mode=stage.mode, noise_multiplier=sigma,
                           clip_norm=clip, expected_batch_size=EXPECTED_BATCH,
                           noise_generator=torch.Generator().manual_seed(noise_seed))
    try:
        trainer.step_logical(chunks, stage.loss)
        norms = getattr(trainer.module, "per_sample_gradient_norms", None)
    finally:
        trainer.close()
    assert len(opt.seen) == 1, "one logical step must call the optimizer exactly once"
    return opt.seen[0], norms


def median_clip(grads) -> float:
    """A clipping norm between the per-example norms: some examples clipped, some not."""
    norms = sorted(norm(g) for g in grads.values())
    clip = (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2
    assert norms[0] < clip < norms[-1] and norms[-1] > 1.5 * norms[0], norms
    return clip


def assert_grads_close(got, want, rtol=1e-4):
    assert len(got) == len(want)
    flat_got = torch.cat([g.flatten() for g in got])
    flat_want = torch.cat([w.flatten() for w in want])
    err = float((flat_got - flat_want).norm() / flat_want.norm())
    assert err < rtol, f"relative error {err:.2e} of the clipped, averaged gradient"
    scale = float(flat_want.abs().max())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------- tests


def test_replayed_draws_reproduce_the_library_denoising_loss():
    """Precondition of the denoiser comparisons: the test replays denoising_loss's draws."""
    s = DenoiserStage()
    idx = torch.arange(N_EXAMPLES)
    got = s.loss(s.model, idx)
    t, noise, drop = predraw(torch.Generator().manual_seed(s.seed), N_EXAMPLES, K, s.dim,
                             T_TRAIN, LABEL_DROPOUT)
    want = loss_from_draws(s.model, s.z, s.y, s.acp, t, noise, drop, CLASSES)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert drop.any() and not drop.all(), "the draws should use both real and null labels"


def assert_hooks_grad_samples_match_the_loop(s: Stage) -> list[torch.Tensor]:
    """Opacus' per-example gradients from hooks (before clipping), one chunk of all examples,
    against each example's gradient alone; returns the reference gradients per parameter."""
    chunks = chunked(N_EXAMPLES, N_EXAMPLES)
    ref = per_example_grads(s, chunks)
    opt = RecordingSGD(s.model.parameters())
    trainer = make_trainer(s.model, opt, mode="hooks", noise_multiplier=0.0, clip_norm=1.0,
                           expected_batch_size=EXPECTED_BATCH)
    try:
        trainer.backward(s.loss(trainer.module, chunks[0]))
        samples = [p.grad_sample for p in s.model.parameters()]
    finally:
        trainer.close()
    wants = [torch.stack([ref[i][j] for i in range(N_EXAMPLES)]) for j in range(len(samples))]
    scale = max(float(w.abs().max()) for w in wants)
    for got, want in zip(samples, wants):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * scale)
    return wants


@pytest.mark.parametrize("contiguous,blocks,upsample,latent_noise",
                         [(True, 0, "nearest", 0.0), (False, 0, "nearest", 0.0),
                          (True, 2, "shuffle", 0.0), (True, 0, "nearest", 0.4)],
                         ids=["contiguous", "non-contiguous", "residual-shuffle-decoder",
                              "latent-noise"])
def test_hooks_per_example_gradients_of_the_autoencoder_match_the_explicit_loop(
        contiguous, blocks, upsample, latent_noise):
    """Opacus' per-example gradients themselves (before clipping), conv input either layout,
    with the optional decoder (residual blocks, sub-pixel upsampling) and with training's
    latent noise (each example's gradient is that of its own noisy reconstruction)."""
    s = AutoencoderStage(contiguous=contiguous, decoder_blocks=blocks, upsample=upsample,
                         latent_noise=latent_noise)
    assert_hooks_grad_samples_match_the_loop(s)


def test_hooks_per_example_gradients_of_the_conv_denoiser_match_the_explicit_loop():
    """Each example's gradient covers its own K noise draws (K > 1 here), through every
    convolution, the FiLM layers and the label embedding."""
    assert K > 1
    wants = assert_hooks_grad_samples_match_the_loop(ConvDenoiserStage())
    assert all(float(w.abs().max()) > 0 for w in wants), "every parameter should get a gradient"


def test_ghost_norms_of_the_denoiser_match_the_explicit_loop():
    s = DenoiserStage()
    chunks = chunked(N_EXAMPLES, N_EXAMPLES)
    ref = per_example_grads(s, chunks)
    _, norms = dp_step(s, chunks, clip=1.0, sigma=0.0)
    want = torch.tensor([norm(ref[i]) for i in range(N_EXAMPLES)])
    torch.testing.assert_close(norms.detach().float(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("physical", [N_EXAMPLES, 3, 1], ids=["one-chunk", "chunks-of-3",
                                                               "chunks-of-1"])
@pytest.mark.parametrize("stage_name", list(STAGES))
def test_noiseless_step_is_the_clipped_sum_over_expected_batch_size(stage_name, physical):
    s = STAGES[stage_name]()
    chunks = chunked(N_EXAMPLES, physical)
    ref = per_example_grads(s, chunks)
    clip = median_clip(ref)
    got, _ = dp_step(s, chunks, clip=clip, sigma=0.0)
    assert_grads_close(got, clipped_mean(ref, clip, EXPECTED_BATCH))


@pytest.mark.parametrize("stage_name", list(STAGES))
def test_noise_is_added_once_per_logical_step_with_std_sigma_times_clip(stage_name):
    """Three physical chunks, one noise draw: residual std sigma C / expected batch size."""
    s = STAGES[stage_name]()
    chunks = chunked(N_EXAMPLES, 3)
    ref = per_example_grads(s, chunks)
    clip, sigma = median_clip(ref), 3.0
    got, _ = dp_step(s, chunks, clip=clip, sigma=sigma)
    want = clipped_mean(ref, clip, EXPECTED_BATCH)
    resid = torch.cat([(g - w).flatten() for g, w in zip(got, want)]) * EXPECTED_BATCH
    n = resid.numel()
    assert n > 2000
    std = float(resid.std())
    # the sample std of n Gaussians has relative standard error 1 / sqrt(2 n)
    assert std == pytest.approx(sigma * clip, rel=6 / math.sqrt(2 * n))
    assert abs(float(resid.mean())) < 6 * sigma * clip / math.sqrt(n)


@pytest.mark.parametrize("stage_name", list(STAGES))
def test_empty_batch_still_takes_a_noisy_step(stage_name):
    s = STAGES[stage_name]()
    clip, sigma = 0.7, 2.0
    got, _ = dp_step(s, [], clip=clip, sigma=sigma, noise_seed=5)
    noise = torch.cat([g.flatten() for g in got]) * EXPECTED_BATCH
    n = noise.numel()
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=6 / math.sqrt(2 * n))
    assert abs(float(noise.mean())) < 6 * sigma * clip / math.sqrt(n)
    # Gaussian, not merely the right scale: about 68.3 % within one standard deviation
    inside = float((noise.abs() < sigma * clip).float().mean())
    assert inside == pytest.approx(0.6827, abs=6 * math.sqrt(0.6827 * 0.3173 / n))
    # the noise comes from the given generator: same seed, same noise; another seed, other noise
    again, _ = dp_step(STAGES[stage_name](), [], clip=clip, sigma=sigma, noise_seed=5)
    other, _ = dp_step(STAGES[stage_name](), [], clip=clip, sigma=sigma, noise_seed=6)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert not any(torch.equal(a, b) for a, b in zip(got, other))


def test_step_logical_returns_the_mean_loss_and_updates_the_model():
    s = AutoencoderStage()
    chunks = chunked(N_EXAMPLES, 3)
    with torch.no_grad():
        want = float(reconstruction_loss(s.model, s.x).mean())
    before = [p.detach().clone() for p in s.model.parameters()]
    opt = torch.optim.SGD(s.model.parameters(), lr=0.1)
    trainer = make_trainer(s.model, opt, mode="hooks", noise_multiplier=0.5, clip_norm=1.0,
                           expected_batch_size=EXPECTED_BATCH)
    try:
        got = trainer.step_logical(chunks, s.loss)
        assert math.isnan(trainer.step_logical([], s.loss))
    finally:
        trainer.close()
    assert got == pytest.approx(want, rel=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(before, s.model.parameters()))
    # close() leaves a plain model: no per-example state, ordinary backward works
    reconstruction_loss(s.model, s.x).mean().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in s.model.parameters())


def test_make_trainer_refuses_unknown_modes_and_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ConfigError, match="mode"):
        make_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="vmap",
                     noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="not DP-compatible"):
        make_trainer(bn, torch.optim.SGD(bn.parameters(), lr=0.1), mode="hooks",
                     noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4)


# ----------------------------------------------------------------------------- Poisson sampling


def test_poisson_batches_have_binomial_sizes_and_independent_inclusion():
    n, q, steps, physical = 500, 0.06, 600, 16
    gen = torch.Generator().manual_seed(0)
    sizes, counts = [], np.zeros(n)
    for chunks in poisson_batches(n=n, sample_rate=q, steps=steps, physical_batch_size=physical,
                                  generator=gen):
        assert all(0 < len(c) <= physical for c in chunks)
        assert all(len(c) == physical for c in chunks[:-1])
        idx = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        assert idx.dtype == torch.long
        assert len(torch.unique(idx)) == len(idx), "an example at most once per step"
        assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)
        sizes.append(len(idx))
        counts[idx.numpy()] += 1
    sizes = np.array(sizes)
    assert len(sizes) == steps
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    # variance of the sample variance of a near-Gaussian: 2 var^2 / (steps - 1)
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (steps - 1))
    assert sizes.var(ddof=1) > 0.5 * var, "sizes must vary (not fixed-size batches)"
    # each example is included with probability q in each step
    per_example = counts / steps
    assert abs(per_example.mean() - q) < 0.005
    assert np.all(np.abs(per_example - q) < 6 * math.sqrt(q * (1 - q) / steps))


def test_poisson_batches_yield_empty_steps_and_are_reproducible():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [[c.tolist() for c in chunks] for chunks in
                poisson_batches(n=20, sample_rate=0.02, steps=50, physical_batch_size=4,
                                generator=gen)]
    a = run(1)
    assert len(a) == 50
    assert any(step == [] for step in a), "P(empty) = 0.98^20 ~ 0.67 per step"
    assert any(step != [] for step in a)
    assert a == run(1)
    assert a != run(2)
