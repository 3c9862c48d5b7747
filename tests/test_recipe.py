"""The paper's recipe: docs/recipe.md's table against the presets, the learning-rate rule, the discriminator's
loss, and a 2-step run of `maetok-b-128` through every loss term with stand-in weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from maetok.config import DiffusionRunConfig, TokenizerRunConfig, load_config, resolve_config_path, to_dict
from maetok.io import teachers
from maetok.nets.lpips import LPIPS
from maetok.tokenizer.losses import diff_augment, hinge_d_loss
from maetok.tokenizer.model import MAETok
from maetok.train.optim import lr_factor, peak_lr
from maetok.train.run import run_tokenizer
from maetok.train.tokenizer_task import TokenizerTask

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"
TINY = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
        "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
        "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=2", "model.aux_width=16",
        "model.aux_heads=1", "model.aux_depth=1", "train.log_every=1", "train.image_every=100",
        "train.ckpt_every=100", "stats_batches=1", "data.spec=shapes", "data.limit=16", "data.num_workers=0",
        "train.batch_size=4"]
TINY_TEACHER = "{pretrained: false, model_kwargs: {depth: 1, embed_dim: 16, num_heads: 1}}"


def recipe_rows() -> list[dict[str, str]]:
    """The rows of docs/recipe.md's table, as {column: cell}."""
    lines = [line for line in RECIPE.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert all(len(r) == len(header) for r in rows)
    return rows


def checked_rows() -> list[tuple[str, str, str]]:
    """(preset, dotted key, our value as YAML) of every row that names a preset key."""
    out = []
    for row in recipe_rows():
        if row["preset key"] != "—":
            preset, key = row["preset key"].strip("`").split(":")
            out.append((preset, key, row["our value"].strip("`")))
    return out


def preset_value(preset: str, key: str):
    kind = TokenizerRunConfig if resolve_config_path(preset).parent.name == "tokenizer" else DiffusionRunConfig
    node = to_dict(load_config(kind, preset))
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("preset, key, value", checked_rows(), ids=lambda v: str(v))
def test_recipe_table_matches_the_presets(preset, key, value):
    assert preset_value(preset, key) == yaml.safe_load(value), f"docs/recipe.md and {preset} differ on {key}"


def test_recipe_table_covers_the_official_settings():
    keys = {key for preset, key, _ in checked_rows() if preset == "maetok-b-128"}
    assert {"loss.pixel_weight", "loss.perceptual_weight", "loss.perceptual_warmup_steps", "loss.gan.weight",
            "loss.gan.adaptive_weight", "loss.gan.start_step", "loss.gan.discriminator", "loss.gan.diffaug",
            "loss.gan.consistency_weight", "loss.gan.lecam_weight", "train.optim.betas", "train.optim.weight_decay",
            "train.optim.grad_clip", "train.optim.lr", "train.optim.lr_reference_batch", "train.batch_size",
            "model.dec_drop_path", "model.mask.ratio_min", "model.mask.ratio_max", "model.aux_width",
            "model.aux_depth", "model.aux_heads", "train.ema_decay"} <= keys
    presets = {preset for preset, _, _ in checked_rows()}
    assert presets == {"maetok-b-128", "maetok-b-128-decoder-ft", "sit-xl-1", "lightningdit-xl-1"}


def test_the_learning_rate_scales_with_the_global_batch():
    cfg = load_config(TokenizerRunConfig, "maetok-b-128")
    assert peak_lr(cfg.train) == pytest.approx(2e-4)  # 1e-4 * 512 / 256, the official rate
    small = load_config(TokenizerRunConfig, "maetok-b-128", ["train.batch_size=128"])
    assert peak_lr(small.train) == pytest.approx(5e-5)
    for preset in ("cpu-32", "cpu-64", "cifar10"):  # off unless a preset asks for it
        cfg = load_config(TokenizerRunConfig, preset)
        assert peak_lr(cfg.train) == cfg.train.optim.lr


def test_presets_of_the_demo_and_tests_keep_the_old_defaults():
    for preset in ("cpu-32", "cpu-64", "cifar10"):
        cfg = load_config(TokenizerRunConfig, preset)
        gan = cfg.loss.gan
        assert cfg.model.dec_drop_path == 0 and cfg.train.optim.lr_reference_batch == 0
        assert (gan.consistency_weight, gan.disc_loss_weight, gan.lecam_decay, gan.disc_betas) == (0, 1, 0.99,
                                                                                                   (0.5, 0.9))
        assert (gan.diffaug_cutout, gan.diffaug_prob, gan.disc_weight_decay, gan.disc_grad_clip) == (0.5, 1, 0, 0)
        assert not gan.disc_lr_follows_generator
    assert load_config(DiffusionRunConfig, "sit-cpu", ["latents=x"]).train.optim.lr_reference_batch == 0


class MeanLogit(torch.nn.Module):
    """A discriminator whose logits are a linear function of the image: every term has a closed form."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(1, 2, 3))[:, None]


def test_discriminator_loss_is_the_official_one():
    """disc_loss_weight * (hinge + lecam_weight * LeCAM) + consistency_weight * MSE(D(weak), D(strong)), with
    the strong view drawn after the weak ones; the lr follows the generator's (batch scale and schedule)."""
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + [
        "loss.gan.weight=0.4", "loss.gan.disc_loss_weight=0.4", "loss.gan.consistency_weight=4.0",
        "loss.gan.lecam_weight=0.001", "loss.gan.lecam_decay=0.0", "loss.gan.disc_lr_follows_generator=true",
        "train.optim.lr_reference_batch=2", "train.steps=10", "train.optim.warmup_steps=2"])
    task = TokenizerTask(cfg, torch.device("cpu"))
    task.disc = MeanLogit()
    real, fake = torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(5)
    terms = task._disc_loss_terms(real, fake)
    torch.manual_seed(5)
    d = task.disc
    lr_, lf = d(real), d(fake)
    lecam = torch.relu(lr_ - lf.mean()).pow(2).mean() + torch.relu(lr_.mean() - lf).pow(2).mean()  # decay 0
    strong = torch.cat([d(diff_augment(real)), d(diff_augment(fake))])
    cr = (torch.cat([lr_, lf]) - strong).pow(2).mean()
    want = 0.4 * (hinge_d_loss(lr_, lf) + 0.001 * lecam) + 4.0 * cr
    torch.testing.assert_close(terms["loss_disc"], want)
    torch.testing.assert_close(terms["loss_disc_cr"], cr)
    assert task._disc_lr(5) == pytest.approx(1e-4 * 2 * lr_factor(5, 10, cfg.train.optim))


def fake_lpips_files(folder: Path) -> str:
    """LPIPS weight files with random values, in the two files' real layout: 'VGG16_FILE,LPIPS_LIN_FILE'."""
    state = LPIPS().state_dict()
    vgg, lin = folder / "vgg16.safetensors", folder / "lin.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("features.")}, str(vgg))
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("lin")}, str(lin))
    return f"{vgg},{lin}"


def test_maetok_b_128_runs_two_steps_through_every_loss_term(tmp_path, monkeypatch):
    """The recipe end to end on CPU: tiny sizes, random teachers (DINOv2, SigLIP), random LPIPS weights and a
    tiny random DINO discriminator; GAN and consistency regularisation on from step 0."""
    timm = pytest.importorskip("timm")
    built = []

    def tiny_dino(weights: str = "", pretrained: bool = True, image_size: int = 224):
        built.append(weights)
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=image_size,
                                 dynamic_img_size=True, embed_dim=24, depth=12, num_heads=2)

    monkeypatch.setattr(teachers, "dino_backbone", tiny_dino)
    targets = (f"model.aux_targets=[{{name: hog, weight: 1.0}}, {{name: dinov2, weight: 1.0, options: "
               f"{TINY_TEACHER}}}, {{name: siglip, weight: 1.0, options: {TINY_TEACHER}}}]")
    # An explicit discriminator file, so the up-front weights check finds one; the tiny backbone ignores it.
    (tmp_path / "dino.safetensors").write_bytes(b"")
    cfg = load_config(TokenizerRunConfig, "maetok-b-128", TINY + [
        targets, "train.steps=2", "loss.gan.start_step=0", "loss.perceptual_warmup_steps=0",
        f"loss.perceptual_weights={fake_lpips_files(tmp_path)}", f"loss.gan.disc_weights={tmp_path}/dino.safetensors"])
    assert cfg.model.dec_drop_path == 0.05 and cfg.loss.gan.consistency_weight == 4.0
    out = tmp_path / "run"
    assert run_tokenizer(cfg, out, device="cpu")["finished"]
    assert built, "the DINO discriminator was not built"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    terms = {"loss", "loss_pixel", "loss_perceptual", "loss_aux_hog", "loss_aux_dinov2", "loss_aux_siglip",
             "loss_gan_g", "gan_weight", "loss_disc", "loss_disc_lecam", "loss_disc_cr"}
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert terms <= set(record), f"missing: {sorted(terms - set(record))}"
        assert all(math.isfinite(record[k]) for k in terms), {k: record[k] for k in terms}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["loss"]["gan"]["consistency_weight"] == 4.0 and saved["model"]["dec_drop_path"] == 0.05


def test_the_trainer_applies_the_batch_scaled_rate(tmp_path):
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=1", "train.optim.warmup_steps=0",
                                                            "train.optim.lr_reference_batch=2"])
    assert run_tokenizer(cfg, tmp_path / "run", device="cpu")["finished"]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["lr"] == pytest.approx(peak_lr(cfg.train) * lr_factor(0, 1, cfg.train.optim))



def test_decoder_drop_path_follows_the_linear_rule_in_the_pixel_decoder_only():
    cfg = load_config(TokenizerRunConfig, "cpu-32", ["model.dec_drop_path=0.05", "model.dec_depth=3"]).model
    model = MAETok(cfg, {"hog": 8})
    assert [b.drop_path.rate for b in model.decoder.blocks] == pytest.approx([0.0, 0.025, 0.05])
    assert all(b.drop_path.rate == 0 for d in model.aux_decoders.values() for b in d.blocks)
    z = torch.randn(2, cfg.latent_tokens, cfg.latent_dim)
    assert torch.equal(model.eval().decode(z), model.decode(z))  # eval: no stochastic depth
