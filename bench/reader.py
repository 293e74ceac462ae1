"""Pairs per second delivered to the training step by the pair reader, in one run, and whole
training steps per second with --steps_per_call 1 and 8.

  previous  the Python reader (data/shards.py `batches` at --previous, before the tf.data reader)
            through the previous input path: tf.data.Dataset.from_generator, one thread per host
  tfdata    today's reader: data.reader.PairReader, a tf.data graph (tf.io.read_file, decode_raw,
            stateless shuffles, rebatch)

each from a local folder and from ram:// (TensorFlow's in-memory filesystem, the stand-in for
gs://; the previous reader reads each shard whole through gfile there), at several global batch
sizes. Every measurement runs in a fresh process: the previous reader's generator thread slowed
every tf.data pipeline that ran after it in the same process (about 3x here). Each reader feeds distribute_datasets_from_function under OneDeviceStrategy, uint8 -> float
on the way, into compiled steps that only convert the batch (float32 x, targets in [-1, 1]) and average it,
--steps_per_call of them in one call as training.py runs them, so what is timed is the input
pipeline, not the network. A cifar10-shaped set
(32x32x3, float16 X and uint8 Y, np.save in the original layout) is made once; the local files sit
in the page cache. One round reads --epochs epochs of each reader in turn, through one iterator
as a training run does, timed after its first call (interleaved, so a change of load hits all
alike); the best round counts.

The last rows train the tiny config (8x8x3, batch 32) on a tiny set through utils.train.loop.
run_loop, steps per second with one step per call and with 8 (the host reads the loss back once
per call).

    python bench/reader.py                                  # 6 shards of 16,384, batches 128 512 2048
    python bench/reader.py --batches 512 --rounds 2 --previous 950856a
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
from utils.cli import keep_freed_memory, quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from data import shards  # noqa: E402
from data.reader import PairReader, steps_per_epoch  # noqa: E402
from utils.train.loop import distributed_dataset  # noqa: E402

SHAPE = (32, 32, 3)
PREVIOUS = "950856a"  # the last commit with the Python reader


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


def consume(x, y):
    """What the student's step does with a batch before the network: float32 x, targets in [-1, 1]."""
    return tf.reduce_mean(tf.cast(x, tf.float32)) + tf.reduce_mean(shards.dequantise_targets(y))


def previous_data(module, folder: str, batch: int, strategy, epochs: int):
    """The previous input path: the Python reader in from_generator, one thread per host."""
    pairs = module.open_pair_set(folder, SHAPE)
    specs = (tf.TensorSpec((batch, *SHAPE), tf.float32), tf.TensorSpec((batch, *SHAPE), tf.uint8))

    def make(epoch, start, ctx):
        def gen():
            for e in range(epochs):
                yield from module.batches(pairs, batch, e, 1, 0, (0, 1))
        return tf.data.Dataset.from_generator(gen, output_signature=specs)
    return distributed_dataset(strategy, make, 0, 0), epochs * (pairs.n_train // batch)


def tfdata_data(folder: str, batch: int, strategy, epochs: int):
    pairs = shards.open_pair_set(folder, SHAPE)
    reader = PairReader(pairs, batch, seed=1)
    steps = epochs * steps_per_epoch(pairs, batch)
    make = lambda epoch, start, ctx: reader.dataset(epoch, start, (0, 1), batch).take(steps)  # noqa
    return distributed_dataset(strategy, make, 0, 0), steps


def pairs_per_second(data, steps: int, batch: int, run_steps, per_call: int) -> float:
    """Consume `steps` batches as the training loop does, per_call steps in one compiled call;
    timed after the first call (tracing, the first group's read: a run pays them once)."""
    it = iter(data)
    float(run_steps(it, tf.constant(per_call)))
    start, done = time.perf_counter(), per_call
    while done < steps:
        n = min(per_call, steps - done)
        float(run_steps(it, tf.constant(n)))
        done += n
    return (steps - per_call) * batch / (time.perf_counter() - start)


def training_steps_per_second(steps_per_call: list[int], n_steps: int) -> dict[int, float]:
    """Tiny-config student steps/s through run_loop with each steps_per_call (after a warm-up)."""
    from models.configs import CONFIGS
    from models.diffusion import student_loss
    from models.unet import UNet
    from utils.train.loop import Logger, Trainer, run_loop
    cfg = CONFIGS["tiny"]
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "pairs")
        rng = np.random.default_rng(0)
        os.makedirs(folder)
        for k in range(4):
            np.save(os.path.join(folder, f"x_train_{k}.npy"),
                    rng.standard_normal((256, *cfg.network.image_shape)).astype(np.float16))
            np.save(os.path.join(folder, f"y_train_{k}.npy"),
                    rng.integers(0, 256, (256, *cfg.network.image_shape), dtype=np.uint8))
        pairs = shards.open_pair_set(folder, cfg.network.image_shape)
        batch = cfg.train.batch_size
        reader = PairReader(pairs, batch, seed=0)
        for n in steps_per_call:
            run = os.path.join(tmp, f"run{n}")
            trainer = Trainer(strategy, lambda: UNet(cfg.network), cfg.train.optim,
                              lambda m, x, y, step: student_loss(
                                  m, tf.cast(x, tf.float32), shards.dequantise_targets(y), "l1"),
                              run,
                              global_batch=batch, total_steps=10 ** 6, xla=True)
            data = distributed_dataset(strategy, lambda e, s, ctx: reader.dataset(
                e, s, (0, 1), batch), 0, 0)
            kw = dict(steps_per_epoch=pairs.n_train // batch, data=data, ckpt_every=10 ** 6,
                      on_checkpoint=lambda step: None, logger=Logger(run, enabled=False),
                      desc="", progress=False, steps_per_call=n)
            run_loop(trainer, total_steps=2 * n, **kw)  # warm-up: tracing, XLA compilation
            start = time.perf_counter()
            run_loop(trainer, total_steps=2 * n + n_steps, **kw)
            out[n] = n_steps / (time.perf_counter() - start)
    return out


def measure_one(reader: str, folder: str, where: str, batch: int, epochs: int, per_call: int,
                previous_rev: str) -> float:
    """One measurement, in this (fresh) process, set up as training.py's (utils.cli.run)."""
    keep_freed_memory()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    @tf.function
    def run_steps(iterator, n):
        def body(i, total):
            return i + 1, total + strategy.run(consume, args=iterator.get_next())
        return tf.while_loop(lambda i, _: i < n, body, [tf.constant(0), tf.constant(0.0)])[1]

    if where == "ram":
        copy_to(folder, "ram://bench_reader/pairs")
        folder = "ram://bench_reader/pairs"
    if reader == "previous":
        data, steps = previous_data(previous_module(previous_rev), folder, batch, strategy, epochs)
    else:
        data, steps = tfdata_data(folder, batch, strategy, epochs)
    return pairs_per_second(data, steps, batch, run_steps, per_call)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--shard_size", type=int, default=16384,
                   help="pairs per shard (real sets: 102,400 for cifar10, 25,600 for celeba)")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048],
                   help="global batch sizes (one replica)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs per round, through one iterator (as a training run reads them)")
    p.add_argument("--previous", default=PREVIOUS, help="git revision of the previous reader")
    p.add_argument("--steps_per_call", type=int, default=8,
                   help="steps consumed per compiled call, as training.py --steps_per_call: 8 "
                        "takes the per-step Python round trip out of both readers' figures")
    p.add_argument("--train_steps", type=int, default=400,
                   help="timed tiny training steps per steps_per_call setting (0: skip)")
    p.add_argument("--parts", nargs="+", default=["reader", "training"],
                   choices=["reader", "training"])
    p.add_argument("--one", nargs=3, metavar=("READER", "WHERE", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child process: one measurement, printed
        reader, where, batch = args.one
        print(measure_one(reader, args.folder, where, int(batch), args.epochs, args.steps_per_call,
                          args.previous))
        return

    if "reader" in args.parts:
        compare_readers(args)
    if "training" in args.parts and args.train_steps:
        rates = training_steps_per_second([1, 8], args.train_steps)
        print(f"\ntiny student training ({args.train_steps} steps, batch 32, XLA): "
              f"steps_per_call 1: {rates[1]:.1f} steps/s, 8: {rates[8]:.1f} steps/s "
              f"({rates[8] / rates[1]:.2f}x)")


def compare_readers(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "pairs")
        write_set(local, args.shards, args.shard_size)
        n = args.shards * args.shard_size
        print(f"{args.shards} shards x {args.shard_size:,} pairs ({n * 9 * 1024 / 1e6:.0f} MB), "
              f"{SHAPE}; previous reader: data/shards.py at {args.previous}; each measurement "
              f"in a fresh process")
        rows = [(reader, where, batch) for batch in args.batches for where in ("local", "ram")
                for reader in ("previous", "tfdata")]
        best = {row: 0.0 for row in rows}
        for r in range(args.rounds):
            for row in rows:
                reader, where, batch = row
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--one", reader, where, str(batch),
                     "--folder", local, "--epochs", str(args.epochs), "--steps_per_call",
                     str(args.steps_per_call), "--previous", args.previous],
                    capture_output=True, text=True, check=True).stdout
                rate = float(out.split()[-1])
                best[row] = max(best[row], rate)
                print(f"  round {r + 1}: batch {batch:5d} {where:5s} {reader:8s} {rate:10,.0f} pairs/s")
        print(f"\nbest of {args.rounds} rounds, pairs/s into the step ({args.steps_per_call} "
              f"steps per call, {args.epochs} epochs through one iterator):")
        print(f"{'batch':>6s} {'from':6s} {'previous':>10s} {'tf.data':>10s} {'tf.data/previous':>17s}")
        for batch in args.batches:
            for where in ("local", "ram"):
                a, b = best[("previous", where, batch)], best[("tfdata", where, batch)]
                print(f"{batch:6d} {where:6s} {a:10,.0f} {b:10,.0f} {b / a:16.2f}x")


if __name__ == "__main__":
    main()
