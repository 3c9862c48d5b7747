"""The config dataclasses: every setting of a run, its default, and the rules that reject what cannot work.

Each `validate(key)` receives the dotted key of its section, so that a message names what the user typed.
Types and unknown keys are checked before (`coerce.from_dict`); these methods hold the rules types cannot say.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the dotted key."""

# ==============================================================================================================
# Tokenizer
# ==============================================================================================================
@dataclass
class MaskConfig:
    """Training-time patch masking: one ratio per batch from a truncated normal, ceil(r*N) patches per sample."""
    ratio_mean: float = 0.6
    ratio_std: float = 0.25
    ratio_min: float = 0.4
    ratio_max: float = 0.6

    def validate(self, key: str) -> None:
        for name in ("ratio_mean", "ratio_min", "ratio_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}.{name}={v} must lie in [0, 1]")
        if self.ratio_min > self.ratio_max:
            raise ConfigError(f"{key}: ratio_min={self.ratio_min} > ratio_max={self.ratio_max}")
        if self.ratio_std < 0:
            raise ConfigError(f"{key}.ratio_std={self.ratio_std} must be >= 0")


@dataclass
class AuxTargetConfig:
    """One auxiliary target predicted by a shallow decoder at masked patches (see tokenizer/targets.py)."""
    name: str = "hog"
    weight: float = 1.0
    # Target-specific options, e.g. {"weights": "path.safetensors", "layer": "layer2"} for resnet-cifar.
    options: dict[str, Any] = field(default_factory=dict)
    # True: when the teacher's weights cannot be found, train without this target (said at start-up)
    # instead of stopping with an error.
    optional: bool = False

    def validate(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name must name a registered auxiliary target (hog, dinov2, ...)")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight={self.weight} must be >= 0")


@dataclass
class TokenizerConfig:
    """The MAETok tokenizer and its AE / VAE / masked-AE baselines (same backbone, chosen by `variant`)."""
    variant: Literal["maetok", "ae", "vae", "mae"] = "maetok"
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    latent_tokens: int = 32
    latent_dim: int = 12
    enc_width: int = 192
    enc_depth: int = 4
    enc_heads: int = 3
    dec_width: int = 192
    dec_depth: int = 4
    dec_heads: int = 3
    mlp_ratio: float = 4.0
    rope_theta: float = 10.0
    layerscale_init: float = 1e-5
    mask: MaskConfig = field(default_factory=MaskConfig)
    aux_targets: list[AuxTargetConfig] = field(default_factory=lambda: [AuxTargetConfig("hog", 1.0)])
    aux_width: int = 192
    aux_depth: int = 3
    aux_heads: int = 3
    aux_loss_on: Literal["masked", "all"] = "masked"
    # Stochastic depth of the pixel decoder's last block (block i: dec_drop_path * i / (dec_depth - 1)); 0 = off.
    dec_drop_path: float = 0.0
    grad_checkpointing: bool = False    # recompute block activations in backward: less memory, ~30% more compute
    # Ordered ("nested") tokens, as in FlexTok / One-D-Piece: training decodes from a random prefix of k latent
    # tokens, so that any k in `token_counts` decodes alone (coarse first, detail later). [] = every k in 1..L.
    token_dropout: Literal["none", "nested"] = "none"
    token_counts: list[int] = field(default_factory=list)
    # How often a training sample keeps all L tokens; the shorter lengths share the rest equally. Raising it buys
    # back full-length quality at the prefixes' expense. None: every allowed length equally often.
    token_full_prob: float | None = None
    # Global latent statistics, measured after training; normalize(z) = (z - mean) / std.
    latent_mean: float = 0.0
    latent_std: float = 1.0

    @property
    def uses_mask(self) -> bool:
        return self.variant in ("maetok", "mae")

    @property
    def uses_aux(self) -> bool:
        return self.variant == "maetok" and len(self.aux_targets) > 0

    @property
    def allowed_token_counts(self) -> list[int]:
        """The prefix lengths that decode: those trained with nested dropout, else only the full length L."""
        if self.token_dropout == "none":
            return [self.latent_tokens]
        return list(self.token_counts) or list(range(1, self.latent_tokens + 1))

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self, key: str) -> None:
        for name in ("image_size", "patch_size", "in_channels", "latent_tokens", "latent_dim", "enc_width",
                     "enc_depth", "enc_heads", "dec_width", "dec_depth", "dec_heads", "aux_width", "aux_depth",
                     "aux_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be a positive integer")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{key}.patch_size={self.patch_size} does not divide "
                              f"{key}.image_size={self.image_size}")
        for part in ("enc", "dec", "aux"):
            w, h = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if w % h or (w // h) % 4:
                raise ConfigError(f"{key}.{part}_width={w} / {part}_heads={h} must give an integer head width "
                                  f"divisible by 4 (RoPE-Mixed rotates pairs on a 2D grid)")
        if self.latent_std <= 0:
            raise ConfigError(f"{key}.latent_std={self.latent_std} must be > 0")
        if not 0.0 <= self.dec_drop_path < 1.0:
            raise ConfigError(f"{key}.dec_drop_path={self.dec_drop_path} must lie in [0, 1)")
        names = [t.name for t in self.aux_targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.aux_targets has duplicate names {names}")
        self._validate_token_counts(key)

    def _validate_token_counts(self, key: str) -> None:
        counts, L = self.token_counts, self.latent_tokens
        if counts and self.token_dropout == "none":
            raise ConfigError(f"{key}.token_counts={counts} needs {key}.token_dropout=nested")
        if counts and (any(not 1 <= k <= L for k in counts) or counts != sorted(set(counts)) or counts[-1] != L):
            raise ConfigError(f"{key}.token_counts={counts} must be increasing, each in [1, {key}.latent_tokens="
                              f"{L}], and end with {L}")
        full = self.token_full_prob
        if full is not None and (self.token_dropout == "none" or not 0.0 <= full <= 1.0
                                 or len(self.allowed_token_counts) < 2):
            raise ConfigError(f"{key}.token_full_prob={full} needs {key}.token_dropout=nested with a length below "
                              f"{L} to train, and must lie in [0, 1]")


@dataclass
class GanConfig:
    """The adversarial terms. Defaults are this toolkit's small-scale GAN; `maetok-b-128` sets the official
    recipe (docs/recipe.md lists every value and where it comes from)."""
    weight: float = 0.0                 # 0 disables the GAN entirely
    start_step: int = 0
    discriminator: Literal["patchgan", "dino"] = "patchgan"
    disc_weights: str = ""              # DINO ViT-S/16 weights (local file) for discriminator="dino"
    adaptive_weight: bool = True
    diffaug: bool = False
    # DiffAugment of the images the discriminator sees (both its own step and the generator's): the cut-out
    # square's side as a fraction of the image side, and the probability that each group (colour, translation,
    # cut-out) is applied to a batch. The official recipe's weak view is 0.2 and 0.5.
    diffaug_cutout: float = 0.5
    diffaug_prob: float = 1.0
    # Consistency regularisation of the discriminator: weight of the MSE between its logits on the images above
    # and on strongly augmented copies (DiffAugment, cut-out 0.5, every group), real and fake. 0 = off.
    consistency_weight: float = 0.0
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99           # of LeCAM's running means of the logits
    # Scales hinge + LeCAM in the discriminator's loss (not the consistency term); the official code uses the
    # generator's GAN weight here.
    disc_loss_weight: float = 1.0
    disc_lr: float = 1e-4
    # True: the discriminator's lr is disc_lr times the generator's multiplier at each step (batch scaling,
    # warmup and cosine of train.optim), as in the official code, where both share one lr and schedule.
    disc_lr_follows_generator: bool = False
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 0.0      # on matrices only, as the generator's optimizer
    disc_grad_clip: float = 0.0         # 0 = no clipping

    def validate(self, key: str) -> None:
        for name in ("weight", "consistency_weight", "lecam_weight", "disc_loss_weight", "disc_weight_decay",
                     "disc_grad_clip", "start_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if self.disc_lr <= 0:
            raise ConfigError(f"{key}.disc_lr={self.disc_lr} must be > 0")
        if not 0.0 <= self.diffaug_cutout < 1.0 or not 0.0 <= self.diffaug_prob <= 1.0:
            raise ConfigError(f"{key}.diffaug_cutout={self.diffaug_cutout} must lie in [0, 1) and "
                              f"{key}.diffaug_prob={self.diffaug_prob} in [0, 1]")
        if not 0.0 <= self.lecam_decay < 1.0 or not all(0.0 <= b < 1.0 for b in self.disc_betas):
            raise ConfigError(f"{key}.lecam_decay={self.lecam_decay} and {key}.disc_betas="
                              f"{list(self.disc_betas)} must lie in [0, 1)")


@dataclass
class TokenizerLossConfig:
    pixel_weight: float = 1.0
    perceptual: Literal["none", "lpips", "resnet-cifar"] = "none"
    perceptual_weight: float = 1.0
    # Local weights: resnet-cifar: one safetensors file; lpips: "VGG16_FILE,LPIPS_LIN_FILE". "" = look in
    # $MAETOK_SHARED_DATA (LPIPS weights cannot be downloaded on every machine).
    perceptual_weights: str = ""
    perceptual_warmup_steps: int = 0    # linear ramp-in of the perceptual term
    kl_weight: float = 1e-6             # VAE variant only
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class DecoderFinetuneConfig:
    """Stage 2: encoder frozen, auxiliary decoders dropped, mask ratio annealed linearly from `start` to 0."""
    init_from: str = ""                 # stage-1 run directory or weights directory
    mask_ratio_start: float = 0.6
    anneal_steps: int = 1000            # 0: no masking at all

    def validate(self, key: str) -> None:
        if not 0.0 <= self.mask_ratio_start <= 1.0:
            raise ConfigError(f"{key}.mask_ratio_start={self.mask_ratio_start} must lie in [0, 1]")
        if self.anneal_steps < 0:
            raise ConfigError(f"{key}.anneal_steps={self.anneal_steps} must be >= 0")


# ==============================================================================================================
# Diffusion
# ==============================================================================================================
@dataclass
class SiTConfig:
    """SiT on (B, L, C) latent tokens; `variant: lightningdit` swaps in RoPE, SwiGLU, RMSNorm and qk-norm."""
    variant: Literal["sit", "lightningdit"] = "sit"
    in_channels: int = 12               # latent dim C
    num_tokens: int = 32                # latent tokens L
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10               # label `num_classes` is the null label used by CFG
    class_dropout: float = 0.1
    grad_checkpointing: bool = False
    # > 0: a shortcut student (train/distill_task.py) that samples in 1, 2, 4, ... up to this many steps, one
    # forward each, with the guidance below folded into its weights; 0: a velocity model, as trained by flow matching.
    shortcut_steps: int = 0
    shortcut_cfg_scale: float = 1.0
    shortcut_cfg_interval: tuple[float, float] = (0.0, 1.0)

    def validate(self, key: str) -> None:
        steps, (low, high) = self.shortcut_steps, self.shortcut_cfg_interval
        if steps < 0 or steps & (steps - 1) or self.shortcut_cfg_scale < 1 or not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"{key}.shortcut_steps={steps} must be 0 or a power of two, shortcut_cfg_scale="
                              f"{self.shortcut_cfg_scale} >= 1 and shortcut_cfg_interval={[low, high]} in [0, 1]")
        for name in ("in_channels", "num_tokens", "hidden", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be a positive integer")
        if self.hidden % self.heads:
            raise ConfigError(f"{key}.hidden={self.hidden} is not divisible by {key}.heads={self.heads}")
        if self.num_classes < 0:
            raise ConfigError(f"{key}.num_classes={self.num_classes} must be >= 0 (0 = unconditional)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"{key}.class_dropout={self.class_dropout} must lie in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{key}.mlp_ratio={self.mlp_ratio} must be > 0")
        if self.variant == "lightningdit" and (self.hidden // self.heads) % 2:
            raise ConfigError(f"{key}.hidden={self.hidden} / heads={self.heads} must give an even head width "
                              f"(variant lightningdit rotates channel pairs with RoPE)")


@dataclass
class TransportConfig:
    """Flow matching with one time convention: t = 0 is data, t = 1 is noise."""
    path: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    cos_loss_weight: float = 0.0        # LightningDiT velocity-direction term

    def validate(self, key: str) -> None:
        if self.lognormal_std <= 0:
            raise ConfigError(f"{key}.lognormal_std={self.lognormal_std} must be > 0")
        if self.cos_loss_weight < 0:
            raise ConfigError(f"{key}.cos_loss_weight={self.cos_loss_weight} must be >= 0")


@dataclass
class SampleConfig:
    sampler: Literal["euler", "heun", "sde"] = "heun"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    sde_t_min: float = 0.04
    seed: int = 0

    def validate(self, key: str) -> None:
        low, high = self.cfg_interval
        if not (0.0 <= low <= high <= 1.0):
            raise ConfigError(f"{key}.cfg_interval={list(self.cfg_interval)} must satisfy 0 <= low <= high <= 1")
        if self.steps < 1:
            raise ConfigError(f"{key}.steps={self.steps} must be >= 1")
        if self.sampler == "sde" and self.steps < 2:
            # One SDE step is only the deterministic last step, taken at t = 1: it returns minus the noise.
            raise ConfigError(f"{key}.steps={self.steps}: the sde sampler needs at least 2 steps")
        if self.cfg_scale < 1:
            # As the official samplers, guidance applies only above 1: a smaller scale would silently mean none.
            raise ConfigError(f"{key}.cfg_scale={self.cfg_scale} must be >= 1 (1 = no guidance; the samplers "
                              f"guide only above 1, as the official ones)")
        if not 0.0 < self.sde_t_min < 1.0:
            raise ConfigError(f"{key}.sde_t_min={self.sde_t_min} must lie in (0, 1)")
        check_seed(self.seed, f"{key}.seed")


def check_seed(seed: int, key: str) -> None:
    """Seeds are mixed with steps and ranks into generator seeds; [0, 2^32) keeps every mix in range."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key}={seed} must lie in [0, 2^32)")


# ==============================================================================================================
# Shared: data, optimisation, the training loop
# ==============================================================================================================
@dataclass
class DataConfig:
    spec: str = "shapes"                # see maetok.data.open_dataset: folder, zip:..., cifar:..., npz:..., shapes
    split: str = "train"
    image_size: int = 32
    random_flip: bool = True
    num_workers: int = 0
    strict: bool = False                # first unreadable image is an error instead of a skip
    limit: int = 0                      # use only the first N items (0 = all)
    cache_dir: str = ""                 # decoded-array cache ("" = $MAETOK_CACHE or ~/.cache/maetok)

    def validate(self, key: str) -> None:
        if not self.spec:
            raise ConfigError(f"{key}.spec must name a dataset: shapes, a folder, zip:..., cifar:... or npz:...")
        if self.image_size <= 0:
            raise ConfigError(f"{key}.image_size={self.image_size} must be a positive integer")
        if self.num_workers < 0 or self.limit < 0:
            raise ConfigError(f"{key}.num_workers and {key}.limit must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    # 0: `lr` is the learning rate. N > 0: `lr` is the rate for a global batch of N, scaled linearly to
    # train.batch_size (the official tokenizer recipe: N = 256). See train/optim.peak_lr.
    lr_reference_batch: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0              # 0 disables clipping

    def validate(self, key: str) -> None:
        if not 0 < self.lr <= 1:  # above 1, AdamW moves every weight by more than 1 per step: a typo
            raise ConfigError(f"{key}.lr={self.lr} must lie in (0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas={list(self.betas)} must lie in [0, 1)")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.lr_reference_batch < 0:
            raise ConfigError(f"{key}.warmup_steps, {key}.grad_clip and {key}.lr_reference_batch must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64                # global batch, split across ranks
    seed: int = 0
    ema_decay: float = 0.999
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    log_every: int = 50
    image_every: int = 500              # PNG grids of reconstructions / samples
    ckpt_every: int = 500
    keep_last: int = 2
    snapshot_every: int = 0             # also keep the EMA model as snapshots/step-N every N steps (0: never)
    max_bad_steps: int = 10             # consecutive non-finite steps before the run stops
    # Also send log.jsonl's records and the preview grids to TensorBoard (<run>/tensorboard/) or W&B (rank 0).
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, key: str) -> None:
        if self.steps < 0:
            raise ConfigError(f"{key}.steps={self.steps} must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"{key}.batch_size={self.batch_size} must be > 0")
        check_seed(self.seed, f"{key}.seed")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{key}.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.keep_last < 1 or self.ckpt_every < 1 or self.log_every < 1 or self.image_every < 1:
            raise ConfigError(f"{key}.keep_last, ckpt_every, log_every and image_every must be >= 1")
        if self.snapshot_every < 0:
            raise ConfigError(f"{key}.snapshot_every={self.snapshot_every} must be >= 0 (0: no snapshots)")


@dataclass
class TokenizerRunConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: Literal[1, 2] = 1
    decoder_ft: DecoderFinetuneConfig = field(default_factory=DecoderFinetuneConfig)
    stats_batches: int = 20             # batches used to measure the latent mean/std after training
    # auto: when training runs in bf16, frozen network teachers (DINOv2, SigLIP, ...) hold bf16 weights and run
    # without autocast (half the memory traffic of fp32 activations); fp32: full precision. HOG is always fp32.
    teacher_precision: Literal["auto", "fp32"] = "auto"

    def validate(self, key: str) -> None:
        if self.data.image_size != self.model.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} differs from "
                              f"model.image_size={self.model.image_size}")
        if self.stage == 2 and not self.decoder_ft.init_from:
            raise ConfigError("stage=2 (decoder fine-tuning) needs decoder_ft.init_from = a stage-1 run")


@dataclass
class DiffusionRunConfig:
    model: SiTConfig = field(default_factory=SiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tokenizer: str = ""                 # tokenizer weights directory (for online encoding and sample grids)
    latents: str = ""                   # latent cache directory (from `maetok latents cache`); "" = encode online
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ema_decay=0.9999, optim=OptimConfig(
        lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, schedule="constant")))

    def validate(self, key: str) -> None:
        if not self.latents and not self.tokenizer:
            raise ConfigError("diffusion training needs `latents` (a latent cache) or `tokenizer` (to encode online)")
        if self.model.num_classes == 0 and self.sample.cfg_scale != 1.0:
            # Found here, not when the first preview grid is sampled hundreds of steps in.
            raise ConfigError(f"sample.cfg_scale={self.sample.cfg_scale}: guidance needs a class-conditional model "
                              f"and model.num_classes=0; add sample.cfg_scale=1")
