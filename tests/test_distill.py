"""Shortcut distillation: `maetok diffusion distill` turns a trained SiT into a student that samples in 1, 2, 4, ...
steps with one forward each; the student is a model folder `maetok sample` reads like any other.

One module fixture makes a tiny tokenizer, its latent cache, a teacher diffusion run (weights perturbed, so that
every path of the network matters) and one distillation through the CLI (seconds on a CPU).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maetok.cli import main
from maetok.config import ConfigError, DiffusionRunConfig, SampleConfig, SiTConfig, TokenizerConfig, load_config
from maetok.config.distill import DistillConfig
from maetok.data import open_dataset
from maetok.data.latents import cache_latents
from maetok.diffusion import SiT, sit_config
from maetok.diffusion.samplers import euler_ode, sample
from maetok.diffusion.shortcut import draw_grid_times, draw_step_counts, guided_velocity, shortcut_loss
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint
from maetok.io.pretrained import load_sit, save_pretrained
from maetok.tokenizer import MAETok
from maetok.train.distill_task import DistillTask, student_from_teacher
from maetok.train.run import run_diffusion

MAX_STEPS = 4
DISTILL = ["--device", "cpu", f"distill.max_steps={MAX_STEPS}", "train.batch_size=8", "train.log_every=1",
           "train.image_every=3", "train.ckpt_every=2", "sample.steps=2"]


def _perturbed(model: SiT, seed: int = 0) -> SiT:
    """Every parameter moved off its initial value: the zero-initialised adaLN paths then matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _tiny_teacher(**overrides) -> SiT:
    return _perturbed(SiT(sit_config("tiny", in_channels=4, num_tokens=8, num_classes=3, **overrides))).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    tok_cfg = TokenizerConfig(image_size=16, patch_size=4, latent_tokens=4, latent_dim=4, enc_width=32, enc_depth=1,
                              enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[])
    save_pretrained(MAETok(tok_cfg).eval(), root / "tok")
    cache_latents(MAETok(tok_cfg).eval(), open_dataset("shapes", image_size=16, limit=48), root / "latents",
                  progress=False)
    cfg = load_config(DiffusionRunConfig, "sit-cpu", [
        f"latents={root / 'latents'}", f"tokenizer={root / 'tok'}", "model.hidden=32", "model.depth=2",
        "model.heads=2", "train.batch_size=8", "train.steps=2", "train.image_every=1000", "sample.steps=2"])
    assert run_diffusion(cfg, root / "teacher", device="cpu")["finished"]
    save_pretrained(_perturbed(load_sit(root / "teacher" / "model")), root / "teacher" / "model")
    # The teacher given as its run folder: the latents, tokenizer and guidance come from the run's config.
    assert main(["diffusion", "distill", "--teacher", str(root / "teacher"), "--out", str(root / "student"),
                 *DISTILL, "train.steps=4"]) == 0
    return {"root": root, "tok": root / "tok", "latents": root / "latents", "teacher": root / "teacher",
            "student": root / "student"}


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
def test_a_default_sit_keeps_its_parameters_and_takes_no_step_size():
    model = SiT(sit_config("tiny", depth=1, in_channels=4, num_tokens=8, num_classes=3))
    assert list(model.state_dict()) == [
        "pos_embed", "x_embedder.weight", "x_embedder.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias", "final_layer.linear.weight",
        "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    assert SiTConfig().shortcut_steps == 0 and not model.is_shortcut_student
    x, t, y = torch.randn(2, 8, 4), torch.rand(2), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="not a shortcut student"):
        model(x, t, y, torch.ones(2))
    with pytest.raises(ConfigError, match="power of two"):
        sit_config("tiny", shortcut_steps=3)


def test_a_model_folder_saved_before_students_existed_loads(tmp_path: Path):
    model = _tiny_teacher()
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    for key in ("shortcut_steps", "shortcut_cfg_scale", "shortcut_cfg_interval"):
        del meta[key]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert not load_sit(tmp_path).is_shortcut_student


@pytest.mark.parametrize("variant", ["sit", "lightningdit"])
def test_the_untrained_student_is_the_teacher_at_every_step_size(variant):
    teacher = _tiny_teacher(variant=variant)
    student = student_from_teacher(teacher, DistillConfig(teacher="t", cfg_scale=1.5, cfg_interval=(0.0, 0.75),
                                                          max_steps=8)).eval()
    assert set(student.state_dict()) - set(teacher.state_dict()) == {"d_embedder.embedding_table.weight"}
    assert student.config.class_dropout == 0 and student.config.shortcut_steps == 8
    x, t, y = torch.randn(3, 8, 4), torch.rand(3), torch.tensor([0, 2, 3])  # 3: the null label
    with torch.no_grad():
        v = teacher(x, t, y)
        for n in (1, 2, 4, 8):
            assert torch.equal(student(x, t, y, torch.full((3,), 1 / n)), v)
    with pytest.raises(ValueError, match="pass the step size d"):
        student(x, t, y)


# --------------------------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------------------------
def test_the_base_target_is_the_guided_velocity_the_samplers_step_with():
    """Guidance as the samplers apply it: at t inside [low, high], both ends included, and nowhere else."""
    teacher = _tiny_teacher()
    noise, y = torch.randn(2, 8, 4, dtype=torch.float64), torch.tensor([0, 1])
    ones = torch.ones(2)
    for interval in ((0.0, 1.0), (0.0, 0.75)):
        one_step = euler_ode(teacher, noise, y, steps=1, cfg_scale=1.5, cfg_interval=interval)  # x1 - v(x1, 1)
        with torch.no_grad():
            v = guided_velocity(teacher, noise.float(), ones, y, 1.5, interval, teacher.null_label)
        assert torch.allclose(one_step, noise - v.double(), atol=1e-5)
    with torch.no_grad():
        x, t = noise.float(), ones * 0.75
        cond, uncond = teacher(x, t, y), teacher(x, t, torch.full_like(y, 3))
        edge = guided_velocity(teacher, noise.float(), ones * 0.75, y, 1.5, (0.0, 0.75), 3)
    assert torch.allclose(edge, uncond + 1.5 * (cond - uncond), atol=1e-6)


def test_step_sizes_and_times_lie_on_the_samplers_grids():
    torch.manual_seed(0)
    steps = draw_step_counts(24, 1000, 16, torch.device("cpu"))
    assert (steps[:24] == 16).all() and set(steps[24:].tolist()) == {1, 2, 4, 8}
    t = draw_grid_times(steps)
    j = t * steps
    assert torch.equal(j, j.round()) and (j >= 1).all() and (j <= steps).all()
    assert set((t[steps == 4] * 4).tolist()) == {1.0, 2.0, 3.0, 4.0}


def test_at_initialisation_the_base_samples_have_no_error_without_guidance():
    teacher = _tiny_teacher()
    for scale, base_is_zero in ((1.0, True), (2.0, False)):
        cfg = DistillConfig(teacher="t", cfg_scale=scale, cfg_interval=(0.0, 1.0), max_steps=8)
        student = student_from_teacher(teacher, cfg)
        x0, y = torch.randn(8, 8, 4), torch.randint(0, 3, (8,))
        out = shortcut_loss(student, student, teacher, x0, y, cfg, teacher.null_label)
        assert (out["mse_base"] == 0) == base_is_zero and out["mse_consistency"] > 0
        out["loss"].backward()
        assert student.d_embedder.embedding_table.weight.grad.abs().sum() > 0  # the step sizes get trained


# --------------------------------------------------------------------------------------------------------------
# Sampling with a student
# --------------------------------------------------------------------------------------------------------------
def test_a_student_samples_with_one_forward_per_step_and_its_folded_guidance():
    teacher = _tiny_teacher()
    student = student_from_teacher(teacher, DistillConfig(teacher="t", cfg_scale=1.5, cfg_interval=(0.0, 0.75),
                                                          max_steps=MAX_STEPS)).eval()
    calls = []
    student.register_forward_hook(lambda module, args, out: calls.append((args[0].shape[0], args[3][0].item())))
    noise, y = torch.randn(3, 8, 4), torch.tensor([0, 1, 2])
    for steps in (1, 2, 4):
        results = []
        for given in ({}, {"cfg_scale": 1.5}, {"cfg_scale": 1.5, "cfg_interval": (0.0, 0.75)}):
            calls.clear()
            results.append(sample(student, noise, y, SampleConfig(steps=steps, **given)))
            assert calls == [(3, 1 / steps)] * steps  # no doubled batch: no unconditional branch
        assert all(torch.equal(results[0], r) for r in results[1:])
    # Untrained, the student is the teacher: N student steps are the teacher's unguided N-step Euler.
    assert torch.equal(sample(student, noise, y, SampleConfig(steps=4)), euler_ode(teacher, noise, y, steps=4))


def test_a_student_refuses_step_counts_and_guidance_it_was_not_distilled_for():
    student = student_from_teacher(_tiny_teacher(), DistillConfig(teacher="t", cfg_scale=1.5,
                                                                  cfg_interval=(0.0, 0.75), max_steps=MAX_STEPS))
    noise, y = torch.randn(1, 8, 4), torch.tensor([0])
    for cfg, message in ((SampleConfig(steps=3), r"steps=3: .* 1, 2, 4 steps"),
                         (SampleConfig(steps=8), r"steps=8: .*up to the 4"),
                         (SampleConfig(steps=2, cfg_scale=2.0), r"cfg_scale=2: .*scale 1.5 folded"),
                         (SampleConfig(steps=2, cfg_interval=(0.1, 0.9)), r"cfg_interval=.*\[0.0, 0.75\]"),
                         (SampleConfig(steps=2, sampler="sde"), "sampler=sde")):
        with pytest.raises(ConfigError, match=message):
            sample(student.eval(), noise, y, cfg)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------
def test_distill_writes_a_student_model_folder_with_the_teacher_runs_settings(runs):
    student = load_sit(runs["student"] / "model")
    teacher = load_sit(runs["teacher"] / "model")
    cfg = student.config
    assert (cfg.shortcut_steps, cfg.shortcut_cfg_scale, tuple(cfg.shortcut_cfg_interval)) == (MAX_STEPS, 1.5,
                                                                                              (0.0, 0.75))
    assert (cfg.hidden, cfg.depth, cfg.num_classes) == (teacher.config.hidden, teacher.config.depth, 10)
    saved = (runs["student"] / "config.yaml").read_text()
    assert f"latents: {runs['latents'].resolve()}" in saved and "cfg_scale: 1.5" in saved
    records = [json.loads(line) for line in (runs["student"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and {"mse_base", "mse_consistency"} <= set(records[0])
    assert list((runs["student"] / "images").glob("samples_*.png"))


@pytest.mark.parametrize("extra", [[], ["--cfg", "1.5"], ["--cfg", "1.5", "--interval", "0,0.75"]])
def test_maetok_sample_runs_a_student(runs, tmp_path: Path, extra):
    for steps in ("1", "2"):
        out = tmp_path / steps
        assert main(["sample", "--model", str(runs["student"] / "model"), "--tokenizer", str(runs["tok"]),
                     "--steps", steps, "--num-samples", "4", "--batch-size", "4", "--out", str(out), "--device",
                     "cpu", *extra]) == 0
        settings = json.loads((out / "sampling.json").read_text())
        assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["cfg_interval"]) == \
            ("shortcut", int(steps), 1.5, [0.0, 0.75])


@pytest.mark.parametrize("extra,message", [(["--steps", "3"], "steps=3: "), (["--steps", "8"], "steps=8: "),
                                           (["--steps", "2", "--cfg", "2"], "cfg_scale=2: ")])
def test_maetok_sample_refuses_a_students_wrong_settings_in_one_line(runs, tmp_path: Path, capsys, extra, message):
    assert main(["sample", "--model", str(runs["student"] / "model"), "--tokenizer", str(runs["tok"]), "--out",
                 str(tmp_path / "s"), "--device", "cpu", "--num-samples", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"maetok: error: {message}") and "\n" not in err
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_distill_refuses_what_it_cannot_work_with(runs, tmp_path: Path, capsys):
    """No teacher; a bare model folder and no data; a step count that is not a power of two."""
    assert main(["diffusion", "distill", "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "distill.teacher is empty: give --teacher" in capsys.readouterr().err
    bare = tmp_path / "bare"
    save_pretrained(load_sit(runs["teacher"] / "model"), bare)
    assert main(["diffusion", "distill", "--teacher", str(bare), "--out", str(tmp_path / "b"), *DISTILL]) == 2
    assert "needs the data the teacher was trained on: give latents=DIR" in capsys.readouterr().err
    assert main(["diffusion", "distill", "--teacher", str(bare), "--out", str(tmp_path / "c"), *DISTILL,
                 "distill.max_steps=6"]) == 2
    assert "distill.max_steps=6 must be a power of two" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
    # The bare folder with its data named works, and without a teacher run the guidance is the default 1.5 on [0, 1].
    assert main(["diffusion", "distill", "--teacher", str(bare), "--out", str(tmp_path / "d"), *DISTILL,
                 f"latents={runs['latents']}", "train.steps=1"]) == 0
    cfg = load_sit(tmp_path / "d" / "model").config
    assert (cfg.shortcut_cfg_scale, tuple(cfg.shortcut_cfg_interval)) == (1.5, (0.0, 1.0))


class Crash(Exception):
    """Stands in for a process killed mid-run: nothing after it is written."""


def test_an_interrupted_distillation_resumes_exactly(runs, tmp_path: Path, monkeypatch):
    """A run that dies after step 5 (its last checkpoint: step 4) and is resumed ends with the weights, EMA
    included, of the run that was never interrupted."""
    command = ["diffusion", "distill", "--teacher", str(runs["teacher"]), *DISTILL, "train.steps=7"]
    assert main([*command, "--out", str(tmp_path / "ref")]) == 0

    def crash_after_step_5(self, batch, step, outputs):
        if step == 4:
            raise Crash()
        return {}

    with monkeypatch.context() as patch:
        patch.setattr(DistillTask, "after_step", crash_after_step_5)
        with pytest.raises(Crash):
            main([*command, "--out", str(tmp_path / "run")])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "ckpt-00000004.pt"
    assert main(["diffusion", "distill", "--out", str(tmp_path / "run"), "--resume", "--device", "cpu"]) == 0
    a = load_checkpoint(latest_checkpoint(tmp_path / "ref" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert a["step"] == b["step"] == 7
    for part in ("model", "ema"):
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part} differs after resume: {different[:5]}"
    assert load_sit(tmp_path / "run" / "model").is_shortcut_student
