"""Tokenizer losses: GAN pieces, perceptual networks, KL."""
from __future__ import annotations

import pytest
import torch

from maetok.config import GanConfig, TokenizerLossConfig
from maetok.io.teachers import build_discriminator, build_perceptual, dino_backbone, resnet_perceptual_network
from maetok.tokenizer.losses import (DinoDiscriminator, LeCAM, PatchGAN, ResNetPerceptual, adaptive_gan_weight,
                                     consistency_regularization, diff_augment, hinge_d_loss, hinge_g_loss, kl_loss,
                                     ramp)


def test_patchgan_gives_patch_logits_and_hinge_losses_behave():
    d = PatchGAN()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logits = d(x)
    assert logits.dim() == 4 and logits.shape[0] == 2 and logits.shape[1] == 1
    # Perfectly separated logits give zero discriminator loss; the generator loss is minus the fake logits.
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0
    assert hinge_g_loss(torch.full((4,), 3.0)) == -3.0


def test_adaptive_weight_balances_gradients():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    out = layer(x)
    rec = out.pow(2).mean()
    gan = 10 * out.mean()
    w = adaptive_gan_weight(rec, gan, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0].norm()
    assert torch.allclose(w, g_rec / (g_gan + 1e-4), rtol=1e-5)
    assert not w.requires_grad


def test_diff_augment_is_differentiable_and_shape_preserving():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_()
    y = diff_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Same generator seed -> same augmentation: the policy is reproducible.
    y2 = diff_augment(x.detach(), torch.Generator().manual_seed(0))
    assert torch.equal(y.detach(), y2)


def test_diff_augment_weak_view_options():
    """cut-out and p_apply at their defaults are the plain call (same draws); p_apply=0 changes nothing; a smaller
    cut-out zeroes a smaller square (2 * int(cutout * H / 2) - 1 on a side)."""
    x = torch.rand(3, 3, 20, 20) + 1.0  # no zeros of its own
    plain = diff_augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(diff_augment(x, torch.Generator().manual_seed(1), cutout=0.5, p_apply=1.0), plain)
    assert torch.equal(diff_augment(x, torch.Generator().manual_seed(1), p_apply=0.0), x)
    # At 0.5 each group is skipped for the whole batch half the time: all three now and then, not always.
    outcomes = {torch.equal(diff_augment(x, torch.Generator().manual_seed(s), p_apply=0.5), x) for s in range(40)}
    assert outcomes == {True, False}
    for cutout, side in ((0.5, 9), (0.2, 3)):
        y = diff_augment(x, torch.Generator().manual_seed(3), cutout=cutout)
        zeros = y.eq(0).all(dim=1).flatten(1).sum(1)  # cut-out pixels, per image (the square may be clipped)
        assert int(zeros.max()) <= side * side and int(zeros.max()) > 0


def test_consistency_regularization_is_the_mse_of_the_two_views():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert consistency_regularization(a, a) == 0
    torch.testing.assert_close(consistency_regularization(a, b), (a - b).pow(2).mean())


def test_lecam_tracks_emas_and_penalises_overconfidence():
    reg = LeCAM(decay=0.0)
    penalty = reg(torch.full((4,), 5.0), torch.full((4,), -5.0))
    assert float(reg.ema_real) == 5.0 and float(reg.ema_fake) == -5.0
    # With EMAs at the current values, the penalty is (5 - (-5))^2 for each side.
    assert torch.isclose(penalty, torch.tensor(200.0))


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    mean, logvar = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    assert kl_loss(mean, logvar) == 0
    assert kl_loss(mean + 1, logvar) > 0


def test_ramp():
    assert ramp(0, 0) == 1.0 and ramp(5, 10) == 0.5 and ramp(50, 10) == 1.0


def test_resnet_perceptual_is_zero_on_identical_and_grows_with_noise(shared_dir):
    loss = ResNetPerceptual(resnet_perceptual_network())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert loss(x, x) < 1e-8
    small, large = loss(x + 0.05 * torch.randn_like(x), x), loss(x + 0.5 * torch.randn_like(x), x)
    assert 0 < small < large
    assert build_perceptual(TokenizerLossConfig(perceptual="none")) is None


def test_lpips_without_weights_fails_clearly():
    from maetok.io.hub import MissingWeightsError

    with pytest.raises(MissingWeightsError):
        build_perceptual(TokenizerLossConfig(perceptual="lpips"))


def test_dino_discriminator_random_init_runs():
    pytest.importorskip("timm")
    d = DinoDiscriminator(dino_backbone(pretrained=False, image_size=224))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    logits = d(x)
    assert logits.shape[0] == 1 and logits.dim() == 2
    assert not any(p.requires_grad for p in d.backbone.parameters())
    assert any(p.requires_grad for p in d.heads.parameters())
    assert isinstance(build_discriminator(GanConfig(discriminator="patchgan")), PatchGAN)
