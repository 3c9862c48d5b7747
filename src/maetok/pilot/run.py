"""`maetok pilot`: does MAETok beat plain AE / VAE tokenizers on *your* data, and what does it cost?

For each variant, with the same backbone, budget and seed: train the tokenizer (MAETok: stage 1, then its extra
decoder fine-tuning stage, as in the paper; the report says so), cache its latents, train the same diffusion
model, sample with and without CFG, and measure rFID / gFID / IS / precision-recall / PSNR / SSIM, GMM NLL per
K (one PCA dimension for all), linear-probe accuracy, parameters, GFLOPs and throughput; every FID with its
bootstrap standard error, the samples' FID against the variant's own reconstructions and gFID at the diffusion
run's snapshots (its learning curve), and for a nested-dropout tokenizer the reconstruction metrics per prefix
length. Writes `report.md`, `report.json`, PNG grids and plots.
Every stage writes its result to disk before the next starts, so re-running with --resume continues.
`fidelity="latent"` stops after the latent stages (tokenizers, reconstruction, latent caches, latent analysis) and
writes a report without generation metrics; the same pilot continued at `fidelity="full"` reuses them all (a
search trains its promising trials on to gFID this way, `maetok.sweep`).

Under torchrun every rank runs the training stages (DDP), and shares latent caching, generation and the
feature extraction of every FID (each rank its contiguous share); rank 0 alone computes the metrics from the
gathered features, fits the latent analysis and writes the report while the others wait at a barrier.
"""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import ConfigError
from ..io.distributed import DistInfo, barrier, cleanup, init_distributed
from ..io.pretrained import load_tokenizer
from ..io.rundir import RunDirExists, resume_mode
from ..io.weights import ensure_weights, required_weights
from ..plugins import reload_plugins
from ..train.run import setup_logging
from .budgets import PilotBudget, pilot_settings
from .evaluation import (analyse_latents, evaluate_generation, evaluate_learning_curve, evaluate_prefixes,
                         evaluate_reconstruction, measure_cost, prepare_feature_space, real_floor)
from .plan import PilotPlan, check_request
from .report import LEARNING_CURVE_PLOT, TOKENS_CURVE_PLOT, learning_curve, prefix_curve, write_report
from .stages import (PEAK_GPU, PEAK_RSS, ResultsFile, cache_variant_latents, load_json, open_pilot_data,
                     open_variant_results, peak_memory, train_diffusion, train_tokenizer, training_log)

# Ranks other than 0 wait at barriers while rank 0 evaluates (minutes to hours at full size): the default
# collective timeout (10-30 min) would kill a healthy job.
PILOT_COLLECTIVE_TIMEOUT = timedelta(hours=12)
# How far a pilot goes: "latent" stops before the diffusion stages, "full" runs them all.
FIDELITIES = ("latent", "full")


def check_fidelity(fidelity: str) -> None:
    if fidelity not in FIDELITIES:
        raise ConfigError(f"unknown pilot fidelity {fidelity!r}; choose one of {', '.join(FIDELITIES)}")


def run_pilot(data_spec: str, variants: list[str], budget: str, out: Path, resume: bool | str = False,
              force: bool = False, device: str = "cpu", inception: bool = False,
              settings: PilotBudget | None = None, collective_timeout: float | None = None,
              fidelity: str = "full") -> Path | None:
    """Run (or continue) the pilot in `out`; alone or under torchrun. The report's path on rank 0, else None.
    `settings`: the budget's settings when changed from BUDGETS[budget] (see `pilot_settings`).
    `collective_timeout`: seconds a rank may wait for the others (default PILOT_COLLECTIVE_TIMEOUT); past it the
    waiting collective raises with a traceback instead of hanging.
    `fidelity`: "full" (every stage), or "latent" (no diffusion model, sampling or cost: see the module's doc).
    `resume`: True or "latest" (an interrupted training stage continues from its newest checkpoint, refused when
    that does not verify), or "verified" (from the newest checkpoint that verifies)."""
    check_fidelity(fidelity)
    resume = resume_mode(resume)
    timeout = PILOT_COLLECTIVE_TIMEOUT if collective_timeout is None else timedelta(seconds=collective_timeout)
    dist = init_distributed(device, timeout=timeout)
    if not dist.enabled:
        dist.device = torch.device(device)
    try:
        setup_logging(None, dist.is_main)
        if resume:  # the plugins its target sets use, before the sets' names are checked
            recorded = Path(out) / "pilot_results.json"
            reload_plugins(load_json(recorded).get("plan", {}).get("plugins"), recorded)
        check_request(budget, variants)  # before the data is opened: a typo fails at once
        settings = settings or pilot_settings(budget)
        data = open_pilot_data(data_spec, settings)
        plan = PilotPlan(data_spec, variants, budget, settings, Path(out), data.facts, device, inception)
        # Everything that can fail on a typo (configs, data) has failed by now: before hours of work, and before
        # --force deletes the old pilot.
        plan.check_fits(dist.world)
        # Every pretrained network of every run, found or fetched before hours of work (one error names all missing)
        ensure_weights(required_weights(*(run.config for runs in plan.tokenizer_runs.values() for run in runs),
                                        feature_nets=["inception"] if plan.inception else []))
        prepare_pilot_folder(plan.out, resume, force, dist)
        top = ResultsFile(plan.out / "pilot_results.json", dist)
        plan.check_same_settings(top.stages.get("plan"))
        if top.pending("plan"):
            top.record("plan", plan.record(dist) if dist.is_main else None)
        space = prepare_feature_space(plan, data, top, dist)
        if top.pending("real_floor"):
            top.record("real_floor", real_floor(plan, data, space))
        per_variant = {}
        # The stages inline (not in a function per variant): a helper frame between the handler and the model
        # costs a level of call depth (tests/test_call_depth.py).
        for variant in plan.variants:
            results, folder = open_variant_results(plan, variant, dist), plan.variant_dir(variant)
            for run in plan.tokenizer_runs[variant]:  # MAETok: stage 1, then decoder fine-tuning on its encoder
                if results.pending(run.stage):
                    results.record(run.stage, train_tokenizer(run.config, folder / run.folder, dist, resume))
            tokenizer = load_tokenizer(plan.tokenizer_dir(variant) / "model").to(dist.device)
            if results.pending("reconstruction"):
                results.record("reconstruction", evaluate_reconstruction(plan, variant, tokenizer, data, space, dist))
            if results.pending("prefix_reconstruction"):
                results.record("prefix_reconstruction",
                               evaluate_prefixes(plan, variant, tokenizer, data, space, dist))
            if results.pending("latents"):
                results.record("latents", cache_variant_latents(plan, variant, tokenizer, data, dist))
            per_variant[variant] = results.stages
            if fidelity != "full":
                continue
            if results.pending("diffusion_train"):
                results.record("diffusion_train", train_diffusion(plan.diffusion_runs[variant], folder / "diffusion",
                                                                  dist, resume))
            for sampling in plan.sampling:
                if results.pending(f"generation_{sampling}"):
                    results.record(f"generation_{sampling}",
                                   evaluate_generation(plan, folder, sampling, tokenizer, space, dist))
            if results.pending("learning_curve"):
                results.record("learning_curve", evaluate_learning_curve(plan, folder, tokenizer, space, dist))
            if results.pending("cost"):
                results.record("cost", measure_cost(plan, variant, tokenizer, data, dist.device)
                               if dist.is_main else None)
        if top.pending("latent_analysis"):
            top.record("latent_analysis", analyse_latents(plan) if dist.is_main else None)
        return write_pilot_report(plan, top, per_variant, dist, fidelity) if dist.is_main else None
    finally:
        cleanup(dist)


def run_plan(plan: PilotPlan, resume: bool = False, force: bool = False,
             collective_timeout: float | None = None, fidelity: str = "full") -> Path | None:
    """Run the pilot a plan made in Python describes (see `run_pilot`); its run configs are resolved again from
    its settings and the data, as `from_dict` does."""
    return run_pilot(plan.data, plan.variants, plan.budget, plan.out, resume=resume, force=force, device=plan.device,
                     inception=plan.inception, settings=plan.settings, collective_timeout=collective_timeout,
                     fidelity=fidelity)


def prepare_pilot_folder(out: Path, resume: bool, force: bool, dist: DistInfo) -> None:
    """Make `out` ready: continue it (--resume), delete it first (--force: only a pilot's), or refuse."""
    existing = out.exists() and any(out.iterdir())
    barrier(dist)  # every rank looks before rank 0 deletes or creates anything
    if existing and not resume:
        if not (out / "pilot_results.json").is_file():  # --force deletes a pilot, never someone's folder
            raise RunDirExists(f"{out} is not empty and is not a maetok pilot (no pilot_results.json); "
                               f"choose another --out")
        if not force:
            raise RunDirExists(f"pilot directory {out} already exists; pass --resume to continue it or --force "
                               f"to delete it and start over")
        if dist.is_main:
            shutil.rmtree(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(dist)


def write_pilot_report(plan: PilotPlan, top: ResultsFile, per_variant: dict[str, dict], dist: DistInfo,
                       fidelity: str = "full") -> Path:
    """The loss plot, and report.md / report.json with the pilot's peak memory over all its attempts (each stage
    records its process's: a resumed pilot may have run only the last stages itself)."""
    if fidelity == "full":  # a pilot stopped at the latent fidelity has no diffusion training to plot
        plot_losses({v: plan.variant_dir(v) / "diffusion" for v in plan.variants}, plan.out / "diffusion_loss.png")
        plot_learning_curves(per_variant, plan.settings.diffusion_steps, plan.out / LEARNING_CURVE_PLOT)
    plot_prefix_curves({v: prefix_curve(per_variant[v], plan.tokenizer_runs[v][-1].config.model.latent_tokens)
                        for v in plan.variants}, plan.out / TOKENS_CURVE_PLOT)
    memory = peak_memory(dist.device, dist.world)
    for path in (top.path, *(plan.variant_dir(v) / "results.json" for v in plan.variants)):
        recorded = load_json(path)
        for key in (PEAK_RSS, PEAK_GPU):
            if isinstance(recorded.get(key), float) and key in memory:
                memory[key] = max(memory[key], recorded[key])
    return write_report(plan.out, top.stages, per_variant, top.stages["latent_analysis"], memory, fidelity)


def plot_losses(run_dirs: dict[str, Path], path: Path) -> Path:
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run in run_dirs.items():
        steps, loss = training_log(run, "loss")
        if steps:
            k = max(1, len(loss) // 50)  # light smoothing so the lines can be told apart
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, label=name)
    ax.set_xlabel("diffusion training step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("Diffusion training loss (same SiT, same seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_learning_curves(per_variant: dict[str, dict], final_step: int, path: Path) -> Path | None:
    """gFID without CFG against the diffusion model's training step, per variant, with the bootstrap standard
    error as error bars: which latent space the same diffusion model learns faster."""
    curves = {v: curve for v, results in per_variant.items() if (curve := learning_curve(results, final_step))}
    if not curves:
        return None
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (steps, gfid, se) in curves.items():
        ax.errorbar(steps, gfid, yerr=se, marker="o", capsize=3, label=name)
    ax.set_xlabel("diffusion training step")
    ax.set_ylabel("gFID without CFG (lower is better)")
    ax.set_title("gFID during diffusion training (same SiT)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_prefix_curves(curves: dict[str, dict[str, list] | None], path: Path) -> Path | None:
    """rFID (with its standard error) and PSNR against the number of latent tokens decoded from, per variant
    trained with nested token dropout."""
    curves = {v: curve for v, curve in curves.items() if curve}
    if not curves:
        return None
    fig = Figure(figsize=(9, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    rfid_axes, psnr_axes = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, curve in curves.items():
        rfid_axes.errorbar(curve["tokens"], curve["rfid"], yerr=curve["rfid_se"], marker="o", capsize=3, label=name)
        psnr_axes.plot(curve["tokens"], curve["psnr"], marker="o", label=name)
    for axes, label in ((rfid_axes, "rFID (lower is better)"), (psnr_axes, "PSNR, dB (higher is better)")):
        axes.set_xlabel("latent tokens decoded from (k)")
        axes.set_ylabel(label)
        axes.legend()
    fig.suptitle("What the first k latent tokens keep")
    fig.tight_layout()
    fig.savefig(path)
    return path
