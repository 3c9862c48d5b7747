"""`cheaper_generation.py --collect`: the results folder from the measurements in --out: cheaper-generation.json,
cheaper-generation.md (a table per lever), reconstruction.png, gflops_vs_gfid.png and README.md."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from common import RESULTS_DIR, machine, machine_line, markdown_table, utc_now, write_json

# Families of generation points in the figure: (label, marker, filled).
K_CFG, K_NOCFG, FIXED = "k tokens, pilot sampler + CFG", "k tokens, pilot sampler, no CFG", "fixed tokenizer at L"
EULER, HEUN, STUDENT = "teacher Euler + CFG", "teacher Heun + CFG", "student (CFG folded in)"
STYLE = {K_CFG: ("o", True), K_NOCFG: ("o", False), FIXED: ("*", True), EULER: ("s", True), HEUN: ("^", True),
         STUDENT: ("D", True)}


def families(point: dict, pilot: dict, L: int) -> list[str]:
    """The figure's families a point belongs to (the teacher at the pilot's sampler is a k = L point too)."""
    out = []
    at_pilot_sampler = (point["sampler"], point["steps"]) == (pilot["sampler"], pilot["steps"])
    if point["model"] == "fixed":
        out.append(FIXED)
    elif point["model"].startswith("k") and at_pilot_sampler:
        out.append(K_CFG if point["guidance"] == "cfg" else K_NOCFG)
    if point["model"] == f"k{L}" and point["guidance"] == "cfg":
        out.append({"euler": EULER, "heun": HEUN}.get(point["sampler"], point["sampler"]))
    if point["model"] == "student":
        out.append(STUDENT)
    return out


def pareto_front(points: dict[str, dict]) -> list[str]:
    """Keys of the points no other point beats on both generation GFLOPs and gFID, cheapest first."""
    front, best = [], float("inf")
    for key, p in sorted(points.items(), key=lambda kv: (kv[1]["gflops_per_image"], kv[1]["gfid"])):
        if p["gfid"] < best:
            front.append(key)
            best = p["gfid"]
    return front


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def price_of_option(state: dict, L: int, tokenizer: str = "nested") -> dict:
    """What nested dropout costs at full length: a nested tokenizer's numbers at L against the fixed one's (and
    gFID for "nested", the one with diffusion models)."""
    rec, gen = state["reconstruction"], state.get("generation", {}) if tokenizer == "nested" else {}
    nested, fixed = rec[f"{tokenizer}-k{L}"], rec[f"fixed-k{L}"]
    out = {"rfid_nested": nested["rfid"], "rfid_nested_se": nested["rfid_se"], "rfid_fixed": fixed["rfid"],
           "rfid_fixed_se": fixed["rfid_se"], "rfid_pct": _pct(nested["rfid"], fixed["rfid"]),
           "psnr_db": nested["psnr"] - fixed["psnr"], "ssim": nested["ssim"] - fixed["ssim"]}
    steps = state["pilot_sampling"]["cfg"]
    for guidance in ("cfg", "nocfg"):
        suffix = f"-{steps['sampler']}{steps['steps']}-{guidance}"
        a, b = gen.get(f"k{L}{suffix}"), gen.get(f"fixed{suffix}")
        if a and b:
            out[f"gfid_{guidance}_nested"], out[f"gfid_{guidance}_fixed"] = a["gfid"], b["gfid"]
            out[f"gfid_{guidance}_pct"] = _pct(a["gfid"], b["gfid"])
    return out


def other_nested(state: dict) -> list[str]:
    """The labels of the nested tokenizers measured in reconstruction only (--also-nested)."""
    return sorted({r["tokenizer"] for r in state["reconstruction"].values()} - {"nested", "fixed"})


def _price_line(price: dict, L: int, label: str) -> str:
    line = (f"Price of the option at full length ({label} vs fixed at k = L = {L}): rFID {price['rfid_pct']:+.1f}% "
            f"({_pm(price['rfid_nested'], price['rfid_nested_se'])} vs "
            f"{_pm(price['rfid_fixed'], price['rfid_fixed_se'])}), PSNR {price['psnr_db']:+.2f} dB, SSIM "
            f"{price['ssim']:+.3f}")
    if "gfid_cfg_pct" in price:
        line += (f"; gFID with CFG {price['gfid_cfg_pct']:+.1f}% ({price['gfid_cfg_nested']:.2f} vs "
                 f"{price['gfid_cfg_fixed']:.2f})")
    return line + "."


def build_result(state: dict) -> dict:
    L = max(r["tokens"] for r in state["reconstruction"].values())
    pilot = state["pilot_sampling"]["cfg"]
    points = {k: {kk: v for kk, v in p.items() if kk != "metrics"} | {"key": k, "families": families(p, pilot, L)}
              for k, p in state.get("generation", {}).items()}
    front = pareto_front(points)
    for key, p in points.items():
        p["pareto"] = key in front
    return {"date": utc_now(), "machine": state.get("machine") or machine(), "out": state.get("out", "OUT"),
            "pilots": state["pilots"], "settings_differ": state["settings_differ"], "settings": state["settings"],
            "feature_net": state.get("feature_net"), "pilot_sampling": state["pilot_sampling"], "latent_tokens": L,
            "models": state.get("models", {}), "distill": state.get("distill", {}).get("student"),
            "reconstruction": sorted(state["reconstruction"].values(), key=lambda r: (r["tokenizer"], r["tokens"])),
            "price_of_option_at_L": price_of_option(state, L),
            "price_of_other_nested_at_L": {t: price_of_option(state, L, t) for t in other_nested(state)},
            "generation": list(points.values()),
            "pareto_front": front}


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------
def _pm(value: float, se: float) -> str:
    return f"{value:.2f} ± {se:.2f}"


def _gen_row(p: dict, *first: object) -> list[object]:
    mark = " (front)" if p["pareto"] else ""
    return [*first, p["forward_passes"], f"{p['gflops_per_image']:.3f}", f"{p['images_per_s']:.1f}",
            _pm(p["gfid"], p["gfid_se"]) + mark, p["num_samples"]]


def markdown(result: dict) -> str:
    L, price, pilot = result["latent_tokens"], result["price_of_option_at_L"], result["pilot_sampling"]["cfg"]
    nested = result["pilots"]["nested"]
    net = (result["feature_net"] or {}).get("feature_net", "the pilot's feature network")
    rec_rows = [[r["tokenizer"], r["tokens"], f"{r['tokens'] / L:.2f}", _pm(r["rfid"], r["rfid_se"]),
                 f"{r['psnr']:.2f}", f"{r['ssim']:.3f}"] for r in result["reconstruction"]]
    gen = result["generation"]
    pilot_sampler = f"{pilot['sampler']} {pilot['steps']} steps"
    tok_rows = [_gen_row(p, p["model"], p["tokens"], p["guidance"]) for p in gen
                if {K_CFG, K_NOCFG, FIXED} & set(p["families"])]
    step_rows = [_gen_row(p, fam, p["steps"]) for fam in (EULER, HEUN, STUDENT)
                 for p in sorted(gen, key=lambda p: p["steps"]) if fam in p["families"]]
    gen_head = ["forward passes", "GFLOPs / image", "images/s", f"gFID[{net}] ± SE", "samples"]
    lines = [machine_line(result["machine"]), "",
             f"Data `{nested['data']}`, `{nested['budget']}` budget; one seed per model; FIDs against the "
             f"{nested['n_eval']} held-out images under `{net}`, ± the bootstrap standard error of the samples drawn.",
             "", "## 1. Fewer tokens: reconstruction", "",
             markdown_table(["tokenizer", "k", "k / L", f"rFID[{net}] ± SE", "PSNR (dB)", "SSIM"], rec_rows), "",
             _price_line(price, L, "nested"), "",
             *(line for label, other in result["price_of_other_nested_at_L"].items()
               for line in (_price_line(other, L, f"`{label}`"), "")),
             f"## 2. Fewer tokens: generation ({pilot_sampler}, the pilot's sampler)", "",
             markdown_table(["model", "k", "guidance", *gen_head], tok_rows), "",
             "## 3. Fewer steps: teacher (k = L) and distilled student", "",
             markdown_table(["family", "steps", *gen_head], step_rows), "",
             "(front): on the Pareto front of every point, lower gFID at lower generation GFLOPs: "
             + ", ".join(f"`{k}`" for k in result["pareto_front"]) + "."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------
def plot_reconstruction(result: dict, path: Path) -> None:
    L = result["latent_tokens"]
    rows = {r["tokenizer"]: [] for r in result["reconstruction"]}
    for r in result["reconstruction"]:
        rows[r["tokenizer"]].append(r)
    fig = Figure(figsize=(8, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate((("rfid", "rFID (lower is better)"), ("psnr", "PSNR dB (higher is better)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        nested = rows.get("nested", [])
        for j, (tokenizer, curve) in enumerate((t, c) for t, c in rows.items() if t != "fixed"):
            se = [r["rfid_se"] for r in curve] if metric == "rfid" else None
            name = "nested dropout" if tokenizer == "nested" else tokenizer
            ax.errorbar([r["tokens"] for r in curve], [r[metric] for r in curve], yerr=se, marker="os^v"[j % 4],
                        capsize=3, color=f"C{j}", label=f"{name}, first k tokens")
        for r in rows.get("fixed", []):
            ax.errorbar([r["tokens"]], [r[metric]], yerr=[r["rfid_se"]] if metric == "rfid" else None, marker="*",
                        markersize=12, linestyle="none", color="C3", capsize=3, label=f"fixed length (L = {L})")
        ax.set_xticks([r["tokens"] for r in nested])
        ax.set_xlabel("latent tokens k")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _annotation(p: dict, family: str) -> str:
    if family in (K_CFG, K_NOCFG):
        return f"k={p['tokens']}"
    if family == FIXED:
        return p["guidance"]
    return str(p["steps"])


def plot_cost(result: dict, path: Path) -> None:
    """gFID and images/s against generation GFLOPs per image, a marker per family; the Pareto front drawn."""
    fig = Figure(figsize=(11, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (family, (marker, filled)) in enumerate(STYLE.items()):
        pts = sorted((p for p in result["generation"] if family in p["families"]), key=lambda p: p["gflops_per_image"])
        if not pts:
            continue
        x = [p["gflops_per_image"] for p in pts]
        style = dict(marker=marker, color=f"C{i}", markerfacecolor=f"C{i}" if filled else "none", label=family)
        ax.errorbar(x, [p["gfid"] for p in pts], yerr=[p["gfid_se"] for p in pts], capsize=2, linestyle=":",
                    **style)
        speed.plot(x, [p["images_per_s"] for p in pts], linestyle=":", **style)
        for p in pts:
            ax.annotate(_annotation(p, family), (p["gflops_per_image"], p["gfid"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    front = {p["key"]: p for p in result["generation"]}
    front = [front[k] for k in result["pareto_front"]]
    ax.step([p["gflops_per_image"] for p in front], [p["gfid"] for p in front], where="post", color="black",
            linewidth=1, alpha=0.6, label="Pareto front")
    ax.scatter([p["gflops_per_image"] for p in front], [p["gfid"] for p in front], s=160, facecolors="none",
               edgecolors="black", linewidths=1)
    ax.set_xscale("log")
    ax.set_xlabel("generation GFLOPs per image (SiT forwards + decode)")
    ax.set_ylabel("gFID (lower is better)")
    ax.set_title("Quality against cost (labels: k, or sampler steps)", fontsize=9)
    ax.legend(fontsize=7)
    speed.set_xscale("log")
    speed.set_yscale("log")
    speed.set_xlabel("generation GFLOPs per image")
    speed.set_ylabel("images/s measured (sampling + decoding)")
    threads = result["machine"].get("torch_threads")
    speed.set_title(f"Measured speed (torch threads: {threads}; see the JSON's machine)", fontsize=9)
    for axis in (ax.xaxis, speed.xaxis, speed.yaxis):  # plain numbers at 1, 2, 5 x 10^n, none between
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------
def readme(result: dict, dest: Path) -> str:
    nested, fixed, s = result["pilots"]["nested"], result["pilots"]["fixed"], result["settings"]
    net = (result["feature_net"] or {}).get("feature_net", "the pilot's feature network")
    distill = result["distill"] or {}
    pilot = result["pilot_sampling"]["cfg"]
    differ = ", ".join(f"`{k}`" for k in result["settings_differ"]) or "nothing"
    steps = " ".join(map(str, s["steps_list"]))
    also = {label: p for label, p in result["pilots"].items() if label not in ("nested", "fixed")}
    # Paths under the repository are shown relative to it: the commands run from its root.
    return "\n".join([
        "# Cheaper generation: fewer tokens, fewer steps, a distilled student", "",
        "Made by `benchmarks/cheaper_generation.py` from finished pilots of the same data and budget (`bash "
        "benchmarks/cheaper_generation.sh` runs the CIFAR-10 pilots and then this):", "",
        f"    python benchmarks/cheaper_generation.py --nested {nested['folder']} --fixed {fixed['folder']} \\",
        *([f"        --also-nested {' '.join(p['folder'] for p in also.values())} \\"] if also else []),
        f"        --out {result['out']} --distill-steps {s['distill_steps']} --steps-list {steps}"
        + (f" --num-samples {s['num_samples']}" if s["num_samples"] != nested["n_eval"] else "")
        + (f" --distill-set {' '.join(s['distill_set'])}" if s["distill_set"] else ""),
        f"    python benchmarks/cheaper_generation.py --out {result['out']} --collect"
        + ("" if dest.resolve() == RESULTS_DIR / "cheaper-generation" else f" --results {dest}"), "",
        f"- `--nested` (`{nested['variant']}` of `{nested['data']}`, `{nested['budget']}` budget) trained its "
        f"tokenizer with nested token dropout; `--fixed` (`{fixed['variant']}`) is the same pilot without it (the "
        f"pilots' settings differ in {differ})."
        + "".join(f" `--also-nested` `{label}` is another nested-dropout pilot, measured in reconstruction only."
                  for label in also),
        f"- Reconstruction: the {nested['n_eval']} held-out images the pilot scores, encoded to the first k of "
        f"L = {result['latent_tokens']} tokens and decoded; rFID, PSNR and SSIM as the pilot computes them "
        "(uint8 levels), the fixed tokenizer's measured the same way (its pilot's own numbers are in the JSON).",
        "- Generation with k < L tokens: a diffusion model per k, trained with the nested pilot's diffusion settings "
        "(steps, batch, rate, seed) on a latent cache of the first k tokens; k = L is the nested pilot's own model.",
        f"- Fewer steps: that L-token model with Euler and Heun at the pilot's guidance (scale {pilot['cfg_scale']:g} "
        f"on t in {pilot['cfg_interval']}), and a shortcut student distilled from it "
        f"({s['distill_steps']} steps; `{distill.get('command', 'maetok diffusion distill')}`) with that guidance "
        "folded in: one forward per step.",
        f"- gFID: {s['num_samples']} class-balanced samples per point (the pilot's sampling seed) against the "
        f"held-out images under `{net}`, ± the bootstrap standard error of the samples drawn. Every model was "
        "trained once (one seed); differences within about two standard errors, or within the spread of training "
        "seeds (benchmarks/pilot_seeds.py), are not findings.",
        "- GFLOPs per image: SiT forward passes per sample (two where guided; a Heun step two calls but the last) "
        "times the SiT's forward FLOPs at its token count, plus one decode (torch's FlopCounterMode, 2 per "
        "multiply-add). A student's step-size embedding is a lookup: its forward costs its teacher's.",
        "- images/s: sampling and decoding measured on the machine in the JSON (`machine`, with its load); with "
        "other jobs on the machine the GFLOPs are the comparable cost.", "",
        "Files: `cheaper-generation.json` (every point, with settings and paths), `cheaper-generation.md` (a table "
        "per lever), `reconstruction.png` (rFID and PSNR against k), `gflops_vs_gfid.png` (gFID and images/s "
        "against GFLOPs per image, the Pareto front circled)."]).replace(f"{RESULTS_DIR.parent.parent}/", "")


def collect(state: dict, dest: Path) -> dict:
    result = build_result(state)
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / "cheaper-generation.json", result)
    md = markdown(result)
    (dest / "cheaper-generation.md").write_text(md + "\n")
    plot_reconstruction(result, dest / "reconstruction.png")
    plot_cost(result, dest / "gflops_vs_gfid.png")
    (dest / "README.md").write_text(readme(result, dest) + "\n")
    print(md)
    return result

