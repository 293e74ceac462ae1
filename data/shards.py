"""The on-disk pair format, written once: files, manifest, noise, checks and the tf.data reader.

A pair set is a folder laid out as the original code wrote it, plus a manifest:

    x_test.npy  y_test.npy  x_train_0.npy  y_train_0.npy  ...  manifest.json

X (the teacher's input noise) is float16 [N, H, W, C]; Y (the teacher's output image) is uint8,
rounded from [-1, 1]. The noise of example i is a pure function of (seed, stream, i) through a
counter-based generator (stream 0: train, 1: test), so any shard can be regenerated bit for bit and a
"compact" set can omit X entirely and recompute it when reading. Sets written by the original code
(no manifest) are read too.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tensorflow as tf

from utils.errors import UserError
from utils.fileio import atomic_write, sha256_file, write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TRAIN, TEST = 0, 1  # noise streams
_STREAM_STRIDE = 1 << 40  # keeps (stream, index) keys apart for any realistic set size


class PairSetError(UserError, ValueError):
    """A pair set that is missing, incomplete, corrupt, or made with other settings."""


@dataclass(frozen=True)
class Shard:
    name: str  # "test" or "train_{k}"
    stream: int
    start: int  # index of its first example within its stream
    count: int

    @property
    def x_file(self) -> str:
        return f"x_{self.name}.npy"

    @property
    def y_file(self) -> str:
        return f"y_{self.name}.npy"


def layout(n_examples: int, shard_size: int, n_test: int) -> list[Shard]:
    """The test shard, then the train shards (the last one may be short)."""
    shards = [Shard("test", TEST, 0, n_test)] if n_test else []
    for k, start in enumerate(range(0, n_examples, shard_size)):
        shards.append(Shard(f"train_{k}", TRAIN, start, min(shard_size, n_examples - start)))
    return shards


# -- noise -----------------------------------------------------------------------------------------

def example_noise(indices: tf.Tensor, seed: int | tf.Tensor, stream: int,
                  shape: tuple[int, int, int]) -> tf.Tensor:
    """X_T for the given example indices: N(0, I) from a stateless generator keyed by
    (seed, stream, index), rounded to float16 (the stored precision) and returned as float32, so the
    teacher sees exactly the X that is stored. Independent of batching and of the replica count.
    Graph-compatible (seed and indices may be symbolic): the exported `sample` signature calls it."""
    keys = tf.cast(indices, tf.int64) + stream * _STREAM_STRIDE
    seed = tf.convert_to_tensor(seed, tf.int64)

    def one(key):
        return tf.random.stateless_normal(shape, seed=tf.stack([seed, key]))
    x = tf.map_fn(one, keys, fn_output_signature=tf.float32)
    return tf.cast(tf.cast(x, tf.float16), tf.float32)


def dequantise_targets(y: tf.Tensor) -> tf.Tensor:
    """Stored uint8 targets (utils.images.to_uint8 of the teacher's images) -> [-1, 1] floats."""
    return tf.cast(y, tf.float32) / 127.5 - 1.0


# -- files -----------------------------------------------------------------------------------------

def save_npy_atomic(path: str, array: np.ndarray) -> dict:
    """np.save atomically; returns the manifest record of the file."""
    with atomic_write(path) as f:
        np.save(f, array)
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "shape": list(array.shape), "dtype": str(array.dtype)}


def npy_bytes(shape: tuple[int, ...], dtype) -> int:
    """Exact size of an .npy file (header padded to 64 bytes in format 1.0 for small shapes)."""
    buf = tempfile.SpooledTemporaryFile()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize


# -- manifest --------------------------------------------------------------------------------------

def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PairSetError(f"{path}: unreadable manifest ({e})") from None


@contextlib.contextmanager
def locked_manifest(folder: str) -> Iterator[dict]:
    """Read-modify-write of manifest.json under a file lock (workers of one job share the folder)."""
    with open(os.path.join(folder, ".manifest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(folder) or {}
        yield manifest
        write_json(os.path.join(folder, MANIFEST), manifest)


def check_file(folder: str, name: str, record: dict | None, full: bool = True) -> str | None:
    """None if the file matches its manifest record; otherwise why not."""
    path = os.path.join(folder, name)
    if record is None:
        return "not recorded as complete"
    if not os.path.exists(path):
        return "missing"
    if os.path.getsize(path) != record["bytes"]:
        return f"size {os.path.getsize(path)} != {record['bytes']}"
    if full and sha256_file(path) != record["sha256"]:
        return "checksum mismatch"
    return None


# -- reading ---------------------------------------------------------------------------------------

@dataclass
class PairSet:
    """A readable pair set: shards in order, and how to get X for compact shards."""
    folder: str
    train: list[Shard]
    test: Shard | None
    image_shape: tuple[int, int, int]
    compact: bool
    seed: int | None

    @property
    def n_train(self) -> int:
        return sum(s.count for s in self.train)

    def load(self, shard: Shard) -> tuple[np.ndarray | None, np.ndarray]:
        """(X or None if compact, Y) memory-mapped: reading a shard costs what is touched."""
        y = np.load(os.path.join(self.folder, shard.y_file), mmap_mode="r")
        x = None if self.compact else np.load(os.path.join(self.folder, shard.x_file), mmap_mode="r")
        return x, y

    def x_for(self, shard: Shard, x: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        if x is not None:
            return np.asarray(x[rows], np.float32)
        return example_noise(tf.constant(shard.start + rows), self.seed, shard.stream,
                             self.image_shape).numpy()


def open_pair_set(folder: str, image_shape: tuple[int, int, int], verify: bool = False) -> PairSet:
    """Open a complete pair set for training (ours, with manifest; or the original's, without).
    Shapes and dtypes are always checked; `verify` also checks every checksum."""
    if not os.path.isdir(folder):
        raise PairSetError(f"no pair set at {folder}")
    manifest = read_manifest(folder)
    if manifest is not None:
        shards = [Shard(**s) for s in manifest["shards"]]
        compact = bool(manifest["compact"])
        files = manifest.get("files", {})
        for s in shards:
            for name in ([s.y_file] if compact else [s.x_file, s.y_file]):
                problem = check_file(folder, name, files.get(name), full=verify)
                if problem:
                    raise PairSetError(f"pair set {folder} is incomplete: {name} {problem}")
        seed = manifest["seed"]
    else:  # the original layout: x_train_{k}.npy / y_train_{k}.npy, test shard optional
        ks = sorted(int(m.group(1)) for f in os.listdir(folder)
                    if (m := re.fullmatch(r"y_train_(\d+)\.npy", f)))
        if not ks:
            raise PairSetError(f"no pair set at {folder} (no manifest.json, no y_train_*.npy)")
        shards, start = [], 0
        if os.path.exists(os.path.join(folder, "y_test.npy")):
            n = np.load(os.path.join(folder, "y_test.npy"), mmap_mode="r").shape[0]
            shards.append(Shard("test", TEST, 0, n))
        for k in ks:
            n = np.load(os.path.join(folder, f"y_train_{k}.npy"), mmap_mode="r").shape[0]
            shards.append(Shard(f"train_{k}", TRAIN, start, n))
            start += n
        compact, seed = False, None
    for s in shards:
        _check_arrays(folder, s, image_shape, compact)
    test = next((s for s in shards if s.stream == TEST), None)
    return PairSet(folder, [s for s in shards if s.stream == TRAIN], test, image_shape, compact, seed)


def _check_arrays(folder: str, s: Shard, image_shape, compact: bool) -> None:
    want = (s.count, *image_shape)
    checks = [(s.y_file, np.uint8)] + ([] if compact else [(s.x_file, np.float16)])
    for name, dtype in checks:
        path = os.path.join(folder, name)
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise PairSetError(f"{path}: unreadable ({e})") from None
        if a.shape != want or a.dtype != dtype:
            raise PairSetError(f"{path}: {a.dtype}{list(a.shape)}, expected "
                               f"{np.dtype(dtype)}{list(want)}")


def epoch_order(pairs: PairSet, epoch: int, seed: int, shards_in_memory: int
                ) -> list[tuple[Shard, np.ndarray]]:
    """The example order of one epoch: shards in a seeded random order, taken `shards_in_memory` at a
    time, examples of those shards mixed together. Returns (shard, row) runs, flattened below."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pairs.train))
    runs = []
    for g in range(0, len(order), shards_in_memory):
        group = [pairs.train[i] for i in order[g:g + shards_in_memory]]
        owner = np.concatenate([np.full(s.count, j) for j, s in enumerate(group)])
        row = np.concatenate([np.arange(s.count) for s in group])
        perm = rng.permutation(len(owner))
        runs.append((group, owner[perm], row[perm]))
    return runs


def batches(pairs: PairSet, global_batch: int, epoch: int, seed: int, start_step: int = 0,
            part: tuple[int, int] = (0, 1), shards_in_memory: int = 2
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(X float32, Y uint8) batches of one epoch, shuffled across shards, from step `start_step` on.

    The order depends only on (seed, epoch), never on the number of workers; `part = (i, n)` yields
    worker i's 1/n of every global batch. A partial last batch is dropped, as in the original."""
    worker, n_workers = part
    per_worker = global_batch // n_workers
    step = 0
    index_of = {s.name: i for i, s in enumerate(pairs.train)}
    carry = np.empty((0, 2), np.int64)
    for group, owner, row in epoch_order(pairs, epoch, seed, shards_in_memory):
        ids = np.array([index_of[s.name] for s in group])[owner]
        examples = np.concatenate([carry, np.stack([ids, row], 1)])  # (shard index, row)
        n_full = len(examples) // global_batch
        loaded = {}
        for b in range(n_full):
            if step >= start_step:
                pick = examples[b * global_batch:(b + 1) * global_batch]
                pick = pick[worker * per_worker:(worker + 1) * per_worker]
                yield _gather(pairs, pick, loaded)
            step += 1
        carry = examples[n_full * global_batch:]


def _gather(pairs: PairSet, pick: np.ndarray, loaded: dict) -> tuple[np.ndarray, np.ndarray]:
    xs = np.empty((len(pick), *pairs.image_shape), np.float32)
    ys = np.empty((len(pick), *pairs.image_shape), np.uint8)
    for sid in np.unique(pick[:, 0]):
        shard = pairs.train[sid]
        if sid not in loaded:
            loaded[sid] = pairs.load(shard)
        x, y = loaded[sid]
        mask = pick[:, 0] == sid
        rows = pick[mask, 1]
        ys[mask] = y[rows]
        xs[mask] = pairs.x_for(shard, x, rows)
    return xs, ys


def steps_per_epoch(pairs: PairSet, global_batch: int) -> int:
    return pairs.n_train // global_batch


def heldout_batches(pairs: PairSet, batch: int, limit: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The held-out pairs in order (all of them, or the first `limit`)."""
    if pairs.test is None:
        return
    x, y = pairs.load(pairs.test)
    n = pairs.test.count if limit is None else min(limit, pairs.test.count)
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        yield pairs.x_for(pairs.test, x, rows), np.asarray(y[rows])
