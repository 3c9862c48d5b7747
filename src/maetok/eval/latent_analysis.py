"""How easy a tokenizer's latent space is to model: the MAETok paper's GMM protocol, a linear probe, and how far
per-token statistics are from N(0, 1).

GMM protocol: latents (N, L, C) -> (N, L*C) -> PCA to the smallest dimension keeping >= 90% of the variance
(or a dimension imposed on all tokenizers being compared, so their likelihoods live in the same space) ->
standardise -> GaussianMixture for each K; held-out per-sample NLL and BIC. Fewer modes needed, lower NLL at a
given K: a more "discriminative", easier latent space for diffusion. All fitting is on the training split only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler


def flatten_latents(latents) -> np.ndarray:
    """(N, L, C) tokens (numpy or torch) -> (N, L*C) float64."""
    x = latents.detach().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
    if x.ndim < 2:
        raise ValueError(f"expected latents (N, L, C) or (N, D), got shape {x.shape}")
    return x.reshape(len(x), -1).astype(np.float64)


def pca_dim_for_variance(latents, threshold: float = 0.9) -> int:
    """Smallest number of principal components whose explained variance reaches `threshold` of the total."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must lie in (0, 1]")
    ratios = PCA(svd_solver="full").fit(flatten_latents(latents)).explained_variance_ratio_
    # The small tolerance keeps round-off from asking for one more component when the threshold is met exactly.
    return int(min(np.searchsorted(np.cumsum(ratios), threshold - 1e-12) + 1, len(ratios)))


def shared_pca_dim(latents_by_tokenizer: dict[str, object], threshold: float = 0.9,
                   reduce: Literal["max", "min"] = "max") -> int:
    """One PCA dimension for every tokenizer compared: the max (every one keeps >= threshold) or min of theirs."""
    dims = [pca_dim_for_variance(v, threshold) for v in latents_by_tokenizer.values()]
    return max(dims) if reduce == "max" else min(dims)


@dataclass
class GMMResult:
    ks: list[int]
    nll: list[float]            # held-out mean negative log-likelihood per sample (nats), in the PCA space
    bic: list[float]            # on the training split
    train_nll: list[float]
    pca_dim: int
    explained_variance: float   # fraction kept by pca_dim components
    n_train: int
    n_test: int
    covariance: str
    extra: dict = field(default_factory=dict)
    nll_se: list[float] = field(default_factory=list)  # standard error of each held-out mean (per-sample spread)

    @property
    def best_k_bic(self) -> int:
        return self.ks[int(np.argmin(self.bic))]

    @property
    def nll_per_dim(self) -> list[float]:
        return [v / self.pca_dim for v in self.nll]

    def metrics(self) -> dict[str, float]:
        """Flat, named numbers: gmm_nll[k=8,pca=12]@1000 (held-out count), gmm_bic[k=8,pca=12]@4000 (train)."""
        out = {}
        for k, nll, bic in zip(self.ks, self.nll, self.bic):
            out[f"gmm_nll[k={k},pca={self.pca_dim}]@{self.n_test}"] = nll
            out[f"gmm_bic[k={k},pca={self.pca_dim}]@{self.n_train}"] = bic
        return out


def gmm_analysis(train_latents, test_latents, ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 pca_dim: int | None = None, variance: float = 0.9,
                 covariance: Literal["full", "diag"] = "full", seed: int = 0, max_iter: int = 200,
                 n_init: int = 1) -> GMMResult:
    """Fit PCA, standardisation and one GaussianMixture per K on `train_latents`; score `test_latents`.
    `pca_dim` None: chosen from `variance` on the training latents; give it to impose the same across tokenizers."""
    train, test = flatten_latents(train_latents), flatten_latents(test_latents)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train latents have {train.shape[1]} dims, test {test.shape[1]}")
    dim = pca_dim if pca_dim is not None else pca_dim_for_variance(train, variance)
    if not 1 <= dim <= min(train.shape):
        raise ValueError(f"pca_dim={dim} must lie in [1, {min(train.shape)}]")
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(train)
    scaler = StandardScaler().fit(pca.transform(train))
    z_train, z_test = scaler.transform(pca.transform(train)), scaler.transform(pca.transform(test))
    nll, nll_se, bic, train_nll = [], [], [], []
    for k in ks:
        gmm = GaussianMixture(k, covariance_type=covariance, random_state=seed, max_iter=max_iter,
                              n_init=n_init, reg_covar=1e-6).fit(z_train)
        per_sample = -gmm.score_samples(z_test)
        nll.append(float(per_sample.mean()))
        nll_se.append(float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1 else math.nan)
        train_nll.append(float(-gmm.score(z_train)))
        bic.append(float(gmm.bic(z_train)))
    return GMMResult(list(ks), nll, bic, train_nll, dim, float(pca.explained_variance_ratio_.sum()),
                     len(train), len(test), covariance, nll_se=nll_se)


def linear_probe(train_latents, train_labels, test_latents, test_labels, c: float = 1.0, max_iter: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """Held-out top-1 accuracy of multinomial logistic regression on flattened, standardised latents."""
    train, test = flatten_latents(train_latents), flatten_latents(test_latents)
    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(train), np.asarray(train_labels))
    acc = float((clf.predict(scaler.transform(test)) == np.asarray(test_labels)).mean())
    return {f"probe_top1@{len(test)}": acc}


def token_statistics(latents, normalize: Literal["global", "channel"] = "global") -> dict[str, object]:
    """Per-token mean/std (over samples and channels), and how far the normalised latents are from N(0, 1).

    Latents are normalised as the diffusion model sees them: by one global mean/std ("global") or per channel.
    After that, each (token, channel) marginal should be ~N(0, 1); the summary reports the mean and max of
    |mean| and |std - 1| over (token, channel).
    """
    x = latents.detach().cpu().numpy() if hasattr(latents, "detach") else np.asarray(latents)
    if x.ndim != 3:
        raise ValueError(f"expected latents (N, L, C), got shape {x.shape}")
    x = x.astype(np.float64)
    axes = (0, 1, 2) if normalize == "global" else (0, 1)
    z = (x - x.mean(axis=axes, keepdims=True)) / x.std(axis=axes, keepdims=True)
    mean_lc, std_lc = z.mean(axis=0), z.std(axis=0)  # (L, C)
    return {
        "per_token_mean": x.mean(axis=(0, 2)), "per_token_std": x.std(axis=(0, 2)),
        "mean_abs_mean": float(np.abs(mean_lc).mean()), "max_abs_mean": float(np.abs(mean_lc).max()),
        "mean_abs_std_dev": float(np.abs(std_lc - 1).mean()), "max_abs_std_dev": float(np.abs(std_lc - 1).max()),
        "n": len(x),
    }


def plot_gmm_nll(results_by_tokenizer: dict[str, GMMResult], path: str | Path, per_dim: bool = False) -> Path:
    """Held-out NLL vs K, one line per tokenizer, saved as an image (Agg canvas: no display, no pyplot state)."""
    # Start-up time: matplotlib takes ~0.5 s to import, and only this plot needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # start-up time, as above

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dims = set()
    for name, r in results_by_tokenizer.items():
        ax.plot(r.ks, r.nll_per_dim if per_dim else r.nll, marker="o", label=f"{name} (pca {r.pca_dim})")
        dims.add(r.pca_dim)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GMM components K")
    ax.set_ylabel("held-out NLL per dim" if per_dim else "held-out NLL per sample")
    if len(dims) > 1 and not per_dim:  # per-sample NLLs in different PCA spaces do not compare
        ax.set_title("note: PCA dimensions differ", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
