"""User mistakes on the command line: each is refused with one `error:` line naming the problem and exit code 2,
before any model is loaded or sample drawn where the arguments alone show it; and the CLI stays usable under
torchrun, whose own parser sees every option of the command it launches."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from maetok.cli import build_parser, main
from maetok.commands.training import run_training
from maetok.config import SiTConfig, TokenizerConfig
from maetok.io.pretrained import load_sit, load_tokenizer, save_pretrained

SRC = Path(__file__).resolve().parents[1]


def run(*argv) -> tuple[int, str, str]:
    """`maetok ARGV` in this process: (exit code, stdout, stderr); argparse's own refusals included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: usage errors exit 2 while parsing
            code = e.code
    return code, out.getvalue(), err.getvalue()


def refused(*argv) -> str:
    """The error line of a command that must fail with exit code 2 and no traceback."""
    code, out, err = run(*argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "error: " in err, err
    return err.strip().splitlines()[-1]


def _tokenizer(latent_tokens: int) -> torch.nn.Module:
    from maetok.tokenizer import MAETok

    return MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=latent_tokens,
                                  latent_dim=4, enc_width=32, enc_heads=2, enc_depth=1, dec_width=32, dec_heads=2,
                                  dec_depth=1, aux_targets=[]))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny weights: a SiT on 4x4 latents, a tokenizer that makes 4x4 latents and one that makes 2x4."""
    from maetok.diffusion.sit import SiT

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_pretrained(_tokenizer(4), root / "tok")
    save_pretrained(_tokenizer(2), root / "tok-2tokens")
    save_pretrained(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=1, heads=2, num_classes=10)),
                    root / "sit")
    return {name: root / name for name in ("tok", "tok-2tokens", "sit")}


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands' default outputs (runs/...) land in the test's folder


# ==============================================================================================================
# torchrun
# ==============================================================================================================
def _option_strings(parser: argparse.ArgumentParser):
    """(command, option string, action) for every option of every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for command, option, act in _option_strings(sub):
                    yield f"{name} {command}".strip(), option, act
        else:
            for option in action.option_strings:
                yield "", option, action


def test_no_option_is_a_prefix_of_a_torchrun_option():
    """torchrun parses the whole command line with abbreviations allowed, the launched command's options too: an
    option that abbreviates two of torchrun's (--num: --numa-binding, --numa_binding) stops the launch."""
    from torch.distributed.run import get_args_parser

    torchrun = {s for a in get_args_parser()._actions for s in a.option_strings}
    options = list(_option_strings(build_parser()))
    assert len(options) > 50  # the walk reached the subcommands
    clashes = sorted({(cmd, opt) for cmd, opt, _ in options
                      if opt not in ("-h", "--help", "--num")  # --help: torchrun passes an exact match on
                      and any(t.startswith(opt) for t in torchrun)})
    assert clashes == []
    # --num survives only as an alias of --num-samples, for command lines written before the rename.
    with_num = [(cmd, act) for cmd, opt, act in options if opt == "--num"]
    assert {cmd for cmd, _ in with_num} == {"tokenizer reconstruct", "sample", "eval"}
    assert all(act.option_strings[0] == "--num-samples" and act.dest == "num_samples" for _, act in with_num)

    # torchrun's parser hands such a command line to the script untouched.
    argv = ["sample", "--model", "m", "--tokenizer", "t", "--num-samples", "6", "--out", "o"]
    args = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "maetok.cli", *argv])
    assert args.training_script == "maetok.cli" and args.training_script_args == argv


def test_num_is_an_alias_of_num_samples(tmp_path):
    parser = build_parser()
    for argv in (["sample", "--model", tmp_path, "--tokenizer", tmp_path, "--out", "o"],
                 ["eval", "gen", "--ref", "shapes"], ["tokenizer", "reconstruct", "--model", tmp_path, "--images",
                                                      "shapes", "--out", "o"]):
        argv = [str(a) for a in argv]
        assert parser.parse_args([*argv, "--num", "7"]).num_samples == 7
        assert parser.parse_args([*argv, "--num-samples", "7"]).num_samples == 7


# ==============================================================================================================
# Arguments refused while parsing
# ==============================================================================================================
@pytest.mark.parametrize("interval, problem", [("0.75", "two numbers"), ("a,b", "two numbers"),
                                               ("0,1,2", "two numbers"), ("0.8,0.2", "LOW < HIGH"),
                                               ("0.5,0.5", "LOW < HIGH"), ("-0.1,0.5", "0 <= LOW"),
                                               ("0,1.5", "HIGH <= 1")])
def test_sample_interval_is_checked_while_parsing(models, interval, problem):
    line = refused("sample", "--model", models["sit"], "--tokenizer", models["tok"], f"--interval={interval}",
                   "--out", "s")
    assert "--interval" in line and problem in line and repr(interval) in line and not Path("s").exists()


def test_interval_parses_to_the_sampler_setting(models):
    args = build_parser().parse_args(["sample", "--model", str(models["sit"]), "--tokenizer", str(models["tok"]),
                                      "--interval", "0,0.75", "--out", "s"])
    assert args.interval == (0.0, 0.75)


@pytest.mark.parametrize("argv", [
    ["sample", "--num-samples", "0"], ["sample", "--num", "-3"], ["sample", "--steps", "0"],
    ["sample", "--batch-size", "0"], ["sample", "--cfg", "-1"], ["sample", "--num-samples", "2.5"],
    ["tokenizer", "reconstruct", "--num-samples", "0"], ["latents", "cache", "--batch-size", "0"],
    ["latents", "cache", "--limit", "-1"], ["eval", "gen", "--num-samples", "-1"]])
def test_counts_are_checked_while_parsing(models, argv):
    required = {"sample": ["--model", models["sit"], "--tokenizer", models["tok"], "--out", "o"],
                "tokenizer": ["--model", models["tok"], "--images", "shapes", "--out", "o"],
                "latents": ["--tokenizer", models["tok"], "--data", "shapes", "--out", "o"],
                "eval": ["--ref", "shapes"]}[argv[0]]
    line = refused(*argv, *required)
    option = next(a for a in argv if a.startswith("--"))
    assert option in line and (">= 1" in line or ">= 0" in line), line
    assert not Path("o").exists()


def test_eval_accepts_zero_meaning_all():
    assert build_parser().parse_args(["eval", "gen", "--ref", "shapes", "--num-samples", "0"]).num_samples == 0


@pytest.mark.parametrize("argv", [["sample", "--model", "{sit}", "--tokenizer", "{tok}", "--out", "o"],
                                  ["latents", "cache", "--tokenizer", "{tok}", "--data", "shapes", "--out", "o"],
                                  ["eval", "gen", "--ref", "shapes"],
                                  ["tokenizer", "train", "--out", "o"], ["pilot", "--out", "o"]])
def test_device_names_are_checked_while_parsing(models, monkeypatch, argv):
    argv = [a.format(sit=models["sit"], tok=models["tok"]) for a in argv]
    line = refused(*argv, "--device", "gpu")
    assert "--device" in line and "'gpu'" in line and "auto, cpu, cuda" in line
    # A device this machine lacks is refused too, not silently replaced by the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(*argv, "--device", "cuda")
    assert "--device" in line and "CUDA is not available" in line
    assert not Path("o").exists()


def test_indexed_devices_where_the_command_uses_them(monkeypatch, models):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    parser = build_parser()
    base = ["latents", "cache", "--tokenizer", str(models["tok"]), "--data", "shapes", "--out", "o"]
    assert parser.parse_args([*base, "--device", "cuda:1"]).device == "cuda:1"
    assert parser.parse_args([*base, "--device", "CPU"]).device == "cpu"
    assert "cuda:0 to cuda:1" in refused(*base, "--device", "cuda:2")
    # Training places each rank by itself and knows no device index: cuda:N would be ignored there.
    assert "unknown device 'cuda:1'" in refused("tokenizer", "train", "--out", "o", "--device", "cuda:1")


def test_missing_local_checkpoint_is_not_taken_for_a_hub_id(models, tmp_path):
    (tmp_path / "runs").mkdir()
    for argv in (["latents", "cache", "--data", "shapes", "--out", "o", "--tokenizer"],
                 ["eval", "recon", "--ref", "shapes", "--tokenizer"],
                 ["tokenizer", "reconstruct", "--images", "shapes", "--out", "o", "--model"]):
        for path, why in (("runs/nonexist", "'runs' exists here"), ("./tok", "starts with"),
                          ("a/b/c", "org/name"), ("nothing-here", "org/name")):
            line = refused(*argv, path)
            assert f"{path}: no such folder" in line and why in line, line
    # A SiT hub id that cannot be downloaded (no network here) is named with both readings.
    line = refused("sample", "--tokenizer", models["tok"], "--out", "o", "--model", "org/sit")
    assert "org/sit: no such folder" in line and "hub" in line, line
    # A real hub id (no such local folder) still gets through the parser, to the download.
    args = build_parser().parse_args(["eval", "recon", "--ref", "shapes", "--tokenizer", "MAETok/maetok-b-128"])
    assert args.tokenizer == "MAETok/maetok-b-128"


# ==============================================================================================================
# Errors found by the commands
# ==============================================================================================================
def test_missing_or_empty_data_folder(models, tmp_path):
    line = refused("latents", "cache", "--tokenizer", models["tok"], "--data", tmp_path / "nowhere", "--out", "o")
    assert line.startswith("maetok: error: ") and "nowhere" in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    line = refused("latents", "cache", "--tokenizer", models["tok"], "--data", tmp_path / "empty", "--out", "o")
    assert f"{(tmp_path / 'empty').resolve()}: no image files" in line and "'/'" not in line
    line = refused("tokenizer", "reconstruct", "--model", models["tok"], "--images", tmp_path / "empty",
                   "--out", "o")
    assert "no image files" in line and not Path("o").exists()


def _image_folder(root: Path, splits: dict[str, int]) -> Path:
    from PIL import Image

    for split, n in splits.items():
        for i in range(n):
            folder = root / split / ("cat", "dog")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (40 * i % 256, 90, 200)).save(folder / f"{i}.png")
    return root


def test_held_out_split_defaults_to_val_when_there_is_no_test(models, tmp_path):
    """ImageNet's layout (train/ + val/): the held-out commands read val/ unless --split says otherwise."""
    data = _image_folder(tmp_path / "imagenet", {"train": 4, "val": 6})
    code, out, err = run("tokenizer", "reconstruct", "--model", models["tok"], "--images", data, "--out", "r")
    assert code == 0, err
    metrics = json.loads(Path("r/metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_images"] == 6
    code, out, err = run("eval", "recon", "--tokenizer", models["tok"], "--ref", data, "--features",
                         "resnet20-cifar10-random", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert result["reference"]["split"] == "val" and result["num_images"] == 6
    # An explicit --split wins, and a missing one is named together with the folder and what is there.
    line = refused("tokenizer", "reconstruct", "--model", models["tok"], "--images", data, "--split", "test",
                   "--out", "r2")
    assert str(data.resolve()) in line and "no 'test/' folder" in line and "['train', 'val']" in line
    assert "--split val" in line and not Path("r2").exists()
    assert "['train', 'val']" in refused("eval", "recon", "--tokenizer", models["tok"], "--ref", data, "--split",
                                         "test", "--features", "resnet20-cifar10-random", "--device", "cpu",
                                         "--force")


def test_convert_official_sit_of_a_tokenizer_folder(models, tmp_path):
    line = refused("convert", "official-sit", "--src", models["tok"], "--out", tmp_path / "converted")
    assert line.startswith("maetok: error: ") and str(models["tok"] / "config.json") in line
    assert "not a recognised SiT config" in line and not (tmp_path / "converted").exists()


def test_convert_refuses_to_overwrite_without_force(models, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = refused("convert", "official-sit", "--src", models["sit"], "--out", out)
    assert "already exists" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = run("convert", "official-sit", "--src", models["sit"], "--out", out, "--force")
    assert code == 0, err

    assert load_sit(out).config.num_tokens == 4
    code, _, err = run("convert", "official-sit", "--src", models["sit"], "--out", tmp_path / "fresh")
    assert code == 0, err  # a new folder needs no --force


def test_sample_with_the_wrong_tokenizer_fails_before_sampling(models, monkeypatch):
    import maetok.eval.generate as G

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(G, "sample", no_sampling)
    line = refused("sample", "--model", models["sit"], "--tokenizer", models["tok-2tokens"], "--num-samples", 4,
                   "--steps", 1, "--out", "s", "--device", "cpu")
    assert f"--model {models['sit']}" in line and f"--tokenizer {models['tok-2tokens']}" in line
    assert "4 tokens x 4 channels" in line and "decodes 2 x 4" in line
    assert not Path("s").exists()


def test_sample_records_its_settings(models):
    code, out, err = run("sample", "--model", models["sit"], "--tokenizer", models["tok"], "--num-samples", 3,
                         "--steps", 1, "--sampler", "euler", "--cfg", 2, "--interval", "0.1,0.6", "--seed", 5,
                         "--batch-size", 2, "--out", "s", "--device", "cpu")
    assert code == 0, err
    assert "sampling.json" in out
    settings = json.loads(Path("s/sampling.json").read_text())
    assert {k: settings[k] for k in ("num_samples", "sampler", "steps", "cfg_scale", "cfg_interval", "seed",
                                     "balanced", "batch_size", "processes")} == {
        "num_samples": 3, "sampler": "euler", "steps": 1, "cfg_scale": 2.0, "cfg_interval": [0.1, 0.6], "seed": 5,
        "balanced": False, "batch_size": 2, "processes": 1}
    assert settings["model"] == str(models["sit"].resolve()) and settings["tokenizer"] == str(models["tok"].resolve())


# ==============================================================================================================
# torchrun: one printed summary
# ==============================================================================================================
@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_training_summary_printed_by_rank_0_only(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    from maetok.config import TokenizerRunConfig

    def fake_run(cfg, out, **kwargs):  # every rank returns the summary, as run_tokenizer does under torchrun
        return {"finished": True, "step": 3}

    args = argparse.Namespace(config="cpu-32", overrides=[], out="o", resume=False, force=False, device="cpu")
    assert run_training(args, TokenizerRunConfig, fake_run) == 0
    out = capsys.readouterr().out
    assert (json.loads(out) == {"finished": True, "step": 3}) if printed else out == ""


def test_from_pretrained_of_a_missing_local_folder_says_so(tmp_path, monkeypatch):
    # The Python API follows the CLI's rule: "runs/nonexist" is a mistyped local folder when runs/ exists here,
    # not a hub id to download.
    from maetok.io import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(hub, "hub_download", lambda *a, **k: pytest.fail("sent a local path to the hub"))
    with pytest.raises(FileNotFoundError, match="no such folder.*'runs' exists here"):
        load_tokenizer("runs/nonexist")
