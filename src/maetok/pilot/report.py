"""The pilot's report: one table across variants, the pictures, and what the numbers can and cannot say."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .target_sets import base_variant, set_targets, variant_folder

PAPER_NOTE = ("The paper (ImageNet 256, SiT-L, equal diffusion training) reports gFID AE 24.47, VAE 22.17, "
              "MAETok 5.78, with MAETok's latents needing the fewest GMM modes and giving the best linear probe.")


# Shown in the main table; everything else goes in the expandable one below it.
HEADLINE = ("rfid", "psnr", "ssim", "gfid", "is[", "gmm_nll", "probe_top1", "tokenizer_params", "sit_params",
            "encode_gflops", "decode_gflops", "sit_forward_gflops", "generation_gflops", "latent_shape",
            "tokenizer_train_images", "diffusion_train_images", "sampling_images_per_s", "variant_total_wall_s")


LEARNING_CURVE_PLOT, TOKENS_CURVE_PLOT = "learning_curve.png", "tokens_curve.png"
# What the rows of the report's sections on prefixes and on the learning curve carry in their names.
PREFIX_MARK, STEP_MARK = " from the first ", " at diffusion step "


def learning_curve(results: dict[str, Any], final_step: int) -> tuple[list, list, list] | None:
    """(diffusion steps, gFID without CFG, its standard error) of one variant: its snapshots', then its final
    model's; None without snapshots."""
    curve, final = results.get("learning_curve"), results.get("generation_nocfg", {})
    found = _find(final, "gfid["), _find(final, "gfid_se[")
    if not curve or not curve.get("steps") or None in found:
        return None
    return ([*curve["steps"], final_step], [*curve["gfid"], found[0][1]], [*curve["gfid_se"], found[1][1]])


def _flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """All named metrics of one variant in one flat dict (keys already carry feature net and sample count)."""
    flat: dict[str, Any] = {}
    rec = results.get("reconstruction", {})
    flat.update({k: v for k, v in rec.items() if k != "wall_s"})
    for name in ("nocfg", "cfg"):
        for k, v in results.get(f"generation_{name}", {}).items():
            if k in ("wall_s", "cfg_scale"):
                continue
            flat[f"{k} ({name})" if not k.startswith("sampling") else f"{k}_{name}"] = v
    curve, final = results.get("learning_curve") or {}, _find(results.get("generation_nocfg", {}), "gfid[")
    for step, gfid, se in zip(curve.get("steps", []), curve.get("gfid", []), curve.get("gfid_se", [])):
        if final is None:  # snapshots evaluated, the final model not (yet): nothing to name the rows after
            break
        flat[f"{final[0]} (nocfg){STEP_MARK}{step}"] = gfid
        flat[f"{final[0].replace('gfid', 'gfid_se', 1)} (nocfg){STEP_MARK}{step}"] = se
    flat.update(_prefix_rows(results))
    flat.update({k: v for k, v in results.get("cost", {}).items() if k != "wall_s"})
    for key in ("tokenizer_train", "decoder_finetune", "diffusion_train", "latents"):
        if key in results and "wall_s" in results[key]:
            flat[f"{key}_wall_s"] = results[key]["wall_s"]
    # Everything this variant cost, training and evaluation (stages resumed from an interrupted run count the
    # last attempt only).
    flat["variant_total_wall_s"] = sum(r.get("wall_s", 0.0) for r in results.values() if isinstance(r, dict))
    return flat


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return str(v)


def _find(flat: dict[str, Any], prefix: str, suffix: str = "") -> tuple[str, Any] | None:
    for k, v in flat.items():
        if k.startswith(prefix) and k.endswith(suffix):
            return k, v
    return None


def _ordering(values: dict[str, float], lower_is_better: bool) -> str:
    items = sorted(values.items(), key=lambda kv: kv[1], reverse=not lower_is_better)
    return " < ".join(f"{k} ({_fmt(v)})" for k, v in items) if lower_is_better else \
        " > ".join(f"{k} ({_fmt(v)})" for k, v in items)


def _probe_se(accuracy: float, key: str) -> float | None:
    """Binomial standard error of a held-out accuracy, from the count in its name (probe_top1@2000)."""
    n = int(key.rsplit("@", 1)[1]) if "@" in key and key.rsplit("@", 1)[1].isdigit() else 0
    return math.sqrt(accuracy * (1 - accuracy) / n) if n > 0 else None


def _lead(values: dict[str, float], lower: bool, ses: dict[str, float] | None
          ) -> tuple[str, str | None, float, str, bool]:
    """(best, runner-up, margin, what the held-out noise says of it, whether that makes it a tie)."""
    ranked = sorted(values, key=values.get, reverse=not lower)
    best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    if second is None:
        return best, None, 0.0, "", False
    margin, noise, tie = abs(values[best] - values[second]), "", False
    if ses and ses.get(best) is not None and ses.get(second) is not None:
        se = math.hypot(ses[best], ses[second])
        tie = margin < 2 * se
        noise = f", {'within' if tie else 'beyond'} 2 standard errors ({_fmt(2 * se)}) of the evaluated sample"
    return best, second, margin, noise, tie


def _verdict_line(label: str, values: dict[str, float], lower: bool, ses: dict[str, float] | None,
                  has_maetok: bool, best_word: str = "best") -> str:
    """One ordering, its margin, and whether the margin clears twice the standard error of the difference.
    With target-set variants (maetok[hog+sobel]) the verdict names the best set (`_set_verdict`)."""
    line = f"- {label}: {_ordering(values, lower)}"
    if any(set_targets(v) is not None for v in values):
        return f"{line} -> {_set_verdict(values, lower, ses, best_word)}"
    best, second, margin, noise, tie = _lead(values, lower, ses)
    if second is None:
        return line
    if tie:
        return f"{line} -> {best} ahead by {_fmt(margin)}{noise}: **a tie at this sample count**"
    if not has_maetok:
        return f"{line} -> {best} ahead by {_fmt(margin)}{noise}"
    verdict = f"MAETok {best_word}" if best == "maetok" else f"MAETok not {best_word} ({best} is)"
    return f"{line} -> **{verdict}** (margin {_fmt(margin)}{noise})"


def _set_verdict(values: dict[str, float], lower: bool, ses: dict[str, float] | None, best_word: str) -> str:
    """The best target set against the next set (what --target-sets asks), and a baseline that beats them all."""
    sets = {v: x for v, x in values.items() if set_targets(v) is not None}
    best, second, margin, noise, tie = _lead(sets, lower, ses)
    if second is None:
        verdict = f"one target set, {best}"
    elif tie:
        verdict = f"target set {best} ahead of {second} by {_fmt(margin)}{noise}: **a tie at this sample count**"
    else:
        verdict = f"**target set {best} {best_word}** (margin {_fmt(margin)} over {second}{noise})"
    leader = _lead(values, lower, None)[0]
    if set_targets(leader) is not None or values[leader] == values[best]:
        return verdict
    return f"{verdict}; {leader} is ahead of every set (by {_fmt(abs(values[leader] - values[best]))})"


def _snapshot_steps(flat: dict[str, Any]) -> list[int]:
    """The diffusion steps of a variant's learning-curve rows, in order."""
    return sorted(int(k.rsplit(STEP_MARK, 1)[1]) for k in flat if k.startswith("gfid[") and STEP_MARK in k)


def _verdicts(variants: list[str], flat: dict[str, dict[str, Any]], analysis: dict) -> list[str]:
    has_maetok = any(base_variant(v) == "maetok" for v in variants)
    lines = []
    checks = [("gfid[", " (nocfg)", True, "gFID without CFG"), ("gfid[", " (cfg)", True, "gFID with CFG"),
              ("rfid[", "", True, "rFID"), ("probe_top1", "", False, "linear-probe top-1"),
              ("gfid_vs_recon[", " (nocfg)", True, "gFID against the variant's own reconstructions (no CFG)")]
    checks += [("gfid[", f" at diffusion step {step}", True, f"gFID without CFG at diffusion step {step}")
               for step in _snapshot_steps(flat[variants[0]])[:1]]  # the earliest: how fast it is learned
    for prefix, suffix, lower, label in checks:
        found = {v: got for v in variants if (got := _find(flat[v], prefix, suffix))}
        if len(found) != len(variants):
            continue
        values = {v: got[1] for v, got in found.items()}
        if prefix == "probe_top1":
            ses = {v: _probe_se(got[1], got[0]) for v, got in found.items()}
        else:  # the bootstrap standard error recorded beside each FID (eval.fid.fid_bootstrap_se)
            ses = {v: flat[v].get(got[0].replace("[", "_se[", 1)) for v, got in found.items()}
        lines.append(_verdict_line(label, values, lower, ses, has_maetok))
    gmm = {v: analysis["variants"][v]["gmm"] for v in variants}
    ks = gmm[variants[0]]["ks"]
    i = len(ks) // 2
    mid = ks[i]
    values = {v: gmm[v]["nll"][i] for v in variants}
    ses = {v: gmm[v]["nll_se"][i] for v in variants} if all(gmm[v].get("nll_se") for v in variants) else None
    kept = ", ".join(f"{v} keeps {gmm[v]['explained_variance']:.0%}"
                     + (f" (its own 90% needs {gmm[v]['own_pca_dim']})" if "own_pca_dim" in gmm[v] else "")
                     for v in variants)
    lines.append(_verdict_line(f"GMM held-out NLL at K={mid} (PCA dim {analysis['pca_dim']} for all: {kept})",
                               values, True, ses, has_maetok, best_word="lowest"))
    lines += ["", "One tokenizer seed per variant: the standard errors above cover the held-out sample only. "
              "Tokenizer seeds move more (on CIFAR-10 at the standard budget, gFID by 1-4 between seeds; README), so "
              "rerun with `--tokenizer-set train.seed=N` and compare with `benchmarks/pilot_compare.py` before "
              "trusting a margin of that size."]
    return lines


def _target_sets_note(variants: list[str]) -> list[str]:
    """What each target-set variant trains, for a pilot that compares sets (`--target-sets`)."""
    sets = {v: set_targets(v) for v in variants if set_targets(v) is not None}
    if not sets:
        return []
    named = "; ".join(f"`{v}`: {', '.join(names) or 'no auxiliary target'}" for v, names in sets.items())
    return [f"Auxiliary target sets compared (MAETok with these targets, each at weight 1.0, otherwise the same "
            f"run): {named}. The verdicts below name the best set per metric.", ""]


def _metric_table(variants: list[str], flat: dict[str, dict[str, Any]], keys: list[str]) -> list[str]:
    """A markdown table: one row per metric key, one column per variant (blank where a variant lacks it)."""
    return ["| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants),
            *(f"| {k} | " + " | ".join(_fmt(flat[v].get(k, "")) for v in variants) + " |" for k in keys)]


def _section(title: str, text: str, variants: list[str], flat: dict[str, dict[str, Any]], rows: list[str],
             plot: Path, alt: str) -> list[str]:
    """A report section of its own rows: the title, what they mean, their table and the plot when it was drawn."""
    if not rows:
        return []
    lines = ["", f"## {title}", "", text, "", *_metric_table(variants, flat, rows)]
    return lines + (["", f"![{alt}]({plot.name})"] if plot.is_file() else [])


def _section_row(key: str) -> bool:
    return PREFIX_MARK in key or STEP_MARK in key or key.startswith("gfid_vs_recon")


def prefix_curve(results: dict[str, Any], length: int) -> dict[str, list] | None:
    """rFID, its standard error, PSNR and SSIM per number of latent tokens k, the full `length` last; None for a
    tokenizer without nested token dropout."""
    curve, full = results.get("prefix_reconstruction"), results.get("reconstruction", {})
    found = {name: _find(full, name) for name in ("rfid[", "rfid_se[", "psnr@", "ssim@")}
    if not curve or not curve.get("tokens") or None in found.values():
        return None
    out = {name: [*curve[name], found[prefix][1]] for name, prefix in
           (("rfid", "rfid["), ("rfid_se", "rfid_se["), ("psnr", "psnr@"), ("ssim", "ssim@"))}
    return {"tokens": [*curve["tokens"], length], **out}


def _prefix_rows(results: dict[str, Any]) -> dict[str, Any]:
    curve, full = results.get("prefix_reconstruction") or {}, results.get("reconstruction", {})
    rows = {}
    for name, prefix in (("rfid", "rfid["), ("rfid_se", "rfid_se["), ("psnr", "psnr@"), ("ssim", "ssim@")):
        key = _find(full, prefix)
        for tokens, value in zip(curve.get("tokens", []), curve.get(name, [])):
            if key:
                rows[f"{key[0]}{PREFIX_MARK}{tokens} tokens"] = value
    return rows


def _prefix_section(variants: list[str], flat: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """What the first k latent tokens keep, for tokenizers trained with nested token dropout."""
    rows = [k for k in dict.fromkeys(k for v in variants for k in flat[v]) if PREFIX_MARK in k]
    text = ("Tokenizers trained with nested token dropout decode from any prefix of their latent tokens they were "
            "trained on: reconstruction quality of the held-out images from the first k tokens (the full length's "
            "is in the main table). A diffusion model on k tokens costs about k/L of one on all of them.")
    return _section("Fewer tokens: what the first k latent tokens keep", text, variants, flat, rows,
                    out / TOKENS_CURVE_PLOT, "rFID and PSNR vs number of latent tokens")


def _learnability(variants: list[str], flat: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """The paper's claim about the diffusion side, apart from the decoder: rows and the learning-curve plot."""
    rows = [k for k in dict.fromkeys(k for v in variants for k in flat[v])
            if k.startswith("gfid_vs_recon") or STEP_MARK in k]
    text = ("`gfid_vs_recon`: FID of the samples (no CFG) against this tokenizer's own reconstructions of the "
            "held-out images, instead of the images: what the decoder loses counts in both sets, so this measures "
            "how well the diffusion model learned the latent distribution. The rows `at diffusion step N`: gFID "
            "without CFG of the diffusion model's EMA during its training (same seed, same data order for every "
            "variant): how fast it learns. `_se` rows: bootstrap standard errors over the samples.")
    return _section("The diffusion side: how learnable is each latent space?", text, variants, flat, rows,
                    out / LEARNING_CURVE_PLOT, "gFID during diffusion training")


LATENT_NOTE = ("**Latent fidelity**: this pilot stopped after the latent stages (tokenizers, reconstruction, latent "
               "caches, latent analysis); it has no diffusion model, so no gFID, samples or generation cost. "
               "Continue it at the full fidelity for those.")


def write_report(out: Path, top: dict[str, Any], per_variant: dict[str, dict], analysis: dict,
                 resources: dict[str, Any] | None = None, fidelity: str = "full") -> Path:
    """report.json + report.md in `out`. `resources`: measured by the caller (peak memory of the process).
    `fidelity`: how far the pilot went ("latent": no generation metrics, said at the top)."""
    variants = list(per_variant)
    flat = {v: _flat_metrics(per_variant[v]) for v in variants}
    for v in variants:
        a = analysis["variants"][v]
        for k, nll in zip(a["gmm"]["ks"], a["gmm"]["nll"]):
            flat[v][f"gmm_nll@K={k}"] = nll
        flat[v]["gmm_best_k_bic"] = a["gmm"]["best_k_bic"]
        flat[v].update({k: val for k, val in a.items() if k.startswith("probe_top1")})
    report = {"data": top["plan"]["data"], "budget": top["plan"]["budget"], "feature_net": top["feature_net"],
              "real_floor": {k: v for k, v in top["real_floor"].items() if k != "wall_s"},
              "gmm_pca_dim": analysis["pca_dim"], "settings": top["plan"]["settings"],
              "environment": {**{k: top["plan"][k] for k in ("device", "torch", "threads") if k in top["plan"]},
                              **(resources or {})},
              **({} if fidelity == "full" else {"fidelity": fidelity}), **{v: flat[v] for v in variants}}
    (out / "report.json").write_text(json.dumps(report, indent=2))

    net = top["feature_net"]["feature_net"]
    keys = list(dict.fromkeys(k for v in variants for k in flat[v]))
    lines = [f"# maetok pilot: {', '.join(variants)} on `{top['plan']['data']}` ({top['plan']['budget']} budget)", ""]
    settings = top["plan"]["settings"]
    ft = settings.get("decoder_ft_steps", 0) if any(base_variant(v) == "maetok" for v in variants) else 0
    same = ("Same backbone, training steps, learning rate and seed for every tokenizer"
            + (f"; MAETok alone then gets its decoder fine-tuning ({ft} steps on the frozen encoder, as in the "
               f"paper), which can also help its rFID/PSNR" if ft else "") + ".")
    lines += [same + " The same diffusion model is trained on each.",
              f"Feature network for FID/KID/IS/PR: **{net}** ({top['feature_net'].get('why', '')}). "
              "Every metric name carries its feature network and sample count.", ""]
    if fidelity != "full":
        lines += [LATENT_NOTE, ""]
    lines += _target_sets_note(variants)
    floor = report["real_floor"]
    if floor:
        lines += ["Real-data floor (training images vs held-out images, same count): "
                  + ", ".join(f"{k} = {_fmt(v)}" for k, v in floor.items()), ""]
    if resources:
        lines += ["Resources: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in resources.items()), ""]
    if "cifar" in top["plan"]["data"].lower():
        lines += ["The CIFAR-10 copy used is JPEG-compressed: these FIDs compare our variants with each other "
                  "and are not comparable with published CIFAR-10 FIDs.", ""]
    sections = [k for k in keys if _section_row(k)]  # shown in their own sections below
    keys = [k for k in keys if k not in sections]
    headline = [k for k in keys if k.startswith(HEADLINE)]
    lines += _metric_table(variants, flat, headline)
    lines += ["", "Costs: parameters and FLOPs are properties of the models (generation_gflops_per_image: every "
              "forward pass of the sampler, guided ones twice, plus the decode). The images/s rows are wall-clock "
              "on this machine while the variants ran one after another, so other load on it moves them; equal "
              "FLOPs mean equal cost."]
    lines += ["", "<details><summary>All metrics (KID, precision/recall, costs, timings)</summary>", "",
              *_metric_table(variants, flat, [k for k in keys if k not in headline])]
    lines += ["", "</details>"]
    lines += ["", "## Does the paper's ordering hold here?", "", PAPER_NOTE, ""]
    lines += _verdicts(variants, flat, analysis)
    lines += _prefix_section(variants, flat, out)
    if fidelity == "full":
        lines += _learnability(variants, flat, out)
    lines += ["", "## Pictures", "", "GMM held-out NLL vs number of components (lower = fewer modes needed):", "",
              "![GMM NLL vs K](gmm_nll.png)", ""]
    if fidelity == "full":
        lines += ["Diffusion training loss per tokenizer:", "", "![diffusion loss](diffusion_loss.png)", ""]
    for v in variants:
        folder = variant_folder(v)  # a target set's folder has no brackets, which would also break the links
        lines += [f"### {v}", "", f"Held-out reconstructions (originals above reconstructions): "
                  f"![{folder} reconstructions]({folder}/reconstructions.png)", ""]
        if fidelity == "full":
            lines += [f"Samples without CFG: ![{folder} samples]({folder}/samples-nocfg/samples.png)", "",
                      f"Samples with CFG: ![{folder} samples cfg]({folder}/samples-cfg/samples.png)", ""]
    lines += ["## Settings", "", "```json", json.dumps(top["plan"]["settings"], indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
