"""The on-disk pair format, written once: files, manifest, noise, checks and the tf.data reader.

A pair set is a folder laid out as the original code wrote it, plus a manifest:

    x_test.npy  y_test.npy  x_train_0.npy  y_train_0.npy  ...  manifest.json

X (the teacher's input noise) is float16 [N, H, W, C]; Y (the teacher's output image) is uint8,
rounded from [-1, 1]. The noise of example i is a pure function of (seed, stream, i) through a
counter-based generator (stream 0: train, 1: test), so any shard can be regenerated bit for bit and a
"compact" set can omit X entirely and recompute it when reading. Sets written by the original code
(no manifest) are read too.

The folder may be on any tf.io.gfile filesystem (`gs://...`, `ram://...`). The training reader
(PairReader) reads whole shards with TensorFlow's file ops, a group of two at a time (about three
groups in memory); the held-out pairs are memory-mapped where the folder is local.

No lock: each shard's record (its files' sizes and checksums, with the set's settings) is its own
manifest part, `manifest.{shard}.json`, written once under its final name, complete, by the worker
that wrote the shard, after the shard's files. The manifest is the union of manifest.json (if any:
written by earlier versions, and by whoever finds the set complete) and the parts, assembled by
whoever reads it. A worker killed mid-write leaves no part (a local write goes through a temporary
name; an object-store upload appears only when finished), so its shard counts as not done.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tensorflow as tf

from utils import fileio
from utils.errors import UserError
from utils.fileio import atomic_write, sha256_file, write_json

MANIFEST = "manifest.json"
_PART = re.compile(r"manifest\.((?:test|train_\d+))\.json")  # a shard's manifest part
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
    record = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if not fileio.is_local(path):  # one upload of the finished bytes
        buf = io.BytesIO()
        np.save(buf, array)
        data = buf.getvalue()
        fileio.write_bytes(path, data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **record}
    with atomic_write(path) as f:
        np.save(f, array)
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path), **record}


def npy_bytes(shape: tuple[int, ...], dtype) -> int:
    """Exact size of an .npy file (header padded to 64 bytes in format 1.0 for small shapes)."""
    buf = tempfile.SpooledTemporaryFile()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize


# -- manifest --------------------------------------------------------------------------------------

def part_name(shard_name: str) -> str:
    return f"manifest.{shard_name}.json"


def _read_json(path: str) -> dict:
    try:
        return fileio.read_json(path)
    except (OSError, ValueError) as e:
        raise PairSetError(f"{path}: unreadable manifest ({e})") from None


def read_manifest(folder: str) -> dict | None:
    """The manifest assembled from manifest.json and the parts (None if neither exists). A part
    overrides manifest.json's record of the same files (it is newer: a shard regenerated after the
    set was assembled). Settings that differ between the pieces are an error."""
    names = fileio.listdir(folder) if fileio.isdir(folder) else []
    manifest = _read_json(os.path.join(folder, MANIFEST)) if MANIFEST in names else None
    for name in sorted(n for n in names if _PART.fullmatch(n)):
        path = os.path.join(folder, name)
        try:
            part = _read_json(path)
        except PairSetError:  # written whole or not at all; if damaged anyway, the shard is redone
            continue
        if manifest is None:
            manifest = {**part, "files": {}}
        elif header(part) != header(manifest):
            diff = sorted(k for k in set(header(part)) | set(header(manifest))
                          if part.get(k) != manifest.get(k))
            raise PairSetError(f"{path} disagrees with the rest of the manifest on "
                               f"{', '.join(diff[:3])}: two pair sets in one folder")
        manifest["files"].update(part["files"])
    return manifest


# Settings recorded only by later versions, with the value that sets written before meant.
RECORDED_LATER = {"precision": "float32"}


def header(manifest: dict) -> dict:
    """Everything of a manifest (or part) but the file records: the set's settings and layout
    (settings recorded only later filled in with what they meant before)."""
    return {**RECORDED_LATER, **{k: v for k, v in manifest.items() if k != "files"}}


def write_part(folder: str, head: dict, shard: Shard, records: dict) -> None:
    """Record a finished shard: its manifest part, written once, complete, under its final name."""
    write_json(os.path.join(folder, part_name(shard.name)), {**head, "files": records})


def assemble_manifest(folder: str) -> dict | None:
    """Write manifest.json from the parts if the set is complete and it differs from what is there;
    returns the manifest. Several workers may do so at once: they write the same bytes."""
    manifest = read_manifest(folder)
    if manifest is None or not is_complete(manifest):
        return manifest
    path = os.path.join(folder, MANIFEST)
    current = _read_json(path) if fileio.exists(path) else None
    if current != manifest:
        write_json(path, manifest)
    return manifest


def is_complete(manifest: dict) -> bool:
    files = manifest.get("files", {})
    return all(name in files for s in manifest["shards"]
               for name in shard_files(Shard(**s), manifest["compact"]))


def shard_files(s: Shard, compact: bool) -> list[str]:
    return [s.y_file] if compact else [s.x_file, s.y_file]


def check_file(folder: str, name: str, record: dict | None, full: bool = True) -> str | None:
    """None if the file matches its manifest record; otherwise why not."""
    path = os.path.join(folder, name)
    if record is None:
        return "not recorded as complete"
    if not fileio.exists(path):
        return "missing"
    size = fileio.getsize(path)
    if size != record["bytes"]:
        return f"size {size} != {record['bytes']}"
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
    offsets: dict[str, int] = field(default_factory=dict)  # file name -> where its rows start

    @property
    def n_train(self) -> int:
        return sum(s.count for s in self.train)

    def load(self, shard: Shard) -> tuple[np.ndarray | None, np.ndarray]:
        """(X or None if compact, Y): memory-mapped if local (reading a shard costs what is
        touched), else read whole through gfile."""
        y = load_npy(os.path.join(self.folder, shard.y_file))
        x = None if self.compact else load_npy(os.path.join(self.folder, shard.x_file))
        return x, y

    def x_for(self, shard: Shard, x: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        if x is not None:
            return np.asarray(x[rows], np.float32)
        return example_noise(tf.constant(shard.start + rows), self.seed, shard.stream,
                             self.image_shape).numpy()


def load_npy(path: str) -> np.ndarray:
    """A read-only .npy array: memory-mapped if local, else read whole through gfile (one copy:
    the array is a view of the bytes read)."""
    if fileio.is_local(path):
        return np.load(path, mmap_mode="r")
    data = fileio.read_bytes(path)
    shape, dtype, offset = _npy_header(io.BytesIO(data), path)
    if len(data) != offset + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes, not those of a {dtype}{list(shape)} array")
    return np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)


def _npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if fortran or dtype.hasobject:
        raise ValueError("not a C-ordered numeric array")
    return shape, dtype, f.tell()


def npy_info(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of an .npy file (the size is checked against them)."""
    with fileio.open_read(path) as f:
        shape, dtype, offset = _npy_header(f, path)
    size = fileio.getsize(path)
    if size != offset + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{size} bytes, not those of a {dtype}{list(shape)} array (truncated?)")
    return shape, dtype, offset


def open_pair_set(folder: str, image_shape: tuple[int, int, int], verify: bool = False) -> PairSet:
    """Open a complete pair set for training (ours, with manifest; or the original's, without).
    Shapes and dtypes are always checked; `verify` also checks every checksum."""
    try:
        return _open_pair_set(folder, image_shape, verify)
    except OSError as e:  # a filesystem gfile cannot reach, a file gone while opening
        raise PairSetError(f"pair set {folder}: {e}") from None


def _open_pair_set(folder: str, image_shape: tuple[int, int, int], verify: bool) -> PairSet:
    if not fileio.isdir(folder):
        raise PairSetError(f"no pair set at {folder}")
    manifest = read_manifest(folder)
    if manifest is not None:
        shards = [Shard(**s) for s in manifest["shards"]]
        compact = bool(manifest["compact"])
        files = manifest.get("files", {})
        for s in shards:
            for name in shard_files(s, compact):
                problem = check_file(folder, name, files.get(name), full=verify)
                if problem:
                    raise PairSetError(f"pair set {folder} is incomplete: {name} {problem}")
        seed = manifest["seed"]
    else:  # the original layout: x_train_{k}.npy / y_train_{k}.npy, test shard optional
        names = fileio.listdir(folder)
        ks = sorted(int(m.group(1)) for f in names if (m := re.fullmatch(r"y_train_(\d+)\.npy", f)))
        if not ks:
            raise PairSetError(f"no pair set at {folder} (no manifest.json, no y_train_*.npy)")
        shards, start = [], 0
        if "y_test.npy" in names:
            n = _shape_of(os.path.join(folder, "y_test.npy"))[0]
            shards.append(Shard("test", TEST, 0, n))
        for k in ks:
            n = _shape_of(os.path.join(folder, f"y_train_{k}.npy"))[0]
            shards.append(Shard(f"train_{k}", TRAIN, start, n))
            start += n
        compact, seed = False, None
    offsets = {}
    for s in shards:
        offsets.update(_check_arrays(folder, s, image_shape, compact))
    test = next((s for s in shards if s.stream == TEST), None)
    return PairSet(folder, [s for s in shards if s.stream == TRAIN], test, image_shape, compact, seed,
                   offsets)


def _shape_of(path: str) -> tuple[int, ...]:
    try:
        return npy_info(path)[0]
    except (OSError, ValueError) as e:
        raise PairSetError(f"{path}: unreadable ({e})") from None


def _check_arrays(folder: str, s: Shard, image_shape, compact: bool) -> dict[str, int]:
    """Checks a shard's arrays; returns their header lengths (where the rows start)."""
    want = (s.count, *image_shape)
    checks = [(s.y_file, np.uint8)] + ([] if compact else [(s.x_file, np.float16)])
    offsets = {}
    for name, dtype in checks:
        path = os.path.join(folder, name)
        try:
            shape, got, offsets[name] = npy_info(path)
        except (OSError, ValueError) as e:
            raise PairSetError(f"{path}: unreadable ({e})") from None
        if shape != want or got != dtype:
            raise PairSetError(f"{path}: {got}{list(shape)}, expected "
                               f"{np.dtype(dtype)}{list(want)}")
    return offsets


# -- the training reader: a tf.data graph ----------------------------------------------------------
# The order of an epoch is a pure function of (seed, epoch), the same for any number of workers:
# the train shards in a shuffled order, taken SHARDS_PER_GROUP at a time (a "group"); the
# examples of a group shuffled together; the groups' examples one after the other, cut into
# global batches (a last partial batch is dropped). Worker i of n takes the i-th n-th of every
# global batch. Both shuffles are TensorFlow's stateless_shuffle, keyed by stateless_fold_in of
# (seed, epoch) and of the group, so the whole reader is graph ops: shards are read with
# tf.io.read_file (any tf.io.gfile path), their rows taken after the .npy header by decode_raw.

SHARDS_PER_GROUP = 2
READER_KEY = 0x5EED_DA7A  # keeps the reader's random streams apart from any other use of `seed`


def _fold_in(key: tf.Tensor, data: int | tf.Tensor) -> tf.Tensor:
    # always int64 data: stateless_fold_in hashes an int32 0 and an int64 0 differently
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def epoch_key(seed: int | tf.Tensor, epoch: int | tf.Tensor) -> tf.Tensor:
    """The stateless seed of an epoch's order."""
    return _fold_in(tf.stack([tf.cast(seed, tf.int64), tf.constant(READER_KEY, tf.int64)]), epoch)


def shard_order(key: tf.Tensor, n_shards: int) -> tf.Tensor:
    """The epoch's order of the train shards (indices into PairSet.train)."""
    return tf.random.experimental.stateless_shuffle(tf.range(n_shards, dtype=tf.int64),
                                                    seed=_fold_in(key, 0))


def group_permutation(key: tf.Tensor, group: int | tf.Tensor, n: int | tf.Tensor) -> tf.Tensor:
    """The order of a group's n examples (its shards' rows, one shard after the other)."""
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                    seed=_fold_in(key, tf.cast(group, tf.int64) + 1))


def steps_per_epoch(pairs: PairSet, global_batch: int) -> int:
    return pairs.n_train // global_batch


class PairReader:
    """The stored pairs as tf.data: one host's part of every global batch, as per-replica batches
    (x float16 as stored, or float32 noise for a compact set; y uint8: the training step converts
    them, on the device), from (epoch, step) on, for as long as it is iterated.

    Per group of shards: the files are read and decoded once and this host's rows of the group
    put in epoch order (one copy); its batches are then slices of that, with no copy (a scan
    carries the rows of a batch that a group ends part-way into the next group). One group is
    read while the previous one is served: about three groups' rows in memory."""

    def __init__(self, pairs: PairSet, global_batch: int, seed: int,
                 shards_per_group: int = SHARDS_PER_GROUP):
        self.pairs, self.global_batch, self.seed = pairs, global_batch, seed
        self.k = shards_per_group
        self.n_shards = len(pairs.train)
        self.used = steps_per_epoch(pairs, global_batch) * global_batch  # positions of an epoch
        if self.used == 0:
            raise PairSetError(f"{pairs.n_train} training pairs are fewer than one batch of "
                               f"{global_batch}")
        self.row = int(np.prod(pairs.image_shape))
        folder, train = pairs.folder, pairs.train
        self._y_paths = tf.constant([os.path.join(folder, s.y_file) for s in train])
        self._x_paths = tf.constant([os.path.join(folder, s.x_file) for s in train])
        self._y_offsets = tf.constant([pairs.offsets.get(s.y_file, 0) for s in train], tf.int64)
        self._x_offsets = tf.constant([pairs.offsets.get(s.x_file, 0) for s in train], tf.int64)
        self._counts = tf.constant([s.count for s in train], tf.int64)
        self._starts = tf.constant([s.start for s in train], tf.int64)

    def dataset(self, epoch: int, start_step: int, part: tuple[int, int],
                per_replica: int) -> tf.data.Dataset:
        """Per-replica batches of this host (part = (host, n_hosts)) from step `start_step` of
        `epoch` on, through the following epochs without end. Consecutive elements go to
        consecutive local replicas (what distribute_datasets_from_function does with them)."""
        host, n_hosts = part
        per_host = self.global_batch // n_hosts
        if per_host % per_replica:
            raise ValueError(f"a host's batch {per_host} does not split into replicas of "
                             f"{per_replica}")
        first = tf.constant(epoch, tf.int64)

        def epoch_groups(e):
            start = tf.where(e == first, tf.constant(start_step, tf.int64), 0)
            return self._groups(e, start * self.global_batch, host, per_host)
        # prefetch: the next epoch's first group is read while this epoch's last is used
        groups = tf.data.Dataset.range(epoch, 2 ** 62).flat_map(epoch_groups).prefetch(1)
        x_empty = tf.zeros([0], tf.int64) if self.pairs.compact else tf.zeros([0, self.row],
                                                                              tf.float16)
        carry = (x_empty, tf.zeros([0, self.row], tf.uint8))
        batches = groups.scan(carry, lambda c, g: self._cut(c, g, per_replica))
        batches = batches.flat_map(lambda *g: self._batches(g, per_replica))
        shape = self.pairs.image_shape
        if self.pairs.compact:  # X from the seed: the same noise as generation gave the teacher
            to_pair = lambda key, y: (example_noise(key, self.pairs.seed, TRAIN, shape),
                                      tf.reshape(y, [-1, *shape]))
            return batches.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return batches.map(lambda x, y: (tf.reshape(x, [-1, *shape]), tf.reshape(y, [-1, *shape])))

    def _groups(self, epoch: tf.Tensor, first_position: tf.Tensor, host: int,
                per_host: int) -> tf.data.Dataset:
        """The groups of one epoch from a position on: this host's x rows (or noise keys) and
        y rows of each group, in epoch order."""
        key = epoch_key(self.seed, epoch)
        order = shard_order(key, self.n_shards)
        sizes = tf.math.segment_sum(tf.gather(self._counts, order),
                                    tf.range(self.n_shards, dtype=tf.int64) // self.k)
        ends = tf.cumsum(sizes)
        begin = tf.reduce_sum(tf.cast(ends <= first_position, tf.int64))  # groups already done
        end = tf.reduce_sum(tf.cast(ends - sizes < self.used, tf.int64))  # groups still used

        def group(g):
            shards = self._ids(order[g * self.k:(g + 1) * self.k])
            size, base = sizes[g], ends[g] - sizes[g]
            position = base + tf.range(size)
            mine = ((position >= first_position) & (position < self.used)
                    & ((position % self.global_batch) // per_host == host))
            permutation = group_permutation(key, g, size)
            ys = [self._read(self._y_paths, self._y_offsets, sid, tf.uint8) for sid in shards]
            if self.pairs.compact:  # the examples' noise keys stand in for x
                xs = [tf.gather(self._starts, tf.maximum(sid, 0))
                      + tf.range(tf.shape(y, out_type=tf.int64)[0]) for sid, y in zip(shards, ys)]
            else:
                xs = [self._read(self._x_paths, self._x_offsets, sid, tf.float16) for sid in shards]
            return self._in_order(xs, permutation, mine), self._in_order(ys, permutation, mine)
        # one group read at a time (with the prefetch, the next one is read while this one serves)
        return tf.data.Dataset.range(begin, end).map(group)

    @staticmethod
    def _in_order(parts: list[tf.Tensor], permutation: tf.Tensor, mine: tf.Tensor) -> tf.Tensor:
        """This host's rows of a group (the rows of `parts`, one shard after the other) in epoch
        order. Every row is copied once, straight from its shard to its place: this host's rows
        first, then the other hosts' (sliced off, but in the same buffer: a host holds whole
        groups, as it held whole shards), so no concat of the shards and no second copy."""
        order = tf.concat([tf.boolean_mask(permutation, mine), tf.boolean_mask(permutation, ~mine)], 0)
        places = tf.math.invert_permutation(tf.cast(order, tf.int32))
        where = tf.split(places, [tf.shape(p)[0] for p in parts]) if len(parts) > 1 else [places]
        # indices are a permutation (no duplicates): the parallel kernel's result is deterministic
        merged = tf.raw_ops.ParallelDynamicStitch(indices=where, data=parts)
        return merged[:tf.reduce_sum(tf.cast(mine, tf.int32))]

    def _cut(self, carry, group, per_replica: int):
        """scan step: the group's first batch is the rows carried over from the last group and
        the first rows of this one; the rows that do not fill a batch are carried into the next."""
        carry_x, carry_y = carry
        x, y = group
        k = tf.shape(carry_y, out_type=tf.int64)[0]
        n = (k + tf.shape(y, out_type=tf.int64)[0]) // per_replica  # batches ending in this group
        head = tf.where((k > 0) & (n > 0), per_replica - k, 0)  # rows completing the carried batch
        used = tf.maximum(n * per_replica - k, 0)  # this group's rows in its batches
        keep = tf.where(n > 0, tf.constant(0, tf.int64), k)  # no batch ends here: carry on
        new_carry = (tf.concat([carry_x[:keep], x[used:]], 0),
                     tf.concat([carry_y[:keep], y[used:]], 0))
        first = (tf.concat([carry_x, x[:head]], 0), tf.concat([carry_y, y[:head]], 0))
        return new_carry, (first, x[head:used], y[head:used], tf.cast(head > 0, tf.int64))

    def _batches(self, group, per_replica: int) -> tf.data.Dataset:
        """The group's batches: the completed carried batch, if any, then slices of its rows."""
        first, x, y, has_first = group
        slices = tf.data.Dataset.range(tf.shape(y, out_type=tf.int64)[0] // per_replica).map(
            lambda b: (x[b * per_replica:(b + 1) * per_replica],
                       y[b * per_replica:(b + 1) * per_replica]))
        return tf.data.Dataset.from_tensors(first).take(has_first).concatenate(slices)

    def _ids(self, shards: tf.Tensor) -> list[tf.Tensor]:
        """The group's shard indices, -1 where the last group is short."""
        padded = tf.concat([shards, tf.fill([self.k], tf.constant(-1, tf.int64))], 0)
        return [padded[i] for i in range(self.k)]

    def _read(self, paths: tf.Tensor, offsets: tf.Tensor, sid: tf.Tensor, dtype) -> tf.Tensor:
        """A shard's rows [count, H*W*C] read whole by tf.io.read_file; no rows for sid -1."""
        def read():
            i = tf.maximum(sid, 0)
            raw = tf.io.decode_raw(tf.io.read_file(tf.gather(paths, i)), dtype)
            return tf.reshape(raw[tf.gather(offsets, i) // dtype.size:], [-1, self.row])
        return tf.cond(sid >= 0, read, lambda: tf.zeros([0, self.row], dtype))


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
