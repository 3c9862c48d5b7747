"""The pilot report's verdicts: an ordering with its margin, a tie where the margin is inside the held-out
sample's noise, no MAETok verdict when MAETok was not run, and the GMM's dimensions laid open."""
from __future__ import annotations

from maetok.pilot.report import _verdicts


def _inputs(probe: dict[str, float], nll: dict[str, float], n: int = 2000):
    flat = {v: {f"gfid[net]@{n} (nocfg)": 20.0 + i, f"gfid[net]@{n} (cfg)": 15.0 + i, f"rfid[net]@{n}": 10.0 - i,
                f"probe_top1@{n}": probe[v]} for i, v in enumerate(probe)}
    analysis = {"pca_dim": 12, "variants": {v: {"gmm": {
        "ks": [1, 4, 16], "nll": [30.0, nll[v], nll[v] - 1], "nll_se": [0.1, 0.1, 0.1], "explained_variance": 0.93,
        "own_pca_dim": 9}} for v in probe}}
    return flat, analysis


def test_clear_margins_give_verdicts_with_the_margin():
    flat, analysis = _inputs({"ae": 0.30, "maetok": 0.50}, {"ae": 29.0, "maetok": 25.0})
    lines = _verdicts(["ae", "maetok"], flat, analysis)
    assert lines[0] == "- gFID without CFG: ae (20) < maetok (21) -> **MAETok not best (ae is)** (margin 1)"
    probe = next(line for line in lines if line.startswith("- linear-probe"))
    assert "**MAETok best** (margin 0.2, beyond 2 standard errors" in probe
    gmm = next(line for line in lines if line.startswith("- GMM"))
    assert "PCA dim 12 for all: ae keeps 93% (its own 90% needs 9)" in gmm and "**MAETok lowest**" in gmm
    assert "One tokenizer seed per variant" in lines[-1]


def test_a_margin_inside_the_held_out_noise_is_called_a_tie():
    # 0.41 vs 0.40 on 500 images: the binomial standard error of the difference is about 0.031
    flat, analysis = _inputs({"ae": 0.40, "maetok": 0.41}, {"ae": 25.05, "maetok": 25.0}, n=500)
    lines = _verdicts(["ae", "maetok"], flat, analysis)
    probe = next(line for line in lines if line.startswith("- linear-probe"))
    assert probe.endswith("**a tie at this sample count**") and "MAETok" not in probe
    gmm = next(line for line in lines if line.startswith("- GMM"))
    assert gmm.endswith("**a tie at this sample count**")


def test_without_maetok_the_orderings_name_no_maetok_verdict():
    flat, analysis = _inputs({"ae": 0.30, "vae": 0.50}, {"ae": 29.0, "vae": 25.0})
    lines = _verdicts(["ae", "vae"], flat, analysis)
    assert not any("MAETok" in line for line in lines if line.startswith("- "))
    assert lines[0] == "- gFID without CFG: ae (20) < vae (21) -> ae ahead by 1"
