"""Diffusion training refuses, before any work, what would otherwise fail or mislead hundreds of steps in."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maetok.config import ConfigError, DiffusionRunConfig, TokenizerConfig, load_config
from maetok.data import open_dataset
from maetok.data.latents import cache_latents
from maetok.tokenizer import MAETok
from maetok.train.run import run_diffusion
from maetok.io.pretrained import load_sit, load_tokenizer, save_pretrained

SIT = ["model.hidden=32", "model.depth=2", "model.heads=2", "train.batch_size=8", "train.steps=2", "sample.steps=2"]


def _tokenizer(root: Path, latent_tokens: int) -> Path:
    cfg = TokenizerConfig(image_size=16, patch_size=4, latent_tokens=latent_tokens, latent_dim=4, enc_width=32,
                          enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[])
    save_pretrained(MAETok(cfg), root)
    return root


def test_guidance_on_an_unconditional_model_is_refused_with_the_fix():
    """sit-cpu samples its preview grids with CFG 1.5: an unconditional model (unlabelled data) cannot."""
    with pytest.raises(ConfigError, match=r"needs a class-conditional model(.|\n)*add sample.cfg_scale=1"):
        load_config(DiffusionRunConfig, "sit-cpu", ["latents=x", "model.num_classes=0"])
    cfg = load_config(DiffusionRunConfig, "sit-cpu", ["latents=x", "model.num_classes=0", "sample.cfg_scale=1"])
    assert cfg.sample.cfg_scale == 1.0


def test_a_tokenizer_that_did_not_make_the_cache_is_refused_before_the_run_starts(tmp_path: Path):
    tok_a = _tokenizer(tmp_path / "tok-a", latent_tokens=8)
    tok_b = _tokenizer(tmp_path / "tok-b", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok_a), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", "model.num_tokens=8", "model.in_channels=4", *SIT]
    with pytest.raises(ConfigError, match=r"did not make the latent cache(.|\n)*latent_tokens: cache 8, tokenizer 4"):
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [*over, f"tokenizer={tok_b}"]), tmp_path / "run",
                      device="cpu")
    assert not (tmp_path / "run").exists()
    summary = run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [*over, f"tokenizer={tok_a}"]),
                            tmp_path / "run", device="cpu")
    assert summary["finished"]


def test_a_model_folder_of_the_other_kind_or_a_run_folder_is_named_as_such(tmp_path: Path):
    from maetok.config import SiTConfig
    from maetok.diffusion.sit import SiT

    tok = _tokenizer(tmp_path / "tok" / "model", latent_tokens=4)
    save_pretrained(SiT.from_config(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2)),
                    tmp_path / "sit" / "model")
    with pytest.raises(ConfigError, match="holds a SiT diffusion model .kind: sit., not a tokenizer"):
        load_tokenizer(tmp_path / "sit" / "model")
    with pytest.raises(ConfigError, match="holds a tokenizer, not a SiT diffusion model"):
        load_sit(tok)
    with pytest.raises(FileNotFoundError, match="a training run keeps its weights in .*tok/model"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="a training run keeps its weights in .*sit/model"):
        load_sit(tmp_path / "sit")


def test_an_older_cache_of_the_same_tokenizer_is_accepted(tmp_path: Path):
    """A cache written before a tokenizer config field existed records no value for it: the field's default is
    what that tokenizer had. grad_checkpointing does not change the latents at all."""
    import json

    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    meta = json.loads((cache / "meta.json").read_text())
    del meta["tokenizer_config"]["grad_checkpointing"]
    (cache / "meta.json").write_text(json.dumps(meta))
    over = [f"latents={cache}", f"tokenizer={tok}", "model.num_tokens=4", "model.in_channels=4", *SIT]
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over), tmp_path / "run", device="cpu")["finished"]


def test_a_run_saved_under_looser_rules_resumes_once_its_config_is_fixed(tmp_path: Path, monkeypatch, capsys):
    """A run started before a validation rule existed (here: guidance with an unconditional model) must still
    resume; the rule applies to what it continues with, and the message names the fix, an allowed change."""
    import json

    import maetok.train.run as run_module
    from maetok.cli import main

    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", "model.num_tokens=4", "model.in_channels=4", "model.num_classes=0", *SIT]
    run = tmp_path / "run"
    cfg = load_config(DiffusionRunConfig, "sit-cpu", [*over, "sample.cfg_scale=1"])
    assert run_diffusion(cfg, run, device="cpu")["finished"]
    saved = run_module.saved_run_config

    def as_an_older_version_saved_it(ckpt):
        data = saved(ckpt)
        data["sample"]["cfg_scale"] = 1.5
        return data

    monkeypatch.setattr(run_module, "saved_run_config", as_an_older_version_saved_it)
    yaml_path = run / "config.yaml"  # what the command line resumes from
    yaml_path.write_text(yaml_path.read_text().replace("cfg_scale: 1.0", "cfg_scale: 1.5"))
    resume = ["diffusion", "train", "--out", str(run), "--resume", "--device", "cpu", "train.steps=3"]
    assert main(resume) == 2
    assert "add sample.cfg_scale=1" in capsys.readouterr().err
    assert main([*resume, "sample.cfg_scale=1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3


def test_a_run_records_its_transport_path_with_the_model_and_warns_about_an_unclipped_cosine_loss(
        tmp_path: Path, caplog):
    """`maetok sample` reads the path from the model folder: the SDE's velocity-to-score conversion needs it."""
    import json

    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    cfg = load_config(DiffusionRunConfig, "sit-cpu", [
        f"latents={cache}", f"tokenizer={tok}", "model.num_tokens=4", "model.in_channels=4", *SIT,
        "transport.path=cosine", "transport.cos_loss_weight=0.1", "train.optim.grad_clip=0", "sample.sampler=sde"])
    with caplog.at_level("WARNING"):
        assert run_diffusion(cfg, tmp_path / "run", device="cpu")["finished"]
    assert "without gradient clipping" in caplog.text
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["transport_path"] == "cosine"


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path: Path, monkeypatch):
    """Input paths are saved absolute: a scheduled job that starts in another folder still resumes, and `x` and
    `./x` name the same cache."""
    import yaml

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    _tokenizer(Path("tok"), latent_tokens=4)
    cache_latents(load_tokenizer("tok"), open_dataset("shapes", image_size=16, limit=16), Path("latents"),
                  flip=False, progress=False)
    over = ["latents=latents", "tokenizer=tok", "model.num_tokens=4", "model.in_channels=4", *SIT]
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over), "run", device="cpu")["finished"]
    saved = yaml.safe_load(Path("run/config.yaml").read_text())
    assert saved["latents"] == str(project / "latents") and saved["tokenizer"] == str(project / "tok")
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over[:2] + ["train.steps=3"]), "run",
                         resume=True, device="cpu")["step"] == 3  # the same relative paths: the same inputs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = [f"latents={project / 'latents'}", f"tokenizer={project / 'tok'}", "train.steps=4"]
    summary = run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", absolute), project / "run", resume=True,
                            device="cpu")
    assert summary["finished"] and summary["step"] == 4


def test_data_settings_with_a_latent_cache_are_refused_not_ignored(tmp_path: Path):
    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", "model.num_tokens=4", "model.in_channels=4", *SIT]
    with pytest.raises(ConfigError, match=r"data.limit: no effect when training on the latent cache(.|\n)*--limit"):
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [*over, "data.limit=8"]), tmp_path / "run",
                      device="cpu")
    assert not (tmp_path / "run").exists()
    cfg = load_config(DiffusionRunConfig, "sit-cpu", [*over, "data.random_flip=false", "data.num_workers=0"])
    assert run_diffusion(cfg, tmp_path / "run", device="cpu")["finished"]


def test_a_run_log_holds_only_its_own_run(tmp_path: Path):
    """Two runs in one process (the pilot, the Python API): the first's train.log does not collect the second's
    lines, and no log file stays open after a run."""
    import logging

    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", "model.num_tokens=4", "model.in_channels=4", *SIT]
    run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over), tmp_path / "a", device="cpu")
    assert not [h for h in logging.getLogger("maetok").handlers if isinstance(h, logging.FileHandler)]
    run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over), tmp_path / "b", device="cpu")
    first, second = (tmp_path / "a" / "train.log").read_text(), (tmp_path / "b" / "train.log").read_text()
    assert first.count("diffusion sit:") == 1 and second.count("diffusion sit:") == 1


def test_the_model_shape_comes_from_the_cache_when_not_given_and_a_given_mismatch_is_refused(tmp_path: Path):
    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    with pytest.raises(ConfigError, match=r"model.num_tokens=8 but the latents are 4 tokens of dim 4 .*; drop model.num_tokens"):
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [f"latents={cache}", "model.num_tokens=8", *SIT]),
                      tmp_path / "bad", device="cpu")
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", [f"latents={cache}", *SIT]), tmp_path / "run",
                         device="cpu")["finished"]
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "model.num_tokens=4, taken from the latents" in log_text and "model.in_channels=4, taken" in log_text
    assert "num_tokens: 4" in (tmp_path / "run" / "config.yaml").read_text()


def test_snapshots_keep_the_ema_model_of_their_step_and_none_at_the_last(tmp_path: Path):
    from maetok.io.checkpoint import load_checkpoint  # the training checkpoint the snapshot must agree with
    from maetok.train.diffusion_task import snapshots

    tok = _tokenizer(tmp_path / "tok", latent_tokens=4)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16),
                          tmp_path / "latents", flip=False, progress=False)
    over = [f"latents={cache}", *SIT, "train.steps=4", "train.snapshot_every=2", "train.ckpt_every=1",
            "train.keep_last=10"]
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over), tmp_path / "run", device="cpu")["finished"]
    kept = snapshots(tmp_path / "run")
    assert list(kept) == [2]  # step 4 is the run's own model/
    ema = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt")["ema"]
    snapshot = load_sit(kept[2]).state_dict()
    assert snapshot.keys() == ema.keys() and all(torch.equal(snapshot[k], ema[k]) for k in ema)
    final = load_sit(tmp_path / "run" / "model").state_dict()
    assert not all(torch.equal(snapshot[k], final[k]) for k in final)
    with pytest.raises(ConfigError, match="snapshot_every=-1 must be >= 0"):
        load_config(DiffusionRunConfig, "sit-cpu", [*over, "train.snapshot_every=-1"])
