"""Tokenizer contracts: shapes per variant, masking, eval behaviour, save/load, and that it actually learns."""
from __future__ import annotations

import math

import pytest
import torch

from maetok.config import AuxTargetConfig, MaskConfig, TokenizerConfig
from maetok.data import open_dataset
from maetok.eval.recon import psnr
from maetok.io.pretrained import load_tokenizer, save_pretrained
from maetok.tokenizer import MAETok
from maetok.tokenizer.masking import random_patch_mask, sample_mask_ratio
from maetok.tokenizer.model import patchify, unpatchify


def tiny_cfg(**kw) -> TokenizerConfig:
    base = dict(image_size=16, patch_size=4, latent_tokens=8, latent_dim=6, enc_width=32, enc_depth=2, enc_heads=2,
                dec_width=32, dec_depth=2, dec_heads=2, aux_width=16, aux_depth=1, aux_heads=1,
                aux_targets=[AuxTargetConfig("hog", 1.0)])
    base.update(kw)
    cfg = TokenizerConfig(**base)
    cfg.validate("model")
    return cfg


@pytest.mark.parametrize("variant", ["maetok", "ae", "vae", "mae"])
def test_shapes_for_every_variant(variant):
    cfg = tiny_cfg(variant=variant)
    model = MAETok(cfg, aux_dims={"hog": 108})
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    model.train()
    out = model(x)
    assert out.recon.shape == x.shape and out.z.shape == (3, 8, 6)
    assert (out.mask is not None) == cfg.uses_mask
    assert set(out.aux) == ({"hog"} if variant == "maetok" else set())
    if variant == "maetok":
        assert out.aux["hog"].shape == (3, 16, 108)
    assert (out.posterior is not None) == (variant == "vae")
    model.eval()
    z = model.encode(x)
    assert z.shape == (3, 8, 6)
    assert model.decode(z).shape == x.shape


def test_mask_ratio_distribution_is_truncated_normal():
    cfg = MaskConfig()
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(cfg, g) for _ in range(4000)])
    assert ratios.min() >= 0.4 and ratios.max() <= 0.6
    # N(0.6, 0.25) truncated to [0.4, 0.6]: P(r > 0.5) from the normal CDF (about 0.54, more mass near 0.6).
    phi = lambda v: 0.5 * (1 + math.erf((v - 0.6) / (0.25 * math.sqrt(2))))
    expected = (phi(0.6) - phi(0.5)) / (phi(0.6) - phi(0.4))
    assert abs((ratios > 0.5).float().mean().item() - expected) < 0.025
    assert abs(sample_mask_ratio(MaskConfig(ratio_min=0.3, ratio_max=0.3), g) - 0.3) < 1e-12


@pytest.mark.parametrize("mean", [0.75, 0.25])
def test_mask_ratio_with_the_mean_outside_the_range_is_still_the_truncated_normal(mean: float):
    """N(mean, 0.02) truncated to [0.4, 0.6], the mean 7.5 standard deviations out: the mass piles up at the near
    end (a uniform draw over the range would have mean 0.5). Expected mean in closed form:
    mean + std * (pdf(a) - pdf(b)) / P(a <= Z <= b), the probability from the tail the range lies in."""
    std = 0.02
    cfg = MaskConfig(ratio_mean=mean, ratio_std=std)
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(cfg, g) for _ in range(2000)], dtype=torch.float64)
    assert ratios.min() >= 0.4 and ratios.max() <= 0.6
    a, b = (0.4 - mean) / std, (0.6 - mean) / std
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    tail = lambda z: 0.5 * math.erfc(z / math.sqrt(2))  # P(Z > z), precise far out in the upper tail
    mass = tail(a) - tail(b) if a > 0 else tail(-b) - tail(-a)
    expected = mean + std * (pdf(a) - pdf(b)) / mass
    assert abs(expected - (0.5974 if mean > 0.6 else 0.4026)) < 1e-4  # scipy.stats.truncnorm's mean
    assert abs(ratios.mean().item() - expected) < 2e-4


def test_mask_counts_and_positions_are_random_per_sample():
    g = torch.Generator().manual_seed(1)
    mask = random_patch_mask(64, 64, 0.45, generator=g)
    assert (mask.sum(1) == math.ceil(0.45 * 64)).all()
    assert mask.float().mean(0).std() > 0  # different positions across samples
    assert len({tuple(r.tolist()) for r in mask}) == 64
    # Every position gets masked with about the same probability.
    freq = random_patch_mask(4000, 16, 0.5, generator=g).float().mean(0)
    assert (freq - 0.5).abs().max() < 0.05


def test_masked_patches_use_mask_token_and_latents_never_masked():
    cfg = tiny_cfg()
    model = MAETok(cfg, aux_dims={"hog": 108}).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    out = model(x)
    # Changing only masked pixels leaves the latent unchanged: those patches were replaced by the mask token.
    mask_img = out.mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(x)
    x2 = torch.where(mask_img, torch.rand_like(x), x)
    torch.manual_seed(0)
    out2 = model(x2)
    assert torch.equal(out.mask, out2.mask)
    assert torch.allclose(out.z, out2.z, atol=1e-6)


def test_no_masking_in_eval():
    model = MAETok(tiny_cfg(), aux_dims={"hog": 108}).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.mask is None
    assert torch.allclose(out.z, model.encode(x))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (4, 4), 3), x)


def test_save_load_roundtrip(tmp_path):
    cfg = tiny_cfg(variant="vae", latent_mean=0.25, latent_std=2.0)
    model = MAETok(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    save_pretrained(model, tmp_path / "w")
    loaded = load_tokenizer(tmp_path / "w")
    assert loaded.config == cfg
    assert torch.equal(loaded.encode(x), model.encode(x))
    z = model.encode(x)
    assert torch.allclose(loaded.denormalize(loaded.normalize(z)), z, atol=1e-6)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "w").iterdir())


def test_aux_decoders_are_not_saved_with_inference_weights(tmp_path):
    model = MAETok(tiny_cfg(), aux_dims={"hog": 108})
    save_pretrained(model, tmp_path / "w")
    loaded = load_tokenizer(tmp_path / "w")
    assert len(loaded.aux_decoders) == 0


def test_bad_input_names_the_shape():
    model = MAETok(tiny_cfg()).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 8, 6\)"):
        model.decode(torch.zeros(1, 8, 5))


def test_tiny_tokenizer_overfits_a_batch():
    """8 images, a few hundred steps on CPU: reconstruction PSNR rises by at least 10 dB (well under a minute)."""
    ds = open_dataset("shapes", split="train", image_size=16)
    x = torch.stack([ds[i][0] for i in range(8)])
    cfg = tiny_cfg(variant="ae", enc_width=64, dec_width=64, enc_heads=4, dec_heads=4)
    model = MAETok(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    with torch.no_grad():
        before = psnr(model.eval().decode(model.encode(x)), x).mean().item()
    model.train()
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x).recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = psnr(model.eval().decode(model.encode(x)), x).mean().item()
    assert after - before > 10.0, f"PSNR {before:.1f} -> {after:.1f} dB"


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = MAETok(tiny_cfg(variant="ae", grad_checkpointing=flag))
        model(x).recon.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
