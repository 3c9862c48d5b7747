"""MAETok: a plain ViT autoencoder with 1D latent tokens, trained with mask modelling.

    images ─► Encoder (ViT + CLS + APE + RoPE-Mixed, L latent tokens appended) ─► z (B, L, C)
    z ─► LatentDecoder (N image queries + latents, adaLN from z on the latent positions) ─► pixels
    z ─► auxiliary LatentDecoders (shallow) ─► HOG / DINOv2 / SigLIP features of the masked patches (training)

With `token_dropout="nested"` the pixel decoder is trained on random prefixes of the L tokens (FlexTok,
One-D-Piece), so the first k tokens decode alone: see `MAETok.drop_tail_tokens`.

The same code gives the baselines: `ae` (no mask, no aux), `vae` (diagonal Gaussian posterior + KL) and `mae`
(mask, pixel target only). The forward pass matches the official `AEModel` (see tokenizer/convert.py and the
parity test) so the released checkpoints load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, TokenizerConfig
from ..layers import Attention, DropPath, LayerScale, Mlp, PatchConv2d, RoPEMixed, modulate_latents
from .masking import random_patch_mask, sample_mask_ratio


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    """Pre-norm ViT block with LayerScale (DINOv2 style)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.ls1 = LayerScale(width, ls_init)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width, ls_init)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        # x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each LayerScale folded into its branch's output
        # projection: no pass over the activations of its own (the same function, another rounding).
        x = x + self.attn(self.norm1(x), rope, folded_layerscale=self.ls1.gamma)
        return x + self.mlp(self.norm2(x), folded_layerscale=self.ls2.gamma)


class Encoder(nn.Module):
    """Sequence [CLS, N patches, L latents]; RoPE on the patches only; the last L tokens become the latent."""

    def __init__(self, cfg: TokenizerConfig, out_dim: int):
        super().__init__()
        W, N, L = cfg.enc_width, cfg.num_patches, cfg.latent_tokens
        self.patch_embed = PatchConv2d(cfg.in_channels, W, cfg.patch_size)  # a Conv2d; a matmul on CUDA
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + N, W) * 0.02)  # learned APE over [CLS, patches]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W)) if cfg.uses_mask else None
        self.latent_tokens = nn.Parameter(torch.randn(1, L, W) * 0.02)
        self.latent_pos_embed = nn.Parameter(torch.randn(1, L, W) * 0.02)
        self.rope = RoPEMixed(cfg.enc_depth, cfg.enc_heads, W // cfg.enc_heads, cfg.grid, cfg.rope_theta)
        self.blocks = nn.ModuleList(EncoderBlock(W, cfg.enc_heads, cfg.mlp_ratio, cfg.layerscale_init)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(W, eps=1e-6)
        self.to_latent = nn.Linear(W, out_dim)
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, W), row-major patches
        if mask is not None:
            # Masked patches become the mask token *before* the position embedding, so the encoder still knows
            # where the missing patches are.
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        B, pos = x.shape[0], self.pos_embed
        # [CLS, patches, latents] with their position embeddings, written once (same sums as cat-then-add).
        x = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), x + pos[:, 1:],
                       (self.latent_tokens + self.latent_pos_embed).expand(B, -1, -1)], dim=1)
        # RoPE on the patches [1, 1 + N) only: identity rotations elsewhere, so tables cover the whole sequence.
        tables = self.rope.tables(x.shape[1], start=1)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, tables[i], use_reentrant=False)
            else:
                x = block(x, tables[i])
        latents = self.norm(x)[:, -self.latent_tokens.shape[1]:]
        return self.to_latent(latents)


# --------------------------------------------------------------------------------------------------------------
# Decoder (pixel decoder and the shallow auxiliary decoders)
# --------------------------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Non-affine pre-norm block; the latent positions are modulated by the raw latent as h*scale + shift.

    Note the plain `scale` (not 1 + scale) and the absence of gates: this is what the released weights expect.
    `drop_path`: stochastic depth on both residual branches, each drawn on its own (the official MoVQ block).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, latent_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 4 * width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, z: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(z).chunk(4, dim=-1)
        n_img = x.shape[1] - z.shape[1]
        x = x + self.drop_path(self.attn(modulate_latents(self.norm1(x), n_img, shift_msa, scale_msa), rope))
        return x + self.drop_path(self.mlp(modulate_latents(self.norm2(x), n_img, shift_mlp, scale_mlp)))


class LatentModulatedNorm(nn.Module):
    """Final norm of the decoder: non-affine LayerNorm, latent positions modulated by the raw latent."""

    def __init__(self, width: int, latent_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * width))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(z).chunk(2, dim=-1)
        return modulate_latents(self.norm(x), x.shape[1] - z.shape[1], shift, scale)


class LatentDecoder(nn.Module):
    """Sequence [N image queries (one shared mask token), L projected latents]; RoPE on the image slots only.

    Returns per-patch outputs (B, N, out_dim): pixels for the pixel decoder, target features for aux decoders.
    `drop_path`: the stochastic-depth rate of the last block; block i has drop_path * i / (depth - 1), timm's
    linear rule, which the official decoder (a timm ViT built with drop_path_rate) follows.
    """

    def __init__(self, latent_dim: int, latent_tokens: int, grid: tuple[int, int], width: int, depth: int,
                 heads: int, mlp_ratio: float, rope_theta: float, out_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.num_image_tokens = grid[0] * grid[1]
        self.from_latent = nn.Linear(latent_dim, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.latent_pos_embed = nn.Parameter(torch.randn(1, latent_tokens, width) * 0.02)
        self.rope = RoPEMixed(depth, heads, width // heads, grid, rope_theta)
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio, latent_dim, rate) for rate in rates)
        self.final_norm = LatentModulatedNorm(width, latent_dim)
        self.head = nn.Linear(width, out_dim)
        self.grad_checkpointing = False
        for m in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_norm.adaLN_modulation[-1]]:
            nn.init.zeros_(m.weight)  # official init: latent positions start at zero and open up during training
            nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        queries = self.mask_token.expand(B, self.num_image_tokens, -1)
        x = torch.cat([queries, self.from_latent(z) + self.latent_pos_embed], dim=1)
        tables = self.rope.tables(x.shape[1], start=0)  # image slots [0, N) rotated, latents not
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, z, tables[i], use_reentrant=False)
            else:
                x = block(x, z, tables[i])
        x = self.final_norm(x, z)
        return self.head(x[:, :self.num_image_tokens])


def unpatchify(tokens: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """(B, N, p*p*C) with (row-in-patch, col-in-patch, channel) layout, channel fastest -> (B, C, H, W)."""
    B = tokens.shape[0]
    gh, gw = grid
    x = tokens.view(B, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * patch, gw * patch)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of `unpatchify`: (B, C, H, W) -> (B, N, p*p*C)."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerOutput:
    recon: torch.Tensor                                   # (B, C, H, W)
    z: torch.Tensor                                       # (B, L, C) latent fed to the decoders
    mask: torch.Tensor | None = None                      # (B, N) bool, True = masked patch
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, N, dim) predictions
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # VAE (mean, logvar)
    tokens: torch.Tensor | None = None                    # (B,) prefix length decoded per sample (nested dropout)


class MAETok(nn.Module):
    """MAETok tokenizer. `aux_dims` maps auxiliary target names to feature sizes; inference models have none."""

    def __init__(self, cfg: TokenizerConfig, aux_dims: dict[str, int] | None = None):
        super().__init__()
        self.config = cfg
        C = cfg.latent_dim
        self.encoder = Encoder(cfg, out_dim=2 * C if cfg.variant == "vae" else C)
        # Stochastic depth in the pixel decoder only: the official auxiliary decoders are built with none.
        self.decoder = LatentDecoder(C, cfg.latent_tokens, cfg.grid, cfg.dec_width, cfg.dec_depth, cfg.dec_heads,
                                     cfg.mlp_ratio, cfg.rope_theta, cfg.patch_size ** 2 * cfg.in_channels,
                                     cfg.dec_drop_path)
        for part in (self.encoder, self.decoder):
            part.grad_checkpointing = cfg.grad_checkpointing
        self.aux_decoders = nn.ModuleDict()
        if cfg.uses_aux and aux_dims:
            for t in cfg.aux_targets:
                if t.name not in aux_dims:
                    raise ConfigError(f"model.aux_targets: no feature size given for target {t.name!r}")
                self.aux_decoders[t.name] = LatentDecoder(
                    C, cfg.latent_tokens, cfg.grid, cfg.aux_width, cfg.aux_depth, cfg.aux_heads, cfg.mlp_ratio,
                    cfg.rope_theta, aux_dims[t.name])
        # Stands in for every dropped tail token (only built with nested dropout: the default model is unchanged).
        self.absent_latent = nn.Parameter(torch.zeros(1, 1, C)) if cfg.token_dropout == "nested" else None

    # ----- the public interface -----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, sample: bool = False, tokens: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latent (B, k, C), the first k = `tokens` of the L tokens (default L).
        VAE: the posterior mean unless `sample`."""
        self._check_images(images)
        k = self.check_tokens(self.config.latent_tokens if tokens is None else tokens)
        h = self.encoder(images)
        if self.config.variant == "vae":
            mean, logvar = _split_posterior(h)
            h = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return h if k == self.config.latent_tokens else h[:, :k]

    def decode(self, z: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """Latent (B, k, C), or (B, L, C) of which the first k = `tokens` are kept -> images (B, C, H, W), roughly
        in [-1, 1] (not clamped). `tokens` defaults to z's own length; k must be a trained prefix length."""
        cfg = self.config
        L, C = cfg.latent_tokens, cfg.latent_dim
        own = z.shape[1] if z.dim() == 3 and z.shape[1] in cfg.allowed_token_counts else L
        k = self.check_tokens(own if tokens is None else tokens)
        if z.dim() != 3 or z.shape[2] != C or z.shape[1] not in (k, L):
            want = f"(B, {L}, {C})" if k == L else f"(B, {k}, {C}) or (B, {L}, {C})"
            raise ValueError(f"decode expects latents of shape {want}, got {tuple(z.shape)}")
        if k < L:
            z = torch.cat([z[:, :k], self.absent_latent.to(z.dtype).expand(z.shape[0], L - k, -1)], dim=1)
        return unpatchify(self.decoder(z), cfg.patch_size, cfg.grid, cfg.in_channels)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.latent_mean) / self.config.latent_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.config.latent_std + self.config.latent_mean

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> TokenizerOutput:
        """Training forward. Masks patches when the variant uses masking and the module is in training mode
        (or when `mask_ratio` is given explicitly, e.g. for the stage-2 anneal); eval mode never masks."""
        self._check_images(images)
        cfg = self.config
        mask = self._draw_mask(images, mask_ratio, generator)
        h = self.encoder(images, mask)
        posterior = None
        if cfg.variant == "vae":
            mean, logvar = _split_posterior(h)
            posterior = (mean, logvar)
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if self.training else mean
        else:
            z = h
        z_pixel, tokens = z, None
        if self.training and cfg.token_dropout == "nested":
            z_pixel, tokens = self.drop_tail_tokens(z, generator)
        recon = unpatchify(self.decoder(z_pixel), cfg.patch_size, cfg.grid, cfg.in_channels)
        # The auxiliary decoders see the full z: their feature targets shape what the encoder writes into every
        # token, and they never run at inference, where only the pixel decoder meets a prefix.
        aux = {name: dec(z) for name, dec in self.aux_decoders.items()}
        return TokenizerOutput(recon=recon, z=z, mask=mask, aux=aux, posterior=posterior, tokens=tokens)

    def drop_tail_tokens(self, z: torch.Tensor,
                         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nested ("tail") token dropout: per sample, k drawn from the allowed prefix lengths (uniformly, or L with
        probability `token_full_prob` and the shorter ones uniformly otherwise); tokens k..L-1 become the learned
        `absent_latent`. Returns (z with tails replaced, k per sample).

        Why a learned absent token rather than a shorter sequence or an attention mask: the decoder's sequence,
        its L-row position embedding and its adaLN modulation from z on the latent rows all stay as they are,
        so every variant and the official weights take it unchanged, and `decode` of a k-prefix is the same
        computation as in training (pad with the absent token). Both z and its modulation see the same stand-in.
        """
        counts, full = torch.tensor(self.config.allowed_token_counts), self.config.token_full_prob
        draw_on = generator.device if generator is not None else "cpu"
        if full is None:
            pick = torch.randint(len(counts), (z.shape[0],), generator=generator, device=draw_on)
        else:  # a shorter length for every sample, then L instead for a `full` fraction of them
            pick = torch.randint(len(counts) - 1, (z.shape[0],), generator=generator, device=draw_on)
            keep_all = torch.rand(z.shape[0], generator=generator, device=draw_on) < full
            pick = torch.where(keep_all, len(counts) - 1, pick)
        tokens = counts[pick.cpu()].to(z.device)
        keep = torch.arange(z.shape[1], device=z.device) < tokens[:, None]
        return torch.where(keep[..., None], z, self.absent_latent.to(z.dtype)), tokens

    def check_tokens(self, tokens: int) -> int:
        """The API boundary for prefix lengths: one clear line naming the lengths this tokenizer was trained on."""
        allowed, L = self.config.allowed_token_counts, self.config.latent_tokens
        if tokens not in allowed:
            how = "trained with nested token dropout" if self.config.token_dropout == "nested" else \
                "trained without token dropout (model.token_dropout=none)"
            raise ValueError(f"tokens={tokens} is not allowed: this tokenizer ({L} latent tokens, {how}) "
                             f"decodes from k in {_format_counts(allowed)}")
        return int(tokens)

    @torch.compiler.disable
    def _draw_mask(self, images: torch.Tensor, mask_ratio: float | None,
                   generator: torch.Generator | None) -> torch.Tensor | None:
        """The (B, N) patch mask, or None. Eager even under torch.compile: the ratio is a new Python float every
        step, on which a compiled graph would specialise and recompile; the mask itself is a plain tensor input."""
        cfg = self.config
        if mask_ratio is None and self.training and cfg.uses_mask:
            mask_ratio = sample_mask_ratio(cfg.mask, generator)
        if not mask_ratio:
            return None
        if self.encoder.mask_token is None:
            raise ValueError(f"variant {cfg.variant!r} has no mask token; masking needs maetok or mae")
        return random_patch_mask(images.shape[0], cfg.num_patches, mask_ratio, images.device, generator)

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"expected images of shape (B, {want[0]}, {want[1]}, {want[2]}) in [-1, 1], "
                             f"got {tuple(images.shape)}")

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder and pixel decoder only: what encode/decode need (aux decoders are training scaffolding)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("aux_decoders.")}


def _format_counts(counts: list[int]) -> str:
    if len(counts) > 2 and counts == list(range(counts[0], counts[-1] + 1)):
        return f"{counts[0]}..{counts[-1]}"
    return str(counts)


def _split_posterior(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = h.chunk(2, dim=-1)
    return mean, logvar.clamp(-30.0, 20.0)  # the usual VAE guard against exp overflow
