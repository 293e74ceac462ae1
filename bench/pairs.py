"""Teacher pair-generation speed, and how much of it is anything but the network.

For each config, in one run and on one CPU replica (OneDeviceStrategy, as training.py uses without
accelerators), with randomised teacher weights:

  (a) the real generation path, one batch at a time: data/pairs.py's own per-shard loop
      (`_generate_shard`: example_noise, the teacher's compiled DDIM while-loop from make_teacher_fn,
      uint8 quantisation) on a shard of exactly one batch; file writing and checksums are left out;
  (b) one bare forward pass of the same network at the same batch (tf.function, same XLA setting).

    overhead = time per batch / (network calls per pair x time of one forward pass) - 1

where the calls per pair are ddim_plan(cfg.sampler).n_calls (identity steps of the quadratic sequence
dropped). It covers the noise, the sampler arithmetic, the loop, strategy dispatch and quantisation;
the noise alone is timed too. Everything is called once before timing (tracing, XLA compilation);
then each timed batch is followed by a few forward passes and a noise batch (interleaved, so a change
of load hits both sides of the ratio alike). The best batch and the best forward pass give the
overhead; the mean batch gives the sustained pairs/s.

    python bench/pairs.py                                    # tiny and digits, full sampler, batch 64
    python bench/pairs.py --datasets cifar10 --batches 2     # the full cifar10 network (slow on CPUs)
    python bench/pairs.py --datasets tiny --batches 1 --no-xla
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.forward import randomise  # noqa: E402
from data.pairs import _generate_shard, make_teacher_fn, settings_for  # noqa: E402
from data.shards import TRAIN, Shard  # noqa: E402
from models.diffusion import example_noise  # noqa: E402
from models.configs import get_config  # noqa: E402
from models.diffusion import ddim_plan  # noqa: E402
from models.unet import UNet  # noqa: E402

FORWARD_REPEATS = 3  # forward passes timed after each timed batch


class _NoBar:
    """Stands in for the tqdm bar _generate_shard updates."""

    def update(self, n: int) -> None:
        pass


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def batch_timer(teacher_fn: Callable, settings, batch: int) -> Callable[[], object]:
    """One batch of the real generation path; each call takes the next `batch` example indices."""
    count = iter(range(1 << 30))

    def one() -> object:
        sh = Shard("train_0", TRAIN, next(count) * batch, batch)
        return _generate_shard(sh, settings, teacher_fn, batch, _NoBar(), None)
    return one


def measure(dataset: str, batch: int, batches: int, xla: bool) -> dict[str, list[float]]:
    """Seconds of each timed generation batch, of each bare forward pass and of each noise batch.
    Every timed batch is followed by FORWARD_REPEATS forward passes and one noise batch
    (interleaved, so a change of load hits both sides of the ratio alike)."""
    cfg = get_config(dataset)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        teacher = UNet(cfg.network)
    randomise(teacher)
    settings = settings_for(cfg, seed=0)
    generate = batch_timer(make_teacher_fn(teacher, cfg.sampler, strategy, xla), settings, batch)
    net = tf.function(lambda x, t: teacher(x, t, training=False), jit_compile=xla)
    x = example_noise(tf.range(batch), 0, TRAIN, settings.image_shape)
    t = tf.fill([batch], int(ddim_plan(cfg.sampler).t[0]))
    timed = {"batch": generate, "forward": lambda: net(x, t).numpy(),
             "noise": lambda: example_noise(tf.range(batch), 0, TRAIN, settings.image_shape).numpy()}
    for fn in timed.values():
        fn()  # warm-up: tracing, XLA compilation
    times = {key: [] for key in timed}
    for _ in range(batches):
        times["batch"].append(seconds(timed["batch"]))
        times["forward"] += [seconds(timed["forward"]) for _ in range(FORWARD_REPEATS)]
        times["noise"].append(seconds(timed["noise"]))
    return times


def bench(dataset: str, batch: int, batches: int, xla: bool) -> None:
    calls = ddim_plan(get_config(dataset).sampler).n_calls
    times = measure(dataset, batch, batches, xla)
    s_batch, s_fwd, s_noise = (min(times[k]) for k in ("batch", "forward", "noise"))
    overhead = s_batch / (calls * s_fwd) - 1.0
    print(f"{dataset:8s} batch {batch:3d}, xla {'on ' if xla else 'off'}: "
          f"{batch / np.mean(times['batch']):8.1f} pairs/s (mean of {batches} batch(es); best "
          f"{batch / s_batch:.1f}) | {calls} calls/pair | forward {1000 * s_fwd:8.2f} ms | "
          f"batch {1000 * s_batch:9.1f} ms vs {calls} x forward {1000 * calls * s_fwd:9.1f} ms: "
          f"overhead {100 * overhead:+6.1f}% (noise alone {1000 * s_noise:.1f} ms)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["tiny", "digits"])
    p.add_argument("--batch", type=int, default=64, help="pairs per teacher call (gen batch)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per dataset")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the sampler loop and the forward pass with XLA (default: on)")
    args = p.parse_args()
    print(f"TensorFlow {tf.__version__}, devices: {[d.name for d in tf.config.list_logical_devices()]}")
    for dataset in args.datasets:
        bench(dataset, args.batch, args.batches, args.xla)


if __name__ == "__main__":
    main()
