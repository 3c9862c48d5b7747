"""Evaluation: generation metrics on named feature networks, reconstruction metrics, and latent-space analysis.

Every number is named with what produced it, e.g. `fid[inception]@5000`, `kid[resnet56-cifar10]@1000`,
`psnr@5000` (see `metric_name`).
"""
from .features import (FeatureNet, FeatureSet, available_feature_nets, build_feature_net, extract_features,
                       register_feature_net, uint8_to_images, wrap_feature_net)
from .fid import (FeatureStats, fid, frechet_distance, generation_metrics, inception_score, kid, load_adm_images,
                  metric_name, precision_recall, reference_stats)
from .latent_analysis import (GMMResult, flatten_latents, gmm_analysis, linear_probe, pca_dim_for_variance,
                              plot_gmm_nll, shared_pca_dim, token_statistics)
from .recon import ReconstructionMetrics, psnr, reconstruction_metrics, ssim, to_uint8_levels

__all__ = [
    "FeatureNet", "FeatureSet", "available_feature_nets", "build_feature_net", "extract_features",
    "register_feature_net", "uint8_to_images", "wrap_feature_net",
    "FeatureStats", "fid", "frechet_distance", "generation_metrics", "inception_score", "kid", "load_adm_images",
    "metric_name", "precision_recall", "reference_stats",
    "GMMResult", "flatten_latents", "gmm_analysis", "linear_probe", "pca_dim_for_variance", "plot_gmm_nll",
    "shared_pca_dim", "token_statistics",
    "ReconstructionMetrics", "psnr", "reconstruction_metrics", "ssim", "to_uint8_levels",
]
