"""`maetok sweep`: the space file parsed and checked, a short sweep end to end with its report, pruned trials
recorded as pruned, a killed sweep resumed without repeating a finished trial, and two workers on one study.

Every sweep here runs on a pilot shrunk below the smoke budget (TINY: 3 training steps, 16 evaluation images):
its numbers mean nothing, its stages all run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import free_port
from maetok.cli import main
from maetok.config import ConfigError
from maetok.io.distributed import DistInfo
from maetok.pilot import DataFacts, PilotPlan
from maetok.sweep import SearchSpace, SweepConfig, load_space, run_sweep
from maetok.sweep.trial import TrialRunner

TINY = ["n_train=64", "n_eval=16", "tokenizer_steps=3", "diffusion_steps=3", "decoder_ft_steps=1",
        "classifier_steps=3", "sample_steps=2", "gmm_ks=[1, 2]"]
TINY_RUNS = ["--tokenizer-set", "train.batch_size=16", "--diffusion-set", "train.batch_size=16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _logger_as_found(maetok_logger_as_found):
    """A sweep adds a stderr handler to the "maetok" logger (see conftest)."""


def _error_line(capsys) -> str:
    """The one error line of a refused command (its log lines aside), with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("maetok: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _config(out: Path, **kw) -> SweepConfig:
    kw = {"data": "shapes", "space": "maetok", "out": out, "trials": 3, "budget": "smoke", "overrides": TINY,
          "tokenizer_set": ["train.batch_size=16"], "diffusion_set": ["train.batch_size=16"], **kw}
    return SweepConfig(**kw)


def _study(out: Path, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=storage or f"sqlite:///{out / 'study.db'}")


def _sweep_args(out: Path, *extra: str) -> list[str]:
    return ["sweep", "--budget", "smoke", "--out", str(out), *TINY_RUNS, *extra, *TINY]


# --------------------------------------------------------------------------------------------------------------
# The space file
# --------------------------------------------------------------------------------------------------------------
def test_the_shipped_spaces_give_the_budget_as_trial_0_and_settings_per_trial(tmp_path: Path):
    runner = TrialRunner(_config(tmp_path / "s"), DistInfo())  # checks every parameter's range on a plan
    space, base = runner.space, runner.base
    defaults = space.default_params(base)
    assert defaults["latent_tokens"] == 16 and defaults["aux_targets"] == "hog" and defaults["hog_weight"] == 1.0
    assert "sobel_weight" not in defaults  # the weight of a target the default does not have is no parameter
    assert defaults["tokenizer_lr_factor"] == 1.0 and defaults["decoder_ft_fraction"] == pytest.approx(1 / 3)
    assert defaults["mask_ratio_mean"] == 0.6
    settings = space.settings({**defaults, "aux_targets": "hog+sobel", "sobel_weight": 2.0, "latent_dim": 12,
                               "tokenizer_lr_factor": 2.0, "decoder_ft_fraction": 0.0}, base)
    assert settings["tokenizer.model.aux_targets"] == [
        {"name": "hog", "weight": 1.0, "options": {}, "optional": False},
        {"name": "sobel", "weight": 2.0, "options": {}}]
    assert settings["tokenizer.train.optim.lr"] == pytest.approx(2 * 5e-3) and settings["decoder_ft_steps"] == 0
    plan = runner.plan_for(settings)
    model = plan.tokenizer_runs["maetok"][0].config.model
    assert [(t.name, t.weight) for t in model.aux_targets] == [("hog", 1.0), ("sobel", 2.0)]
    assert model.latent_dim == 12 and len(plan.tokenizer_runs["maetok"]) == 1  # no decoder fine-tuning stage
    assert plan.diffusion_runs["maetok"].model.in_channels == 12
    assert plan.out.parent == tmp_path / "s" / "trials" and runner.plan_for(settings).out == plan.out
    default = runner.plan_for(space.settings(defaults, base))  # trial 0: the budget's own runs
    for run, base_run in zip(default.tokenizer_runs["maetok"], base.tokenizer_runs["maetok"], strict=True):
        assert (run.config.model, run.config.train, run.config.loss) == \
            (base_run.config.model, base_run.config.train, base_run.config.loss)
    assert default.diffusion_runs["maetok"].model == base.diffusion_runs["maetok"].model
    vae = load_space("vae")
    assert vae.variant == "vae" and vae.default_params(
        PilotPlan.from_budget("smoke", "shapes", ["vae"], tmp_path, base.facts))["kl_weight"] == 1e-4


def test_conditional_parameters_exist_only_where_their_condition_holds(tmp_path: Path):
    runner = TrialRunner(_config(tmp_path / "s"), DistInfo())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        values = runner.space.suggest(study.ask(), runner.base)
        chosen = values["aux_targets"].split("+")
        assert ("hog_weight" in values) == ("hog" in chosen) and ("sobel_weight" in values) == ("sobel" in chosen)


def test_on_cifar_the_default_teacher_joins_the_choices_with_its_options(tmp_path: Path):
    facts = DataFacts(num_classes=10, cifar10=True, train_images=256, held_out_images=64)
    base = PilotPlan.from_budget("smoke", "shapes", ["maetok"], tmp_path, facts)
    space = load_space("maetok").with_default_choices(base)
    assert space.default_params(base)["aux_targets"] == "hog+resnet-cifar"
    assert "hog+resnet-cifar" in space.target_chooser.choices
    teacher = space.settings({"aux_targets": "hog+resnet-cifar"}, base)["tokenizer.model.aux_targets"][1]
    assert teacher["options"] == {"arch": "resnet56", "layer": "layer2"}


BAD_SPACES = [
    ("p: {type: float, low: 0.5, high: 0.5, set: tokenizer.model.mask.ratio_mean}", r"\[0.5, 0.5\] is empty"),
    ("p: {type: float, low: 0, high: 1, log: true, set: tokenizer.train.optim.lr}", "log-scale range must be positive"),
    ("p: {type: float, low: 0, high: 1, set: tokenizer.model.mask.ratio_meen}", "parameter p: unknown setting .tokenizer.model.mask.ratio_meen."),
    ("p: {type: int, low: 1, high: 9, set: decoder_steps}", "unknown setting 'decoder_steps'"),
    ("p: {type: categorical, choices: [hog, dinoo], set: tokenizer.model.aux_targets}",
     "'dinoo' is not a registered auxiliary target"),
    ("p: {type: float, low: 0, high: 1, lgo: true, set: vae_kl_weight}", "unknown key 'lgo'"),
    ("p: {type: float, low: 0.1, high: 1, set: vae_kl_weight, when: {q: [1]}}", "names 'q', which is not a parameter"),
    ("p: {type: real, low: 0, high: 1, set: vae_kl_weight}", "type 'real'; choose float, int, categorical"),
    ("p: {type: float, low: 0, high: 2, set: tokenizer.model.mask.ratio_mean}", "p = 2: .*must lie in \\[0, 1\\]"),
    ("p: {type: categorical, choices: [hog], set: tokenizer.model.aux_targets}\n  w: {type: float, low: 0.1, "
     "high: 1, set: tokenizer.model.aux_targets.sobel.weight}", "weighs target 'sobel', which no choice of p holds"),
]


@pytest.mark.parametrize("text,message", BAD_SPACES)
def test_a_bad_space_is_one_line_before_any_training(tmp_path: Path, capsys, text: str, message: str):
    space = tmp_path / "space.yaml"
    space.write_text(f"variant: maetok\nparameters:\n  {text}\n")
    out = tmp_path / "sweep"
    assert main(_sweep_args(out, "--space", str(space))) == 2
    line = _error_line(capsys)
    assert str(space) in line and re.search(message, line), line
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--objective", "gfd"], "objective 'gfd' is not a KPI"),
    (["--constraint", "generation_gflops<2"], "write KPI<=VALUE"),
    (["--proxy", "gfid"], "the pruner's proxy must come from the latent stages"),
    (["--storage", "nowhere"], "give a database URL"),
    (["--storage", "journal:/no/such/folder/j.log"], "folder /no/such/folder does not exist"),
    (["--storage", "sqlite:////no/such/folder/s.db"], "cannot open it: OperationalError"),
    (["--storage", "postgresql://me:secret@127.0.0.1:1/db"], "postgresql://me:***@127.0.0.1:1/db: cannot open it"),
])
def test_bad_requests_and_storages_that_cannot_be_opened_are_one_line(tmp_path: Path, capsys, extra, message):
    assert main(_sweep_args(tmp_path / "sweep", *extra)) == 2
    line = _error_line(capsys)
    assert message in line and "secret" not in line, line
    assert not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------------------
def test_a_three_trial_smoke_sweep_writes_its_report_and_a_rerun_trains_nothing(tmp_path: Path):
    out = tmp_path / "sweep"
    assert main(_sweep_args(out, "--trials", "3")) == 0
    report = json.loads((out / "report.json").read_text())
    trials = report["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3 and trials[0]["default"]
    assert all(t["fidelity"] == "full" and "gfid" in t["kpis"] and "rfid" in t["kpis"] for t in trials)
    assert trials[0]["kpis"]["gfid"] == trials[0]["values"][0] and trials[0]["metric_names"]["gfid"].endswith("(nocfg)")
    assert report["best"][0]["values"][0] == min(t["values"][0] for t in trials)
    assert report["rerun_best"].startswith("maetok pilot --data shapes --budget smoke --variants maetok")
    md = (out / "report.md").read_text()
    for text in ("## Best configuration", "| gfid (objective) | full |", "| rfid | latent |",
                 "| generation_gflops | architecture |", "## What mattered (fANOVA", "optuna-dashboard", "--worker"):
        assert text in md, text
    assert (out / "history-gfid.png").is_file() and (out / "importances-gfid.png").is_file()
    results = {t["folder"]: (out / t["folder"] / "maetok" / "results.json").read_text() for t in trials}
    assert main(_sweep_args(out, "--trials", "3")) == 0  # finished: the report again, nothing trained
    assert len(_study(out).trials) == 3
    assert {f: (out / f / "maetok" / "results.json").read_text() for f in results} == results
    # Another objective on the same study would mix two searches: refused, naming what differs.
    assert main(_sweep_args(out, "--trials", "3", "--objective", "rfid")) == 2


def test_a_trial_stopped_by_a_signal_is_retried_when_the_sweep_runs_again(tmp_path: Path, monkeypatch):
    out = tmp_path / "sweep"
    args = _sweep_args(out, "--trials", "1", "--objective", "rfid")
    # What run_tokenizer returns when SIGTERM stopped it: checkpoint written, not finished.
    with monkeypatch.context() as patch:
        patch.setattr("maetok.pilot.stages.run_tokenizer",
                      lambda cfg, out, **kw: {"finished": False, "stopped_by": "SIGTERM", "step": 1})
        assert main(args) == 128 + signal.SIGTERM
    stopped, retry = _study(out).trials
    assert stopped.state == TrialState.FAIL and "interrupted" in stopped.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING and retry.params == stopped.params
    assert main(args) == 0
    assert [t.state for t in _study(out).trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_pruned_trials_are_recorded_as_pruned_at_the_latent_fidelity(tmp_path: Path):
    out = tmp_path / "sweep"
    run_sweep(_config(out, trials=2), pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # every rFID is above 0
    trials = _study(out).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert t.user_attrs["fidelity"] == "latent" and t.intermediate_values == {1: t.user_attrs["kpis"]["rfid"]}
        assert "the pruner stopped it before the diffusion stages" in t.user_attrs["pruned_because"]
        folder = out / t.user_attrs["folder"]
        assert (folder / "maetok" / "latents-train").is_dir() and not (folder / "maetok" / "diffusion").exists()
        assert "**Latent fidelity**" in (folder / "report.md").read_text()
    md = (out / "report.md").read_text()
    assert "No trial completed" in md and md.count("| pruned | latent |") == 2


def test_two_objectives_give_a_pareto_front_and_a_cost_constraint_prunes_before_training(tmp_path: Path):
    out = tmp_path / "sweep"
    run_sweep(_config(out, trials=4, objectives=["rfid,generation_gflops"], sampler="random",
                      constraints=["generation_gflops<=0.15"]))
    trials = _study(out).trials
    assert len(trials) == 4
    for t in trials:
        gflops = t.user_attrs["kpis"]["generation_gflops"]
        if gflops > 0.15:  # known from the configs: not trained at all
            assert t.state == TrialState.PRUNED and "infeasible before training" in t.user_attrs["pruned_because"]
            assert not (out / t.user_attrs["folder"]).exists()
        else:  # both objectives come from the latent stages: no diffusion model
            assert t.state == TrialState.COMPLETE and t.user_attrs["fidelity"] == "latent"
            assert t.constraints == {"generation_gflops<=0.15": pytest.approx(gflops - 0.15)}
    assert trials[0].state == TrialState.COMPLETE  # the default's 0.1 GFLOPs holds
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED}  # seed 0 draws one above 0.15
    assert (out / "pareto_front.png").is_file()
    assert "No pruning: every objective comes from the latent stages" in (out / "report.md").read_text()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-4000:]}")
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout} s")


def test_a_sweep_killed_mid_trial_resumes_without_repeating_a_finished_trial(tmp_path: Path):
    out = tmp_path / "sweep"
    args = _sweep_args(out, "--trials", "3")
    proc = subprocess.Popen([sys.executable, "-m", "maetok.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def second_trial_training():
        # Not before a second trial's folder exists: opening the SQLite storage while the sweep is still creating
        # it races Optuna's schema set-up (a UNIQUE constraint on alembic_version), which the sweep's own workers
        # avoid by taking its lock.
        if not (out / "study.db").is_file() or len(list((out / "trials").glob("*"))) < 2:
            return None
        try:
            running = [t for t in _study(out).get_trials(states=(TrialState.RUNNING,)) if t.number >= 1]
        except KeyError:  # the study is not made yet
            return None
        return running[0] if running and (out / running[0].user_attrs.get("folder", "-") / "maetok").is_dir() \
            else None

    killed = _wait_for(second_trial_training, proc, 240, "a second trial training")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _study(out).trials[0]
    assert first.state == TrialState.COMPLETE
    finished = (out / first.user_attrs["folder"] / "maetok" / "results.json").read_text()

    assert main(args) == 0
    trials = _study(out).trials
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and "ended while it ran" in dead.user_attrs["fail_reason"]
    retry = next(t for t in trials if t.system_attrs.get("retry_history") == [killed.number])
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["folder"] == killed.user_attrs["folder"]  # resumed in the killed one's folder
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert (out / first.user_attrs["folder"] / "maetok" / "results.json").read_text() == finished  # not rerun
    assert f"retried as #{retry.number}" in (out / "report.md").read_text()


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_on_one_storage_run_each_trial_once(tmp_path: Path, storage: str):
    out = tmp_path / "sweep"
    url = f"journal:{tmp_path / 'journal.log'}" if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    args = _sweep_args(out, "--trials", "4", "--storage", url, "--sampler", "random")
    workers = [subprocess.Popen([sys.executable, "-m", "maetok.cli", *args, "--worker"], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    study = optuna.load_study(study_name="sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))) if storage == "journal" else url)
    trials = study.trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)  # none twice, none over
    assert sum(bool(t.user_attrs.get("default")) for t in trials) == 1
    assert len({t.user_attrs["folder"] for t in trials}) == 4
    assert main(args) == 0 and len(study.trials) == 4  # the first process's report, nothing trained
    assert (out / "report.md").is_file()


@pytest.mark.distributed
def test_a_sweep_under_torchrun_runs_each_trial_as_one_ddp_job(tmp_path: Path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "maetok.cli", *_sweep_args(out, "--trials", "2", "--device",
                                                                                 "cpu", "--collective-timeout", "150")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    trials = _study(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    results = json.loads((out / trials[1].user_attrs["folder"] / "maetok" / "results.json").read_text())
    assert results["tokenizer_train"]["world_size"] == 2 and results["diffusion_train"]["world_size"] == 2


def test_a_space_round_trips_through_the_study_record():
    space = load_space("maetok")
    assert SearchSpace.from_dict(space.to_dict(), "again").to_dict() == space.to_dict()
    with pytest.raises(ConfigError, match="variant 'vq'"):
        SearchSpace.from_dict({"variant": "vq", "parameters": {}}, "x")


def test_the_seeds_of_two_sweeps_give_unrelated_proposals():
    """Per trial the sampler is seeded from (--seed, trials so far): the same pair always gives the same seed (a
    resumed sweep proposes what an uninterrupted one would), and --seed 1 does not replay --seed 0's proposals one
    trial later, as seeding with their sum did."""
    from maetok.sweep.study import trial_seed  # the sweep's own seeding rule

    assert trial_seed(0, 5) == trial_seed(0, 5)
    streams = {seed: [trial_seed(seed, n) for n in range(12)] for seed in range(3)}
    assert not set(streams[0]) & set(streams[1]) and not set(streams[1]) & set(streams[2])

    def proposals(seed: int) -> list[float]:
        study = optuna.create_study()
        out = []
        for n in range(6):
            study.sampler = optuna.samplers.RandomSampler(seed=trial_seed(seed, n))
            trial = study.ask()
            out.append(trial.suggest_float("x", 0, 1))
            study.tell(trial, 0.0)
        return out

    first, second = proposals(0), proposals(1)
    assert not set(first[1:]) & set(second)  # no shifted copy
