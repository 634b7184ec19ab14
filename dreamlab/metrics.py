"""Metrics shared by every model family.

`frechet_distance` is the Fréchet distance between two Gaussians fitted to feature sets. dreamlab's
`fid_fmnist` (in `generators.classifiers`) applies it to the penultimate (128-d) features of our own
Fashion-MNIST CNN: it is *not* Inception FID, and its numbers are only comparable with each other.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from threadpoolctl import threadpool_limits


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), stabilised as in the reference FID code."""
    diff = mu1 - mu2
    # one BLAS thread: for feature-sized matrices more threads only contend (100x slower on a busy 2-core machine)
    with threadpool_limits(1):
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            off = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
