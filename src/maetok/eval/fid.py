"""Generation metrics on features of a named network: FID, KID, Inception Score, precision/recall.

Every result is a dict whose keys carry the metric, the feature network and the number of evaluated samples,
`metric_name("fid", "inception", 5000) == "fid[inception]@5000"`, so numbers from different networks or sample
counts are never confused. The count is that of the evaluated (generated or reconstructed) set; the reference
set's count is stored in its `FeatureStats.n`.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .features import FeatureNet, FeatureSet, extract_features

_FORMAT_VERSION = 1


def metric_name(metric: str, net: str | None, n: int | None) -> str:
    """`fid[inception]@5000`; without a network (PSNR, SSIM) `psnr@5000`."""
    return f"{metric}[{net}]@{n}" if net else f"{metric}@{n}"


# ==============================================================================================================
# Statistics and their files
# ==============================================================================================================
@dataclass
class FeatureStats:
    """Mean and covariance of N features under network `net`: all FID needs, cached so references are computed once.
    `n` is None for reference statistics whose sample count the file does not say."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    net: str

    @classmethod
    def from_features(cls, feats: FeatureSet) -> FeatureStats:
        x = np.asarray(feats.features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got {x.shape}")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0], feats.net)

    def save(self, path: str | Path) -> Path:
        """Plain numeric arrays only (the name is stored as UTF-8 bytes) so loading never needs pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps numpy from appending a second .npz
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(-1 if self.n is None else self.n),
                     net_utf8=np.frombuffer(self.net.encode(), dtype=np.uint8),
                     format_version=np.int64(_FORMAT_VERSION))
        return path

    @classmethod
    def load(cls, path: str | Path, net: str | None = None) -> FeatureStats:
        """Our own files, or ADM reference batches that hold `mu`/`sigma` (TF Inception pool_3: net "inception").
        With `net` given, a file computed with another network is refused."""
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "net_utf8" in keys:
                n = int(z["n"])
                stats = cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), None if n < 0 else n,
                            bytes(z["net_utf8"]).decode())
            elif {"mu", "sigma"} <= keys:
                n = _npz_array_shape(path, "arr_0")[0] if "arr_0" in keys else None
                stats = cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), n, "inception")
            else:
                raise ValueError(f"{path}: no mu/sigma statistics (keys {sorted(keys)}); for an ADM batch of images "
                                 f"(arr_0) use reference_stats(path, feature_net) to compute them")
        if net is not None and stats.net != net:
            raise ValueError(f"{path}: statistics were computed with feature net {stats.net!r}, not {net!r}")
        return stats


def _npz_array_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an .npz without reading it (ADM's arr_0 is gigabytes)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return _npy_header(f)[0]


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, left positioned at the first data byte."""
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(f)


def _mapped_npz_array(path: str | Path, key: str) -> np.ndarray | None:
    """`key` of an uncompressed .npz (what np.savez writes) as a read-only memory map, or None when it is
    compressed or not a plain C-order array: slicing the map reads only the slice from disk."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as f:
            shape, fortran, dtype = _npy_header(f)
            header_len = f.tell()  # the member's bytes are stored as they are: its offset is the file's
    if fortran or dtype.hasobject:
        return None
    with open(path, "rb") as raw:  # the local file header (its extra field may differ from the central one)
        raw.seek(info.header_offset)
        local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def load_adm_images(path: str | Path, lazy: bool = False) -> np.ndarray:
    """The uint8 NHWC images (`arr_0`) of an ADM reference or sample batch. `lazy`: a read-only memory map when
    the file is uncompressed, so that evaluation shards (torchrun) read only their own images."""
    images = _mapped_npz_array(path, "arr_0") if lazy else None
    if images is None:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise ValueError(f"{path}: no arr_0 image array (keys {z.files})")
            images = z["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 should be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def reference_stats(source, net: FeatureNet, cache_path: str | Path | None = None, batch_size: int = 64,
                    progress: bool = True) -> FeatureStats:
    """Statistics of reference images under `net`, read from `cache_path` when it exists (and matches `net`),
    else computed and written there. `source`: an ADM .npz path, or anything `extract_features` takes. Under the
    Inception network an ADM batch's stored mu/sigma are its statistics, as in the ADM evaluator; otherwise they
    are computed from its images (arr_0)."""
    if cache_path is not None and Path(cache_path).is_file():
        return FeatureStats.load(cache_path, net=net.name)
    if isinstance(source, (str, Path)):
        with np.load(source, allow_pickle=False) as z:
            has_stats = {"mu", "sigma"} <= set(z.files)
        if has_stats and net.name == "inception":
            return FeatureStats.load(source, net="inception")
        source = load_adm_images(source)
    stats = FeatureStats.from_features(extract_features(net, source, batch_size, progress))
    if cache_path is not None:
        stats.save(cache_path)
    return stats


# ==============================================================================================================
# FID
# ==============================================================================================================
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64.

    A singular product (e.g. fewer samples than dimensions) can make sqrtm non-finite: retry with `eps` added to
    both diagonals. Round-off gives the root a small imaginary part; more than `imag_tol` on its diagonal means
    the inputs are not valid covariances, and is an error rather than a silently wrong number.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # singularity warnings are handled below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(mu1.size) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("matrix square root is not finite even with the eps offset: check the covariances")
    if np.iscomplexobj(covmean):
        worst = float(np.abs(np.diagonal(covmean).imag).max())
        if worst > imag_tol:
            raise ValueError(f"matrix square root has imaginary diagonal parts up to {worst:.3g} (> {imag_tol})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _stats(x: FeatureSet | FeatureStats) -> FeatureStats:
    if isinstance(x, FeatureStats):
        return x
    return x.fid_stats if x.fid_stats is not None else FeatureStats.from_features(x)


def _same_net(a, b) -> str:
    if a.net != b.net:
        raise ValueError(f"features come from different networks: {a.net!r} vs {b.net!r}")
    return a.net


def fid(evaluated: FeatureSet | FeatureStats, reference: FeatureSet | FeatureStats) -> dict[str, float]:
    """{"fid[net]@n": value}, n = number of evaluated samples."""
    a, b = _stats(evaluated), _stats(reference)
    net = _same_net(a, b)
    return {metric_name("fid", net, a.n): frechet_distance(a.mu, a.sigma, b.mu, b.sigma)}


def fid_bootstrap_se(evaluated: FeatureSet, reference: FeatureSet | FeatureStats, resamples: int = 50,
                     seed: int = 0) -> dict[str, float]:
    """{"fid_se[net]@n": value}: the standard error of FID that comes from drawing these n evaluated samples,
    estimated as the spread of FID over `resamples` bootstrap draws (n rows with replacement) of the evaluated
    features. The reference stays fixed: two variants measured against the same held-out set share its noise,
    so only the evaluated side separates them. Training noise (another seed) is not in it."""
    x = np.asarray(evaluated.features, dtype=np.float64)
    ref = _stats(reference)
    _same_net(evaluated, ref)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = x[rng.integers(0, len(x), len(x))]
        draws.append(frechet_distance(rows.mean(axis=0), np.cov(rows, rowvar=False), ref.mu, ref.sigma))
    return {metric_name("fid_se", evaluated.net, len(x)): float(np.std(draws, ddof=1))}


# ==============================================================================================================
# KID, IS, precision/recall
# ==============================================================================================================
def kid(evaluated: FeatureSet, reference: FeatureSet, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged
    over random subsets (without replacement, min(subset_size, N) each); the mean and the std across subsets
    (0 when the subsets are the whole sets: give a smaller subset_size for a spread). float64 throughout;
    `device` can be a GPU for 2048-d features."""
    net = _same_net(evaluated, reference)
    x = torch.as_tensor(np.asarray(evaluated.features, np.float64), device=device)
    y = torch.as_tensor(np.asarray(reference.features, np.float64), device=device)
    m, n = min(subset_size, len(x)), min(subset_size, len(y))
    if m < 2 or n < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d, rng = x.shape[1], np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        xs = x[torch.as_tensor(rng.choice(len(x), m, replace=False), device=device)]
        ys = y[torch.as_tensor(rng.choice(len(y), n, replace=False), device=device)]
        kxx, kyy, kxy = (xs @ xs.T / d + 1) ** 3, (ys @ ys.T / d + 1) ** 3, (xs @ ys.T / d + 1) ** 3
        # Unbiased: drop the k(x_i, x_i) terms from the within-set means.
        values.append((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                      - 2 * kxy.mean())
    values = torch.stack(values).cpu().numpy()
    return {metric_name("kid", net, evaluated.n): float(values.mean()),
            metric_name("kid_std", net, evaluated.n): float(values.std())}


def inception_score(evaluated: FeatureSet, splits: int = 10) -> dict[str, float]:
    """exp(E_x KL(p(y|x) || p(y))) on the logits of the set's network, over `splits` consecutive chunks; mean, std.
    Named with the network: is[resnet56-cifar10] is not the Inception Score papers report."""
    if evaluated.logits is None:
        extra = (" The FID Inception TorchScript has no classifier head (pool_3 features only), so IS with "
                 "Inception is not available here; use a feature net with logits, e.g. resnet56-cifar10."
                 if evaluated.net == "inception" else "")
        raise ValueError(f"feature net {evaluated.net!r} produced no logits, needed for the Inception Score.{extra}")
    logits = torch.as_tensor(np.asarray(evaluated.logits, np.float64))
    if len(logits) < splits:
        raise ValueError(f"{len(logits)} samples cannot form {splits} splits")
    scores = []
    for chunk in torch.tensor_split(logits, splits):
        log_p = torch.log_softmax(chunk, dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(chunk))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return {metric_name("is", evaluated.net, evaluated.n): float(np.mean(scores)),
            metric_name("is_std", evaluated.net, evaluated.n): float(np.std(scores))}


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is at distance 0, rank 0)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1)
                      for i in range(0, len(points), chunk)])


def precision_recall(evaluated: FeatureSet, reference: FeatureSet, k: int = 3, chunk: int = 1024,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): a set's manifold is the union of balls reaching each
    point's k-th nearest neighbour. Precision: evaluated samples inside the reference manifold; recall: reference
    samples inside the evaluated manifold. Distances in float32 (chunks of `chunk` rows; `device` may be a GPU)."""
    net = _same_net(evaluated, reference)
    gen = torch.as_tensor(np.asarray(evaluated.features, np.float32), device=device)
    ref = torch.as_tensor(np.asarray(reference.features, np.float32), device=device)
    if min(len(gen), len(ref)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _inside_manifold(gen, ref, _kth_neighbour_radii(ref, k, chunk), chunk).double().mean().cpu()
    recall = _inside_manifold(ref, gen, _kth_neighbour_radii(gen, k, chunk), chunk).double().mean().cpu()
    return {metric_name("precision", net, evaluated.n): float(precision),
            metric_name("recall", net, evaluated.n): float(recall)}


def generation_metrics(evaluated: FeatureSet, reference: FeatureSet | FeatureStats, kid_subsets: int = 100,
                       is_splits: int = 10, device: str | torch.device = "cpu",
                       kid_subset_size: int = 1000) -> dict[str, float]:
    """FID always; KID and precision/recall when reference features (not only statistics) are given; IS when the
    evaluated set has logits."""
    out = fid(evaluated, reference)
    if isinstance(reference, FeatureSet):
        out |= kid(evaluated, reference, num_subsets=kid_subsets, subset_size=kid_subset_size, device=device)
        out |= precision_recall(evaluated, reference, device=device)
    if evaluated.logits is not None:
        out |= inception_score(evaluated, splits=is_splits)
    return out
