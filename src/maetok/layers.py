"""Transformer building blocks shared by the tokenizer and the diffusion model.

Everything attends through `F.scaled_dot_product_attention` (fused kernels on every device), including the
RoPE paths: the rotation is applied to q and k before the call, so no explicit softmax(QK^T) is ever formed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of `x` (..., N, D) as complex numbers by angles with cos/sin (..., N, D/2).

    Interleaved pairing, as the official MAETok RoPE-Mixed (not the "rotate-half" layout). Low-precision inputs
    are rotated in float32: bf16 angles lose position information at long sequence lengths.
    """
    dtype = x.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    pairs = x.to(work).unflatten(-1, (-1, 2))
    re, im = pairs.unbind(-1)
    cos, sin = cos.to(work), sin.to(work)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(dtype)


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope_start: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = _rope_slice(q, rope, rope_start), _rope_slice(k, rope, rope_start)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _rope_slice(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
    cos, sin = rope
    n = cos.shape[-2]
    if start == 0 and n == x.shape[-2]:
        return apply_rope(x, cos, sin)
    parts = [x[..., :start, :], apply_rope(x[..., start:start + n, :], cos, sin), x[..., start + n:, :]]
    return torch.cat(parts, dim=-2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT adaLN: x * (1 + scale) + shift, with (B, C) or (B, N, C) modulation."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


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
