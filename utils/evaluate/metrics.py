"""The sample-quality metrics besides FID, each as its reference implementation computes it, from
the Inception features (and class probabilities) of one pass over each image set
(utils/evaluate/measure.py makes the pass). The memory of the distance computations is bounded by
their blocks, not by the number of images.

  KID        Binkowski et al. 2018: the unbiased MMD^2 between the sets' pool_3 features with the
             cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over 100 subsets of
             min(1000, n) images of each set drawn without replacement (as StyleGAN's
             metrics/kernel_inception_distance.py); we also give the std over the subsets.
  precision  Kynkaanniemi et al. 2019, as guided-diffusion's evaluations/evaluator.py
  recall     (ManifoldEstimator) computes them: a set's manifold is the union of balls around its
             features with radius the squared distance to the k = 3rd nearest neighbour; precision
             is the share of the samples inside the real images' manifold, recall the share of
             the real images inside the samples' manifold.
  IS         Salimans et al. 2016, as openai/improved-gan's inception_score.py: softmax over the
             1008 classes of the pool_3 features times the weights of `softmax/logits/MatMul` (no
             bias), exp(E_x KL(p(y|x) || p(y))) in 10 splits, their mean and std.
"""
from __future__ import annotations

import numpy as np

METRICS = ("fid", "kid", "pr", "is")  # eval.py fid --metrics (pr: precision and recall)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
IS_SPLITS = 10
BLOCK = 2048  # rows (and columns) of a block of pairwise distances: 16 MB in float32


def kid(gen: np.ndarray, real: np.ndarray, seed: int = 0, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float]:
    """(mean, std over the subsets) of the unbiased MMD^2 with the cubic polynomial kernel."""
    d = gen.shape[1]
    m = min(len(gen), len(real), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):  # the kernels in float32 as StyleGAN's (its features are), sums in float64
        x = np.asarray(gen[rng.choice(len(gen), m, replace=False)], np.float32)
        y = np.asarray(real[rng.choice(len(real), m, replace=False)], np.float32)
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        within = a.sum(dtype=np.float64) - np.diag(a).sum(dtype=np.float64)
        values[i] = within / (m - 1) / m - b.sum(dtype=np.float64) * 2 / m / m
    return float(values.mean()), float(values.std())


def _squared_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances of two blocks of rows (float32, as the evaluator)."""
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    d = (u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]
    return np.maximum(d, 0)


def manifold_radii(features: np.ndarray, k: int = PR_K, block: int = BLOCK) -> np.ndarray:
    """Each feature's squared distance to its k-th nearest neighbour in the set (itself, at
    distance 0, counting as the 0th), by blocks of rows and columns."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision and recall need more than {k} images in each set")
    radii = np.empty(n, np.float32)
    for r in range(0, n, block):
        rows = features[r:r + block]
        nearest = np.full((len(rows), 0), np.inf, np.float32)  # the k + 1 smallest so far
        for c in range(0, n, block):
            both = np.concatenate([nearest, _squared_distances(rows, features[c:c + block])], 1)
            nearest = np.partition(both, min(k, both.shape[1] - 1), axis=1)[:, :k + 1]
        radii[r:r + block] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
           block: int = BLOCK) -> np.ndarray:
    """For each point, whether it lies within radii[j] of some centres[j] (squared distances)."""
    hit = np.zeros(len(points), bool)
    for r in range(0, len(points), block):
        rows = points[r:r + block]
        for c in range(0, len(centres), block):
            d = _squared_distances(rows, centres[c:c + block])
            hit[r:r + block] |= (d <= radii[None, c:c + block]).any(1)
    return hit


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """(precision: the share of the samples inside the real manifold, recall: the share of the
    real images inside the samples' manifold)."""
    real_radii, gen_radii = manifold_radii(real, k), manifold_radii(gen, k)
    return (float(inside(gen, real, real_radii).mean()),
            float(inside(real, gen, gen_radii).mean()))


def inception_score(probs: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(mean KL(p(y|x) || p(y))), as improved-gan."""
    n = len(probs)
    if n < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images")
    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(splits):  # improved-gan's parts: [i N / splits, (i + 1) N / splits)
        part = probs[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
