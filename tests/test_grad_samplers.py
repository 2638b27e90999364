"""The per-example gradient registered for PatchConv, against autograd example by example."""

import pytest
import torch
from opacus import GradSampleModule

from dplatent.models.denoiser import PatchConv
from dplatent.privacy.grad_samplers import patch_conv_grad_sample


def loop_grads(pc: PatchConv, x: torch.Tensor, w: torch.Tensor):
    """Gradient of sum(w_b * pc(x_b)) for each example b alone."""
    out = []
    for xb, wb in zip(x, w):
        pc.zero_grad()
        (pc(xb[None]) * wb[None]).sum().backward()
        out.append((pc.weight.grad.clone(), pc.bias.grad.clone()))
    return out


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same values in the layout PatchConv's output has: channels-last over the folded
    [B K, C, H, W] batch."""
    folded = t.reshape(-1, *t.shape[-3:]).contiguous(memory_format=torch.channels_last)
    return folded.view(t.shape)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("lead", [(), (1,), (3,)], ids=["no-draw-axis", "K1", "K3"])
def test_patch_conv_per_example_gradients_sum_over_an_examples_draws(lead, layout, kernel):
    torch.manual_seed(0)
    pc = PatchConv(2, 4, kernel)
    x = torch.randn(5, *lead, 2, 6, 5)
    w = torch.randn(5, *lead, 4, 6, 5)  # d loss / d output of each example
    if layout == "channels-last":
        x, w = channels_last(x), channels_last(w)
        assert not x.is_contiguous() and torch.equal(pc(x), pc(x.contiguous()))
    got = patch_conv_grad_sample(pc, [x], w)
    for b, (gw, gb) in enumerate(loop_grads(pc, x, w)):
        torch.testing.assert_close(got[pc.weight][b], gw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[pc.bias][b], gb, rtol=1e-4, atol=1e-5)


def test_patch_conv_sampler_is_the_one_opacus_uses_and_handles_an_empty_batch():
    # registered, so Opacus does not fall back to its generic (functorch) per-example path
    assert GradSampleModule.GRAD_SAMPLERS[PatchConv] is patch_conv_grad_sample
    torch.manual_seed(1)
    pc = PatchConv(2, 3)
    gsm = GradSampleModule(pc, batch_first=True, loss_reduction="sum")
    x, w = torch.randn(4, 2, 2, 5, 5), torch.randn(4, 2, 3, 5, 5)
    (gsm(x) * w).sum().backward()
    got = pc.weight.grad_sample.clone(), pc.bias.grad_sample.clone()
    gsm.remove_hooks()
    assert got[0].shape == (4, 3, 2, 3, 3)
    for b, (gw, gb) in enumerate(loop_grads(pc, x, w)):
        torch.testing.assert_close(got[0][b], gw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1][b], gb, rtol=1e-4, atol=1e-5)
    empty = patch_conv_grad_sample(pc, [torch.zeros(0, 2, 5, 5)], torch.zeros(0, 3, 5, 5))
    assert empty[pc.weight].shape == (1, 3, 2, 3, 3) and not empty[pc.weight].any()
