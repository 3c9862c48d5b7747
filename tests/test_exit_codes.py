"""What an adversarial user met as tracebacks: each is one `maetok: error:` line naming the file and what to do,
with the documented exit code (commands/common.ExitCode: 2 refused request, 3 unreadable file, 4 diverged
training, 5 disk full or not writable), and no traceback. A bug still shows its traceback."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import maetok.commands.pilot
import maetok.io.files
from maetok.cli import main
from maetok.commands.common import ExitCode
from maetok.config import SiTConfig, TokenizerConfig
from maetok.diffusion.sit import SiT
from maetok.io.checkpoint import latest_checkpoint, load_checkpoint
from maetok.io.pretrained import save_pretrained
from maetok.tokenizer import MAETok
from test_cli_errors import run

TINY = ["--config", "cpu-32", "--device", "cpu", "model.image_size=16", "data.image_size=16", "model.patch_size=4",
        "model.latent_tokens=4", "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2",
        "model.enc_depth=1", "model.dec_width=32", "model.dec_heads=2", "model.dec_depth=1", "model.aux_targets=[]",
        "data.limit=16", "train.batch_size=8", "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1",
        "train.keep_last=3", "stats_batches=1"]


def error_line(code: ExitCode, *argv) -> str:
    """The one error line of a command that must fail with `code`, and no traceback."""
    exit_code, out, err = run(*argv)
    assert exit_code == code, (exit_code, out, err)
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith("maetok: error: "), err
    return lines[-1]


class _Payload:
    """Unpickling it would run a command: the refusals must never get that far."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": _Payload()}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny weights: a tokenizer making 4x4 latents and a SiT on them; and the same folders with a pickle
    renamed model.safetensors."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_pretrained(MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=4, latent_dim=4,
                                           enc_width=32, enc_heads=2, enc_depth=1, dec_width=32, dec_heads=2,
                                           dec_depth=1, aux_targets=[])), root / "tok")
    save_pretrained(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2, num_classes=10)),
                    root / "sit")
    for name in ("tok", "sit"):
        shutil.copytree(root / name, root / f"{name}-pickle")
        _pickle(root / f"{name}-pickle" / "model.safetensors")
    return {name: root / name for name in ("tok", "sit", "tok-pickle", "sit-pickle")}


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ==============================================================================================================
# --out that cannot be made or written
# ==============================================================================================================
OUT_COMMANDS = {
    "tokenizer train": ["tokenizer", "train", *TINY, "train.steps=1"],
    "sample": ["sample", "--model", "{sit}", "--tokenizer", "{tok}", "--num-samples", "2", "--steps", "1",
               "--device", "cpu"],
    "latents cache": ["latents", "cache", "--tokenizer", "{tok}", "--data", "shapes", "--limit", "2",
                      "--device", "cpu"],
    "tokenizer reconstruct": ["tokenizer", "reconstruct", "--model", "{tok}", "--images", "shapes",
                              "--num-samples", "2"],
    "convert official-sit": ["convert", "official-sit", "--src", "{sit}"],
    "analyze": ["analyze", "--latents", "a=nowhere"],
    "pilot": ["pilot", "--budget", "smoke"],
    "demo": ["demo", "--budget", "smoke"],
}


def _command(name: str, models: dict[str, Path], out: str | Path) -> list[str]:
    return [a.format(sit=models["sit"], tok=models["tok"]) for a in OUT_COMMANDS[name]] + ["--out", str(out)]


@pytest.mark.parametrize("name", sorted(OUT_COMMANDS))
def test_an_out_under_a_file_is_refused_before_any_work(models, name):
    Path("somefile").write_text("mine")
    line = error_line(ExitCode.BAD_REQUEST, *_command(name, models, "somefile/sub"))
    assert "--out somefile/sub: somefile is a file" in line and "choose another --out" in line
    assert Path("somefile").read_text() == "mine"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where nobody may make a folder")
@pytest.mark.parametrize("name", ["tokenizer train", "sample", "latents cache", "tokenizer reconstruct",
                                  "convert official-sit", "pilot"])
def test_an_unwritable_out(models, name):
    """Refused when the first file is written (root passes the permission check made up front)."""
    line = error_line(ExitCode.CANNOT_WRITE, *_command(name, models, "/sys/maetok-test/out"))
    assert line.startswith("maetok: error: /sys") and "choose another --out" in line


def test_an_unwritable_out_is_refused_up_front(models, monkeypatch):
    Path("readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "readonly" and real_access(p, mode))
    line = error_line(ExitCode.CANNOT_WRITE, *_command("sample", models, "readonly/samples"))
    assert "readonly: Permission denied; choose another --out, or check the permissions" in line
    assert not Path("readonly/samples").exists()


# ==============================================================================================================
# Training: a corrupt checkpoint, an unreadable image, divergence, a full disk
# ==============================================================================================================
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny tokenizer run of 2 steps, a checkpoint at each."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = run("tokenizer", "train", "--out", out, *TINY, "train.steps=2")
    assert code == 0, err
    return out


def test_a_flipped_byte_in_the_checkpoint_to_resume(trained):
    shutil.copytree(trained, "run")
    ckpt = Path("run/checkpoints/ckpt-00000002.pt")
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x40
    ckpt.write_bytes(bytes(data))
    line = error_line(ExitCode.UNREADABLE_FILE, "tokenizer", "train", "--out", "run", "--resume", *TINY,
                      "train.steps=3")
    assert str(ckpt) in line and "corrupt" in line and "ckpt-00000001.pt" in line  # the one to fall back on


def test_strict_data_refuses_an_unreadable_image():
    Path("imgs/train/cat").mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (20, 20), (10 * i, 90, 200)).save(f"imgs/train/cat/{i}.png")
    Path("imgs/train/cat/bad.png").write_bytes(b"not a png")
    line = error_line(ExitCode.BAD_REQUEST, "tokenizer", "train", "--out", "run", *TINY, "train.steps=1",
                      "data.spec=imgs", "data.strict=true", "data.limit=0")
    assert "bad.png: not an image file" in line and "data.strict=false" in line and not Path("run").exists()


def test_a_diverging_run_stops_with_its_own_code(monkeypatch):
    from maetok.train.tokenizer_task import TokenizerTask  # the task whose losses turn non-finite below

    step_of_task = TokenizerTask.training_step

    def diverging(self, model, batch, step):  # from step 3 on, as a run whose rate is too high
        out = step_of_task(self, model, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= 3 else out

    monkeypatch.setattr(TokenizerTask, "training_step", diverging)
    line = error_line(ExitCode.DIVERGED, "tokenizer", "train", "--out", "run", *TINY, "train.steps=20",
                      "train.max_bad_steps=2")
    emergency = sorted(Path("run/checkpoints").glob("emergency-*.pt"))
    assert len(emergency) == 1 and str(emergency[0]) in line and "--resume" in line


class _FullDisk:
    """An open file whose writes fail as on a full disk."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture
def disk_full_at(monkeypatch):
    """disk_full_at(NAME): the disk fills up when maetok.io.files writes NAME (its atomic temporary file)."""
    real_open = open

    def fill_at(name: str) -> None:
        def open_on_a_full_disk(path, *args, **kwargs):
            file = real_open(path, *args, **kwargs)
            return _FullDisk(file) if Path(path).name.startswith(f".{name}.tmp-") else file

        monkeypatch.setattr(maetok.io.files, "open", open_on_a_full_disk, raising=False)
    return fill_at


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(disk_full_at, monkeypatch):
    """The third checkpoint's write fails with ENOSPC, as a full disk makes it fail: inside torch.save, which
    turns it into a RuntimeError. The checkpoints before stay intact, and --resume continues from them."""
    disk_full_at("ckpt-00000003.pt")
    line = error_line(ExitCode.CANNOT_WRITE, "tokenizer", "train", "--out", "run", *TINY, "train.steps=4")
    assert "--out run: No space left on device" in line and "--resume" in line
    ckpts = Path("run/checkpoints")
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert latest_checkpoint(ckpts).name == "ckpt-00000002.pt" and load_checkpoint(ckpts / "ckpt-00000001.pt")
    assert not list(ckpts.glob(".*tmp*"))
    monkeypatch.delattr(maetok.io.files, "open")  # space freed (the chdir into tmp_path stays): the advice works
    code, _, err = run("tokenizer", "train", "--out", "run", "--resume", *TINY, "train.steps=4")
    assert code == 0 and load_checkpoint(latest_checkpoint(ckpts))["step"] == 4, err


@pytest.mark.parametrize("name, file", [("latents cache", "shard-00000.safetensors"), ("sample", "samples.npz")])
def test_a_full_disk_while_writing_results(models, disk_full_at, name, file):
    """The line comes last, after the final redraw of a progress bar that the failure left open."""
    disk_full_at(file)
    line = error_line(ExitCode.CANNOT_WRITE, *_command(name, models, "out"))
    assert "--out out: No space left on device" in line and not Path("out", file).exists()


# ==============================================================================================================
# Pickles: refused, named, never unpickled
# ==============================================================================================================
@pytest.mark.parametrize("what", ["official-tokenizer", "official-sit"])
def test_convert_of_a_pickle(what):
    weights = _pickle(Path("official/pytorch_model.bin"))
    Path("official/config.json").write_text("{}")
    line = error_line(ExitCode.UNREADABLE_FILE, "convert", what, "--src", "official", "--out", "c")
    assert f"{weights}: could not be read as a weights-only torch file" in line and "refusing to unpickle" in line
    assert not Path("pwned").exists() and not Path("c").exists()


@pytest.mark.parametrize("argv, folder", [
    (["convert", "official-tokenizer", "--src", "{tok-pickle}", "--out", "c"], "tok-pickle"),
    (["convert", "official-sit", "--src", "{sit-pickle}", "--out", "c"], "sit-pickle"),
    (["convert", "official-sit", "--src", "{sit}", "--weights", "{sit-pickle}/model.safetensors", "--out", "c"],
     "sit-pickle"),
    (["sample", "--model", "{sit-pickle}", "--tokenizer", "{tok}", "--num-samples", "2", "--out", "s"],
     "sit-pickle"),
    (["sample", "--model", "{sit}", "--tokenizer", "{tok-pickle}", "--num-samples", "2", "--out", "s"],
     "tok-pickle"),
    (["tokenizer", "reconstruct", "--model", "{tok-pickle}", "--images", "shapes", "--out", "r"], "tok-pickle")])
def test_a_pickle_renamed_safetensors(models, argv, folder):
    argv = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    line = error_line(ExitCode.UNREADABLE_FILE, *argv)
    assert f"{models[folder] / 'model.safetensors'}: not a safetensors file" in line and "a Python pickle" in line
    assert not Path("pwned").exists()


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(maetok.commands.pilot, "cmd_demo", broken)
    with pytest.raises(KeyError, match="a bug"):  # uncaught: Python prints the traceback and exits with 1
        main(["demo", "--out", "d"])
