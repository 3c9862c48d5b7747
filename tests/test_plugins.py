"""Plugins: a plugin file's target trains through the CLI and is loaded again on --resume, installed entry points
register theirs, a bad plugin is one error line, and the pilot compares target sets side by side."""
from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from maetok import plugins
from maetok.config import ConfigError
from maetok.io.distributed import DistInfo
from maetok.pilot import DataFacts, PilotPlan, pilot_settings, run_pilot
from maetok.pilot.report import _verdict_line
from maetok.pilot.target_sets import parse_target_sets, with_target_sets
from maetok.plugins import load_plugins, plugins_for_targets, reload_plugins, split_plugin_options
from maetok.tokenizer.targets import TARGETS
from test_cli_errors import run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "domain_targets_plugin.py"
TINY = ["--device", "cpu", "model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
        "model.latent_dim=4", "model.enc_width=32", "model.enc_heads=2", "model.enc_depth=1", "model.dec_width=32",
        "model.dec_heads=2", "model.dec_depth=1", "model.aux_width=32", "model.aux_heads=2", "model.aux_depth=1",
        "data.limit=16", "train.batch_size=8", "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1",
        "stats_batches=1"]
WITH_PLUGIN_TARGET = "model.aux_targets=[{name: edge-orientation, options: {bins: 6}}, {name: frequency}]"
FACTS = DataFacts(num_classes=10, cifar10=False, train_images=256, held_out_images=64)


@pytest.fixture(autouse=True)
def fresh_registry():
    """Each test starts, and leaves, the target registry and the loaded plugins as a new process has them."""
    targets, loaded = dict(TARGETS), dict(plugins.LOADED)
    yield
    TARGETS.clear()
    TARGETS.update(targets)
    plugins.LOADED.clear()
    plugins.LOADED.update(loaded)


def forget_plugins() -> None:
    """What a new process would have: the built-in targets only, and no plugin module imported."""
    for plugin in plugins.LOADED.values():
        for name in plugin.targets:
            TARGETS.pop(name, None)
    plugins.LOADED.clear()
    for name in [m for m in sys.modules if m.startswith(("maetok_plugin_", "my_"))]:
        del sys.modules[name]


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("maetok: error: "), (code, err)
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    return lines[-1]


def test_plugin_options_may_stand_before_or_after_the_command():
    argv = ["--plugin", "a.py", "tokenizer", "train", "--plugin=b.py", "--out", "x", "k=1", "--plugin", "c.py"]
    assert split_plugin_options(argv) == (["tokenizer", "train", "--out", "x", "k=1"], ["a.py", "b.py", "c.py"])
    assert split_plugin_options(["pilot", "--plugin"]) == (["pilot", "--plugin"], [])  # argparse refuses it


def test_a_plugin_target_trains_through_the_cli_and_is_loaded_again_on_resume(tmp_path: Path, caplog):
    plugin, out = tmp_path / "my_targets.py", tmp_path / "run"
    shutil.copy(EXAMPLE, plugin)
    code, _, err = run("tokenizer", "train", "--plugin", plugin, "--out", out, *TINY, WITH_PLUGIN_TARGET,
                       "train.steps=2")
    assert code == 0, err
    marker = json.loads((out / "maetok-run.json").read_text())
    assert marker["plugins"] == [{"file": str(plugin), "targets": ["edge-orientation"]}]
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]["aux_targets"]
    assert [t["name"] for t in saved] == ["edge-orientation", "frequency"]

    forget_plugins()  # a new process: the run's record alone brings the target back
    caplog.set_level("INFO", logger="maetok")
    code, _, err = run("tokenizer", "train", "--out", out, "--resume", "--device", "cpu", "train.steps=3")
    assert code == 0, err
    assert "edge-orientation" in TARGETS
    assert any("resume: loaded plugin" in r.getMessage() and str(plugin) in r.getMessage() for r in caplog.records)

    # The plugin moved: resuming is one line naming it, or works with --plugin at its new place.
    forget_plugins()
    moved = plugin.rename(tmp_path / "moved_targets.py")
    line = one_error_line(*run("tokenizer", "train", "--out", out, "--resume", "--device", "cpu", "train.steps=4")[::2])
    assert f"records plugin {plugin}" in line and "--plugin" in line
    code, _, err = run("--plugin", moved, "tokenizer", "train", "--out", out, "--resume", "--device", "cpu",
                       "train.steps=4")
    assert code == 0, err


@pytest.mark.parametrize("body,expected", [
    (None, "no such file"),
    ("from maetok.tokenizer.targets import register_target\n"
     "register_target('half-done')(lambda options, image_size, patch_size: None)\n"
     "1 / 0\n", "raised ZeroDivisionError while loading (line 3): division by zero"),
    ("import torch\n", "registered no auxiliary target"),
    ("def broken(:\n", "raised SyntaxError while loading (line 1)"),
    ("from maetok.tokenizer.targets import register_target\n"
     "register_target('hog')(lambda options, image_size, patch_size: None)\n", "'hog' is already registered"),
])
def test_a_bad_plugin_file_is_one_line_before_any_work(tmp_path: Path, body, expected):
    plugin, out = tmp_path / "bad_plugin.py", tmp_path / "run"
    if body is not None:
        plugin.write_text(body)
    before = dict(TARGETS)
    line = one_error_line(*run("tokenizer", "train", "--out", out, *TINY, "train.steps=1", "--plugin", plugin)[::2])
    assert line.startswith(f"maetok: error: plugin {plugin}") and expected in line, line
    assert TARGETS == before and not out.exists()  # what it registered before failing is undone


def test_installed_entry_points_register_targets_for_every_command(tmp_path: Path, monkeypatch):
    (tmp_path / "my_maetok_targets.py").write_text(EXAMPLE.read_text())
    (tmp_path / "my_other_targets.py").write_text(
        "from maetok.tokenizer.targets import register_target, TARGETS\n"
        "def register():\n"
        "    register_target('sobel-again')(TARGETS['sobel'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed = [EntryPoint("edges", "my_maetok_targets", plugins.ENTRY_POINT_GROUP),
                 EntryPoint("more", "my_other_targets:register", plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: installed if group == plugins.ENTRY_POINT_GROUP else [])
    # Through the CLI: the pilot accepts their targets in a set (and goes on to refuse the batch size, before work).
    args = ["pilot", "--variants", "maetok", "--target-sets", "hog,edge-orientation;sobel-again", "--budget", "smoke",
            "--out", tmp_path / "pilot", "--tokenizer-set", "train.batch_size=100000"]
    line = one_error_line(*run(*args)[::2])
    assert "train.batch_size" in line and "unknown auxiliary target" not in line, line
    assert {"edge-orientation", "sobel-again"} <= set(TARGETS)
    assert plugins_for_targets(["edge-orientation"]) == [{"entry_point": "edges", "targets": ["edge-orientation"]}]
    assert load_plugins() == list(plugins.LOADED.values())  # loaded once per process

    forget_plugins()
    reload_plugins([{"entry_point": "edges", "targets": ["edge-orientation"]}], "run/maetok-run.json")
    assert "edge-orientation" in TARGETS
    installed.clear()  # uninstalled since the run started
    forget_plugins()
    with pytest.raises(ConfigError, match="records plugin edges .*entry point of group maetok.targets"):
        reload_plugins([{"entry_point": "edges", "targets": ["edge-orientation"]}], "run/maetok-run.json")


def test_target_sets_become_maetok_variants_with_those_targets(tmp_path: Path):
    assert parse_target_sets("hog; hog,sobel ;none") == [["hog"], ["hog", "sobel"], []]
    assert with_target_sets(["ae", "maetok", "vae"], "hog;hog,texture") == [
        "ae", "maetok[hog]", "maetok[hog+texture]", "vae"]
    assert with_target_sets(["ae"], "none") == ["ae", "maetok[none]"]
    plan = PilotPlan.from_budget("smoke", "shapes", ["ae", "maetok[hog+texture]", "maetok[none]"], tmp_path, FACTS)
    runs = plan.tokenizer_runs["maetok[hog+texture]"]
    assert [r.stage for r in runs] == ["tokenizer_train", "decoder_finetune"]  # MAETok's stage 2 too
    model = runs[0].config.model
    assert model.variant == "maetok" and [(t.name, t.weight) for t in model.aux_targets] == [("hog", 1.0),
                                                                                            ("texture", 1.0)]
    assert plan.tokenizer_runs["maetok[none]"][0].config.model.aux_targets == []
    assert plan.tokenizer_dir("maetok[hog+texture]") == tmp_path / "maetok-hog+texture" / "tokenizer-ft"
    assert plan.diffusion_runs["maetok[hog+texture]"].latents == str(tmp_path / "maetok-hog+texture" / "latents-train")
    assert PilotPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize("sets,expected", [
    ("hog;hog,texure", "unknown auxiliary target 'texure'"),
    ("hog;hog,hog", "names a target twice"),
    ("hog;hog", "name one twice"),
    ("hog;hog sobel", "'hog sobel' is not a target name"),
    (";", "names no target set"),
])
def test_a_bad_target_set_is_one_line_before_any_work(tmp_path: Path, sets, expected):
    out = tmp_path / "pilot"
    line = one_error_line(*run("pilot", "--budget", "smoke", "--target-sets", sets, "--out", out)[::2])
    assert expected in line, line
    assert not out.exists()


def test_a_resumed_pilot_loads_the_plugins_its_plan_recorded(tmp_path: Path):
    plugin, out = tmp_path / "my_targets.py", tmp_path / "pilot"
    shutil.copy(EXAMPLE, plugin)
    plugins.load_plugin_file(plugin)
    plan = PilotPlan.from_budget("smoke", "shapes", ["ae", "maetok[hog+edge-orientation]"], out, FACTS)
    record = plan.record(DistInfo())
    assert record["plugins"] == [{"file": str(plugin), "targets": ["edge-orientation"]}]
    assert "plugins" not in PilotPlan.from_budget("smoke", "shapes", ["ae", "maetok"], out, FACTS).record(DistInfo())
    out.mkdir()
    (out / "pilot_results.json").write_text(json.dumps({"plan": record}))
    forget_plugins()
    huge_batch = pilot_settings("smoke", tokenizer_set=["train.batch_size=100000"])
    with pytest.raises(ConfigError, match="train.batch_size"):  # past the target check: the plugin is back
        run_pilot("shapes", plan.variants, "smoke", out, resume=True, settings=huge_batch)
    assert "edge-orientation" in TARGETS


def test_smoke_pilot_compares_target_sets_side_by_side(tmp_path: Path):
    out = tmp_path / "pilot"
    code, stdout, err = run(
        "pilot", "--budget", "smoke", "--variants", "maetok", "--target-sets", "hog;hog,texture", "--out", out,
        "--device", "cpu", "--tokenizer-set", "train.batch_size=16", "--diffusion-set", "train.batch_size=16",
        "n_train=64", "n_eval=16", "tokenizer_steps=3", "decoder_ft_steps=2", "diffusion_steps=3",
        "classifier_steps=3", "sample_steps=2", "gmm_ks=[1, 2]")
    assert code == 0, err
    variants = ["maetok[hog]", "maetok[hog+texture]"]
    report = json.loads((out / "report.json").read_text())
    assert all(any(k.startswith("rfid[") for k in report[v]) and "gmm_nll@K=1" in report[v] for v in variants)
    md = (out / "report.md").read_text()
    assert "| metric | maetok[hog] | maetok[hog+texture] |" in md
    assert "`maetok[hog+texture]`: hog, texture" in md and "target set maetok[hog" in md
    assert "(maetok-hog+texture/reconstructions.png)" in md
    config = yaml.safe_load((out / "maetok-hog+texture" / "tokenizer" / "config.yaml").read_text())
    assert [t["name"] for t in config["model"]["aux_targets"]] == ["hog", "texture"]
    assert (out / "maetok-hog" / "tokenizer-ft" / "model").is_dir()
    assert json.loads((out / "pilot_results.json").read_text())["plan"]["variants"] == variants


def test_the_verdicts_name_the_best_target_set_and_a_baseline_ahead_of_every_set():
    values = {"ae": 20.0, "maetok[hog]": 22.0, "maetok[hog+texture]": 21.0}
    assert _verdict_line("gFID", values, True, None, True).endswith(
        "-> **target set maetok[hog+texture] best** (margin 1 over maetok[hog]); ae is ahead of every set (by 1)")
    probe = {"maetok[hog]": 0.40, "maetok[hog+texture]": 0.42}
    assert _verdict_line("probe", probe, False, {v: 0.01 for v in probe}, True).endswith(
        "target set maetok[hog+texture] ahead of maetok[hog] by 0.02, within 2 standard errors (0.02828) of the "
        "evaluated sample: **a tie at this sample count**")
