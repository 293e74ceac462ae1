"""The training reader: the stored pairs as a tf.data graph (data/shards.py is the format).

The order of an epoch is a pure function of (seed, epoch), the same for any number of workers:
the train shards in a shuffled order, taken SHARDS_PER_GROUP at a time (a "group"); the
examples of a group shuffled together; the groups' examples one after the other, cut into
global batches (a last partial batch is dropped). Worker i of n takes the i-th n-th of every
global batch. Both shuffles are TensorFlow's stateless_shuffle, keyed by stateless_fold_in of
(seed, epoch) and of the group, so the whole reader is graph ops: shards are read with
tf.io.read_file (any tf.io.gfile path), their rows taken after the .npy header by decode_raw.
A host reads a group of shards at a time while the previous one is served: it holds the group
served and the one prefetched, and while a group is read also its file bytes and their decoded copy
(tests/test_reader_memory.py measures a peak of 4-7 groups, never the whole set).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from data.shards import TRAIN, PairSet, PairSetError
from models.diffusion import example_noise

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
    """Full global batches in an epoch (a last partial batch is dropped); at least one."""
    n = pairs.n_train // global_batch
    if n == 0:
        raise PairSetError(f"{pairs.n_train} training pairs are fewer than one batch of "
                           f"{global_batch}")
    return n


class PairReader:
    """The stored pairs as tf.data: one host's part of every global batch, as per-replica batches
    (x float16 as stored, or float32 noise for a compact set; y uint8: the training step converts
    them, on the device), from (epoch, step) on, for as long as it is iterated.

    Per group of shards: the files are read and decoded once and this host's rows of the group
    put in epoch order (one copy); its batches are then slices of that, with no copy (a scan
    carries the rows of a batch that a group ends part-way into the next group). One group is
    read while the previous one is served: a peak of about 4-7 groups' bytes in memory (the group
    served, the one prefetched, and a group's file bytes and decoded copy while it is read)."""

    def __init__(self, pairs: PairSet, global_batch: int, seed: int,
                 shards_per_group: int = SHARDS_PER_GROUP):
        self.pairs, self.global_batch, self.seed = pairs, global_batch, seed
        self.k = shards_per_group
        self.n_shards = len(pairs.train)
        self.used = steps_per_epoch(pairs, global_batch) * global_batch  # positions of an epoch
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
