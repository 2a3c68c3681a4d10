"""Losses against hand-computed values, and where the consistency gradient goes."""

import math

import pytest
import torch

from mismatch.losses import alpha_schedule, consistency_loss, soft_dice_loss, supervised_loss
from mismatch.methods import TrainingBatch, make_method
from mismatch.models import build_model


def test_binary_dice_hand_computed():
    p = torch.tensor([[[[0.9, 0.2], [0.6, 0.0]]]])   # [1, 1, 2, 2]
    t = torch.tensor([[[1, 0], [1, 0]]])
    # intersection 0.9 + 0.6 = 1.5; sum p = 1.7; sum t = 2  -> Dice = 3 / 3.7
    assert float(soft_dice_loss(p, t, eps=0)) == pytest.approx(1 - 3 / 3.7, abs=1e-6)


def test_multiclass_dice_averages_foreground_classes_only():
    t = torch.tensor([[[0, 1], [2, 2]]])
    p = torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float()
    assert float(soft_dice_loss(p, t, eps=0)) == pytest.approx(0.0, abs=1e-7)
    p2 = p.clone()
    p2[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])     # class 1 missed entirely
    # class 1 Dice 0, class 2 Dice 1 -> loss 0.5
    assert float(soft_dice_loss(p2, t, eps=0)) == pytest.approx(0.5, abs=1e-7)


def test_all_background_slice_gives_a_finite_loss_that_pushes_foreground_down():
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    loss = supervised_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long))
    loss.backward()
    assert math.isfinite(float(loss)) and float(loss) > 0.9
    assert bool((logits.grad > 0).all())      # gradient descent lowers every foreground logit


def test_mse_hand_computed():
    a = torch.tensor([0.2, 0.8, 0.5, 1.0])
    b = torch.tensor([0.0, 1.0, 0.5, 0.0])
    assert float(consistency_loss(a, b)) == pytest.approx((0.04 + 0.04 + 0 + 1) / 4)


def test_alpha_ramps_up_then_stays():
    assert alpha_schedule(0, 100, 0.002) == pytest.approx(0.002 * math.exp(-5))
    assert alpha_schedule(40, 100, 0.002) == pytest.approx(0.002)
    assert alpha_schedule(90, 100, 0.002) == pytest.approx(0.002)
    assert alpha_schedule(0, 100, 0.002, rampup=0) == 0.002


def _consistency_grads(stop_gradient):
    torch.manual_seed(0)
    net = build_model("mismatch", width=4)
    x = torch.randn(2, 1, 16, 16)
    feats = net.encoder(x)
    probs = [torch.sigmoid(d(feats)) for d in net.decoders]
    consistency_loss(probs[0], probs[1], stop_gradient).backward()
    def has_grad(module):
        return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())
    return has_grad(net.encoder), has_grad(net.decoders[0]), has_grad(net.decoders[1])


def test_no_stop_gradient_reaches_encoder_and_both_decoders():
    assert _consistency_grads("none") == (True, True, True)


def test_one_sided_stop_gradient_leaves_the_negative_decoder_alone():
    assert _consistency_grads("one-sided") == (True, True, False)


def test_mismatch_method_loss_terms_and_supervised_method_ignores_unlabelled():
    torch.manual_seed(0)
    net = build_model("mismatch", width=4)
    batch = TrainingBatch(torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16)),
                          torch.randn(3, 1, 16, 16), step=50, total_steps=100)
    loss, terms = make_method("mismatch", alpha=0.5).loss(net, batch)
    assert set(terms) == {"dice", "consistency", "alpha"}
    assert float(loss) == pytest.approx(terms["dice"] + 0.5 * terms["consistency"], rel=1e-5)
    unet = build_model("unet", width=4)
    loss, terms = make_method("unet").loss(unet, batch)
    assert set(terms) == {"dice"} and math.isfinite(float(loss))
