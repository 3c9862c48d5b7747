"""Tokenizer training end to end (in-process, tiny): stage 1 -> stage 2 decoder fine-tuning, latent statistics,
optional teachers, and the resolved config saved with the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from maetok.config import ConfigError, TokenizerRunConfig, load_config
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint
from maetok.train.run import run_tokenizer
from maetok.io.pretrained import load_tokenizer

TINY = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
        "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1",
        "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=16",
        "model.aux_heads=1", "model.aux_depth=1", "data.limit=32", "train.batch_size=8", "train.log_every=1",
        "train.image_every=4", "train.ckpt_every=4", "stats_batches=2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stage1"
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=8"])
    summary = run_tokenizer(cfg, out, device="cpu")
    assert summary["finished"]
    return out


def test_stage1_writes_model_stats_images_and_config(stage1: Path):
    model = load_tokenizer(stage1 / "model")
    assert model.config.latent_std > 0 and model.config.latent_std != 1.0  # measured, not the default
    assert list((stage1 / "images").glob("recon_*.png"))
    saved = yaml.safe_load((stage1 / "config.yaml").read_text())
    assert saved["model"]["latent_tokens"] == 4 and saved["train"]["steps"] == 8
    records = [json.loads(line) for line in (stage1 / "log.jsonl").read_text().splitlines()]
    assert {"loss", "loss_pixel", "loss_aux_hog", "mask_ratio", "grad_norm", "images_per_s"} <= set(records[-1])
    assert all(0.4 <= r["mask_ratio"] <= 0.6 + 1 / 16 for r in records)  # ceil(r*16)/16
    state = load_checkpoint(latest_checkpoint(stage1 / "checkpoints"))
    assert "model:" in state["config"] and state["code_version"]


def test_stage2_freezes_encoder_drops_aux_and_anneals_mask(stage1: Path, tmp_path: Path):
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + [
        "train.steps=6", "stage=2", f"decoder_ft.init_from={stage1}", "decoder_ft.anneal_steps=4",
        "train.optim.warmup_steps=0"])
    out = tmp_path / "stage2"
    assert run_tokenizer(cfg, out, device="cpu")["finished"]
    before, after = load_tokenizer(stage1 / "model"), load_tokenizer(out / "model")
    enc_b, enc_a = before.encoder.state_dict(), after.encoder.state_dict()
    assert all(torch.equal(enc_b[k], enc_a[k]) for k in enc_b), "stage 2 changed the encoder"
    dec_b, dec_a = before.decoder.state_dict(), after.decoder.state_dict()
    assert any(not torch.equal(dec_b[k], dec_a[k]) for k in dec_b), "stage 2 did not train the decoder"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("loss_aux_hog" not in r for r in records)
    ratios = [r.get("mask_ratio", 0.0) for r in records]
    assert ratios[0] > ratios[2] and ratios[-1] == 0.0  # annealed 0.6 -> 0 over 4 steps
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert not any(k.startswith("aux_decoders.") for k in state["model"])


def test_stage2_resumes_without_the_stage1_run_and_matches_an_uninterrupted_run(stage1: Path, tmp_path: Path):
    """The checkpoint holds the weights and stage 1's model config, so a resumed stage 2 needs nothing from
    decoder_ft.init_from (moved or deleted since); the result is the uninterrupted run's."""
    import shutil

    moved = tmp_path / "stage1-copy"
    shutil.copytree(stage1, moved)
    over = TINY + ["stage=2", f"decoder_ft.init_from={moved}", "decoder_ft.anneal_steps=4",
                   "train.optim.warmup_steps=0", "train.optim.schedule=constant", "train.ckpt_every=2"]
    whole = tmp_path / "whole"
    assert run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over + ["train.steps=4"]), whole,
                         device="cpu")["finished"]
    part = tmp_path / "part"
    assert run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over + ["train.steps=2"]), part,
                         device="cpu")["finished"]
    shutil.rmtree(moved)
    resumed = run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over + ["train.steps=4"]), part,
                            resume=True, device="cpu")
    assert resumed["finished"] and resumed["step"] == 4
    a, b = load_tokenizer(whole / "model").state_dict(), load_tokenizer(part / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Without a checkpoint to resume from, the stage-1 run is needed, and its absence is named.
    with pytest.raises(ConfigError, match="no stage-1 weights"):
        run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over + ["train.steps=4"]), tmp_path / "new",
                      device="cpu")


def test_stage2_takes_the_model_config_from_init_from(stage1: Path, tmp_path: Path, caplog):
    """Stage 1 used 4 latent tokens on 16x16 images (the preset says 32 and 32x32): stage 2 needs no model
    overrides, and refuses ones that contradict stage 1 before making its run directory."""
    over = ["stage=2", f"decoder_ft.init_from={stage1}", "train.steps=1", "data.limit=16", "train.batch_size=8",
            "stats_batches=1"]
    out = tmp_path / "ft"
    with caplog.at_level("WARNING"):
        assert run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over), out, device="cpu")["finished"]
    assert "the mask ratio never reaches 0" in caplog.text  # the preset's 1000 annealing steps, in a 1-step run
    model = load_tokenizer(out / "model")
    assert (model.config.latent_tokens, model.config.image_size, model.config.enc_width) == (4, 16, 32)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["latent_tokens"] == 4 and saved["data"]["image_size"] == 16
    bad = load_config(TokenizerRunConfig, "cpu-32", over + ["model.latent_tokens=8", "model.enc_depth=1"])
    with pytest.raises(ConfigError, match=r"model.latent_tokens: stage 1 has 4, requested 8") as e:
        run_tokenizer(bad, tmp_path / "ft-bad", device="cpu")
    assert "enc_depth" not in str(e.value)  # agrees with stage 1
    assert not (tmp_path / "ft-bad").exists()
    with pytest.raises(ConfigError, match="no stage-1 weights"):
        run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over[:1] + [f"decoder_ft.init_from={tmp_path}"]),
                      tmp_path / "ft-none", device="cpu")


def test_stage2_from_released_official_weights_needs_no_masking(parity_dir: Path, tmp_path: Path):
    """Released official files have no encoder mask token: masked stage-2 inputs would meet an untrained,
    all-zero token in the frozen encoder, so stage 2 asks for mask_ratio_start=0, and then trains."""
    official = parity_dir / "tokenizer_tiny"
    over = ["stage=2", f"decoder_ft.init_from={official}", "train.steps=1", "data.limit=8", "train.batch_size=8",
            "stats_batches=1", "decoder_ft.anneal_steps=1"]
    with pytest.raises(ConfigError, match="no trained encoder mask token(.|\n)*decoder_ft.mask_ratio_start=0"):
        run_tokenizer(load_config(TokenizerRunConfig, "cpu-32", over), tmp_path / "masked", device="cpu")
    assert not (tmp_path / "masked").exists()
    cfg = load_config(TokenizerRunConfig, "cpu-32", over + ["decoder_ft.mask_ratio_start=0"])
    assert run_tokenizer(cfg, tmp_path / "unmasked", device="cpu")["finished"]
    records = [json.loads(line) for line in (tmp_path / "unmasked" / "log.jsonl").read_text().splitlines()]
    assert all(r.get("mask_ratio", 0.0) == 0.0 for r in records)


def test_optional_teacher_without_weights_trains_without_it(tmp_path: Path, caplog):
    missing = str(tmp_path / "no-such-resnet.safetensors")
    aux = (f"model.aux_targets=[{{name: hog, weight: 1.0}}, {{name: resnet-cifar, weight: 1.0, optional: true, "
           f"options: {{weights: '{missing}'}}}}]")
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=2", aux])
    with caplog.at_level("WARNING"):
        assert run_tokenizer(cfg, tmp_path / "run", device="cpu")["finished"]
    assert "training WITHOUT it" in caplog.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [t["name"] for t in saved["model"]["aux_targets"]] == ["hog"]


def test_required_teacher_without_weights_stops_before_training(tmp_path: Path):
    from maetok.io.hub import MissingWeightsError

    missing = str(tmp_path / "no-such-resnet.safetensors")
    aux = f"model.aux_targets=[{{name: resnet-cifar, weight: 1.0, options: {{weights: '{missing}'}}}}]"
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=2", aux])
    with pytest.raises(MissingWeightsError, match="no-such-resnet"):
        run_tokenizer(cfg, tmp_path / "run", device="cpu")


@pytest.mark.parametrize("variant", ["ae", "vae", "mae"])
def test_baseline_variants_train(variant: str, tmp_path: Path):
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + ["train.steps=2", f"model.variant={variant}"])
    assert run_tokenizer(cfg, tmp_path / variant, device="cpu")["finished"]
    records = [json.loads(line) for line in (tmp_path / variant / "log.jsonl").read_text().splitlines()]
    assert ("loss_kl" in records[-1]) == (variant == "vae")
    assert ("mask_ratio" in records[-1]) == (variant == "mae")


TEACHERS = ("model.aux_targets=[{name: hog, weight: 1.0}, {name: siglip, weight: 1.0, options: {pretrained: false, "
            "model_kwargs: {depth: 2, embed_dim: 64, num_heads: 2}}}, {name: dinov2, weight: 1.0, options: "
            "{pretrained: false, model: vit_small_patch14_dinov2, layer: 0, norm: true, model_kwargs: {depth: 2, "
            "embed_dim: 64, num_heads: 2}}}, {name: resnet-cifar, weight: 1.0, options: {pretrained: false, "
            "arch: resnet20, layer: layer2}}]")
NETWORK_TEACHERS = ("siglip", "dinov2", "resnet-cifar")  # dinov2 through an intermediate layer (layer=0)


def _task(*overrides: str):
    from maetok.train.tokenizer_task import TokenizerTask

    torch.manual_seed(0)
    cfg = load_config(TokenizerRunConfig, "cpu-32", TINY + [TEACHERS, *overrides])
    return TokenizerTask(cfg, torch.device("cpu"))


def test_bf16_training_holds_network_teachers_in_bf16_and_hog_in_float32():
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    full = _task("train.precision=bf16", "teacher_precision=fp32")
    half = _task("train.precision=bf16")
    for name in NETWORK_TEACHERS:
        assert full.targets[name].compute_dtype == torch.float32
        assert half.targets[name].compute_dtype == torch.bfloat16, name
    assert half.targets["hog"].compute_dtype == torch.float32
    assert half.targets["siglip"].mean.dtype == torch.float32  # normalisation constants are not rounded
    # Features as the step computes them, under the step's autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_full, f_half = full.teacher_features(images), half.teacher_features(images)
    assert all(f.dtype == torch.float32 for f in (*f_full.values(), *f_half.values()))
    # HOG runs outside autocast: exactly the float32 target, not a bf16 approximation of it.
    assert torch.equal(f_half["hog"], half.targets["hog"](images, 4))
    # bf16 weights: the same features up to bf16 rounding (same seed, so the same random teachers).
    for name in NETWORK_TEACHERS:
        cos = torch.nn.functional.cosine_similarity(f_half[name], f_full[name], dim=-1)
        assert cos.min() > 0.99 and not torch.equal(f_half[name], f_full[name]), name
    # float32 training never casts a teacher.
    assert _task().targets["siglip"].compute_dtype == torch.float32


def test_a_nonfinite_discriminator_gradient_skips_the_discriminator_step(caplog):
    """The loop guards the generator's step; the discriminator's own guard keeps NaN out of its weights (and so
    out of every later checkpoint)."""
    task = _task("loss.gan.weight=0.1", "loss.gan.start_step=0", "loss.gan.diffaug=false",
                 "loss.gan.lecam_weight=0.001")  # LeCAM's running means move in its forward: put back too
    before = {k: v.clone() for k, v in [*task.disc.state_dict().items(), *task.lecam.state_dict().items()]}
    state = lambda: {**task.disc.state_dict(), **task.lecam.state_dict()}  # noqa: E731
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with caplog.at_level("WARNING"):
        out = task.after_step(None, 0, {"_images": images, "_recon": images * float("nan")})
    assert "discriminator step skipped" in caplog.text and out["loss_disc"] != out["loss_disc"]  # NaN, logged
    assert all(torch.equal(state()[k], v) for k, v in before.items())
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = task.after_step(None, 1, {"_images": images, "_recon": images.flip(0)})  # a finite step trains it
    assert "skipped" not in caplog.text and out["loss_disc"] == out["loss_disc"]
    assert not all(torch.equal(state()[k], v) for k, v in before.items())


def test_a_teacher_that_fails_to_compile_runs_eagerly(failing_compile, caplog):
    task = _task("train.compile=true")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with caplog.at_level("WARNING"):
        feats = task.teacher_features(images)
    assert "running it eagerly" in caplog.text
    assert torch.equal(feats["siglip"], task.targets["siglip"](images, 4))
    assert not any(task.target_fns[n].is_compiled for n in task.targets)


def test_an_error_of_a_compiled_teacher_itself_is_not_taken_for_a_compiler_failure(passthrough_compile, caplog):
    task = _task("train.compile=true")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="expected images"):
        task.teacher_features(images[:, :2])
    assert "torch.compile failed" not in caplog.text
    assert all(task.target_fns[n].is_compiled for n in task.targets)  # still compiled


@pytest.mark.slow
def test_compiled_teachers_give_the_eager_features():
    task = _task("train.compile=true")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = task.teacher_features(images)
    assert all(task.target_fns[n].is_compiled for n in task.targets), "a teacher fell back to eager"
    for name, target in task.targets.items():
        torch.testing.assert_close(feats[name], target(images, 4), rtol=1e-4, atol=1e-5)


def _aux_inputs(task, seed: int = 0):
    """Predictions (with gradients), features and a patch mask for every target of `task`."""
    g = torch.Generator().manual_seed(seed)
    n = task.model.config.num_patches
    feats = {name: torch.randn(2, n, t.dim, generator=g) for name, t in task.targets.items()}
    preds = {name: torch.randn(2, n, t.dim, generator=g).requires_grad_(True) for name, t in task.targets.items()}
    return preds, feats, torch.rand(2, n, generator=g) < 0.5


def test_aux_losses_are_each_targets_own_loss_and_fall_back_to_eager(failing_compile, caplog):
    from maetok.tokenizer.targets import target_loss

    task = _task("train.compile=true")
    preds, feats, mask = _aux_inputs(task)
    with caplog.at_level("WARNING"):
        got = task.aux_losses(preds, feats, mask)
    assert "torch.compile failed for the auxiliary losses" in caplog.text and not task.aux_losses.is_compiled
    assert set(got) == set(task.targets) == {"hog", "siglip", "dinov2", "resnet-cifar"}
    for name, target in task.targets.items():
        assert torch.equal(got[name], target_loss(preds[name], feats[name], target.loss, mask)), name
    assert not _task("model.variant=ae").aux_losses.is_compiled  # no targets: nothing to compile


@pytest.mark.slow
def test_compiled_aux_losses_give_the_eager_losses_and_gradients():
    from maetok.tokenizer.targets import target_loss

    task = _task("train.compile=true")
    preds, feats, mask = _aux_inputs(task)
    got = task.aux_losses(preds, feats, mask)
    assert task.aux_losses.is_compiled, "the auxiliary losses fell back to eager"
    grads = torch.autograd.grad(sum(got.values()), list(preds.values()))
    want = {name: target_loss(preds[name], feats[name], t.loss, mask) for name, t in task.targets.items()}
    want_grads = torch.autograd.grad(sum(want.values()), list(preds.values()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
