"""Scripts in benchmarks/ that produce committed evidence: run at toy size, checked for what they write."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from conftest import REPO


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the scripts import their `common` module
    yield
    for name in ("lr_sweep", "pilot_compare", "roofline", "gpu", "tokenizer", "common"):
        sys.modules.pop(name, None)


def test_lr_sweep_scores_every_rate_and_continues_where_it_stopped(benchmarks, tmp_path):
    import lr_sweep

    out = tmp_path / "sweep"
    toy = ["n_train=64", "n_eval=32", "tokenizer_steps=3", "decoder_ft_steps=2", "classifier_steps=5"]
    assert lr_sweep.main(["--budget", "smoke", "--variants", "ae", "maetok", "--lrs", "1e-3", "4e-3",
                          "--out", str(out), *toy]) == 0
    result = json.loads((out / "lr_sweep.json").read_text())
    assert set(result["runs"]) == {"ae@0.001", "ae@0.004", "maetok@0.001", "maetok@0.004"}
    assert result["budget_lr"] == 5e-3  # what the smoke budget itself uses
    for key, run in result["runs"].items():
        assert run["rfid"] >= 0 and run["psnr"] > 0 and 0 < run["ssim"] <= 1, key
    # Only the rate differs between the runs of one variant; MAETok gets its decoder fine-tuning too.
    cfg = (out / "maetok@0.004" / "maetok" / "tokenizer" / "config.yaml").read_text()
    assert "lr: 0.004" in cfg and (out / "maetok@0.004" / "maetok" / "tokenizer-ft" / "model").is_dir()
    md = (out / "lr_sweep.md").read_text()
    assert md.count("(best rFID)") == 2 and (out / "lr_sweep.png").stat().st_size > 0
    # A second call trains nothing: every run's stages are on disk.
    before = {p: p.stat().st_mtime for p in out.rglob("model.safetensors")}
    assert lr_sweep.main(["--budget", "smoke", "--variants", "ae", "maetok", "--lrs", "1e-3", "4e-3",
                          "--out", str(out), *toy]) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("model.safetensors")} == before
    # Other settings in the same folder are refused rather than mixed into one table.
    with pytest.raises(SystemExit, match="other settings"):
        lr_sweep.main(["--budget", "smoke", "--lrs", "1e-3", "--out", str(out), "tokenizer_steps=5"])


def test_lr_sweep_records_a_diverging_rate_and_goes_on(benchmarks, tmp_path, monkeypatch):
    import lr_sweep
    import maetok.pilot.stages

    real = maetok.pilot.stages.run_tokenizer

    def diverge_at_high_rates(cfg, out, **kwargs):
        if cfg.train.optim.lr > 1e-2:
            raise FloatingPointError("10 consecutive non-finite steps")  # what the Trainer raises
        return real(cfg, out, **kwargs)

    monkeypatch.setattr(maetok.pilot.stages, "run_tokenizer", diverge_at_high_rates)
    out = tmp_path / "sweep"
    toy = ["n_train=64", "n_eval=32", "tokenizer_steps=3", "classifier_steps=5"]
    assert lr_sweep.main(["--budget", "smoke", "--variants", "ae", "--lrs", "1", "1e-3", "--out", str(out),
                          *toy]) == 0
    runs = json.loads((out / "lr_sweep.json").read_text())["runs"]
    assert runs["ae@1"] == {"variant": "ae", "lr": 1.0, "diverged": True} and runs["ae@0.001"]["rfid"] >= 0
    md = (out / "lr_sweep.md").read_text()
    assert "| ae | 1 | diverged |" in md and "| ae | 0.001 (best rFID) |" in md
    # A rerun retrains nothing the JSON records: not the diverged rate, nor a run whose folder is gone (a
    # committed sweep keeps only its JSON, and is extended from it).
    shutil.rmtree(out / "ae@0.001")
    monkeypatch.setattr(maetok.pilot.stages, "run_tokenizer",
                        lambda *args, **kwargs: pytest.fail("retrained a finished sweep"))
    assert lr_sweep.main(["--budget", "smoke", "--variants", "ae", "--lrs", "1", "1e-3", "--out", str(out),
                          *toy]) == 0


def _fake_pilot(root, name: str, gfid: dict, pca_dim: int = 20, net: str = "cnn"):
    folder = root / name
    folder.mkdir()
    report = {"data": "shapes", "gmm_pca_dim": pca_dim}
    for variant, value in gfid.items():
        report[variant] = {f"gfid[{net}]@100 (nocfg)": value, "psnr@100": 20.0, "kid_std[cnn]@100 (nocfg)": 0.1,
                           "variant_total_wall_s": 5.0}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_pilot_compare_puts_runs_side_by_side_with_their_spread(benchmarks, tmp_path):
    import pilot_compare

    a = _fake_pilot(tmp_path, "a", {"ae": 30.0, "maetok": 25.0})
    b = _fake_pilot(tmp_path, "b", {"ae": 32.0, "maetok": 26.0, "vae": 40.0}, pca_dim=24)
    out = tmp_path / "cmp.md"
    assert pilot_compare.main([str(a), str(b), "--labels", "seed 0", "seed 1", "--out", str(out)]) == 0
    md = out.read_text()
    assert "| gfid[cnn]@100 (nocfg) | ae | 30.00 | 32.00 | 31.00 ± 1.41 |" in md
    assert "| gfid[cnn]@100 (nocfg) | maetok | 25.00 | 26.00 | 25.50 ± 0.71 |" in md
    assert "vae" not in md and "kid_std" not in md and "wall" not in md  # only shared variants, chosen metrics
    assert "different PCA dimensions" in md
    assert json.loads(out.with_suffix(".json").read_text())["metrics"]["ae"]["psnr@100"] == [20.0, 20.0]
    # FIDs under different feature networks are not comparable: refused, naming the metrics.
    c = _fake_pilot(tmp_path, "c", {"ae": 30.0, "maetok": 25.0}, net="inception-like")
    with pytest.raises(SystemExit, match="not in every pilot"):
        pilot_compare.main([str(a), str(c)])


def test_roofline_extrapolation_matches_a_real_trace_and_models_every_operator(benchmarks, tmp_path):
    import roofline

    out = tmp_path / "roofline"
    result = roofline.main(["--preset", "cpu-32", "--targets", "hog", "--batch", "4", "--out", str(out)])
    # Linear extrapolation from the batch-1 and batch-2 traces gives what a real batch-4 step does.
    traced = roofline.trace_step("cpu-32", 4, "hog", [])
    s = result["summary"]
    assert s["flops"] == sum(f for _, _, f, _ in traced) > 0
    assert s["bytes"] == pytest.approx(sum(b for _, _, _, b in traced), rel=1e-3)
    # Every operator lands in a phase and a category; the attention kernel's FLOPs are counted (the CPU
    # kernel is missing from torch's own formulas).
    rows = result["rows"]
    assert {r["phase"] for r in rows} == {"forward+backward", "optimizer + EMA"}
    assert any(r["op"] == "aten.addcdiv_" and r["phase"] == "optimizer + EMA" for r in rows)
    attention = [r for r in rows if "attention" in r["op"]]
    assert attention and all(r["flops"] > 0 for r in attention)
    assert sum(r["seconds"] for r in rows) == pytest.approx(s["seconds"])
    assert s["seconds"] > s["flop_floor_seconds"] > 0 and 0 < s["mfu"] < 1
    md = out.with_suffix(".md").read_text()
    assert "Modelled eager step" in md and "| matmul / conv / attention |" in md
    assert json.loads(out.with_suffix(".json").read_text())["command"].startswith("python benchmarks/roofline.py")


def test_gpu_merge_takes_flops_from_the_eager_step_and_mfu_from_each_parts_own_peak(benchmarks, tmp_path):
    import gpu

    def part(name, peak, rows):
        path = tmp_path / f"gpu-{name}.json"
        path.write_text(json.dumps({"machine": {"cpu": "x", "cpu_count": 1, "torch_threads": 1, "torch": "t",
                                                "python": "p"}, "date": "d", "settings": {"tokenizer_step": "s"},
                                    "peak": {"flops_per_s": peak, "how": "h"}, "part": name, "rows": rows,
                                    "errors": []}))
        return path

    eager = {"case": "tokenizer-train", "what": "eager", "images_per_call": 64, "seconds_per_call": 0.2,
             "flops_per_call": 64e12, "gflops_per_image": 1000.0, "flops_per_s": 320e12, "mfu": 0.4,
             "peak_memory_mib_per_image": 400.0, "images_per_s": 320.0}
    compiled = [{"case": c, "what": c, "images_per_call": n, "seconds_per_call": s, "images_per_s": n / s,
                 "gpu_busy_s_per_step": 0.9 * s}
                for c, n, s in [("tokenizer-train-compiled", 64, 0.16), ("tokenizer-train-compiled-nosync", 64, 0.128),
                                ("tokenizer-train-b128-compiled", 128, 0.32)]]
    result = gpu.merge([part("eager", 800e12, [eager]), part("compile", 1000e12, compiled)],
                       tmp_path / "gpu.json", tmp_path / "gpu.md")
    rows = {r["case"]: r for r in result["rows"]}
    assert rows["tokenizer-train"]["mfu"] == 0.4  # measured in its own part, left alone
    assert rows["tokenizer-train-compiled"]["flops_per_call"] == 64e12
    assert rows["tokenizer-train-compiled"]["mfu"] == pytest.approx(64e12 / 0.16 / 1000e12)  # its own peak
    assert rows["tokenizer-train-compiled-nosync"]["mfu"] == pytest.approx(0.5)
    assert rows["tokenizer-train-b128-compiled"]["flops_per_call"] == 128e12  # scaled with the batch
    md = (tmp_path / "gpu.md").read_text()
    assert "800 TFLOP/s (eager part) and 1000 TFLOP/s (compile part)" in md
    assert "| 144 (90%) |" in md and "| 160.00 |" in md  # kernel time per step (its share), ms per call


def test_the_deinterleaved_rope_candidate_is_the_same_rotation_in_permuted_channels(benchmarks):
    import gpu

    from maetok.layers import rotate_pairs

    x, table = torch.randn(2, 5, 3, 8), torch.randn(5, 3, 4, 2)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])  # (re of each pair..., im of each pair...)
    torch.testing.assert_close(gpu.rotate_halves(x[..., perm], table), rotate_pairs(x, table)[..., perm])


def test_cheaper_generation_measures_every_lever_on_two_smoke_pilots_and_resumes(benchmarks, tmp_path, request,
                                                                                 monkeypatch):
    from maetok.pilot import pilot_settings, run_pilot

    request.addfinalizer(lambda: [sys.modules.pop(m, None) for m in ("cheaper_generation",
                                                                     "cheaper_generation_report")])
    import cheaper_generation

    toy = ["n_train=64", "n_eval=16", "tokenizer_steps=3", "decoder_ft_steps=2", "diffusion_steps=3",
           "classifier_steps=3", "sample_steps=2", "gmm_ks=[1, 2]"]
    nested_set = ["model.token_dropout=nested", "model.token_counts=[4, 8, 12, 16]"]  # L = 16 at the smoke budget

    def pilot(name: str, extra: list[str]):
        settings = pilot_settings("smoke", toy, tokenizer_set=["train.batch_size=16", *extra],
                                  diffusion_set=["train.batch_size=16"])
        run_pilot("shapes", ["maetok[hog]"], "smoke", tmp_path / name, settings=settings)
        return tmp_path / name

    nested, fixed = pilot("nested", nested_set), pilot("fixed", [])
    full_more = pilot("nested-full", [*nested_set, "model.token_full_prob=0.75"])  # reconstruction only
    out, results = tmp_path / "cheaper", tmp_path / "results"
    argv = ["--nested", str(nested), "--fixed", str(fixed), "--also-nested", str(full_more), "--out", str(out),
            "--distill-steps", "2",
            "--steps-list", "1", "2", "--num-samples", "16", "--distill-set", "train.batch_size=16"]
    assert cheaper_generation.main(argv) == 0
    assert cheaper_generation.main(["--out", str(out), "--collect", "--results", str(results)]) == 0
    result = json.loads((results / "cheaper-generation.json").read_text())
    other = "nested[model.token_full_prob=0.75]"
    assert {(r["tokenizer"], r["tokens"]) for r in result["reconstruction"]} == \
        {(t, k) for t in ("nested", other) for k in (4, 8, 12, 16)} | {("fixed", 16)}
    assert set(result["price_of_other_nested_at_L"]) == {other}
    assert f"Price of the option at full length (`{other}` vs fixed" in (results / "cheaper-generation.md").read_text()
    assert all(r["rfid"] >= 0 and r["psnr"] > 0 and r["num_images"] == 16 for r in result["reconstruction"])
    for r in result["reconstruction"]:  # at L, measured as the pilots measured their own
        if r["tokens"] == 16:
            own = r["pilot_record"]
            assert r["rfid"] == pytest.approx(next(v for k, v in own.items() if k.startswith("rfid[")), rel=1e-6)
            assert r["psnr"] == pytest.approx(next(v for k, v in own.items() if k.startswith("psnr@")), rel=1e-6)
    points = {p["key"]: p for p in result["generation"]}
    # The pilot samples with Euler in 2 steps: the teacher's Euler-2 point with CFG is the k = 16 one, measured once.
    expected = {f"k{k}-euler2-{g}" for k in (4, 8, 12, 16) for g in ("cfg", "nocfg")} | \
        {"fixed-euler2-cfg", "fixed-euler2-nocfg", "k16-euler1-cfg", "k16-heun1-cfg", "k16-heun2-cfg",
         "student-shortcut1-folded", "student-shortcut2-folded"}
    assert set(points) == expected
    for p in points.values():
        assert p["num_samples"] == 16 and p["gfid"] >= 0 and p["gfid_se"] >= 0 and p["images_per_s"] > 0
        assert p["gflops_per_image"] == pytest.approx(p["forward_passes"] * p["sit_forward_gflops"]
                                                      + p["decode_gflops"])
    assert points["student-shortcut2-folded"]["forward_passes"] == 2
    for key in ("k16-euler2-cfg", "k16-euler2-nocfg", "fixed-euler2-cfg"):  # the pilots' own samples again
        own = points[key]["pilot_record"]
        assert points[key]["gfid"] == pytest.approx(next(v for k, v in own.items() if k.startswith("gfid[")))
    assert points["k16-heun2-cfg"]["forward_passes"] == 4  # t = 1 unguided (Heun: 2 calls), t = 0.5 guided Euler
    assert points["k4-euler2-cfg"]["sit_forward_gflops"] < points["k16-euler2-cfg"]["sit_forward_gflops"]
    assert "teacher Euler + CFG" in points["k16-euler2-cfg"]["families"] and result["pareto_front"]
    assert result["price_of_option_at_L"]["rfid_fixed"] >= 0 and result["distill"]["summary"]["step"] == 2
    for name in ("cheaper-generation.md", "reconstruction.png", "gflops_vs_gfid.png", "README.md"):
        assert (results / name).stat().st_size > 0
    # A second run does no work: every stage's output is in --out.
    state = (out / "measurements.json").read_text()
    for name in ("generate_to_dir", "train_diffusion", "cache_latents", "maetok_main", "reconstruct"):
        monkeypatch.setattr(cheaper_generation, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    assert cheaper_generation.main(argv) == 0
    assert (out / "measurements.json").read_text() == state


def test_sweep_seeds_compares_the_best_and_the_default_over_seeds(benchmarks, tmp_path):
    """The table, verdicts, costs, copied reports and plot of `sweep_seeds.py --collect`, from made-up pilots."""
    import sweep_seeds

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "report.json").write_text(json.dumps({"best": [{"settings": {
        "tokenizer.model.latent_tokens": 27, "tokenizer.model.mask.ratio_mean": 0.5}}]}))
    gfid = {"default": [25.0, 24.0, 26.0], "best": [20.0, 20.5, 19.5]}  # best ahead beyond the spread
    probe = {"default": [0.47, 0.48, 0.46], "best": [0.46, 0.49, 0.47]}  # a tie
    pilots = {}
    for which in ("default", "best"):
        pilots[which] = []
        for seed in range(3):
            folder = tmp_path / f"{which}-seed{seed}"
            folder.mkdir()
            kpis = {name: 20.0 for name in sweep_seeds.KPIS} | {
                "gfid[resnet56-cifar10]@2000 (nocfg)": gfid[which][seed], "probe_top1@2000": probe[which][seed]}
            costs = {name: 1.0 if which == "default" else 0.85 for name in sweep_seeds.COSTS}
            (folder / "report.json").write_text(json.dumps({"maetok": kpis | costs}))
            (folder / "report.md").write_text(f"# {which} {seed}\n")
            pilots[which].append(folder)
    dest = tmp_path / "results"
    sweep_seeds.collect(pilots, dest, sweep)
    result = json.loads((dest / "sweep-seeds.json").read_text())
    gfid_row = result["kpis"]["gfid[resnet56-cifar10]@2000 (nocfg)"]
    assert gfid_row["default"]["mean"] == pytest.approx(25.0) and gfid_row["best"]["per_seed"] == gfid["best"]
    assert gfid_row["best_minus_default"].startswith("-5 ") and "best ahead beyond seed noise" in \
        gfid_row["best_minus_default"]
    assert "within seed noise" in result["kpis"]["probe_top1@2000"]["best_minus_default"]
    assert result["best_settings"] == ["--tokenizer-set", "model.latent_tokens=27", "--tokenizer-set",
                                       "model.mask.ratio_mean=0.5"]
    assert result["costs"]["best"]["generation_gflops_per_image_nocfg"] == 0.85
    assert (dest / "best-2" / "report.md").read_text() == "# best 2\n"
    md = (dest / "sweep-seeds.md").read_text()
    assert "default 1.000 / 1.000, sweep's best 0.850 / 0.850" in md
    assert (dest / "sweep-seeds.png").stat().st_size > 0


def test_nested_draw_tables_rfid_per_prefix_for_each_draw_and_seed(benchmarks, tmp_path):
    """`nested_draw.py --collect` from made-up pilot folders: the full length from the main reconstruction, the
    prefixes from prefix_reconstruction, a mean per draw."""
    import nested_draw

    pilots = {}
    for name, offset in (("uniform-seed0", 4.0), ("uniform-seed1", 6.0), ("full50-seed0", 0.0)):
        variant = tmp_path / name / nested_draw.VARIANT_DIR
        (variant / "tokenizer-ft" / "model").mkdir(parents=True)
        (variant / "tokenizer-ft" / "model" / "config.json").write_text(json.dumps({"config": {"latent_tokens": 4}}))
        (variant / "results.json").write_text(json.dumps({
            "reconstruction": {"rfid[net]@16": 20.0 + offset, "psnr@16": 18.0},
            "prefix_reconstruction": {"tokens": [1, 2], "rfid": [22.0 + offset, 21.0 + offset], "psnr": [17, 17.5]}}))
        pilots[name] = tmp_path / name
    dest = tmp_path / "results"
    nested_draw.collect(pilots, dest)
    result = json.loads((dest / "nested-draw.json").read_text())
    assert result["curves"]["uniform-seed1"] == {"1": {"rfid": 28.0, "psnr": 17}, "2": {"rfid": 27.0, "psnr": 17.5},
                                                 "4": {"rfid": 26.0, "psnr": 18.0}}
    assert result["mean_rfid"]["uniform"] == {"1": 27.0, "2": 26.0, "4": 25.0}
    assert result["mean_rfid"]["full50"] == {"1": 22.0, "2": 21.0, "4": 20.0}
    assert "| uniform: mean rFID over 2 seeds | 27.00 | 26.00 | 25.00 |" in (dest / "nested-draw.md").read_text()
