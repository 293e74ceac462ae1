"""Forward-pass speed of the full-size U-Nets on this machine.

For each config: images/s at a small and a large batch, compiled graph (tf.function) vs eager, XLA
(jit_compile) vs plain graph, and bfloat16 compute vs float32 (speed ratio and the largest output
difference). Ratios are measured in
the same run, so they hold up on a noisy machine better than absolute numbers.

    python bench/forward.py                       # cifar10 at batch 1 and 64, celeba 1 and 16, lsun 1
    python bench/forward.py --datasets cifar10 --batches 1 64 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.configs import get_config  # noqa: E402
from models.diffusion import STUDENT_T  # noqa: E402
from models.unet import UNet, official_variables  # noqa: E402

DEFAULT_BATCHES = {"cifar10": [1, 64], "celeba": [1, 16], "lsun_church": [1], "lsun_bedroom": [1]}


def randomise(model: UNet, seed: int = 0) -> None:
    """Non-zero weights everywhere (conv_out starts at zero), so output differences mean something."""
    rng = np.random.default_rng(seed)
    for name, v in official_variables(model).items():
        fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
        base = 1.0 if name.endswith("gamma") else 0.0
        v.assign((base + rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype(np.float32))


def seconds_per_call(fn, x, t, repeats: int) -> float:
    fn(x, t)  # warm-up (tracing, allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, t).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(dataset: str, batches: list[int], repeats: int) -> None:
    net = get_config(dataset).network
    f32, bf16 = UNet(net), UNet(net, compute_dtype="bfloat16")
    randomise(f32)
    for a, b in zip(f32.weights, bf16.weights):
        b.assign(a)
    graph32 = tf.function(lambda x, t: f32(x, t))
    graph16 = tf.function(lambda x, t: bf16(x, t))
    xla32 = tf.function(lambda x, t: f32(x, t), jit_compile=True)
    for batch in batches:
        x = tf.random.stateless_normal([batch, *net.image_shape], [0, batch])
        t = tf.fill([batch], STUDENT_T)
        s_graph = seconds_per_call(graph32, x, t, repeats)
        s_eager = seconds_per_call(lambda x, t: f32(x, t), x, t, repeats)
        s_bf16 = seconds_per_call(graph16, x, t, repeats)
        s_xla = seconds_per_call(xla32, x, t, repeats)
        diff = float(tf.reduce_max(tf.abs(graph32(x, t) - graph16(x, t))))
        scale = float(tf.reduce_max(tf.abs(graph32(x, t))))
        print(f"{dataset:12s} batch {batch:3d}: graph {batch / s_graph:7.2f} img/s "
              f"({1000 * s_graph / batch:7.1f} ms/img) | graph/eager speed {s_eager / s_graph:5.2f}x | "
              f"xla/graph speed {s_graph / s_xla:5.2f}x | "
              f"bf16/f32 speed {s_graph / s_bf16:5.2f}x, max |diff| {diff:.3g} (output max {scale:.3g})",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: per dataset)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per setting (the best counts)")
    args = p.parse_args()
    print(f"TensorFlow {tf.__version__}, devices: {[d.name for d in tf.config.list_logical_devices()]}")
    for dataset in args.datasets:
        bench(dataset, args.batches or DEFAULT_BATCHES.get(dataset, [1]), args.repeats)


if __name__ == "__main__":
    main()
