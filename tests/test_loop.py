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
