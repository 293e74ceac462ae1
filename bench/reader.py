"""Pairs per second delivered to the training step by the pair reader, in one run:

  previous  the reader before gfile support (data/shards.py at --previous, default main's), local
            folder, memory-mapped;
  local     today's reader, same local folder, memory-mapped;
  gfile     today's reader, the same files on ram:// (TensorFlow's in-memory filesystem, the
            stand-in for gs://): every shard read whole through tf.io.gfile.

Each reader feeds the student's input path (data.shards.batches -> utils.train.loop.
distributed_batches under OneDeviceStrategy, uint8 -> float on the way) into a compiled step that
only touches the batch, so what is timed is the reader and the input pipeline, not the network.
A cifar10-shaped set (32x32x3, float16 X and uint8 Y, written with np.save in the original layout)
is made once; the local files sit in the page cache, so disk speed is not measured. Rounds are
interleaved (previous, local, gfile, previous, ...) so a change of load hits all alike; the best
round of each is reported.

    python bench/reader.py                       # 6 shards x 4,096 pairs, global batch 512
    python bench/reader.py --shards 4 --shard_size 2048 --rounds 2 --previous 215f549
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data import shards  # noqa: E402
from utils.train.loop import distributed_batches  # noqa: E402

SHAPE = (32, 32, 3)


def previous_module(rev: str):
    """data/shards.py as of git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:data/shards.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "previous_shards.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("previous_shards", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_shards"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_set(folder: str, n_shards: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for k in range(n_shards):
        np.save(os.path.join(folder, f"x_train_{k}.npy"),
                rng.standard_normal((shard_size, *SHAPE)).astype(np.float16))
        np.save(os.path.join(folder, f"y_train_{k}.npy"),
                rng.integers(0, 256, (shard_size, *SHAPE), dtype=np.uint8))


def copy_to(folder: str, target: str) -> None:
    tf.io.gfile.makedirs(target)
    for name in os.listdir(folder):
        tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}", overwrite=True)


def pairs_per_second(module, folder: str, batch: int, strategy, step) -> float:
    pairs = module.open_pair_set(folder, SHAPE)
    specs = (tf.TensorSpec((batch, *SHAPE), tf.float32), tf.TensorSpec((batch, *SHAPE), tf.uint8))
    to_float = lambda x, y: (x, shards.dequantise_targets(y))  # noqa: E731
    data = distributed_batches(strategy, lambda w, n: module.batches(pairs, batch, 0, 1, 0, (w, n)),
                               specs, to_float)
    start, n = time.perf_counter(), 0
    for b in data:
        float(step(b))  # waits for the step
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--shard_size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=512, help="global batch (one replica)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--previous", default="main", help="git revision of the previous reader")
    args = p.parse_args()

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    @tf.function
    def step(batch):
        return strategy.run(lambda x, y: tf.reduce_mean(x) + tf.reduce_mean(y), args=batch)

    readers = {"previous": previous_module(args.previous), "local": shards, "gfile": shards}
    with tempfile.TemporaryDirectory() as tmp:
        local, ram = os.path.join(tmp, "pairs"), "ram://bench_reader/pairs"
        write_set(local, args.shards, args.shard_size)
        copy_to(local, ram)
        where = {"previous": local, "local": local, "gfile": ram}
        n = args.shards * args.shard_size
        print(f"{args.shards} shards x {args.shard_size:,} pairs ({n * 9 * 1024 / 1e6:.0f} MB), "
              f"{SHAPE}, global batch {args.batch}, {n // args.batch} steps an epoch; "
              f"previous reader: data/shards.py at {args.previous}")
        best = {k: 0.0 for k in readers}
        pairs_per_second(shards, local, args.batch, strategy, step)  # tracing, warm caches
        for r in range(args.rounds):
            for name, module in readers.items():
                rate = pairs_per_second(module, where[name], args.batch, strategy, step)
                best[name] = max(best[name], rate)
                print(f"  round {r + 1}: {name:8s} {rate:9,.0f} pairs/s")
        print(f"best of {args.rounds}: previous {best['previous']:,.0f}, local {best['local']:,.0f}, "
              f"gfile {best['gfile']:,.0f} pairs/s")
        print(f"local (memory-mapped) vs previous reader: {best['local'] / best['previous']:.2f}x; "
              f"gfile (ram://) vs local: {best['gfile'] / best['local']:.2f}x")
        tf.io.gfile.rmtree("ram://bench_reader")


if __name__ == "__main__":
    main()
