"""Speed of the exported student against eval's own path, and the drift of the quantised TFLite
models.

For each config, in one run and on the same noise: batch-1 latency (ms per image) and batch-64
throughput (images/s) of

  eval xla / no-xla     eval.py's path: models.diffusion.student_fn (one compiled network call), then
                        utils.images.to_uint8
  savedmodel xla / ...  the exported SavedModel's `denoise` signature (tf.saved_model.load), exported
                        with and without XLA (eval.py export --xla / --no-xla)
  tflite float32 / fp16 / int8
                        the exported TFLite `denoise` in tf.lite.Interpreter with 2 threads (fp16:
                        float16 weights; int8: dynamic-range, int8 weights, activations quantised
                        on the fly)

printed as speed ratios against "eval xla", eval.py's default (above 1: faster). Every path is called
once per batch size first (tracing, XLA compilation, interpreter allocation); then each of
`repeats` rounds times every path once in turn (interleaved, so a change of load on this shared
machine hits all paths alike), and the best round counts. cifar10 runs with random weights
(bench.forward.randomise): speed depends only on the architecture. digits runs the shipped student.

Drift (digits): 1,437 samples (eval's noise, seed 0) from each TFLite model against eval's own
float32 images: largest and mean uint8 level difference, share of pixels more than one level off,
and the digits-classifier FD (utils.evaluate.digit_classifier.digits_fd, against the 360 held-out real
digits) of each set of images.

    python bench/export.py                        # digits (5 rounds), then cifar10 (2 rounds)
    python bench/export.py --datasets digits --repeats 10 --batches 1 64 256
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.forward import randomise  # noqa: E402
from models.configs import get_config  # noqa: E402
from models.unet import UNet, count_parameters  # noqa: E402
from utils.evaluate.export import (TFLITE_VARIANTS, StudentExport, save_saved_model,  # noqa: E402
                          tflite_denoiser, tflite_model)
from utils.images import to_uint8  # noqa: E402
from models.diffusion import student_fn  # noqa: E402
from utils.evaluate.sampling import load_student, noise_for  # noqa: E402

THREADS = 2  # TFLite interpreter threads (TensorFlow itself uses every core: 2 here)
DRIFT_SAMPLES = 1437  # as many as the real digits of the train split
DEFAULT_REPEATS = {"cifar10": 2}  # a batch of 64 takes about 5 s on 2 cores

Path = Callable[[np.ndarray], np.ndarray]  # z float32 [N, H, W, C] -> uint8 images


def eval_path(model: UNet, xla: bool) -> Path:
    step = student_fn(model, xla)
    return lambda z: to_uint8(step(tf.constant(z)).numpy())


def export_paths(model: UNet, cfg, folder: str) -> tuple[dict[str, Path], dict[str, int]]:
    """The SavedModel (XLA on and off) and TFLite paths of `model`, exported into `folder`;
    also the TFLite file sizes in bytes."""
    paths, sizes = {}, {}
    for xla in (True, False):
        saved = os.path.join(folder, f"saved_model_{'xla' if xla else 'no_xla'}")
        save_saved_model(StudentExport(model, cfg, xla), saved)
        denoise = tf.saved_model.load(saved).signatures["denoise"]
        paths[f"savedmodel {'xla' if xla else 'no-xla'}"] = (
            lambda z, f=denoise: f(z=tf.constant(z))["images"].numpy())
    for variant in TFLITE_VARIANTS:
        path = os.path.join(folder, f"denoise_{variant}.tflite")
        with open(path, "wb") as f:
            f.write(tflite_model(saved, variant))
        sizes[variant] = os.path.getsize(path)
        paths[f"tflite {variant}"] = tflite_denoiser(path, THREADS)
    return paths, sizes


def best_seconds(paths: dict[str, Path], z: np.ndarray, repeats: int) -> dict[str, float]:
    for fn in paths.values():
        fn(z)  # warm-up
    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn(z)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def speed_table(paths: dict[str, Path], cfg, batches: list[int], repeats: int,
                sizes: dict[str, int]) -> None:
    res, ch = cfg.network.resolution, cfg.network.in_ch
    cols = {b: best_seconds(paths, noise_for(np.arange(b), cfg, 0).numpy(), repeats)
            for b in batches}
    print(f"  {'path':18s}" + "".join(f"{f'batch {b} ' + ('ms/img' if b == 1 else 'img/s'):>16s}"
                                      f"{'vs eval':>9s}" for b in batches) + f"{'TFLite MB':>11s}")
    for name in paths:
        row = f"  {name:18s}"
        for b, sec in cols.items():
            value = 1000 * sec[name] if b == 1 else b / sec[name]
            row += f"{value:16.2f}{sec['eval xla'] / sec[name]:8.2f}x"
        if name.startswith("tflite"):
            row += f"{sizes[name.split()[-1]] / 2**20:11.2f}"
        print(row, flush=True)
    print(f"  ({res}x{res}x{ch}, best of {repeats} interleaved rounds)", flush=True)


def drift(paths: dict[str, Path], cfg) -> None:
    from utils.evaluate.digit_classifier import digits_fd
    z = noise_for(np.arange(DRIFT_SAMPLES), cfg, 0).numpy()
    ref = paths["eval xla"](z)
    print(f"  drift against eval's float32 images, {DRIFT_SAMPLES} samples (seed 0); "
          f"digits FD vs 360 held-out real digits:")
    print(f"  {'eval xla':18s}{'':58s}FD {digits_fd(ref):7.3f}")
    for variant in TFLITE_VARIANTS:
        images = paths[f"tflite {variant}"](z)
        diff = np.abs(images.astype(int) - ref)
        print(f"  {'tflite ' + variant:18s}max {diff.max():2d} levels, mean {diff.mean():.4f}, "
              f"off {100 * (diff > 0).mean():6.3f}%, >1 off {100 * (diff > 1).mean():6.3f}%  "
              f"FD {digits_fd(images):7.3f}", flush=True)


def bench(dataset: str, batches: list[int], repeats: int) -> None:
    cfg = get_config(dataset)
    try:
        model, weights = load_student(None, cfg)
        source = f"weights: {weights.describe()}"
    except ValueError:  # no released student here: speed depends only on the architecture
        model, source = UNet(cfg.network), "random weights"
        randomise(model)
    print(f"{dataset} ({count_parameters(model):,} parameters; {source})", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        exported, sizes = export_paths(model, cfg, folder)
        paths = {"eval xla": eval_path(model, True), "eval no-xla": eval_path(model, False),
                 **exported}
        speed_table(paths, cfg, batches, repeats, sizes)
        if cfg.fid_features == "digit_classifier":  # drift measured as digits FD
            drift(paths, cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits", "cifar10"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds, the best counts (default: cifar10 2, others 5)")
    args = p.parse_args()
    tf.get_logger().setLevel("ERROR")  # each exported copy retraces student_fn's lambda: noise
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, TFLite {THREADS} threads; "
          f"ratios: speed against eval xla (above 1: faster)")
    for dataset in args.datasets:
        bench(dataset, args.batches, args.repeats or DEFAULT_REPEATS.get(dataset, 5))


if __name__ == "__main__":
    main()
