"""What a sweep can optimise or constrain: the KPIs of one trial, each with its direction and the fidelity it
comes from.

    architecture  from the configs alone, before any training (parameters, GFLOPs)
    latent        the pilot up to the latent stages: tokenizer training, reconstruction, latent analysis
    full          the pilot with its diffusion model: samples and gFID

A trial pays for the full fidelity only when its objective needs it, and (one objective) only when the pruner
lets it through on its `proxy`, a latent KPI (the paper's point: the latent space predicts generation).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

FIDELITIES = ("architecture", "latent", "full")


@dataclass(frozen=True)
class Kpi:
    direction: str      # "minimize" or "maximize"
    fidelity: str       # the cheapest fidelity that gives it (see FIDELITIES)
    what: str


KPIS: dict[str, Kpi] = {
    "gfid": Kpi("minimize", "full", "gFID without guidance, on the pilot's feature network"),
    "gfid_cfg": Kpi("minimize", "full", "gFID with the budget's guidance scale and interval"),
    "rfid": Kpi("minimize", "latent", "rFID of held-out reconstructions, on the pilot's feature network"),
    "psnr": Kpi("maximize", "latent", "PSNR (dB) of held-out reconstructions"),
    "ssim": Kpi("maximize", "latent", "SSIM of held-out reconstructions"),
    "probe": Kpi("maximize", "latent", "linear-probe top-1 accuracy on the held-out latents"),
    "gmm_nll": Kpi("minimize", "latent", "held-out GMM NLL per PCA dimension at the budget's middle K; each "
                                         "trial's PCA keeps 90% of its own latents' variance, so trials of other "
                                         "latent sizes compare only roughly"),
    "peak_memory_gib": Kpi("minimize", "latent", "peak memory of the trial's stages: GPU memory on CUDA (this "
                                                 "trial's); on a CPU the worker's peak RSS so far, an upper bound"),
    "generation_gflops": Kpi("minimize", "architecture", "GFLOPs to generate one image with guidance: every "
                                                         "sampler step, plus the decode"),
    "generation_gflops_nocfg": Kpi("minimize", "architecture", "GFLOPs to generate one image without guidance"),
    "decode_gflops": Kpi("minimize", "architecture", "GFLOPs of one decode"),
    "tokenizer_params_m": Kpi("minimize", "architecture", "encoder + decoder parameters (millions; the "
                                                          "auxiliary decoders are dropped after training)"),
    "sit_params_m": Kpi("minimize", "architecture", "diffusion model parameters (millions)"),
}
DEFAULT_PROXY = "rfid"  # the generator is bounded by its tokenizer: at small scale gFID tracks rFID (README)


def check_kpi(name: str, what: str) -> Kpi:
    if name not in KPIS:
        raise ConfigError(f"{what} {name!r} is not a KPI; choose from {', '.join(KPIS)}")
    return KPIS[name]


def parse_objectives(objectives: list[str]) -> list[str]:
    """['gfid'] or ['gfid', 'generation_gflops'] (a comma-separated --objective, split): checked names."""
    names = [n.strip() for text in objectives for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--objective names no KPI; e.g. gfid, or gfid,generation_gflops")
    for name in names:
        check_kpi(name, "objective")
    if len(set(names)) != len(names):
        raise ConfigError(f"--objective {','.join(names)} names one twice")
    return names


def needs_full(objectives: list[str]) -> bool:
    return any(KPIS[n].fidelity == "full" for n in objectives)


def check_proxy(proxy: str) -> str:
    kpi = check_kpi(proxy, "--proxy")
    if kpi.fidelity != "latent":
        raise ConfigError(f"--proxy {proxy}: the pruner's proxy must come from the latent stages "
                          f"({', '.join(n for n, k in KPIS.items() if k.fidelity == 'latent')})")
    return proxy


@dataclass(frozen=True)
class Constraint:
    """KPI <= bound or KPI >= bound; Optuna's form: a value <= 0 when it holds."""
    kpi: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        match = re.fullmatch(r"\s*([A-Za-z_0-9]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", text)
        if not match:
            raise ConfigError(f"--constraint {text!r}: write KPI<=VALUE or KPI>=VALUE, e.g. "
                              f"generation_gflops<=2.5 or peak_memory_gib<=40")
        name, op, bound = match.groups()
        check_kpi(name, "--constraint")
        try:
            value = float(bound)
        except ValueError:
            raise ConfigError(f"--constraint {text!r}: {bound!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"--constraint {text!r}: the bound must be finite")
        return cls(name, op, value)

    def __str__(self) -> str:
        return f"{self.kpi}{self.op}{self.bound:g}"

    def value(self, kpis: dict[str, float]) -> float:
        return kpis[self.kpi] - self.bound if self.op == "<=" else self.bound - kpis[self.kpi]


def oriented(value: float, kpi: str, direction: str) -> float:
    """`value` of `kpi` turned to the study's `direction` (an intermediate value the pruner compares)."""
    return value if KPIS[kpi].direction == direction else -value


# ------------------------------------------------------------------------------------------------------------
# Reading a trial's KPIs
# ------------------------------------------------------------------------------------------------------------
def architecture_kpis(cost: dict[str, Any]) -> dict[str, float]:
    """From `maetok.pilot.evaluation.architecture_cost` (or the pilot's measured cost: the same keys)."""
    return {"generation_gflops": cost["generation_gflops_per_image_cfg"],
            "generation_gflops_nocfg": cost["generation_gflops_per_image_nocfg"],
            "decode_gflops": cost["decode_gflops"],
            "tokenizer_params_m": cost["encoder_params_M"] + cost["decoder_params_M"],
            "sit_params_m": cost["sit_params_M"]}


def pilot_kpis(report: dict[str, Any], variant: str) -> tuple[dict[str, float], dict[str, str]]:
    """The KPIs in a pilot's report.json (those its fidelity reached), and the metric each was read from."""
    metrics, net = report[variant], report["feature_net"]["feature_net"]
    patterns = {"rfid": rf"rfid\[{re.escape(net)}\]@\d+", "psnr": r"psnr@\d+", "ssim": r"ssim@\d+",
                "probe": r"probe_top1@\d+", "gfid": rf"gfid\[{re.escape(net)}\]@\d+ \(nocfg\)",
                "gfid_cfg": rf"gfid\[{re.escape(net)}\]@\d+ \(cfg\)"}
    values, sources = {}, {}
    for name, pattern in patterns.items():
        key = next((k for k in metrics if re.fullmatch(pattern, k)), None)
        if key is not None:
            values[name], sources[name] = float(metrics[key]), key
    ks = report["settings"]["gmm_ks"]
    k = ks[len(ks) // 2]  # the K of the pilot report's verdict
    if f"gmm_nll@K={k}" in metrics:
        values["gmm_nll"] = metrics[f"gmm_nll@K={k}"] / report["gmm_pca_dim"]
        sources["gmm_nll"] = f"gmm_nll@K={k} / PCA dim {report['gmm_pca_dim']}"
    environment = report.get("environment", {})
    memory = environment.get("peak_gpu_memory_gib", environment.get("peak_rss_gib"))
    if memory is not None:
        values["peak_memory_gib"] = float(memory)
        sources["peak_memory_gib"] = "peak_gpu_memory_gib" if "peak_gpu_memory_gib" in environment else "peak_rss_gib"
    return values, sources
