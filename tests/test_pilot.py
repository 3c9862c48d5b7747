"""The pilot end to end: every stage runs, the report has one column per variant with named metrics, and
re-running with --resume reuses what is done."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import free_port
from maetok.cli import main
from maetok.config import ConfigError, to_dict
from maetok.eval import features as features_module
from maetok.eval.features import FeatureNet
from maetok.pilot import BUDGETS, DataFacts, PilotPlan, open_pilot_data, pilot_settings, run_pilot, run_plan
from maetok.io.rundir import RunDirExists


def _check_report(out: Path, variants: list[str]) -> dict:
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for v in variants:
        metrics = report[v]
        net = report["feature_net"]["feature_net"]
        assert any(k.startswith(f"rfid[{net}]@") for k in metrics), metrics.keys()
        assert any(k.startswith(f"gfid[{net}]@") and k.endswith("(nocfg)") for k in metrics)
        assert any(k.startswith(f"gfid[{net}]@") and k.endswith("(cfg)") for k in metrics)
        assert any(k.startswith("psnr@") for k in metrics) and any(k.startswith("probe_top1@") for k in metrics)
        assert "gmm_nll@K=1" in metrics and "sit_forward_gflops" in metrics and "encode_images_per_s" in metrics
        for pic in ("reconstructions.png", "samples-nocfg/samples.png", "samples-cfg/samples.png"):
            assert (out / v / pic).is_file()
        # the noise of every FID, and the diffusion side apart from the decoder: how well and how fast it learns
        assert any(k.startswith(f"rfid_se[{net}]@") for k in metrics)
        assert any(k.startswith(f"gfid_se[{net}]@") and k.endswith("(nocfg)") for k in metrics)
        assert any(k.startswith(f"gfid_vs_recon[{net}]@") for k in metrics)
        curve = [k for k in metrics if k.startswith(f"gfid[{net}]@") and " at diffusion step " in k]
        assert len(curve) == 3, metrics.keys()  # a quarter, half and three quarters of the diffusion training
    assert (out / "learning_curve.png").is_file() and "## The diffusion side" in md
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | " + " | ".join(variants) + " |"
    assert (out / "gmm_nll.png").is_file() and (out / "diffusion_loss.png").is_file()
    assert "Real-data floor" in md and "Does the paper's ordering hold here?" in md
    assert report["environment"]["peak_rss_gib"] > 0 and "Resources: peak_rss_gib" in md
    # The pilot's peak over its attempts: every stage records its process's, and the report takes the largest.
    recorded = [json.loads((out / v / "results.json").read_text())["peak_rss_gib"] for v in variants]
    assert report["environment"]["peak_rss_gib"] >= max(recorded) > 0
    assert all(report[v]["variant_total_wall_s"] > 0 for v in variants)
    return report


def test_smoke_pilot_runs_every_stage_and_resumes(tmp_path: Path):
    out = tmp_path / "pilot"
    assert main(["pilot", "--budget", "smoke", "--variants", "ae,maetok", "--out", str(out), "--device", "cpu"]) == 0
    _check_report(out, ["ae", "maetok"])
    assert (out / "maetok" / "tokenizer-ft" / "model" / "config.json").is_file()  # stage 2 ran for maetok only
    assert not (out / "ae" / "tokenizer-ft").exists()
    before = (out / "maetok" / "results.json").read_text()
    # Without --resume an existing pilot is refused; with it, nothing is recomputed.
    assert main(["pilot", "--budget", "smoke", "--variants", "ae,maetok", "--out", str(out)]) == 2
    assert main(["pilot", "--budget", "smoke", "--variants", "ae,maetok", "--out", str(out), "--resume"]) == 0
    assert (out / "maetok" / "results.json").read_text() == before
    # Resuming with other settings would mix two budgets in one report: refused, naming the field.
    assert main(["pilot", "--budget", "smoke", "--variants", "ae,maetok", "--out", str(out), "--resume",
                 "diffusion_steps=61"]) == 2
    assert (out / "maetok" / "results.json").read_text() == before


def test_a_nested_dropout_pilot_reports_what_each_prefix_keeps(tmp_path: Path):
    out = tmp_path / "pilot"
    assert main(["pilot", "--budget", "smoke", "--variants", "maetok", "--out", str(out), "--device", "cpu",
                 "--tokenizer-set", "model.token_dropout=nested", "--tokenizer-set", "model.token_counts=[4,8,16]",
                 "decoder_ft_steps=0", "diffusion_steps=8"]) == 0
    report = json.loads((out / "report.json").read_text())
    net = report["feature_net"]["feature_net"]
    rows = [k for k in report["maetok"] if " from the first " in k]
    assert sorted(rows) == sorted(f"{m} from the first {k} tokens" for k in (4, 8) for m in
                                  (f"rfid[{net}]@64", f"rfid_se[{net}]@64", "psnr@64", "ssim@64"))
    # fewer tokens keep less: the full length reconstructs best, on this tokenizer trained a few steps too
    assert report["maetok"][f"psnr@64 from the first 4 tokens"] < report["maetok"]["psnr@64"]
    md = (out / "report.md").read_text()
    assert "## Fewer tokens: what the first k latent tokens keep" in md and (out / "tokens_curve.png").is_file()
    main_table = md.split("## Does the paper")[0]
    assert " from the first " not in main_table and " at diffusion step " not in main_table


class _PooledColours(torch.nn.Module):
    """Stands in for the FID Inception (seconds per image on a CPU): colour statistics on a 4x4 grid."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(x, 4).flatten(1), F.adaptive_max_pool2d(x, 4).flatten(1)], 1)


def test_pilot_inception_fids_share_one_cached_reference(tmp_path: Path, monkeypatch):
    builds = []

    def fake_inception(**_):
        builds.append(1)
        return FeatureNet(_PooledColours(), "inception", has_logits=False)

    monkeypatch.setitem(features_module._REGISTRY, "inception", fake_inception)
    out = tmp_path / "pilot"
    assert main(["pilot", "--budget", "smoke", "--variants", "ae", "--out", str(out), "--inception",
                 "n_eval=40", "diffusion_steps=20", "tokenizer_steps=10"]) == 0
    metrics = json.loads((out / "report.json").read_text())["ae"]
    for key in ("rfid[inception]@40", "gfid[inception]@40 (nocfg)", "gfid[inception]@40 (cfg)"):
        assert metrics[key] > 0, key
    assert builds == [1] and (out / "reference-inception.npz").is_file()  # one network, one reference


def test_pilot_settings_take_overrides_on_the_budget_and_on_its_runs():
    b = pilot_settings("quick", ["image_size=64", "tokenizer_preset=cpu-64", "gmm_ks=[1, 3]"],
                       tokenizer_set=["model.latent_tokens=8"], diffusion_set=["train.batch_size=16"])
    assert (b.image_size, b.tokenizer_preset, b.gmm_ks) == (64, "cpu-64", (1, 3))
    # The run settings given last win: they are applied after the budget's own.
    assert list(b.tokenizer.items())[-1] == ("model.latent_tokens", 8)
    assert list(b.diffusion.items())[-1] == ("train.batch_size", 16)
    assert BUDGETS["quick"].image_size == 32 and BUDGETS["quick"].tokenizer["model.latent_tokens"] == 16
    with pytest.raises(ConfigError, match="imagesize"):
        pilot_settings("quick", ["imagesize=64"])
    with pytest.raises(ConfigError, match="unknown budget"):
        pilot_settings("huge")


CIFAR_FACTS = DataFacts(num_classes=10, cifar10=True, train_images=256, held_out_images=64)


def test_the_cifar_teacher_default_yields_to_a_tokenizer_override(tmp_path: Path):
    """On CIFAR-10 the pilot gives MAETok the ResNet teacher; an explicit `--tokenizer-set model.aux_targets=...`
    (an ablation: HOG only) must replace it, not be replaced by it. Other variants get no teacher."""
    names = lambda cfg: [t.name for t in cfg.model.aux_targets]  # noqa: E731
    default = PilotPlan.from_budget("smoke", "shapes", ["maetok", "ae"], tmp_path, CIFAR_FACTS)
    assert names(default.tokenizer_runs["maetok"][0].config) == ["hog", "resnet-cifar"]
    ablation = PilotPlan.from_budget("smoke", "shapes", ["maetok"], tmp_path, CIFAR_FACTS,
                                     tokenizer_set=["model.aux_targets=[{name: hog, weight: 1.0}]"])
    stage1, stage2 = ablation.tokenizer_runs["maetok"]
    assert names(stage1.config) == ["hog"]
    assert names(stage2.config) == ["hog"] and stage2.config.stage == 2
    assert default.tokenizer_runs["ae"][0].config.model.variant == "ae"


def _image_folder(root: Path, splits: dict[str, int], size: int = 32) -> Path:
    """An ImageNet-layout folder: two colour classes, `n` PNGs per class in each split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_pilot_refuses_typos_before_any_work_and_before_force_deletes(tmp_path: Path):
    out = tmp_path / "pilot"
    base = ["pilot", "--budget", "smoke", "--variants", "ae,maetok", "--out", str(out)]
    # A typo in a run override, a budget field the sampler does not know, a count that makes no sense: each
    # fails at once (exit 2), before the pilot folder is made.
    assert main([*base, "--diffusion-set", "model.foo=1"]) == 2
    assert main([*base, "--tokenizer-set", "train.optim.lrr=1e-3"]) == 2
    assert main([*base, "sampler=foo"]) == 2
    assert main([*base, "n_eval=-5"]) == 2
    assert main([*base[:3], "ae,foo", *base[4:]]) == 2
    assert not out.exists()
    # With --force an existing pilot is deleted only once the new settings are known to be good.
    out.mkdir()
    (out / "pilot_results.json").write_text("{}")
    assert main([*base, "--force", "--diffusion-set", "model.foo=1"]) == 2
    assert (out / "pilot_results.json").is_file()
    # --force deletes a pilot, not any folder named by --out.
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("x")
    assert main([*base[:-1], str(other), "--force"]) == 2
    assert main([*base[:-1], str(other)]) == 2
    assert (other / "chapter1.tex").is_file()
    with pytest.raises(RunDirExists, match="is not a maetok pilot .no pilot_results.json.; choose another --out"):
        run_pilot("shapes", ["ae"], "smoke", other)  # not "pass --force", which it would refuse


def test_a_resumed_pilot_with_another_budget_names_both(tmp_path: Path):
    plan = PilotPlan.from_budget("quick", "shapes", ["ae"], tmp_path, CIFAR_FACTS)
    with pytest.raises(ConfigError, match="it ran --budget smoke, this asks for --budget quick"):
        plan.check_same_settings({"data": "shapes", "budget": "smoke", "settings": to_dict(BUDGETS["smoke"])})


def test_a_pilot_recorded_with_run_overrides_as_strings_resumes_with_the_same_settings(tmp_path: Path):
    """pilot_results.json may hold the run settings as lists of KEY=VALUE strings; the same values resume."""
    plan = PilotPlan.from_budget("smoke", "shapes", ["ae"], tmp_path, CIFAR_FACTS, tokenizer_set=["train.seed=1"])
    as_strings = {**to_dict(plan.settings),
                  "tokenizer": [f"{k}={v}" for k, v in BUDGETS["smoke"].tokenizer.items() if k != "train.optim.lr"]
                  + ["train.optim.lr=5e-3", "train.seed=1"],
                  "diffusion": [f"{k}={v}" for k, v in plan.settings.diffusion.items()]}
    plan.check_same_settings({"data": "shapes", "budget": "smoke", "settings": as_strings})
    as_strings["tokenizer"][-1] = "train.seed=2"
    with pytest.raises(ConfigError, match="other settings"):
        plan.check_same_settings({"data": "shapes", "budget": "smoke", "settings": as_strings})


def test_a_plan_survives_json_and_refuses_run_configs_its_settings_do_not_give(tmp_path: Path):
    plan = PilotPlan.from_budget("quick", "zip:data.zip", ["ae", "maetok"], tmp_path / "p", CIFAR_FACTS,
                                 overrides=["n_eval=32", "gmm_ks=[1, 3]"], tokenizer_set=["train.optim.lr=1e-3"],
                                 diffusion_set=["model.depth=2"], inception=True)
    data = json.loads(json.dumps(plan.to_dict()))
    again = PilotPlan.from_dict(data)
    assert again == plan and again.to_dict() == plan.to_dict()
    assert again.tokenizer_runs["maetok"][1].config.train.optim.lr == 1e-3
    assert again.diffusion_runs["ae"].model.depth == 2 and again.n_eval == 32 and again.settings.gmm_ks == (1, 3)
    data["diffusion_runs"]["ae"]["model"]["depth"] = 3
    with pytest.raises(ConfigError, match="diffusion_runs differ from what its settings give now"):
        PilotPlan.from_dict(data)


def test_a_plan_made_in_python_runs(tmp_path: Path):
    """What a search does for each trial: a budget with a few settings changed, made into a plan, then run."""
    settings = pilot_settings("smoke", ["n_train=64", "n_eval=16", "tokenizer_steps=3", "diffusion_steps=3",
                                        "classifier_steps=3", "sample_steps=2", "gmm_ks=[1, 2]"],
                              tokenizer_set=["train.batch_size=16"], diffusion_set=["train.batch_size=16"])
    facts = open_pilot_data("shapes", settings).facts
    plan = PilotPlan("shapes", ["ae"], "smoke", settings, tmp_path / "pilot", facts)
    settings = replace(settings, cfg_scale=1.5)
    plan = replace(plan, settings=settings)  # resolves the runs again
    assert plan.sampling["cfg"].cfg_scale == 1.5
    plan = PilotPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    report = run_plan(plan)
    assert report == tmp_path / "pilot" / "report.md"
    results = json.loads((tmp_path / "pilot" / "ae" / "results.json").read_text())
    assert results["generation_cfg"]["cfg_scale"] == 1.5 and results["tokenizer_train"]["step"] == 3
    recorded = json.loads((tmp_path / "pilot" / "pilot_results.json").read_text())["plan"]["settings"]
    assert recorded == json.loads(json.dumps(to_dict(settings)))


def test_an_interrupted_pilot_exits_with_the_signal(tmp_path: Path, monkeypatch):
    # What run_tokenizer returns when SIGTERM stopped it: checkpoint written, not finished.
    monkeypatch.setattr("maetok.pilot.stages.run_tokenizer",
                        lambda cfg, out, **kw: {"finished": False, "stopped_by": "SIGTERM", "step": 3})
    code = main(["pilot", "--budget", "smoke", "--variants", "ae", "--out", str(tmp_path / "p")])
    assert code == 128 + signal.SIGTERM  # a scheduler sees a pre-empted job, not a finished one


def test_pilot_names_the_real_count_when_the_held_out_split_is_small(tmp_path: Path, caplog):
    from maetok.data import DatasetError
    from maetok.pilot import run_pilot

    # 40 training images (fewer than the feature classifier's batch of 64) and 10 held-out ones (fewer than
    # the budget's n_eval=64): every metric is computed on, and labelled with, the 10 the split has.
    data = _image_folder(tmp_path / "imgs", {"train": 20, "val": 5})
    out = tmp_path / "pilot"
    args = ["pilot", "--data", str(data), "--budget", "smoke", "--variants", "ae", "--out", str(out),
            "tokenizer_steps=4", "diffusion_steps=4", "classifier_steps=3", "sample_steps=2"]
    # The smoke budget's diffusion batch (64) does not fit in 40 images: refused before any training.
    assert main(args) == 2 and not out.exists()
    assert main([*args, "--diffusion-set", "train.batch_size=32"]) == 0
    report = json.loads((out / "report.json").read_text())
    net = report["feature_net"]["feature_net"]
    assert f"rfid[{net}]@10" in report["ae"] and f"gfid[{net}]@10 (nocfg)" in report["ae"]
    assert any(k.startswith("fid_train_vs_test") and k.endswith("@10") for k in report["real_floor"])
    assert "fewer than n_eval=64" in caplog.text
    # A folder with no held-out split at all is refused with the folder named.
    train_only = _image_folder(tmp_path / "train-only", {"train": 4})
    with pytest.raises(DatasetError, match=r"needs a held-out split, a test/ or val/ folder") as e:
        run_pilot(str(train_only), ["ae"], "smoke", tmp_path / "p2")
    assert "--split" not in str(e.value)  # the loaders' advice is for other commands: the pilot has no --split
    assert not (tmp_path / "p2").exists()


def test_pilot_refuses_unlabelled_data_before_any_work(tmp_path: Path):
    import numpy as np

    from maetok.data import DatasetError
    from maetok.pilot import run_pilot

    np.savez(tmp_path / "plain.npz", np.zeros((8, 16, 16, 3), np.uint8))  # images only, no arr_1
    with pytest.raises(DatasetError, match="needs class labels"):
        run_pilot(f"npz:{tmp_path / 'plain.npz'}", ["ae"], "smoke", tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.distributed
def test_smoke_pilot_under_torchrun(tmp_path: Path):
    """`torchrun --nproc_per_node 2 -m maetok.cli pilot ...` (CPU, gloo): the training stages run as one DDP job
    over both processes, sampling is sharded, rank 0 alone writes the report; --resume reuses every stage."""
    out = tmp_path / "pilot"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "maetok.cli", "pilot", "--budget", "smoke",
               "--variants", "ae,maetok", "--out", str(out), "--device", "cpu",
               # A stuck collective raises with a traceback (well before the kill below) instead of hanging.
               "--collective-timeout", "150", *extra]
        # Its own process group: on a timeout the workers go too (killing torchrun alone leaves them running).
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun pilot did not finish in 300 s:\n{(stdout + stderr)[-6000:]}")
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    proc = torchrun()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert proc.stdout.count("report: ") == 1  # rank 0 only
    _check_report(out, ["ae", "maetok"])
    plan = json.loads((out / "pilot_results.json").read_text())["plan"]
    assert plan["world_size"] == 2
    results = json.loads((out / "maetok" / "results.json").read_text())
    for stage in ("tokenizer_train", "decoder_finetune", "diffusion_train"):
        assert results[stage]["world_size"] == 2 and results[stage]["finished"], (stage, results[stage])
    with np.load(out / "maetok" / "samples-cfg" / "samples.npz") as z:
        assert len(z["arr_0"]) == plan["settings"]["n_eval"]  # both ranks' shares, each sample once
    for split, count in (("train", plan["settings"]["n_train"]), ("test", plan["settings"]["n_eval"])):
        meta = json.loads((out / "maetok" / f"latents-{split}" / "meta.json").read_text())  # cached by every rank
        assert meta["count"] == count and all((out / "maetok" / f"latents-{split}" / s).is_file()
                                              for s in meta["shards"])

    before = (out / "maetok" / "results.json").read_text()
    proc = torchrun("--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert (out / "maetok" / "results.json").read_text() == before


@pytest.mark.slow
def test_quick_pilot_produces_the_report(tmp_path: Path):
    """The README's main command (`maetok demo`): three variants on the built-in data, quick budget."""
    out = Path(os.environ.get("MAETOK_PILOT_OUT", tmp_path / "pilot"))
    assert main(["demo", "--out", str(out)]) == 0
    _check_report(out, ["ae", "vae", "maetok"])


def test_pilot_resume_verified_passes_over_a_damaged_checkpoint(tmp_path: Path, capsys):
    """An interrupted training stage whose newest checkpoint is damaged: --resume refuses it in one line (exit 3)
    naming --resume=verified, which continues from the checkpoint before it, as `tokenizer train` does."""
    out = tmp_path / "pilot"
    args = ["pilot", "--budget", "smoke", "--variants", "ae", "--out", str(out), "--device", "cpu",
            "--tokenizer-set", "train.ckpt_every=10", "diffusion_steps=8"]
    assert main(args) == 0
    # Make the tokenizer stage look interrupted at its last checkpoint, and damage that checkpoint.
    run_dir = out / "ae" / "tokenizer"
    shutil.rmtree(run_dir / "model")
    results = json.loads((out / "ae" / "results.json").read_text())
    stage = next(k for k in results if k.startswith("tokenizer"))
    (out / "ae" / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != stage}))
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert main(args + ["--resume"]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maetok:")]  # not the log
    assert len(err) == 1 and newest.name in err[0] and "--resume=verified" in err[0], err
    assert main([*args, "--resume=verified"]) == 0
    assert (run_dir / "model" / "config.json").is_file()
    assert "resuming from ckpt-" in (run_dir / "train.log").read_text()
