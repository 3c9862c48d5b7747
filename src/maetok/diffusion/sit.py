"""SiT (and LightningDiT) on 1D latent tokens: a velocity-predicting diffusion transformer over (B, L, C).

    model = SiT(sit_config("XL", in_channels=32, num_tokens=128, num_classes=1000))
    v = model(x, t, y)        # x (B, L, C), t (B,) in [0, 1] with t = 0 data and t = 1 noise, y (B,) int labels

Parameter names equal the official SiT's (x_embedder, t_embedder.mlp.0/2, y_embedder.embedding_table,
blocks.i.attn.qkv/proj, blocks.i.mlp.fc1/fc2, blocks.i.adaLN_modulation.1, final_layer.*, pos_embed), so
official checkpoints load with a near-identity conversion (see convert.py).

`SiTConfig.variant = "lightningdit"` builds the LightningDiT block from the same classes: 1D RoPE instead of the
absolute position table, SwiGLU MLP, RMSNorm and qk-norm.

`SiTConfig.shortcut_steps = N > 0` makes a shortcut student (diffusion/shortcut.py): the step size d = 1/n of an
n-step sampler is one more input, embedded and added to the timestep embedding like the class label.

    v = student(x, t, y, d)   # d (B,) in {1, 1/2, 1/4, ..., 1/N}: the average velocity over [t - d, t]
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, SiTConfig
from ..layers import Attention, Mlp, RMSNorm, RoPE1D, SwiGLU, modulate, sincos_1d, timestep_features

# depth, hidden width, heads. S/B/L/XL are the SiT/DiT sizes; tiny is the official-parity fixture's size and
# mini a CPU pilot that trains in minutes.
SIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden=384, heads=6),
    "B": dict(depth=12, hidden=768, heads=12),
    "L": dict(depth=24, hidden=1024, heads=16),
    "XL": dict(depth=28, hidden=1152, heads=16),
    "tiny": dict(depth=2, hidden=64, heads=4),
    "mini": dict(depth=4, hidden=192, heads=3),
}


def sit_config(size: str, **overrides) -> SiTConfig:
    """A validated SiTConfig of a named size, e.g. sit_config("XL", in_channels=32, num_tokens=128)."""
    if size not in SIT_SIZES:
        raise ConfigError(f"unknown SiT size {size!r}; choose one of {list(SIT_SIZES)}")
    cfg = SiTConfig(**{**SIT_SIZES[size], **overrides})
    cfg.validate("model")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] (no x1000) -> sinusoidal features [cos, sin] -> MLP. Features stay float32 like the official."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is the null label: label dropout in training, CFG at sampling."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class StepSizeEmbedder(nn.Module):
    """Step size d = 2^-k -> vector, one learned row per k = log2(1/d) in 0..log2(N) (N = the most steps).

    Zero at initialisation (`SiT.initialize_weights`): a student whose other weights are its teacher's then
    predicts the teacher's velocity at every step size, and training moves each step size away from it.
    """

    def __init__(self, max_steps: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(int(math.log2(max_steps)) + 1, hidden)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        # Powers of two are exact in every float format, so the rounding only absorbs log2's last bit.
        return self.embedding_table(torch.round(-torch.log2(d.float())).long())


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------
def _norm(hidden: int, lightning: bool) -> nn.Module:
    # Official SiT: LayerNorm without affine parameters (adaLN supplies scale and shift). LightningDiT: RMSNorm.
    return RMSNorm(hidden, eps=1e-6) if lightning else nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class SiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * f(LN(x) * (1 + scale) + shift) for f = attention, then the MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, lightning: bool = False):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = _norm(hidden, lightning)
        self.attn = Attention(hidden, heads, qkv_bias=True, qk_norm=lightning)
        self.norm2 = _norm(hidden, lightning)
        self.mlp = SwiGLU(hidden, mlp_hidden) if lightning else Mlp(hidden, mlp_hidden, approximate_gelu=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        # (B, 1, H) chunks broadcast over tokens; order fixed by the official checkpoints.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        # A multiply, then an add (not torch.addcmul, whose FMA rounds once): the official SiT's roundings.
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, lightning: bool = False):
        super().__init__()
        self.norm_final = _norm(hidden, lightning)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
class SiT(nn.Module):
    """Velocity model v(x_t, t, y) over (B, L, C) latent tokens; output has the shape of x."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        cfg.validate("model")
        self.config = cfg
        # The interpolant the velocity was trained on (transport.path). The network does not depend on it, but
        # the SDE sampler's velocity-to-score conversion does, so it is saved with the weights.
        self.transport_path = "linear"
        lightning = cfg.variant == "lightningdit"
        self.x_embedder = nn.Linear(cfg.in_channels, cfg.hidden)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden, cfg.class_dropout) if cfg.num_classes else None
        # Only a shortcut student has it: an ordinary SiT keeps the official parameters exactly.
        self.d_embedder = StepSizeEmbedder(cfg.shortcut_steps, cfg.hidden) if cfg.shortcut_steps else None
        if lightning:
            self.pos_embed = None
            self.rope = RoPE1D(cfg.hidden // cfg.heads, cfg.num_tokens)
        else:
            # A fixed table, but persistent: official checkpoints store it, and converted weights keep it.
            self.register_buffer("pos_embed", sincos_1d(cfg.num_tokens, cfg.hidden)[None])
            self.rope = None
        self.blocks = nn.ModuleList(SiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, lightning)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden, cfg.in_channels, lightning)
        self.initialize_weights()

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: SiTConfig) -> SiT:
        return cls(cfg)

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) embeddings, and every adaLN and the output linear at zero.

        The zeros make each block start as the identity and the whole model output 0, which is what keeps
        adaLN-Zero training stable.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.d_embedder is not None:
            nn.init.zeros_(self.d_embedder.embedding_table.weight)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (CFG's unconditional branch); None for an unconditional model."""
        return self.config.num_classes if self.config.num_classes else None

    @property
    def is_shortcut_student(self) -> bool:
        return self.d_embedder is not None

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                d: torch.Tensor | None = None) -> torch.Tensor:
        self._check_shapes(x, t, y, d)
        h = self.x_embedder(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        if self.d_embedder is not None:
            c = c + self.d_embedder(d)
        rope = self.rope.table() if self.rope is not None else None  # rotation table, built once per call
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        return self.final_layer(h, c)

    def _check_shapes(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                      d: torch.Tensor | None = None) -> None:
        """Shapes and dtypes only: label values are checked where labels come in (the samplers, once per run;
        the training task, on the host), as a check here would sync a GPU at every call."""
        L, C = self.config.num_tokens, self.config.in_channels
        if x.dim() != 3 or x.shape[1:] != (L, C):
            raise ValueError(f"SiT expects x of shape (B, {L}, {C}) = (batch, latent tokens, latent dim); "
                             f"got {tuple(x.shape)}")
        B = x.shape[0]
        if t.shape != (B,) or not t.is_floating_point():
            raise ValueError(f"SiT expects t as a float tensor of shape ({B},), one time in [0, 1] per sample; "
                             f"got {tuple(t.shape)} {t.dtype}")
        if self.y_embedder is None and y is not None:
            raise ValueError("this SiT is unconditional (num_classes=0) but labels y were given; pass y=None")
        if self.y_embedder is not None and (y is None or y.shape != (B,) or y.is_floating_point() or y.is_complex()):
            got = repr(y) if y is None else f"{tuple(y.shape)} {y.dtype}"
            raise ValueError(f"SiT expects labels y as an integer tensor of shape ({B},); got {got}")
        if (d is None) == self.is_shortcut_student:
            raise ValueError("this SiT is a shortcut student: pass the step size d of shape (B,)"
                             if d is None else "this SiT is not a shortcut student (shortcut_steps=0); pass no d")
        if d is not None and (d.shape != (B,) or not d.is_floating_point()):
            raise ValueError(f"SiT expects the step size d as a float tensor of shape ({B},); got "
                             f"{tuple(d.shape)} {d.dtype}")


def SiT_S(**overrides) -> SiT:
    return SiT(sit_config("S", **overrides))


def SiT_B(**overrides) -> SiT:
    return SiT(sit_config("B", **overrides))


def SiT_L(**overrides) -> SiT:
    return SiT(sit_config("L", **overrides))


def SiT_XL(**overrides) -> SiT:
    return SiT(sit_config("XL", **overrides))


def SiT_tiny(**overrides) -> SiT:
    return SiT(sit_config("tiny", **overrides))


def LightningDiT_XL(**overrides) -> SiT:
    return SiT(sit_config("XL", variant="lightningdit", **overrides))
