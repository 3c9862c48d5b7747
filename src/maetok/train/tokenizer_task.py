"""The tokenizer as a training task: stage 1 (mask modelling + auxiliary targets) and stage 2 (decoder fine-tuning).

Loss = pixel MSE + perceptual (ramped in) + sum_k w_k * aux_k (masked patches) + KL (vae) + adaptive GAN.
The discriminator's step (after each generator step): hinge + LeCAM + consistency regularisation.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import (ConfigError, TokenizerConfig, TokenizerRunConfig, config_source, from_dict, set_config_source,
                      to_dict)
from ..data.images import save_image_grid
from ..io.hub import MissingWeightsError
from ..io.pretrained import TOKENIZER_KIND, load_tokenizer
from ..io.teachers import build_discriminator, build_perceptual
from ..tokenizer.losses import (LeCAM, adaptive_gan_weight, consistency_regularization, diff_augment, hinge_d_loss,
                               hinge_g_loss, kl_loss, ramp)
from ..tokenizer.model import MAETok
from ..tokenizer.targets import TargetLosses, build_target
from .compiled import CompiledOrEager, uses_bf16
from .loop import Task
from .optim import batch_lr_scale, lr_factor, weight_decay_groups
from .randomness import pick_flipped

log = logging.getLogger("maetok.train")


# Model fields stage 2 does not use: it builds no auxiliary decoders, takes its mask ratio from decoder_ft and
# measures the latent statistics again. They are kept from stage 1 and not compared with the request.
STAGE2_UNUSED = frozenset({"mask", "aux_targets", "aux_width", "aux_depth", "aux_heads", "aux_loss_on",
                           "latent_mean", "latent_std"})
# How to compute or regularise, not what (the weights do not depend on them): a stage-2 request may set them.
STAGE2_FREE = frozenset({"grad_checkpointing", "dec_drop_path"})
# The consistency term's strong view: the official loss hard-codes DiffAugment with cut-out 0.5, every group.
STRONG_CUTOUT = 0.5


def stage1_weights_dir(init_from: str) -> Path:
    """The weights folder of decoder_ft.init_from: a stage-1 run directory (its model/) or a weights folder."""
    src = Path(init_from)
    if (src / "model" / "config.json").is_file():
        return src / "model"
    if (src / "config.json").is_file():
        return src
    hint = (" (the run has not finished: its model/ is written at the end of training)"
            if (src / "checkpoints").is_dir() else "")
    raise ConfigError(f"decoder_ft.init_from={init_from}: no stage-1 weights there (neither {src}/model/config.json "
                      f"nor {src}/config.json){hint}")


def stage2_config(cfg: TokenizerRunConfig, resumed_config: dict[str, Any] | None = None) -> TokenizerRunConfig:
    """Stage 2 fine-tunes the stage-1 model, so its model config is stage 1's (decoder_ft.init_from), not the
    preset's. Model overrides that contradict it are refused: they could only fail to load or mislead.

    `resumed_config`: the run config of the stage-2 checkpoint being resumed. It records stage 1's model config,
    so a resumed run does not need decoder_ft.init_from any more (its weights are in the checkpoint)."""
    if resumed_config is not None:
        source_name = "the checkpoint being resumed"
        if not isinstance(resumed_config.get("model"), dict):
            raise ConfigError("the stage-2 checkpoint being resumed holds no model config")
        stage1 = from_dict(TokenizerConfig, resumed_config["model"], "checkpoint config: model")
    else:
        weights_dir = stage1_weights_dir(cfg.decoder_ft.init_from)
        source_name = f"decoder_ft.init_from={cfg.decoder_ft.init_from}"
        meta = json.loads((weights_dir / "config.json").read_text())
        if meta.get("kind") == TOKENIZER_KIND:
            stage1 = from_dict(TokenizerConfig, meta["config"], f"{weights_dir}/config.json:config")
        else:  # an official checkpoint: its config comes with the conversion
            stage1 = load_tokenizer(weights_dir).config
    source = config_source(cfg)
    asked, have = to_dict(cfg.model), to_dict(stage1)
    if source is None:  # built in code: every field was asked for
        explicit = set(asked)
    else:
        keys = source.override_keys()
        explicit = set(asked) if "model" in keys else {k.split(".")[1] for k in keys if k.startswith("model.")}
    conflicts = [f"model.{k}: stage 1 has {have[k]!r}, requested {asked[k]!r}" for k in sorted(explicit)
                 if k not in STAGE2_UNUSED | STAGE2_FREE and asked[k] != have[k]]
    data_size_asked = source is None or "data.image_size" in source.override_keys()
    if data_size_asked and cfg.data.image_size != stage1.image_size:
        conflicts.append(f"data.image_size: stage 1 has {stage1.image_size}, requested {cfg.data.image_size}")
    if conflicts:
        raise ConfigError(f"stage 2 fine-tunes the stage-1 model and takes its model config from {source_name}; "
                          f"these settings contradict it:\n  " +
                          "\n  ".join(conflicts) + "\nDrop them (stage 2 needs no model.* overrides).")
    model = {**have, **{k: asked[k] for k in STAGE2_FREE & explicit}}
    data = to_dict(cfg)
    data["model"], data["data"]["image_size"] = model, stage1.image_size
    out = from_dict(TokenizerRunConfig, data)
    taken = {k: v for k, v in have.items() if k not in STAGE2_UNUSED and asked[k] != v}
    if taken:
        log.info("stage 2: model config from %s (differs from the preset in %s)", source_name,
                 ", ".join(f"{k}={v!r}" for k, v in sorted(taken.items())))
    return set_config_source(out, source)


class TokenizerTask(Task):
    def __init__(self, cfg: TokenizerRunConfig, device: torch.device, preview: torch.Tensor | None = None,
                 resuming: bool = False):
        """resuming: a checkpoint will restore the weights, so stage 2 does not load stage 1's."""
        self.cfg, self.device = cfg, device
        mcfg = cfg.model
        self.targets = nn.ModuleDict()
        if cfg.stage == 1 and mcfg.uses_aux:
            kept = []
            for t in mcfg.aux_targets:
                try:
                    self.targets[t.name] = build_target(t, mcfg.image_size, mcfg.patch_size).to(device).eval()
                    kept.append(t)
                except MissingWeightsError as e:
                    if not t.optional:
                        raise
                    log.warning("auxiliary target %s is optional and its weights are missing: training WITHOUT "
                                "it (%s)", t.name, e)
            # The run's config records the targets actually used.
            mcfg.aux_targets = kept
            log.info("auxiliary targets: %s", ", ".join(f"{t.name} (dim {self.targets[t.name].dim}, "
                                                        f"weight {t.weight})" for t in mcfg.aux_targets))
        elif mcfg.aux_targets and mcfg.variant != "maetok":
            log.info("variant %s: auxiliary targets %s are not used", mcfg.variant,
                     [t.name for t in mcfg.aux_targets])
        self.target_fns = self._prepare_targets()
        self.aux_losses = CompiledOrEager(TargetLosses({name: t.loss for name, t in self.targets.items()}),
                                          "the auxiliary losses", enabled=cfg.train.compile and bool(self.targets))
        aux_dims = {n: t.dim for n, t in self.targets.items()}
        self.model = MAETok(mcfg, aux_dims).to(device)
        if cfg.stage == 2:
            self._init_stage2(load_stage1=not resuming)
        self.perceptual = build_perceptual(cfg.loss)
        if self.perceptual is not None:
            self.perceptual = self.perceptual.to(device)
        self.disc = self.disc_opt = self.lecam = None
        gan = cfg.loss.gan
        if gan.weight > 0:
            self.disc = build_discriminator(gan, mcfg.in_channels).to(device)
            self.disc_opt = self._build_disc_optimizer()
            self.lecam = LeCAM(gan.lecam_decay).to(device) if gan.lecam_weight > 0 else None
        self.preview = preview

    def _build_disc_optimizer(self) -> torch.optim.AdamW:
        gan = self.cfg.loss.gan
        params = [p for p in self.disc.parameters() if p.requires_grad]
        # Without weight decay one group, as before: checkpoints of such runs keep resuming.
        groups = weight_decay_groups(params, gan.disc_weight_decay) if gan.disc_weight_decay > 0 else params
        return torch.optim.AdamW(groups, lr=self._disc_lr(0), betas=tuple(gan.disc_betas), weight_decay=0.0)

    def _disc_lr(self, step: int) -> float:
        gan, train = self.cfg.loss.gan, self.cfg.train
        if not gan.disc_lr_follows_generator:
            return gan.disc_lr
        return gan.disc_lr * batch_lr_scale(train) * lr_factor(step, train.steps, train.optim)

    def _weak_view(self, images: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees of `images` in the GAN terms: DiffAugment'ed when loss.gan.diffaug."""
        gan = self.cfg.loss.gan
        return diff_augment(images, cutout=gan.diffaug_cutout, p_apply=gan.diffaug_prob) if gan.diffaug else images

    def _prepare_targets(self) -> dict[str, Callable]:
        """How each frozen target runs. Network teachers hold bf16 weights when training runs in bf16 (see
        teacher_precision); with train.compile every target is compiled too, as the model is (at maetok-b-128
        size the teachers are ~40% of a training step's FLOPs, and compiling fuses their elementwise work)."""
        cfg = self.cfg
        if cfg.teacher_precision == "auto" and uses_bf16(self.device, cfg.train.precision):
            for target in self.targets.values():
                if target.half_precision_ok:
                    target.to_half_precision()
        return {name: CompiledOrEager(t, f"target {name}", enabled=cfg.train.compile)
                for name, t in self.targets.items()}

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every target's per-patch features (float32) of `images`."""
        patch = self.model.config.patch_size
        feats = {}
        # Outside autocast: HOG stays float32 and bf16 teachers stay bf16 throughout (autocast would run their
        # norms in float32 and cast every activation back and forth).
        with torch.autocast(images.device.type, enabled=False):
            for name, fn in self.target_fns.items():
                feats[name] = fn(images, patch)
        return feats

    def _init_stage2(self, load_stage1: bool = True) -> None:
        """Load stage-1 encoder + decoder, freeze the encoder; aux decoders are gone (not built)."""
        weights_from = "the checkpoint being resumed"
        if load_stage1:
            weights_from = weights_dir = stage1_weights_dir(self.cfg.decoder_ft.init_from)
            stage1 = load_tokenizer(weights_dir)
            missing, unexpected = self.model.load_state_dict(stage1.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.startswith("aux_decoders.")]:
                raise ConfigError(f"{weights_dir}: stage-1 weights do not fit this model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}); use the same model config for both stages")
            mask_token = self.model.encoder.mask_token
            if mask_token is not None and self.cfg.decoder_ft.mask_ratio_start > 0 and not mask_token.any():
                # Still at its all-zero init: the frozen encoder would see masked inputs it was never trained on.
                raise ConfigError(f"{weights_dir}: the stage-1 weights hold no trained encoder mask token (released "
                                  f"official checkpoints leave it out), so stage 2 cannot mask its inputs; set "
                                  f"decoder_ft.mask_ratio_start=0 to fine-tune the decoder on unmasked latents")
        self.model.encoder.requires_grad_(False)  # before the optimizer is built: it gets the decoder only
        log.info("stage 2: decoder fine-tuning from %s; encoder frozen; mask ratio %.2f -> 0 over %d steps",
                 weights_from, self.cfg.decoder_ft.mask_ratio_start, self.cfg.decoder_ft.anneal_steps)
        if self.cfg.decoder_ft.anneal_steps > self.cfg.train.steps:
            # The decoder would never be fine-tuned on unmasked latents, which is what inference gives it.
            log.warning("decoder_ft.anneal_steps=%d exceeds train.steps=%d: the mask ratio never reaches 0 "
                        "(set decoder_ft.anneal_steps to at most train.steps, e.g. half of it)",
                        self.cfg.decoder_ft.anneal_steps, self.cfg.train.steps)

    # ----- Task protocol ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def mask_ratio(self, step: int) -> float | None:
        if self.cfg.stage == 2:
            ft = self.cfg.decoder_ft
            if not self.model.config.uses_mask:
                return None
            if ft.anneal_steps <= 0:
                return 0.0
            return ft.mask_ratio_start * max(0.0, 1.0 - step / ft.anneal_steps)
        return None  # stage 1: the model samples its own ratio per batch

    def training_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]:
        cfg, lcfg = self.cfg, self.cfg.loss
        images = batch[0]
        if cfg.data.random_flip:
            images = pick_flipped(images, images.flip(-1))
        if cfg.stage == 2:
            self.model.encoder.eval()
        out = model(images, mask_ratio=self.mask_ratio(step))
        losses: dict[str, torch.Tensor] = {}
        recon = out.recon.float()
        losses["loss_pixel"] = F.mse_loss(recon, images)
        rec = lcfg.pixel_weight * losses["loss_pixel"]
        if self.perceptual is not None:
            losses["loss_perceptual"] = self.perceptual(recon, images)
            rec = rec + lcfg.perceptual_weight * ramp(step, lcfg.perceptual_warmup_steps) * losses["loss_perceptual"]
        total = rec
        if out.aux:
            feats = self.teacher_features(images)
            mask = out.mask if self.model.config.aux_loss_on == "masked" else None
            aux = self.aux_losses(out.aux, feats, mask)
            for t in self.model.config.aux_targets:
                losses[f"loss_aux_{t.name}"] = aux[t.name]
                total = total + t.weight * aux[t.name]
        if out.posterior is not None:
            losses["loss_kl"] = kl_loss(*out.posterior)
            total = total + lcfg.kl_weight * losses["loss_kl"]
        if self.disc is not None and step >= lcfg.gan.start_step:
            losses["loss_gan_g"] = hinge_g_loss(self.disc(self._weak_view(recon)))
            weight = torch.tensor(1.0, device=recon.device)
            if lcfg.gan.adaptive_weight and torch.is_grad_enabled():
                weight = adaptive_gan_weight(rec, losses["loss_gan_g"], self.model.decoder.head.weight)
            losses["gan_weight"] = weight
            total = total + lcfg.gan.weight * weight * losses["loss_gan_g"]
        losses["loss"] = total
        losses["_recon"] = recon.detach()  # for the discriminator step; not logged (not a scalar)
        losses["_images"] = images
        if out.mask is not None:
            losses["mask_ratio"] = out.mask.float().mean().detach()
        return losses

    def after_step(self, batch: Any, step: int, outputs: dict[str, Any]) -> dict[str, float]:
        gan = self.cfg.loss.gan
        if self.disc is None or step < gan.start_step:
            return {}
        # LeCAM moves its running means in its forward: kept to be put back if this step is skipped (a NaN there
        # would otherwise poison every later step).
        lecam_before = None if self.lecam is None else {k: v.clone() for k, v in self.lecam.state_dict().items()}
        terms = self._disc_loss_terms(outputs["_images"], outputs["_recon"])
        d_loss = terms["loss_disc"]
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        _average_grads_across_ranks(self.disc)  # one discriminator for all ranks, as DDP would keep it
        # The loop guards the generator's step; this guards the discriminator's, which would otherwise put
        # non-finite weights into every later checkpoint. The averaged gradients are the same on every rank, so
        # all take the same branch; one host sync, as the logged loss needs anyway.
        grads = [p.grad for p in self.disc.parameters() if p.grad is not None]
        # One multi-tensor kernel (torch.nn.utils.get_total_norm is newer than the torch we support).
        d_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float() if grads \
            else torch.zeros((), device=d_loss.device)
        if gan.disc_grad_clip > 0 and grads:  # clip_grad_norm_'s rule, on the norm computed above
            torch._foreach_mul_(grads, (gan.disc_grad_clip / (d_norm + 1e-6)).clamp(max=1.0))
        names = list(terms)
        values = torch.stack([*(terms[n].detach().float() for n in names), d_norm]).tolist()
        if math.isfinite(values[-1]):
            for group in self.disc_opt.param_groups:
                group["lr"] = self._disc_lr(step)
            self.disc_opt.step()
        else:
            self.disc_opt.zero_grad(set_to_none=True)
            if lecam_before is not None:
                self.lecam.load_state_dict(lecam_before)
            log.warning("step %d: non-finite discriminator gradient; discriminator step skipped", step)
        return dict(zip(names, values[:-1]))

    def _disc_loss_terms(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's loss ("loss_disc") and its regularisers, as the official MAETok loss:
        disc_loss_weight * (hinge + lecam_weight * LeCAM) + consistency_weight * MSE(D(weak), D(strong))."""
        gan = self.cfg.loss.gan
        real_view, fake_view = self._weak_view(real), self._weak_view(fake)
        logits_real, logits_fake = self.disc(real_view), self.disc(fake_view)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        terms = {}
        if self.lecam is not None:
            terms["loss_disc_lecam"] = self.lecam(logits_real, logits_fake)
            d_loss = d_loss + gan.lecam_weight * terms["loss_disc_lecam"]
        d_loss = gan.disc_loss_weight * d_loss
        if gan.consistency_weight > 0:
            strong_real, strong_fake = (diff_augment(x, cutout=STRONG_CUTOUT) for x in (real, fake))
            terms["loss_disc_cr"] = consistency_regularization(
                torch.cat([logits_real, logits_fake]), torch.cat([self.disc(strong_real), self.disc(strong_fake)]))
            d_loss = d_loss + gan.consistency_weight * terms["loss_disc_cr"]
        return {"loss_disc": d_loss, **terms}

    def state_dict(self) -> dict[str, Any]:
        if self.disc is None:
            return {}
        state = {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
            if self.lecam is not None:
                self.lecam.load_state_dict(state["lecam"])

    @torch.no_grad()
    def write_images(self, ema_model: nn.Module, step: int, out_dir: Path) -> None:
        if self.preview is None:
            return
        x = self.preview.to(self.device)
        recon = ema_model.eval().decode(ema_model.encode(x)).clamp(-1, 1)
        # Row pairs: originals above their reconstructions.
        n = x.shape[0]
        save_image_grid(torch.cat([x, recon]).cpu(), out_dir / "images" / f"recon_{step:08d}.png", nrow=n)

    @torch.no_grad()
    def finish(self, ema_model: nn.Module, out_dir: Path) -> None:
        """Nothing to do here: latent statistics need data and are measured by the runner (see run_tokenizer)."""


def _average_grads_across_ranks(module: nn.Module) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
