"""Latent-space analysis: the GMM protocol, PCA dimension choice, linear probe, per-token statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maetok.eval import (flatten_latents, gmm_analysis, linear_probe, pca_dim_for_variance, plot_gmm_nll,
                         shared_pca_dim, token_statistics)


def _mixture_latents(n: int, seed: int, components: int = 3, tokens: int = 4, channels: int = 2):
    """(N, L, C) latents from `components` well-separated Gaussians in a 3-d subspace of L*C dims, and labels."""
    rng = np.random.default_rng(seed)
    d = tokens * channels
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(d, 3)))[0].T  # shared across calls
    centres = np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8]], float)[:components]
    labels = rng.integers(0, components, size=n)
    x = (centres[labels] + rng.normal(size=(n, 3))) @ basis + 0.05 * rng.normal(size=(n, d))
    return x.reshape(n, tokens, channels), labels


def test_flatten_accepts_numpy_and_torch():
    z = torch.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(flatten_latents(z), np.arange(24.0).reshape(2, 12))
    assert flatten_latents(z.numpy()).dtype == np.float64


def test_pca_dim_for_variance_picks_the_smallest_sufficient_dimension():
    rng = np.random.default_rng(0)
    # Independent directions with variances 100, 25, 1, 0.01: cumulative shares 0.79, 0.992, 0.99992, 1.
    x = rng.normal(size=(4000, 4)) * np.array([10.0, 5.0, 1.0, 0.1])
    x = x @ np.linalg.qr(rng.normal(size=(4, 4)))[0]  # rotation: not axis-aligned
    assert pca_dim_for_variance(x, 0.7) == 1
    assert pca_dim_for_variance(x, 0.9) == 2
    assert pca_dim_for_variance(x, 0.999) == 3
    assert pca_dim_for_variance(x, 1.0) == 4
    other = rng.normal(size=(4000, 4)) * np.array([1.0, 1.0, 1.0, 1.0])
    assert shared_pca_dim({"a": x, "b": other}, 0.9, reduce="max") == 4  # isotropic needs all 4
    assert shared_pca_dim({"a": x, "b": other}, 0.9, reduce="min") == 2


def test_gmm_prefers_the_true_number_of_components():
    train, _ = _mixture_latents(900, 0)
    test, _ = _mixture_latents(300, 1)
    result = gmm_analysis(train, test, ks=(1, 2, 3, 4, 5), seed=0)
    assert result.pca_dim <= 3 and result.explained_variance >= 0.9
    nll = dict(zip(result.ks, result.nll))
    assert nll[3] < nll[2] < nll[1]
    assert result.best_k_bic == 3
    assert result.n_train == 900 and result.n_test == 300
    names = result.metrics()
    assert f"gmm_nll[k=3,pca={result.pca_dim}]@300" in names and f"gmm_bic[k=3,pca={result.pca_dim}]@900" in names
    again = gmm_analysis(train, test, ks=(1, 2, 3, 4, 5), seed=0)
    assert again.nll == result.nll and again.bic == result.bic  # seeded


def test_gmm_imposed_dimension_and_diagonal_covariance():
    train, _ = _mixture_latents(400, 0)
    test, _ = _mixture_latents(200, 1)
    result = gmm_analysis(train, test, ks=(1, 3), pca_dim=5, covariance="diag")
    assert result.pca_dim == 5 and result.covariance == "diag"
    assert result.nll[1] < result.nll[0]
    assert result.nll_per_dim == pytest.approx([v / 5 for v in result.nll])
    with pytest.raises(ValueError, match="pca_dim"):
        gmm_analysis(train, test, ks=(1,), pca_dim=100)


def test_linear_probe_separable_vs_random_labels():
    train, y_train = _mixture_latents(400, 0, components=4)
    test, y_test = _mixture_latents(400, 1, components=4)
    assert linear_probe(train, y_train, test, y_test)["probe_top1@400"] > 0.95
    rng = np.random.default_rng(2)
    noise_train, noise_test = rng.normal(size=(400, 4, 4)), rng.normal(size=(400, 4, 4))
    chance = linear_probe(noise_train, rng.integers(0, 2, 400), noise_test, rng.integers(0, 2, 400))
    assert abs(chance["probe_top1@400"] - 0.5) < 0.12


def test_token_statistics_measure_distance_from_standard_normal():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(2000, 8, 4))
    stats = token_statistics(normal)
    assert stats["per_token_mean"].shape == (8,) and stats["per_token_std"].shape == (8,)
    assert stats["mean_abs_mean"] < 0.05 and stats["mean_abs_std_dev"] < 0.05 and stats["n"] == 2000
    skewed = normal.copy()
    skewed[:, 0] = skewed[:, 0] * 4 + 3  # one token off-centre and wide: global normalisation cannot fix it
    bad = token_statistics(skewed)
    assert bad["per_token_mean"][0] == pytest.approx(3, abs=0.2)
    assert bad["max_abs_mean"] > 1 and bad["max_abs_std_dev"] > 0.5
    assert bad["mean_abs_mean"] > stats["mean_abs_mean"]
    channel_scaled = normal * np.array([1.0, 10.0, 0.1, 3.0])  # per-channel scales: fixed by channel normalisation
    assert token_statistics(channel_scaled, "channel")["max_abs_std_dev"] < 0.15
    assert token_statistics(channel_scaled, "global")["max_abs_std_dev"] > 0.5


def test_plot_gmm_nll_writes_a_png(tmp_path):
    train, _ = _mixture_latents(200, 0)
    test, _ = _mixture_latents(100, 1)
    results = {"maetok": gmm_analysis(train, test, ks=(1, 2), pca_dim=3),
               "ae": gmm_analysis(train * 2, test * 2, ks=(1, 2), pca_dim=3)}
    path = plot_gmm_nll(results, tmp_path / "plots" / "gmm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
