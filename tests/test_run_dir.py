"""Run directories and resume: a resumed run keeps its saved config (and refuses conflicting requests), bad input
fails before the run directory is touched, --force deletes only a maetok run, a failed start does not block the
retry, a stopped run's exit status says so, files are written with the umask's permissions. A forked child does
not keep the run locked, a damaged checkpoint is refused with the fallback named (--resume=verified takes it), and
a diverged run rolls back so that the suggested --resume with a lower learning rate finishes."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from maetok.cli import build_parser
from maetok.commands.training import resume_request
from maetok.config import ConfigError, DiffusionRunConfig, TokenizerRunConfig, load_config
from maetok.data.datasets import DatasetError
from maetok.tokenizer import MAETok
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from maetok.io.files import save_safetensors
from maetok.io.rundir import RUN_MARKER, RunDir, RunDirExists
from maetok.train.run import exit_status, resolve_resume_config, run_diffusion, run_tokenizer
from maetok.io.pretrained import load_tokenizer, save_pretrained

# A tiny tokenizer; model.latent_tokens is set apart (LATENTS) so that a resume can leave it out.
TINY = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_dim=4",
        "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1", "model.dec_width=32", "model.dec_heads=2",
        "model.dec_depth=1", "model.aux_width=16", "model.aux_heads=1", "model.aux_depth=1", "data.limit=16",
        "train.batch_size=8", "train.log_every=1", "train.image_every=100", "train.ckpt_every=1", "stats_batches=1"]
LATENTS = "model.latent_tokens=8"


def _cfg(*overrides: str, preset: str = "cpu-32") -> TokenizerRunConfig:
    return load_config(TokenizerRunConfig, preset, list(overrides))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tok"
    assert run_tokenizer(_cfg(*TINY, LATENTS, "train.steps=2"), out, device="cpu")["finished"]
    return out


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of a finished 2-step run (checkpoints, model, config.yaml, marker)."""
    return Path(shutil.copytree(finished, tmp_path / "tok"))


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ----- 1: resume takes the saved config ------------------------------------------------------------------------
def test_resume_without_overrides_continues_with_the_saved_config(run: Path):
    saved = (run / "config.yaml").read_text()
    # The preset alone says latent_tokens=32 and image_size=32; the run has 8 and 16.
    summary = run_tokenizer(_cfg(), run, resume=True, device="cpu")
    assert summary["finished"] and summary["step"] == 2
    assert (run / "config.yaml").read_text() == saved
    assert load_tokenizer(run / "model").config.latent_tokens == 8


def test_resume_applies_allowed_changes_with_a_log_line(run: Path, caplog):
    with caplog.at_level(logging.INFO, logger="maetok"):
        summary = run_tokenizer(_cfg("train.steps=3", "train.log_every=2"), run, resume=True, device="cpu")
    assert summary["finished"] and summary["step"] == 3
    assert "resume: train.steps changes from 2 to 3" in caplog.text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["train"]["log_every"] == 2
    assert saved["model"]["latent_tokens"] == 8 and saved["train"]["batch_size"] == 8
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"))["step"] == 3
    assert "resume: train.steps changes" in (run / "train.log").read_text()  # logged before the file was open


def test_resume_refuses_conflicting_overrides_and_touches_nothing(run: Path):
    before = _snapshot(run)
    with pytest.raises(ConfigError) as e:
        run_tokenizer(_cfg("train.batch_size=4", "train.optim.weight_decay=0.5", "train.seed=3", "train.steps=5"),
                      run, resume=True, device="cpu")
    msg = str(e.value)
    for line in ("train.batch_size: saved 8, requested 4", "train.optim.weight_decay: saved 0.0001, requested 0.5",
                 "train.seed: saved 0, requested 3"):
        assert line in msg
    assert "train.steps: saved" not in msg and "--force" in msg and "new run" in msg
    assert _snapshot(run) == before


def test_resume_compares_another_preset_or_a_config_built_in_code_in_full(run: Path):
    with pytest.raises(ConfigError, match=r"--config cpu-64; the run was started from cpu-32(.|\n)*"
                                          r"model.image_size: saved 16, requested 64"):
        run_tokenizer(_cfg(preset="cpu-64"), run, resume=True, device="cpu")
    with pytest.raises(ConfigError, match=r"model.latent_tokens: saved 8, requested 32"):
        run_tokenizer(TokenizerRunConfig(), run, resume=True, device="cpu")
    # A preset that is only the command's default (no --config given) is not compared: the run keeps its own.
    implicit = load_config(TokenizerRunConfig, None, ["train.steps=2"], default="cpu-64")
    assert resolve_resume_config(implicit, run).model.image_size == 16


def test_resume_keeps_an_optional_target_that_was_left_out(run: Path):
    """The run was started without the optional teacher (its weights were missing): it stays out on resume
    even when the request lists it, or the model would gain an auxiliary decoder the checkpoint lacks."""
    aux = ("model.aux_targets=[{name: hog, weight: 1.0}, {name: resnet-cifar, weight: 1.0, optional: true, "
           "options: {weights: /no/such/file}}]")
    cfg = resolve_resume_config(_cfg(aux), run)
    assert [t.name for t in cfg.model.aux_targets] == ["hog"] and cfg.model.latent_tokens == 8


# ----- 2, 3: bad input fails before the run directory is touched; a failed start is reused -------------------
def test_bad_data_leaves_no_run_directory(tmp_path: Path):
    out = tmp_path / "new"
    with pytest.raises(DatasetError, match="typo"):
        run_tokenizer(_cfg(*TINY, "train.steps=1", f"data.spec={tmp_path / 'typo'}"), out, device="cpu")
    assert not out.exists()


def test_diffusion_shape_mismatch_leaves_no_run_directory(tmp_path: Path):
    from maetok.config import TokenizerConfig
    from maetok.data import open_dataset
    from maetok.data.latents import cache_latents

    tok = MAETok(TokenizerConfig(image_size=16, patch_size=4, latent_tokens=4, latent_dim=4, enc_width=32,
                                 enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[]))
    save_pretrained(tok, tmp_path / "tok")
    cache_latents(tok, open_dataset("shapes", image_size=16, limit=16), tmp_path / "lat", progress=False)
    over = [f"latents={tmp_path / 'lat'}", f"tokenizer={tmp_path / 'tok'}", "model.in_channels=4", "model.hidden=32",
            "model.depth=1", "model.heads=2", "train.batch_size=8", "train.steps=1", "sample.steps=2"]
    out = tmp_path / "sit"
    with pytest.raises(ConfigError, match="latents are 4 tokens"):
        run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over + ["model.num_tokens=32"]), out, device="cpu")
    assert not out.exists()
    assert run_diffusion(load_config(DiffusionRunConfig, "sit-cpu", over + ["model.num_tokens=4"]), out,
                         device="cpu")["finished"]


def test_force_checks_the_new_run_before_deleting_the_old(run: Path, tmp_path: Path):
    before = _snapshot(run)
    with pytest.raises(DatasetError):
        run_tokenizer(_cfg(*TINY, "model.variant=ae", f"data.spec={tmp_path / 'typo'}"), run, force=True,
                      device="cpu")
    assert _snapshot(run) == before


def test_a_failed_start_is_reused_without_force(tmp_path: Path, caplog):
    # What a start that failed after making its directory leaves (a run made by this version) ...
    failed = tmp_path / "failed"
    made = RunDir(failed, resume=False, force=False)
    made.open({"run": "tokenizer"})
    made.close()
    (failed / "config.yaml").write_text("model: {}\ntrain: {}\n")
    (failed / "train.log").write_text("12:00:00 INFO maetok.train: data: shapes (16 images)\n")
    (failed / "log.jsonl").touch()
    (failed / "checkpoints").mkdir()
    # ... and what one made by an earlier version left: train.log alone.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "train.log").write_text("12:00:00 INFO maetok.train: data: shapes (16 images)\n")
    for out in (failed, legacy):
        with caplog.at_level(logging.INFO, logger="maetok"):
            assert run_tokenizer(_cfg(*TINY, LATENTS, "train.steps=1"), out, device="cpu")["finished"]
        assert f"reusing the failed start in {out}" in caplog.text
        assert (out / "model" / "model.safetensors").is_file() and (out / RUN_MARKER).is_file()
    # A run that trained is not a failed start.
    with pytest.raises(RunDirExists, match="--resume"):
        RunDir(failed, resume=False, force=False)


# ----- 4: --force deletes only a maetok run ------------------------------------------------------------------------
def test_force_refuses_a_directory_that_is_not_a_run(tmp_path: Path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "thesis.tex").write_text("x")
    for resume, force in ((False, True), (True, False), (False, False)):
        with pytest.raises(RunDirExists, match="not a maetok run directory"):
            run_tokenizer(_cfg(*TINY, "train.steps=1"), d, resume=resume, force=force, device="cpu")
    assert (d / "sub" / "thesis.tex").read_text() == "x"


def test_force_refuses_a_run_holding_other_files_and_replaces_a_clean_one(run: Path):
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirExists, match="notes.txt"):
        RunDir(run, resume=False, force=True)
    assert (run / "notes.txt").read_text() == "keep me" and latest_checkpoint(run / "checkpoints")
    (run / "notes.txt").unlink()
    run_dir = RunDir(run, resume=False, force=True)
    try:
        assert run_dir.open() == run
    finally:
        run_dir.close()
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]


def test_a_run_directory_in_use_is_not_touched(run: Path):
    first = RunDir(run, resume=True, force=False)
    try:
        for resume, force in ((True, False), (False, True)):
            with pytest.raises(RunDirExists, match="in use"):
                RunDir(run, resume=resume, force=force)
    finally:
        first.close()
    RunDir(run, resume=True, force=False).close()  # free again


def _report_then_sleep(started) -> None:
    started.set()
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_run_directory_locked(run: Path):
    """DataLoader workers are forked while the trainer holds the lock; one orphaned by a SIGKILL lives on for
    seconds, and must not make an immediate restart fail as "in use"."""
    first = RunDir(run, resume=True, force=False)
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_report_then_sleep, args=(started,), daemon=True)
    try:
        child.start()
        assert started.wait(30)
        first.close()  # as the kernel does for a killed trainer
        RunDir(run, resume=True, force=False).close()
    finally:
        first.close()
        child.kill()
        child.join()


# ----- a damaged checkpoint: refused with the fallback named, taken with --resume=verified ---------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # a flipped byte in the zip's central directory, at the end of the file
        path.write_bytes(data[:-60] + bytes([data[-60] ^ 0x40]) + data[-59:])


@pytest.mark.parametrize("how", ["truncated", "zip directory flipped"])
def test_a_damaged_newest_checkpoint_names_the_fallback_and_resume_verified_takes_it(run: Path, how: str, caplog):
    ckpts = run / "checkpoints"
    _damage(ckpts / "ckpt-00000002.pt", how)
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"ckpt-00000002.pt(.|\n)*--resume=verified(.|\n)*ckpt-00000001.pt "
                                         r"\(step 1\)"):
        run_tokenizer(_cfg(), run, resume=True, device="cpu")
    assert _snapshot(run) == before
    with caplog.at_level(logging.WARNING, logger="maetok"):
        summary = run_tokenizer(_cfg(), run, resume="verified", device="cpu")
    assert summary["finished"] and summary["step"] == 2
    assert re.search(r"ckpt-00000002.pt(.|\n)*resuming from ckpt-00000001.pt \(step 1\)", caplog.text)
    assert "resuming from ckpt-00000001.pt" in (run / "train.log").read_text()
    assert load_checkpoint(latest_checkpoint(ckpts))["step"] == 2  # written again, whole


def test_when_no_checkpoint_verifies_resume_says_so(run: Path):
    for path in (run / "checkpoints").glob("*.pt"):
        _damage(path, "truncated")
    before = _snapshot(run)
    for mode in (True, "verified"):
        with pytest.raises(ValueError, match=r"no checkpoint in .* verifies") as e:
            run_tokenizer(_cfg(), run, resume=mode, device="cpu")
        assert "--resume=verified" not in str(e.value) and "--force" in str(e.value)
    assert _snapshot(run) == before


def test_resume_takes_an_optional_mode_and_leaves_overrides_alone():
    """`--resume` alone, `--resume=verified`, and an override written right after a bare --resume (which
    argparse hands to the flag as its value) is still an override."""
    def parse(*args: str):
        return resume_request(build_parser().parse_args(["tokenizer", "train", "--out", "x", *args]))

    assert parse("train.steps=3") == (False, ["train.steps=3"])
    assert parse("--resume") == ("latest", [])
    assert parse("--resume=verified", "train.steps=3") == ("verified", ["train.steps=3"])
    assert parse("--resume", "train.optim.lr=1e-4", "train.steps=3") == ("latest", ["train.optim.lr=1e-4",
                                                                                    "train.steps=3"])
    with pytest.raises(ConfigError, match="--resume=newest: unknown"):
        parse("--resume=newest")


# ----- divergence: rolled back to the last checkpoint before it, and the suggested resume works ---------------
def test_a_diverged_run_rolls_back_and_the_suggested_resume_finishes(run: Path, monkeypatch):
    from maetok.train.tokenizer_task import TokenizerTask  # its losses turn non-finite below

    step_of_task = TokenizerTask.training_step

    def diverging(self, model, batch, step):  # from step 3 on, as a run whose rate is too high
        out = step_of_task(self, model, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= 3 else out

    with monkeypatch.context() as patch, pytest.raises(FloatingPointError) as e:
        patch.setattr(TokenizerTask, "training_step", diverging)
        run_tokenizer(_cfg("train.steps=10", "train.max_bad_steps=3"), run, resume=True, device="cpu")
    message = str(e.value)
    suggested = re.search(r"--resume (train\.optim\.lr=[0-9.e+-]+)", message)
    assert suggested, message
    stopped_at = latest_checkpoint(run / "checkpoints")
    summary = run_tokenizer(_cfg(suggested.group(1)), run, resume=True, device="cpu")
    assert summary["finished"] and summary["step"] == 10 and math.isfinite(summary["psnr_train"])
    # every step after the stop trained (a skipped step logs no record)
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    first = int(stopped_at.stem.split("-")[1])
    assert logged[-(10 - first):] == list(range(first + 1, 11)), (stopped_at, logged)
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values())
    assert "step 2 (ckpt-00000002.pt)" in message


# ----- 6, 7: exit status, flags, permissions ---------------------------------------------------------------------
def test_exit_status_of_a_stopped_run_is_128_plus_the_signal():
    assert exit_status({"finished": True, "stopped_by": None}) == 0
    assert exit_status({"finished": False, "stopped_by": "SIGTERM"}) == 128 + signal.SIGTERM
    assert exit_status({"finished": False, "stopped_by": "SIGINT"}) == 130
    assert exit_status({"finished": False, "stopped_by": None}) == 1


def test_resume_and_force_together_are_refused(run: Path):
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="--resume and --force"):
        run_tokenizer(_cfg(), run, resume=True, force=True, device="cpu")
    assert _snapshot(run) == before


def test_written_files_get_the_umasks_permissions(tmp_path: Path):
    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", metadata={"kind": "test"})
        save_checkpoint(tmp_path / "ckpt", 1, {"step": 1})
    finally:
        os.umask(old)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.zeros(2))
    for path in (tmp_path / "w.safetensors", tmp_path / "ckpt" / "ckpt-00000001.pt"):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_an_explicit_cuda_request_without_cuda_is_refused(monkeypatch):
    # The Python API as the CLI: "cuda" asked for by name never turns into hours on the CPU without a word.
    import torch

    from maetok.config import ConfigError
    from maetok.io.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):  # one named device counts as its family
        with pytest.raises(ConfigError, match="CUDA is not available"):
            init_distributed(device)
    assert init_distributed("auto").device.type == "cpu"
