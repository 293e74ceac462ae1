"""Independent reference for the training reader's order (README, "The pair-set format"), written
from its definition with NumPy and TensorFlow's two stateless primitives, importing nothing of
the reader:

    key(e)        = stateless_fold_in([seed, 0x5EED_DA7A], e)
    shard order   = stateless_shuffle(range(S), seed=stateless_fold_in(key(e), 0))
    groups        = that order, 2 shards at a time; a group's examples are its shards' rows one
                    shard after the other, shuffled by stateless_shuffle(range(m),
                    seed=stateless_fold_in(key(e), g + 1))
    epoch         = the groups' examples one after the other, cut into global batches (the last
                    partial batch dropped); worker w of n takes the w-th n-th of each batch.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

GROUP = 2


def _fold(seed: tf.Tensor, data: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, tf.constant(data, tf.int64))


def _shuffle(n: int, seed: tf.Tensor) -> np.ndarray:
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=seed).numpy()


def epoch_examples(counts: list[int], seed: int, epoch: int) -> list[tuple[int, int]]:
    """(shard index, row) of every example of an epoch, in order (before batching)."""
    key = _fold(tf.constant([seed, 0x5EED_DA7A], tf.int64), epoch)
    order = _shuffle(len(counts), _fold(key, 0))
    out = []
    for g in range(0, len(order), GROUP):
        members = [(int(s), r) for s in order[g:g + GROUP] for r in range(counts[s])]
        perm = _shuffle(len(members), _fold(key, g // GROUP + 1))
        out += [members[i] for i in perm]
    return out


def expected_batches(shard_arrays: list[tuple[np.ndarray, np.ndarray]], seed: int, epoch: int,
                     global_batch: int, worker: int = 0, n_workers: int = 1
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Worker `worker`'s (x float32, y uint8) part of each global batch of the epoch, from the
    shards' arrays [(x, y), ...] in the set's order."""
    examples = epoch_examples([len(y) for _, y in shard_arrays], seed, epoch)
    steps = len(examples) // global_batch
    per = global_batch // n_workers
    out = []
    for s in range(steps):
        picked = examples[s * global_batch + worker * per:s * global_batch + (worker + 1) * per]
        out.append((np.stack([shard_arrays[k][0][r] for k, r in picked]).astype(np.float32),
                    np.stack([shard_arrays[k][1][r] for k, r in picked])))
    return out
