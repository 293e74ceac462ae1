"""`eval.py fid`: the measured images (fresh samples, in one or several runs, a folder, or the
dataset's real images) against a reference (statistics, a folder, or the dataset's real images
with their statistics cached in fid_stats/), by FID and the metrics asked for, from one pass of the
network over each set. digits is measured with its digit classifier instead.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from models.configs import DatasetConfig
from utils import fileio
from utils.evaluate.fid import (STABLE_COUNT, FIDError, Statistics, compute_statistics,
                                frechet_distance, load_statistics, require_dim, save_statistics)
from utils.evaluate.image_sets import ImageFolder, ReferenceImages, reference_images
from utils.evaluate.metrics import IS_SPLITS, KID_SUBSET_SIZE, KID_SUBSETS, METRICS, PR_K

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
