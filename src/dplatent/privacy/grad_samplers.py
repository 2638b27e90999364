"""Per-example gradients for the package's own layers, registered with Opacus' hooks.

`PatchConv` (models/denoiser.py) is a 3x3 convolution applied to [B, ..., C, H, W]: every
leading axis after the first (an example's K noise draws) is folded into F.conv2d's batch.
Opacus' own Conv2d sampler would treat each draw as an example; here the gradient of example
b is the sum over its draws k and positions l of backprop[b, k, :, l] (x) patch[b, k, :, l],
the patches being the unfolded input (the im2col of the forward pass, done once, here).
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
    patches = F.unfold(x.reshape(-1, c, height, width), layer.kernel_size,
                       padding=layer.padding)                         # [B K, C k k, H W]
    patches = patches.view(n, -1, patches.shape[1], height * width)  # [B, K, C k k, H W]
    grads = backprops.reshape(n, -1, c_out, height * width)          # [B, K, C_out, H W]
    if grads.shape[1] == 1:  # one draw: a batched matrix product, no copies
        weight = torch.bmm(grads[:, 0], patches[:, 0].transpose(1, 2))
    else:
        weight = torch.einsum("nkol,nkpl->nop", grads, patches)
    return {layer.weight: weight.view(n, *layer.weight.shape),
            layer.bias: grads.sum(dim=(1, 3))}
