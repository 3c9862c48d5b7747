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


def _with_fid_noise(flat: dict, se: float, n: int = 2000) -> dict:
    for v in flat:
        flat[v][f"gfid_se[net]@{n} (nocfg)"] = se
        flat[v][f"gfid_se[net]@{n} (cfg)"] = se
        flat[v][f"rfid_se[net]@{n}"] = se
    return flat


def test_gfid_and_rfid_margins_inside_their_bootstrap_noise_are_ties():
    # gFID 20 vs 21: with a bootstrap standard error of 1 per variant, 2 SE of the difference is 2.83 > 1
    flat, analysis = _inputs({"ae": 0.30, "maetok": 0.50}, {"ae": 29.0, "maetok": 25.0})
    lines = _verdicts(["ae", "maetok"], _with_fid_noise(flat, 1.0), analysis)
    for label in ("- gFID without CFG", "- gFID with CFG", "- rFID"):
        line = next(line for line in lines if line.startswith(label))
        assert line.endswith("**a tie at this sample count**") and "2 standard errors (2.828)" in line, line


def test_gfid_margins_beyond_their_bootstrap_noise_keep_the_verdict():
    flat, analysis = _inputs({"ae": 0.30, "maetok": 0.50}, {"ae": 29.0, "maetok": 25.0})
    lines = _verdicts(["ae", "maetok"], _with_fid_noise(flat, 0.1), analysis)
    assert lines[0] == ("- gFID without CFG: ae (20) < maetok (21) -> **MAETok not best (ae is)** (margin 1, "
                        "beyond 2 standard errors (0.2828) of the evaluated sample)")


def test_learnability_rows_get_verdicts_and_a_section(tmp_path):
    from maetok.pilot.report import _flat_metrics, _learnability  # the report's private pieces, as above

    def results(gfid_final: float, early: float, vs_recon: float) -> dict:
        return {"generation_nocfg": {"gfid[net]@500": gfid_final, "gfid_se[net]@500": 0.2,
                                     "gfid_vs_recon[net]@500": vs_recon, "gfid_vs_recon_se[net]@500": 0.2},
                "learning_curve": {"steps": [250, 500], "gfid": [early, early - 1], "gfid_se": [0.2, 0.2]}}

    flat = {"ae": _flat_metrics(results(20.0, 40.0, 12.0)), "maetok": _flat_metrics(results(18.0, 30.0, 8.0))}
    assert flat["maetok"]["gfid[net]@500 (nocfg) at diffusion step 250"] == 30.0
    assert flat["maetok"]["gfid_se[net]@500 (nocfg) at diffusion step 500"] == 0.2
    analysis = {"pca_dim": 4, "variants": {v: {"gmm": {"ks": [1, 2], "nll": [3.0, 2.0], "nll_se": [0.1, 0.1],
                                                       "explained_variance": 0.9}} for v in flat}}
    lines = _verdicts(["ae", "maetok"], flat, analysis)
    own = next(line for line in lines if line.startswith("- gFID against the variant's own reconstructions"))
    assert "**MAETok best** (margin 4" in own
    early = next(line for line in lines if line.startswith("- gFID without CFG at diffusion step 250"))
    assert "**MAETok best** (margin 10" in early  # the earliest snapshot only
    assert not any(line.startswith("- gFID without CFG at diffusion step 500") for line in lines)
    section = _learnability(["ae", "maetok"], flat, tmp_path)
    assert section[1] == "## The diffusion side: how learnable is each latent space?"
    assert "| gfid[net]@500 (nocfg) at diffusion step 250 | 40 | 30 |" in section
    assert "| gfid_vs_recon[net]@500 (nocfg) | 12 | 8 |" in section
    assert not any("learning_curve.png" in line for line in section)  # no plot drawn, none linked
