"""The training loop's EMA: warm-up, then the configured decay."""

import pytest
import torch
from conftest import assert_same_state, train_tiny_autoencoder
from torch.optim.swa_utils import AveragedModel

from dplatent.train.loop import ema_avg_fn, ema_decay_at


def test_ema_decay_warms_up_then_caps():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    decays = [ema_decay_at(0.999, k) for k in range(2000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_ema_of_a_short_run_follows_the_trained_weights():
    # With a fixed 0.999 decay, 300 updates would leave ~74% of the initial weights in the
    # average; with warm-up the average ends close to the (constant) trained value.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = AveragedModel(model, avg_fn=ema_avg_fn(0.999))
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(300):
        ema.update_parameters(model)
    w = float(ema.module.weight.detach())
    fixed = 1 - 0.999 ** 300
    assert w > 0.9 and w > fixed + 0.5


def _trained_autoencoder(tmp_path, ema_decay):
    """Six noisy DP steps of a tiny autoencoder; returns (the model train_stage hands on, its
    checkpoint)."""
    from dplatent.train.loop import checkpoint_path, load_checkpoint

    _, out, _ = train_tiny_autoencoder(tmp_path, n=40, batch_size=10, sample_rate=0.25, steps=6,
                                       ema_decay=ema_decay, checkpoint_every=4)
    return out, load_checkpoint(checkpoint_path(tmp_path, "autoencoder"))


def test_final_weights_are_the_ema_when_the_stage_keeps_one(tmp_path):
    """What sampling loads (final_weights of the checkpoint) is what training handed on: the
    EMA of the iterates, which differs from the last iterate."""
    from dplatent.train.loop import final_weights

    out, ck = _trained_autoencoder(tmp_path, ema_decay=0.999)
    assert ck["ema"] and any(not torch.equal(ck["model"][k], v)
                             for k, v in final_weights(ck).items())
    assert_same_state(out.state_dict(), final_weights(ck))


def test_final_weights_are_the_last_iterate_without_ema(tmp_path):
    from dplatent.train.loop import final_weights

    out, ck = _trained_autoencoder(tmp_path, ema_decay=None)
    assert ck["ema"] == {}
    assert_same_state(out.state_dict(), ck["model"])
    assert_same_state(final_weights(ck), ck["model"])


def test_adam_moments_of_the_old_2d_patch_conv_layout_take_the_parameters_shape():
    from dplatent.models.denoiser import PatchConv
    from dplatent.train.loop import match_state_shapes

    def adam_after_one_step(conv):
        opt = torch.optim.Adam(conv.parameters(), lr=0.1)
        conv(torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
        opt.step()
        return opt

    torch.manual_seed(0)
    conv = PatchConv(2, 3)
    saved = adam_after_one_step(conv).state_dict()
    for state in saved["state"].values():  # as written when the layer was a Linear on patches
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dim() == 4:
                state[key] = state[key].reshape(3, -1)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    opt.load_state_dict(saved)
    assert opt.state[conv.weight]["exp_avg"].shape == (3, 18)
    match_state_shapes(opt)
    state = opt.state[conv.weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == conv.weight.shape
    assert state["step"].dim() == 0  # scalars stay as they are
    conv.zero_grad()
    conv(torch.randn(2, 2, 4, 4)).sum().backward()
    opt.step()  # with the 2-D moments this raises (shapes do not broadcast)
