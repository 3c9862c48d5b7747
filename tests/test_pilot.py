"""The pilot end to end: every stage runs, the report has one column per variant with named metrics, and
re-running with --resume reuses what is done."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from maetok.cli import main


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
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | " + " | ".join(variants) + " |"
    assert (out / "gmm_nll.png").is_file() and (out / "diffusion_loss.png").is_file()
    assert "Real-data floor" in md and "Does the paper's ordering hold here?" in md
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


@pytest.mark.slow
def test_quick_pilot_produces_the_report(tmp_path: Path):
    """What the README's main command runs: three variants on the built-in data, quick budget."""
    out = Path(os.environ.get("MAETOK_PILOT_OUT", tmp_path / "pilot"))
    assert main(["pilot", "--budget", "quick", "--out", str(out), "--device", "cpu", "--resume"]) == 0
    _check_report(out, ["ae", "vae", "maetok"])
