"""Per-example gradients for the package's own layers, registered with Opacus' hooks.

`PatchConv` (models/denoiser.py) is a k x k convolution applied to [B, ..., C, H, W]: every
leading axis after the first (an example's K noise draws) is folded into F.conv2d's batch.
Opacus' own Conv2d sampler would treat each draw as an example; here the gradient of example
b is the sum over its draws k and positions l of backprop[b, k, :, l] (x) window[b, k, :, l],
the windows being the zero-padded input shifted by each kernel offset. One batched matrix
product per offset contracts draws and positions together, on channels-last copies of the
windows; unfolding all patches at once (F.unfold, im2col) and contracting them was slower,
at K = 2 by 1.4x for the whole DP step (BENCHMARKS.md).
Importing this module registers the sampler (privacy/dp_training.py does).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch.nn import functional as F

from dplatent.models.denoiser import PatchConv


@register_grad_sampler(PatchConv)
def patch_conv_grad_sample(layer: PatchConv, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """activations[0]: the layer's input [B, ..., C, H, W]; backprops: d loss / d output
    [B, ..., C_out, H, W] (Opacus has already scaled it for the loss's reduction)."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return {layer.weight: torch.zeros_like(layer.weight).unsqueeze(0),
                layer.bias: torch.zeros_like(layer.bias).unsqueeze(0)}
    c_out, (c, height, width) = layer.weight.shape[0], x.shape[-3:]
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    # channels last: [B, K, H, W, C], padded in H and W (a view of the layer's channels-last
    # tensors, then one copy); the output gradient as [B, C_out, K H W]
    padded = F.pad(x.reshape(n, -1, c, height, width).permute(0, 1, 3, 4, 2),
                   (0, 0, pw, pw, ph, ph))
    grads = backprops.reshape(n, -1, c_out, height, width).permute(0, 2, 1, 3, 4)
    grads = grads.reshape(n, c_out, -1)
    weight = backprops.new_empty(n, c_out, c, kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + height, j:j + width].reshape(n, -1, c)  # [B, K H W, C]
            weight[..., i, j] = torch.bmm(grads, window)
    return {layer.weight: weight, layer.bias: grads.sum(dim=2)}
