"""Transformer building blocks shared by the tokenizer and the diffusion model.

Everything attends through `F.scaled_dot_product_attention` (fused kernels on every device), including the
RoPE paths: the rotation is applied to q and k before the call, so no explicit softmax(QK^T) is ever formed.

A formula computed otherwise than as written (for speed, memory or exact rounding) goes through a named layer
or function whose docstring gives the plain formula; tests/test_layers.py checks each against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of `x` (..., N, D) as complex numbers by angles with cos/sin (..., N, D/2).

    Interleaved pairing, as the official MAETok RoPE-Mixed (not the "rotate-half" layout). Low-precision inputs
    are rotated in float32: bf16 angles lose position information at long sequence lengths.
    """
    return rotate_pairs(x, rope_table(cos, sin))


def _rope_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rope_table(cos: torch.Tensor, sin: torch.Tensor, length: int | None = None, start: int = 0) -> torch.Tensor:
    """The rotation table (..., N, D/2, 2) = [cos, sin] pairs (a complex table stored as real numbers, so that
    torch.compile can fuse its uses), padded by `pad_rope_table` to `length` positions."""
    work = _rope_dtype(cos.dtype)
    table = torch.stack([cos.to(work), sin.to(work)], dim=-1)
    return pad_rope_table(table, table.shape[-3] + start if length is None else length, start)


def pad_rope_table(table: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """Pad a table (..., N, D/2, 2) with identity rotations (cos 1, sin 0) so that it covers [start, start + N) of
    `length` tokens: one multiply then rotates the whole sequence, with no slicing and concatenation of q and k
    (a rotation by 0 is exact). A no-op for a table that already has `length` positions."""
    n, lead, half = table.shape[-3], table.shape[:-3], table.shape[-2]
    if start == 0 and n == length:
        return table
    if start < 0 or length < start + n:
        raise ValueError(f"RoPE table of {n} positions does not fit at {start} in a sequence of {length}")
    identity = torch.tensor([1.0, 0.0], dtype=table.dtype, device=table.device)
    return torch.cat([identity.expand(*lead, start, half, 2), table,
                      identity.expand(*lead, length - start - n, half, 2)], dim=-3)


def rotate_pairs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`x` (..., D) with channel pairs (2j, 2j+1) read as complex numbers, rotated by `table` (..., D/2, 2) of
    [cos, sin] pairs (broadcast): (re cos - im sin, re sin + im cos). Computed in float32 for low precision.

    Eager: one complex multiply (same roundings as the real formula) instead of its four multiplies, two adds
    and a stack. Under torch.compile the real formula, which inductor fuses into one kernel (it generates no code
    for complex numbers)."""
    dtype, work = x.dtype, _rope_dtype(x.dtype)
    x, table = x.to(work), table.to(work)
    if torch.compiler.is_compiling():
        re, im = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = table.unbind(-1)
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(dtype)
    out = torch.view_as_complex(_whole_pairs(x).unflatten(-1, (-1, 2))) * torch.view_as_complex(_whole_pairs(table))
    return torch.view_as_real(out).flatten(-2).to(dtype)


def _whole_pairs(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension holds whole (re, im) pairs in memory, as view_as_complex needs; else a
    contiguous copy."""
    if t.stride(-1) != 1 or t.storage_offset() % 2 or any(s % 2 for s in t.stride()[:-1]):
        return t.contiguous()
    return t


class RoPEMixed(nn.Module):
    """RoPE-Mixed (Heo et al. 2024): learnable 2D frequencies per layer and head over a patch grid.

    `freqs` is (2, depth, heads * head_dim / 2): [0] multiplies the column index, [1] the row index. Patch n of a
    row-major grid sits at column n % W, row n // W. Returns all layers' tables at once, so a forward pass
    computes them a single time.
    """

    def __init__(self, depth: int, heads: int, head_dim: int, grid: tuple[int, int], theta: float = 10.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE-Mixed needs head_dim divisible by 4, got {head_dim}")
        self.depth, self.heads, self.head_dim, self.theta = depth, heads, head_dim, theta
        self.freqs = nn.Parameter(self._init_freqs(depth, heads, head_dim, theta))
        rows, cols = grid
        n = torch.arange(rows * cols, dtype=torch.float32)
        # Persistent so that official state dicts (which carry these buffers) round-trip unchanged.
        self.register_buffer("t_x", n % cols)
        self.register_buffer("t_y", torch.div(n, cols, rounding_mode="floor"))

    @staticmethod
    def _init_freqs(depth: int, heads: int, head_dim: int, theta: float) -> torch.Tensor:
        mag = 1.0 / theta ** (torch.arange(0, head_dim, 4).float() / head_dim)  # head_dim/4 magnitudes
        fx, fy = [], []
        for _ in range(depth):
            phi = torch.rand(heads, 1) * 2 * math.pi  # one random rotation per head
            fx.append(torch.cat([mag * torch.cos(phi), mag * torch.cos(phi + math.pi / 2)], -1).flatten())
            fy.append(torch.cat([mag * torch.sin(phi), mag * torch.sin(phi + math.pi / 2)], -1).flatten())
        return torch.stack([torch.stack(fx), torch.stack(fy)])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (depth, heads, N, head_dim/2)."""
        f = self.freqs.float().unflatten(-1, (self.heads, self.head_dim // 2))  # (2, depth, heads, D/2)
        angle = self.t_x[:, None].float() * f[0, :, :, None, :] + self.t_y[:, None].float() * f[1, :, :, None, :]
        return torch.cos(angle), torch.sin(angle)

    def tables(self, length: int | None = None, start: int = 0) -> torch.Tensor:
        """All layers' rotation tables (depth, heads, length, head_dim/2, 2) for a sequence of `length` tokens
        whose patches start at `start` (identity elsewhere): computed once per forward pass, indexed per layer."""
        cos, sin = self()
        return rope_table(cos, sin, length, start)


class RoPE1D(nn.Module):
    """Fixed 1D rotary embedding over a token sequence (LightningDiT on 1D latent tokens)."""

    def __init__(self, head_dim: int, length: int, theta: float = 10000.0):
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angle = torch.arange(length).float()[:, None] * inv[None]
        self.register_buffer("cos", torch.cos(angle), persistent=False)
        self.register_buffer("sin", torch.sin(angle), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin

    def table(self) -> torch.Tensor:
        """The rotation table (length, head_dim/2, 2) for `Attention`."""
        return rope_table(self.cos, self.sin)


# --------------------------------------------------------------------------------------------------------------
# Patch embedding
# --------------------------------------------------------------------------------------------------------------
class PatchConv2d(nn.Conv2d):
    """A patch embedding (a convolution with stride = kernel, no padding) computed as one matmul over the
    non-overlapping patches: the same parameters, state-dict keys and output as `nn.Conv2d`, rounding aside.

    On CUDA only, where cuDNN's strided convolution takes far longer than a matmul of its FLOPs
    (`benchmarks/gpu.py --part micro` times the two). On the CPU oneDNN's convolution is as fast, and its rounding
    does not depend on the batch size (the matmul's does, so sharded and single-process results would differ in
    the last bits), so the CPU keeps it. The matmul's output (B, C_out, H/p, W/p) is a view of a channels-last
    result, so `flatten(2).transpose(1, 2)` (what every ViT does next) gives (B, N, C_out) with no copy."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, bias: bool = True):
        super().__init__(in_channels, out_channels, patch_size, patch_size, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PatchConv2d":
        """The same layer (sharing its parameters) for a plain patch-embedding `conv`; ValueError for any other,
        including Conv2d subclasses and parametrized convolutions, whose forward does more than convolve."""
        k, s = conv.kernel_size, conv.stride
        if (type(conv) is not nn.Conv2d or parametrize.is_parametrized(conv) or k[0] != k[1] or s != k
                or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1) or conv.groups != 1
                or conv.padding_mode != "zeros"):
            raise ValueError(f"not a plain patch embedding (a Conv2d with kernel = stride, no padding, dilation or "
                             f"groups): {conv}")
        with torch.device("meta"):  # no initialisation: it would draw from the global RNG for nothing
            new = cls(conv.in_channels, conv.out_channels, k[0], bias=conv.bias is not None)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.as_matmul(images) if images.device.type == "cuda" else super().forward(images)

    def as_matmul(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        p = self.kernel_size[0]
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"patch embedding expects (B, {self.in_channels}, H, W) with H and W multiples of {p}; "
                             f"got {tuple(images.shape)}")
        gh, gw = H // p, W // p
        # (B, gh, gw, C, p, p): each patch flattened in the weight's (C, kh, kw) order
        patches = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh, gw, C * p * p)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# Attention, MLPs, norms
# --------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    qkv rows are laid out [q; k; v], head h at rows h*head_dim ... (h+1)*head_dim - 1 within each (the timm and
    official layout, so converted weights need no permutation). RoPE, when given, rotates q and k on the token
    slice [rope_start, rope_start + N_rope) only: the tokenizer leaves CLS and latent tokens unrotated.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
                rope_start: int = 0, folded_layerscale: torch.Tensor | None = None) -> torch.Tensor:
        """rope: (cos, sin) of shape ([heads,] N_rope, head_dim/2), or their table from `rope_table`.
        folded_layerscale: LayerScale's gamma, folded into the output projection (`linear_with_folded_scale`)."""
        B, N, C = x.shape
        # (B, N, H, D) views of the projection; unbind (not slicing) so that the backward stacks the three
        # gradients into one tensor instead of zero-filling and summing one per slice.
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            table = rope if isinstance(rope, torch.Tensor) else rope_table(*rope)
            table = _token_major(pad_rope_table(table, N, rope_start))  # (N, H or 1, head_dim/2, 2)
            q, k = rotate_pairs(q, table), rotate_pairs(k, table)
        # SDPA takes the strided (B, H, N, D) views as they are and lays its output out as (B, N, H, D).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear_with_folded_scale(out.transpose(1, 2).reshape(B, N, C), self.proj, folded_layerscale)


def _token_major(table: torch.Tensor) -> torch.Tensor:
    """([H,] N, D/2, 2) -> (N, H or 1, D/2, 2), contiguous (it is small), to broadcast over (B, N, H, D/2)."""
    if table.dim() == 3:
        return table.unsqueeze(1)
    return table.transpose(0, 1).contiguous()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, folded_layerscale: torch.Tensor | None = None) -> torch.Tensor:
        """fc2(gelu(fc1(x))); folded_layerscale: LayerScale's gamma, folded into fc2 (`linear_with_folded_scale`)."""
        h = gelu_in_place_without_grad(self.fc1(x), self.act.approximate)
        return linear_with_folded_scale(h, self.fc2, folded_layerscale)


class SwiGLU(nn.Module):
    """Gated MLP (LightningDiT). Hidden width is 2/3 of the plain MLP's so the parameter count matches."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016), applied to a residual branch: in training, each sample's branch is
    zeroed with probability `rate` and kept ones are scaled by 1 / (1 - rate), so its expectation is unchanged.

    At rate 0 and in eval mode it is the identity and draws no random number: a model built without it keeps
    its random stream, so runs that do not ask for it are unchanged bit for bit."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate {rate} must lie in [0, 1)")
        self.rate = rate

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return branch
        keep = 1.0 - self.rate
        per_sample = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
        return branch * per_sample.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


# --------------------------------------------------------------------------------------------------------------
# Kernels: a plain formula (in the docstring) computed with less memory traffic
# --------------------------------------------------------------------------------------------------------------
def linear_with_folded_scale(x: torch.Tensor, layer: nn.Linear, scale: torch.Tensor | None) -> torch.Tensor:
    """layer(x) * scale (plain layer(x) when scale is None), with the per-channel scale applied to the (small)
    weight and bias instead of the output: it saves a full pass over the output forward and two backward. The same
    function, not the same rounding: the scale is rounded into each weight before the matmul instead of into the
    output after it."""
    if scale is None:
        return layer(x)
    bias = None if layer.bias is None else layer.bias * scale
    return F.linear(x, layer.weight * scale[:, None], bias)


def gelu_in_place_without_grad(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(h, approximate), for a fresh activation `h` that nothing else holds. Where autograd does not track
    it (inference), the result is written over `h`: no new allocation for the largest tensor of an MLP."""
    if torch.is_grad_enabled() and h.requires_grad:
        return F.gelu(h, approximate=approximate)
    return torch.ops.aten.gelu_(h, approximate=approximate)


# --------------------------------------------------------------------------------------------------------------
# adaLN modulation
# --------------------------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT adaLN: x * (1 + scale) + shift, with (B, C) or (B, N, C) modulation."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    # A multiply, then an add, as the official SiT: torch.addcmul would fuse them into one FMA, which rounds once
    # instead of twice, and the parity with the official model is bit-exact.
    return x * (1 + scale) + shift


def modulate_latents(h: torch.Tensor, n_img: int, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`h` (B, n_img + L, C), a sequence [image tokens; L latent tokens], with the latent tokens modulated by the
    latent: cat([h[:, :n_img], h[:, n_img:] * scale + shift]) (MAETok's decoder: a plain scale, not 1 + scale).

    Its own backward writes the input gradient with one concatenation, where autograd's (cat, then two slices of
    h) zero-fills two full-size gradients and sums them: the latent rows are a small part of the sequence."""
    return _ModulateLatents.apply(h, shift, scale, n_img)


class _ModulateLatents(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(h, scale)
        ctx.n, ctx.shift_dtype = n, shift.dtype  # under autocast the modulation is bf16 while h is float32
        return torch.cat([h[:, :n], h[:, n:] * scale + shift], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, scale = ctx.saved_tensors
        n = ctx.n
        g_lat = grad[:, n:]
        grad_h = torch.cat([grad[:, :n], g_lat * scale], dim=1).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_shift = g_lat.to(ctx.shift_dtype) if ctx.needs_input_grad[1] else None
        grad_scale = (g_lat * h[:, n:]).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return grad_h, grad_shift, grad_scale, None


# --------------------------------------------------------------------------------------------------------------
# Fixed position tables and timestep features
# --------------------------------------------------------------------------------------------------------------
def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: channel 2i = sin(pos * w_i), 2i+1 = cos(pos * w_i), w_i = 10000^(-2i/dim).

    Computed in float32 in exactly the official SiT's order of operations: its stored `pos_embed` is then
    reproduced bit for bit (a float64 computation rounded to float32 differs by up to 3.4e-7).
    """
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    w = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * w)
    table[:, 1::2] = torch.cos(pos * w)
    return table


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k/half), computed in float32 like the official SiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
