"""The fast paths of the shared layers compute what the plain formulations compute, gradients included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maetok.io.teachers import _patch_embed_as_matmul
from maetok.layers import (Attention, DropPath, Mlp, PatchConv2d, apply_rope, gelu_in_place_without_grad,
                           linear_with_folded_scale, modulate, modulate_latents, pad_rope_table, rope_table,
                           rotate_pairs)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The interleaved-pair rotation written out in real arithmetic (the official formulation)."""
    re, im = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotate_pairs_matches_real_formula_with_gradients(dtype):
    x = torch.randn(3, 4, 10, 8, dtype=dtype, requires_grad=True)
    angle = torch.randn(4, 10, 4, dtype=dtype, requires_grad=True)
    got = rotate_pairs(x, rope_table(torch.cos(angle), torch.sin(angle)))
    want = reference_rope(x, torch.cos(angle), torch.sin(angle))
    # Bit-equal on x86 (no FMA in the complex multiply); allow an ulp for other vector units.
    torch.testing.assert_close(got, want, rtol=2e-7 if dtype == torch.float32 else 1e-15, atol=0)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, angle), g)
    ref = torch.autograd.grad(want, (x, angle), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_rotate_pairs_compiled_formula_and_strided_inputs(monkeypatch):
    qkv = torch.randn(2, 5, 3, 4, 8)
    x = qkv.unbind(2)[1]  # a strided view, as Attention passes k
    angle = torch.randn(5, 4, 4)
    table = rope_table(torch.cos(angle), torch.sin(angle))
    eager = rotate_pairs(x, table)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(rotate_pairs(x, table), eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotate_pairs(x[:, 1:], table[1:]), eager[:, 1:], rtol=0, atol=1e-6)


def test_rotate_pairs_low_precision_rotates_in_float32():
    x = torch.randn(2, 6, 8).bfloat16()
    angle = torch.randn(6, 4) * 50
    got = apply_rope(x, torch.cos(angle), torch.sin(angle))
    assert got.dtype == torch.bfloat16
    want = reference_rope(x.float(), torch.cos(angle), torch.sin(angle))
    torch.testing.assert_close(got.float(), want, rtol=4e-3, atol=1e-6)  # only the final rounding to bf16


def test_padded_table_leaves_other_tokens_exactly_unchanged():
    angle = torch.randn(2, 4, 3)
    table = pad_rope_table(rope_table(torch.cos(angle), torch.sin(angle)), length=7, start=1)
    assert table.shape == (2, 7, 3, 2)
    x = torch.randn(5, 2, 7, 6)
    out = rotate_pairs(x, table)
    assert torch.equal(out[:, :, 0], x[:, :, 0]) and torch.equal(out[:, :, 5:], x[:, :, 5:])
    torch.testing.assert_close(out[:, :, 1:5], reference_rope(x[:, :, 1:5], torch.cos(angle), torch.sin(angle)),
                               rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        pad_rope_table(table, length=6, start=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_rope_on_a_token_slice_matches_slice_and_concatenate(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=qk_norm).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    angle = torch.randn(4, 6, 4, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    got = attn(x, (cos, sin), rope_start=2)

    B, N, C = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rot = [torch.cat([t[..., :2, :], reference_rope(t[..., 2:8, :], cos, sin), t[..., 8:, :]], dim=-2)
           for t in (q, k)]
    out = F.scaled_dot_product_attention(rot[0], rot[1], v)
    want = attn.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The same with a prebuilt full-length table, as the models pass it.
    table = rope_table(cos, sin, length=N, start=2)
    torch.testing.assert_close(attn(x, table), want, rtol=1e-12, atol=1e-12)


def test_folded_layerscale_is_layerscale_on_the_output_within_rounding():
    """Folded into the projection, the scale is rounded into each weight before the matmul instead of into the
    output after it: the same function, not the same bits (float64 agrees to 1e-12; float32 below)."""
    torch.manual_seed(0)
    mlp, attn = Mlp(16, 32).double(), Attention(16, 2).double()
    gamma = torch.randn(16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for got, want in [(mlp(x, folded_layerscale=gamma), mlp(x) * gamma),
                      (attn(x, folded_layerscale=gamma), attn(x) * gamma)]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, gamma, g)[0], torch.autograd.grad(want, gamma, g)[0])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_folded_scale_float32_forward_and_gradients(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=bias)
    scale = torch.randn(48, requires_grad=True)
    x = torch.randn(4, 7, 64, requires_grad=True)
    got, want = linear_with_folded_scale(x, layer, scale), layer(x) * scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = (x, scale, *layer.parameters())
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear_with_folded_scale(x, layer, None), layer(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_place_without_grad_is_gelu(approximate):
    h = torch.randn(3, 5, 64)
    want = F.gelu(h, approximate=approximate)
    with torch.no_grad():
        fresh = h.clone()
        out = gelu_in_place_without_grad(fresh, approximate)
    assert torch.equal(out, want) and out.data_ptr() == fresh.data_ptr()  # written over its input
    tracked = h.clone().requires_grad_()
    out = gelu_in_place_without_grad(tracked, approximate)
    assert torch.equal(out, want) and out.data_ptr() != tracked.data_ptr()  # the backward needs the input
    g = torch.randn_like(out)
    ref = h.clone().requires_grad_()
    assert torch.equal(torch.autograd.grad(out, tracked, g)[0],
                       torch.autograd.grad(F.gelu(ref, approximate=approximate), ref, g)[0])


def test_mlp_inference_gelu_in_place_equals_training_path():
    mlp = Mlp(16, 64, approximate_gelu=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        fast = mlp(x)
    assert torch.equal(fast, mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))


def _plain_modulate_latents(h, n, shift, scale):
    return torch.cat([h[:, :n], h[:, n:] * scale + shift], dim=1)


@pytest.mark.parametrize("modulation_dtype", [torch.float32, torch.bfloat16])
def test_modulate_latents_is_the_plain_formula_forward_and_backward(modulation_dtype):
    """Bitwise, gradients included; bf16 modulation of a float32 sequence is what autocast produces."""
    h = torch.randn(2, 7, 5, requires_grad=True)
    shift = torch.randn(2, 3, 5, dtype=modulation_dtype, requires_grad=True)
    scale = torch.randn(2, 3, 5, dtype=modulation_dtype, requires_grad=True)
    got, want = modulate_latents(h, 4, shift, scale), _plain_modulate_latents(h, 4, shift, scale)
    assert got.dtype == want.dtype and torch.equal(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (h, shift, scale), g), torch.autograd.grad(want, (h, shift, scale), g)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_modulate_latents_gradcheck():
    h = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.equal(modulate_latents(h, 4, shift, scale), _plain_modulate_latents(h, 4, shift, scale))
    assert torch.autograd.gradcheck(lambda a, b, c: modulate_latents(a, 4, b, c), (h, shift, scale))


def test_modulate_is_the_plain_formula_in_the_promoted_dtype():
    h, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(modulate(h, shift, scale), h * (1 + scale[:, None]) + shift[:, None])
    low = h.bfloat16()
    out = modulate(low, shift, scale)
    assert out.dtype == torch.float32 and torch.equal(out, low * (1 + scale[:, None]) + shift[:, None])


@pytest.mark.parametrize("bias", [True, False])
def test_patch_conv_is_the_strided_convolution_as_a_matmul(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 4, 4, bias=bias)
    fast = PatchConv2d.from_conv(conv)
    assert fast.weight is conv.weight and fast.state_dict().keys() == conv.state_dict().keys()
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    conv.double()
    ref = conv(images)
    out = fast.as_matmul(images)  # what CUDA runs; the CPU keeps the convolution
    assert torch.equal(fast(images), ref)
    assert out.shape == ref.shape == (2, 16, 2, 3)
    torch.testing.assert_close(out, ref)
    tokens = out.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()  # what a ViT does next costs no copy
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, conv.weight, grad)[0]
    g_out = torch.autograd.grad(out, fast.weight, grad)[0]
    torch.testing.assert_close(g_out, g_ref)


def test_patch_conv_takes_no_random_numbers():
    """Teachers are built between the seed and the tokenizer: the swap must not shift the tokenizer's init."""
    conv = torch.nn.Conv2d(3, 8, 4, 4)
    state = torch.get_rng_state()
    PatchConv2d.from_conv(conv)
    assert torch.equal(torch.get_rng_state(), state)


def test_patch_conv_refuses_other_convolutions_and_shapes():
    class StandardizedConv(torch.nn.Conv2d):  # like timm's StdConv2d: its forward does more than convolve
        pass

    for conv in (torch.nn.Conv2d(3, 8, 4, 2), torch.nn.Conv2d(3, 8, 4, 4, padding=1), StandardizedConv(3, 8, 4, 4)):
        with pytest.raises(ValueError, match="not a plain patch embedding"):
            PatchConv2d.from_conv(conv)
        vit = torch.nn.Module()
        vit.patch_embed = torch.nn.Module()
        vit.patch_embed.proj = conv
        _patch_embed_as_matmul(vit)  # a teacher with such an embedding keeps it
        assert vit.patch_embed.proj is conv
    with pytest.raises(ValueError, match=r"multiples of 4; got \(1, 3, 10, 8\)"):
        PatchConv2d(3, 8, 4).as_matmul(torch.zeros(1, 3, 10, 8))


def test_drop_path_is_the_identity_at_rate_zero_and_in_eval_and_draws_nothing():
    x = torch.randn(4, 5, 8)
    state = torch.get_rng_state()
    assert DropPath(0.0).train()(x) is x  # runs without stochastic depth keep their random stream
    assert DropPath(0.3).eval()(x) is x
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="must lie in"):
        DropPath(1.0)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    """Each sample's branch is either 0 or branch / (1 - rate); the mean over many samples is the branch's."""
    torch.manual_seed(0)
    rate, x = 0.25, torch.randn(1, 3, 4).expand(20000, 3, 4).clone().requires_grad_()
    out = DropPath(rate).train()(x)
    kept = out.detach().flatten(1).ne(0).all(dim=1)
    dropped = out.detach().flatten(1).eq(0).all(dim=1)
    assert bool((kept | dropped).all())
    torch.testing.assert_close(out[kept], x[kept] / (1 - rate))
    assert abs(dropped.float().mean().item() - rate) < 0.02
    torch.testing.assert_close(out.detach().mean(0), x[0].detach(), atol=0.05, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - rate)))
    assert bool(x.grad[dropped].eq(0).all())
