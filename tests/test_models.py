"""The autoencoder (stage 1) and the latent denoiser (stage 2)."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch.nn import functional as F

from dplatent.models.autoencoder import Autoencoder, reconstruction_loss, standardise
from dplatent.models.denoiser import (ConvDenoiser, Denoiser, PatchConv, _expand, _halve,
                                      timestep_embedding)

pytestmark = pytest.mark.usefixtures("single_thread")


def autoencoder(channels=1, size=28, stages=(8, 16), latent=2, blocks=0,
                upsample="nearest") -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(in_channels=channels, image_size=size, channels=stages,
                       latent_channels=latent, decoder_blocks=blocks, upsample=upsample)


@pytest.mark.parametrize("upsample", ["nearest", "shuffle"])
@pytest.mark.parametrize("channels,size,stages,latent,blocks", [(1, 28, (8, 16), 2, 0),
                                                                (3, 32, (8, 16, 16), 4, 2),
                                                                (1, 16, (8,), 3, 1)])
def test_autoencoder_shapes(channels, size, stages, latent, blocks, upsample):
    ae = autoencoder(channels, size, stages, latent, blocks, upsample)
    side = size // 2 ** len(stages)
    assert ae.latent_shape == (latent, side, side)
    x = torch.rand(5, channels, size, size)
    z = ae.encode(x)
    assert z.shape == (5, *ae.latent_shape)
    assert ae(x).shape == x.shape
    out = ae.decode(z).detach()
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_latent_noise_is_added_to_the_latent_before_decoding_and_only_when_asked():
    ae = autoencoder()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        plain = ae(x)
        torch.testing.assert_close(ae(x, 0.0, torch.Generator().manual_seed(3)), plain)
        noisy = ae(x, 0.5, torch.Generator().manual_seed(3))
        noise = 0.5 * torch.randn((4, *ae.latent_shape), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(noisy, ae.decoder(ae.encode(x) + noise))
        assert (noisy - plain).abs().max() > 1e-3
        # the loss draws from the generator it is given: the same seed, the same loss
        a = reconstruction_loss(ae, x, 0.5, torch.Generator().manual_seed(9))
        b = reconstruction_loss(ae, x, 0.5, torch.Generator().manual_seed(9))
        c = reconstruction_loss(ae, x, 0.5, torch.Generator().manual_seed(10))
    torch.testing.assert_close(a, b)
    assert a.shape == (4,) and not torch.allclose(a, c)


def test_stage_1_trains_with_the_configured_latent_noise(monkeypatch, tmp_path):
    """train_autoencoder hands train_stage a per-example loss that decodes with
    autoencoder.latent_noise, drawn from the generator the loop passes."""
    from dplatent.config import resolve
    from dplatent.train import stages
    captured = {}
    monkeypatch.setattr(stages, "train_stage",
                        lambda model, n, loss_fn, *a, **k: captured.update(fn=loss_fn, model=model))

    class Plan:
        def stage(self, name):
            return None

    cfg = resolve("smoke", {"autoencoder.latent_noise": "0.5"})
    images = torch.rand(6, 1, 28, 28)
    stages.train_autoencoder(images, cfg, Plan(), ledger=None, run_dir=tmp_path)
    idx = torch.tensor([4, 1, 2])
    ae = captured["model"]
    with torch.no_grad():
        got = captured["fn"](ae, idx, torch.Generator().manual_seed(5))
        want = reconstruction_loss(ae, images[idx], 0.5, torch.Generator().manual_seed(5))
        plain = reconstruction_loss(ae, images[idx])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)


def test_image_size_must_be_divisible_by_the_downsampling():
    from dplatent.errors import ConfigError
    with pytest.raises(ConfigError,
                       match=r"28x28 images do not fit .* divisible by 8, e\.g\. 32, 64"):
        autoencoder(size=28, stages=(8, 16, 16))
    for size in (28, 32, 64):  # the sizes the presets' two stages support
        assert autoencoder(size=size, stages=(8, 16)).latent_shape[1:] == (size // 4, size // 4)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.01, 0.5), (50.0, -3.0)])
def test_latent_is_standardised_per_example(scale, shift):
    ae = autoencoder()
    x = torch.rand(6, 1, 28, 28) * scale + shift
    with torch.no_grad():
        flat = ae.encode(x).flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(6), atol=1e-3, rtol=0)


def test_standardise_uses_only_each_examples_own_values():
    h = torch.randn(4, 2, 3, 3) * torch.tensor([1.0, 5.0, 0.1, 30.0]).view(4, 1, 1, 1)
    out = standardise(h)
    for i in range(4):
        torch.testing.assert_close(standardise(h[i:i + 1])[0], out[i])
        flat = h[i].flatten()
        torch.testing.assert_close(out[i].flatten(), (flat - flat.mean()) / (flat.std() + 1e-5))


def test_examples_do_not_interact_in_the_autoencoder():
    """Per-example gradients presuppose it: GroupNorm only, no batch statistics."""
    ae = autoencoder()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        batch = reconstruction_loss(ae, x)
        alone = torch.cat([reconstruction_loss(ae, x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_reconstruction_loss_is_per_example_binary_cross_entropy():
    ae = autoencoder()
    x = torch.rand(4, 1, 28, 28)
    loss = reconstruction_loss(ae, x)
    assert loss.shape == (4,)
    with torch.no_grad():
        recon = ae.decode(ae.encode(x))
    want = F.binary_cross_entropy(recon, x, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)
    assert bool((loss > 0).all())


def test_decoder_options_add_residual_blocks_at_the_latent_resolution_and_sub_pixel_output():
    from dplatent.models.autoencoder import Residual
    ae = autoencoder(blocks=3, upsample="shuffle")
    residual = [m for m in ae.decoder.modules() if isinstance(m, Residual)]
    assert len(residual) == 3
    assert not any(isinstance(m, torch.nn.Upsample) for m in ae.decoder.modules())
    # The block adds to its input: with its conv zeroed (GroupNorm's shift is 0 at init, and
    # SiLU(0) = 0) it is the identity.
    h = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        residual[0].block[0].weight.zero_()
        residual[0].block[0].bias.zero_()
    torch.testing.assert_close(residual[0](h), h)
    # Sub-pixel output: the 2x2 block of output pixels comes from 4 channels of one position.
    out_conv = ae.decoder.out[0]
    assert out_conv.out_channels == 4 and isinstance(ae.decoder.out[1], torch.nn.PixelShuffle)


def test_unknown_upsampling_is_a_config_error():
    from dplatent.errors import ConfigError
    with pytest.raises(ConfigError, match="upsample must be one of"):
        autoencoder(upsample="bilinear")


def test_both_models_are_dp_compatible():
    assert ModuleValidator.validate(autoencoder(), strict=False) == []
    assert ModuleValidator.validate(autoencoder(blocks=2, upsample="shuffle"),
                                    strict=False) == []
    assert ModuleValidator.validate(denoiser(), strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in autoencoder().modules())


def denoiser(dim=8, classes=4) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(dim=dim, num_classes=classes, hidden=32, blocks=2, expansion=2, time_dim=16)


def test_denoiser_output_shapes_for_flat_and_multi_draw_inputs():
    den = denoiser()
    assert den.null_label == 4
    z, t, y = torch.randn(5, 8), torch.randint(0, 100, (5,)), torch.randint(0, 5, (5,))
    assert den(z, t, y).shape == (5, 8)
    zk, tk, yk = torch.randn(5, 3, 8), torch.randint(0, 100, (5, 3)), torch.randint(0, 5, (5, 3))
    out = den(zk, tk, yk)
    assert out.shape == (5, 3, 8)
    # the K axis is handled as independent rows: same as flattening it into the batch
    flat = den(zk.reshape(15, 8), tk.reshape(15), yk.reshape(15)).reshape(5, 3, 8)
    torch.testing.assert_close(out, flat, rtol=1e-5, atol=1e-6)


def test_denoiser_depends_on_timestep_and_label():
    den = denoiser()
    z = torch.randn(3, 8)
    t, y = torch.full((3,), 10), torch.full((3,), 1)
    base = den(z, t, y)
    assert not torch.allclose(base, den(z, torch.full((3,), 500), y))
    assert not torch.allclose(base, den(z, t, torch.full((3,), 2)))
    assert not torch.allclose(base, den(z, t, torch.full((3,), den.null_label)))
    with pytest.raises(IndexError):
        den(z, t, torch.full((3,), den.null_label + 1))


def conv_denoiser(shape=(2, 6, 6), classes=4, blocks=1, base=None,
                  coarse_blocks=0) -> ConvDenoiser:
    torch.manual_seed(0)
    den = ConvDenoiser(shape=shape, num_classes=classes, width=16, blocks=blocks, time_dim=16,
                       coarse_blocks=coarse_blocks, base=base)
    with torch.no_grad():  # the output convolution starts at zero
        den.out.weight.normal_(0, 0.1)
    return den


def test_patch_conv_is_a_3x3_convolution_with_zero_padding():
    torch.manual_seed(0)
    pc = PatchConv(3, 5)
    x = torch.randn(4, 3, 7, 6)
    want = F.conv2d(x, pc.weight, pc.bias, padding=1)
    torch.testing.assert_close(pc(x), want, rtol=1e-5, atol=1e-5)
    # zero padding: a corner output sees only the 2 x 2 in-map part of its kernel
    corner = (pc.weight[:, :, 1:, 1:] * x[0, :, :2, :2]).sum(dim=(1, 2, 3)) + pc.bias
    torch.testing.assert_close(pc(x)[0, :, 0, 0], corner, rtol=1e-5, atol=1e-5)
    # extra leading axes are carried through
    torch.testing.assert_close(pc(x.view(2, 2, 3, 7, 6)), want.view(2, 2, 5, 7, 6),
                               rtol=1e-5, atol=1e-5)


def test_patch_conv_initialises_and_loads_as_the_linear_on_patches_it_replaced():
    """Until 2026-12-06 the layer was nn.Linear(C_in k k, C_out) on unfolded patches: the
    same seed gives the same numbers, and a checkpoint of that layout gives the same map."""
    torch.manual_seed(3)
    old = torch.nn.Linear(3 * 9, 5)
    torch.manual_seed(3)
    pc = PatchConv(3, 5)
    torch.testing.assert_close(pc.weight.reshape(5, 27), old.weight, rtol=0, atol=0)
    torch.testing.assert_close(pc.bias, old.bias, rtol=0, atol=0)

    x = torch.randn(2, 3, 5, 4)
    cols = F.unfold(x, 3, padding=1)                                    # [2, 27, 20]
    want = old(cols.transpose(1, 2)).transpose(1, 2).reshape(2, 5, 5, 4)
    fresh = PatchConv(3, 5)
    fresh.load_state_dict({"linear.weight": old.weight.detach().clone(),
                           "linear.bias": old.bias.detach().clone()})
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        PatchConv(3, 5).load_state_dict({"linear.weight": old.weight.detach().clone()},
                                        strict=True)


def test_conv_denoiser_shapes_multi_draw_axis_and_zero_start():
    den = conv_denoiser()
    assert den.null_label == 4 and den.dim == 72
    zk, tk, yk = (torch.randn(5, 3, 72), torch.randint(0, 100, (5, 3)),
                  torch.randint(0, 5, (5, 3)))
    out = den(zk, tk, yk)
    assert out.shape == (5, 3, 72)
    flat = den(zk.reshape(15, 72), tk.reshape(15), yk.reshape(15)).reshape(5, 3, 72)
    torch.testing.assert_close(out, flat, rtol=1e-5, atol=1e-6)
    fresh = ConvDenoiser(shape=(2, 6, 6), num_classes=4, width=16, blocks=1)
    assert torch.count_nonzero(fresh(zk, tk, yk)) == 0
    assert ModuleValidator.validate(den, strict=False) == []


def test_conv_denoiser_is_local_on_the_latent_map():
    """Four 3x3 convolutions (in, two in the block, out): a change at one corner of a 12 x 12
    map reaches 4 positions away, not the opposite corner. Normalisation is per channel group
    over the whole map, so far positions move a little; near ones much more."""
    den = conv_denoiser(shape=(1, 12, 12))
    z, t, y = torch.randn(1, 144), torch.tensor([300]), torch.tensor([1])
    dz = torch.zeros(1, 144)
    dz[0, 0] = 5.0
    diff = (den(z + dz, t, y) - den(z, t, y)).abs().view(12, 12)
    assert float(diff[:2, :2].max()) > 20 * float(diff[8:, 8:].max())


def test_conv_denoiser_adds_the_base():
    class Base(torch.nn.Module):
        def forward(self, z, t, y):
            return 2 * z
    den = conv_denoiser(base=Base())
    plain = conv_denoiser()
    z, t, y = torch.randn(3, 72), torch.randint(0, 100, (3,)), torch.randint(0, 4, (3,))
    torch.testing.assert_close(den(z, t, y), plain(z, t, y) + 2 * z)


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 16)
    assert e.shape == (3, 16)
    torch.testing.assert_close(e[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    assert timestep_embedding(t.view(3, 1).expand(3, 2), 16).shape == (3, 2, 16)
    assert not torch.allclose(e[1], e[2])


def test_decode_with_sharpness_is_the_sigmoid_of_scaled_logits():
    ae = autoencoder().eval()
    z = torch.randn(3, *ae.latent_shape)
    logits = ae.decoder(z)
    torch.testing.assert_close(ae.decode(z), torch.sigmoid(logits))
    torch.testing.assert_close(ae.decode(z, 2.5), torch.sigmoid(2.5 * logits))


def test_halve_averages_2x2_windows_and_expand_fills_them_back():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    want = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).view(1, 1, 2, 2)
    torch.testing.assert_close(_halve(x), want)
    # an odd side: the last row and column are windows of their own
    odd = _halve(torch.ones(3, 2, 1, 7, 7))
    assert odd.shape == (3, 2, 1, 4, 4) and torch.all(odd == 1)
    # maps constant on each 2 x 2 window survive the round trip, leading axes included
    blocky = torch.randn(2, 3, 2, 4, 4).repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(_expand(_halve(blocky), (8, 8)), blocky)
    assert _expand(odd, (7, 7)).shape == (3, 2, 1, 7, 7)


@pytest.mark.parametrize("shape", [(1, 14, 14), (2, 7, 7)])
def test_conv_denoiser_with_a_coarse_level_keeps_shapes_draws_and_zero_start(shape):
    den = conv_denoiser(shape=shape, blocks=2, coarse_blocks=1)
    dim = den.dim
    zk, tk, yk = (torch.randn(4, 3, dim), torch.randint(0, 100, (4, 3)),
                  torch.randint(0, 5, (4, 3)))
    out = den(zk, tk, yk)
    assert out.shape == (4, 3, dim)
    flat = den(zk.reshape(12, dim), tk.reshape(12), yk.reshape(12)).reshape(4, 3, dim)
    torch.testing.assert_close(out, flat, rtol=1e-5, atol=1e-6)
    assert len(den.coarse) == 1
    fresh = ConvDenoiser(shape=shape, num_classes=4, width=16, blocks=2, coarse_blocks=1)
    assert torch.count_nonzero(fresh(zk, tk, yk)) == 0
    assert ModuleValidator.validate(den, strict=False) == []
    # without a coarse level the state dict is the one-resolution net's (old checkpoints load)
    plain = conv_denoiser(shape=shape, blocks=2)
    assert not any(k.startswith("coarse.") for k in plain.state_dict())
    assert any(k.startswith("coarse.") for k in den.state_dict())


def test_the_coarse_level_works_at_half_resolution_and_adds_only_what_its_blocks_add():
    """Its blocks see the map pooled to 7 x 7; blocks that add nothing (second convolution
    at zero: each block returns its input) leave the one-resolution net's output unchanged."""
    den = conv_denoiser(shape=(1, 14, 14), blocks=2, coarse_blocks=1)
    seen = []
    den.coarse[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    z, t, y = torch.randn(3, 196), torch.randint(0, 100, (3,)), torch.randint(0, 5, (3,))
    with_level = den(z, t, y)
    assert seen == [(3, 16, 7, 7)]
    plain = conv_denoiser(shape=(1, 14, 14), blocks=2)
    plain.load_state_dict({k: v for k, v in den.state_dict().items()
                           if not k.startswith("coarse.")})
    assert not torch.allclose(with_level, plain(z, t, y), atol=1e-3)
    with torch.no_grad():
        den.coarse[0].conv2.weight.zero_()
        den.coarse[0].conv2.bias.zero_()
    torch.testing.assert_close(den(z, t, y), plain(z, t, y), rtol=1e-5, atol=1e-6)


def test_conv_denoiser_refuses_a_negative_coarse_level():
    with pytest.raises(ValueError, match="coarse_blocks must be >= 0, got -1"):
        ConvDenoiser(shape=(1, 4, 4), num_classes=2, width=8, blocks=1, coarse_blocks=-1)
