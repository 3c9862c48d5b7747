"""train.tracker: TensorBoard event files (each step once after a resume) and W&B through a fake module."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maetok.config import ConfigError, DiffusionRunConfig, TokenizerConfig, TokenizerRunConfig, load_config
from maetok.data import open_dataset
from maetok.data.images import save_image_grid
from maetok.data.latents import cache_latents
from maetok.io.pretrained import load_tokenizer, save_pretrained
from maetok.tokenizer import MAETok
from maetok.io.rundir import RUN_ENTRIES
from maetok.train.run import _may_change_on_resume, run_diffusion
from maetok.train.tracking import NullTracker, check_tracker, open_tracker


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_each_step_once_after_a_resume_and_the_grids(tmp_path: Path):
    first = open_tracker("tensorboard", tmp_path, 0, None)
    for step in (1, 2, 3, 4):
        first.scalars({"step": step, "loss": float(step), "lr": 0.1})
    first.close()  # killed after step 4, resumed from the checkpoint of step 2
    resumed = open_tracker("tensorboard", tmp_path, 2, None)
    for step in (3, 4, 5):
        resumed.scalars({"step": step, "loss": 10.0 * step, "lr": 0.1})
    save_image_grid(torch.zeros(2, 3, 8, 8), tmp_path / "images" / "recon_00000005.png", nrow=2)
    resumed.images(tmp_path, 5)
    resumed.close()
    acc = _events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0),
                                                                 (5, 50.0)]
    assert [e.step for e in acc.Images("recon")] == [5]
    assert "tensorboard" in RUN_ENTRIES and _may_change_on_resume("train.tracker")


def test_wandb_gets_the_records_and_a_missing_package_is_one_line(tmp_path: Path, monkeypatch):
    logged, finished = [], []
    run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)),
                                finish=lambda: finished.append(True))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: run
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = open_tracker("wandb", tmp_path, 0, TokenizerRunConfig())
    tracker.scalars({"step": 3, "loss": 0.5})
    save_image_grid(torch.zeros(1, 3, 8, 8), tmp_path / "images" / "samples_00000003.png", nrow=1)
    tracker.images(tmp_path, 3)
    tracker.close()
    assert logged[0] == (3, {"loss": 0.5}) and logged[1][1]["samples"][0] == "image" and finished
    assert isinstance(open_tracker("wandb", tmp_path, 0, None, is_main=False), NullTracker)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as for a missing package
    with pytest.raises(ConfigError, match=r"^train.tracker=wandb needs the wandb package.*pip install wandb"):
        check_tracker("wandb")


def test_a_run_sends_log_jsonl_records_and_its_grids_to_tensorboard(tmp_path: Path):
    tok = tmp_path / "tok"
    save_pretrained(MAETok(TokenizerConfig(image_size=16, patch_size=4, latent_tokens=4, latent_dim=4, enc_width=32,
                                           enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2,
                                           aux_targets=[])), tok)
    cache = cache_latents(load_tokenizer(tok), open_dataset("shapes", image_size=16, limit=16), tmp_path / "lat",
                          flip=False, progress=False)
    cfg = load_config(DiffusionRunConfig, "sit-cpu", [
        f"latents={cache}", f"tokenizer={tok}", "model.hidden=32", "model.depth=1", "model.heads=2",
        "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.image_every=2", "sample.steps=2",
        "train.tracker=tensorboard"])
    assert run_diffusion(cfg, tmp_path / "run", device="cpu")["finished"]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    acc = _events(tmp_path / "run" / "tensorboard")
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in records] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert {"lr", "grad_norm", "images_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [2, 3]
