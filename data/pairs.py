"""Stage 1: the teacher's (X_T, F_teacher(X_T)) pairs, generated once, reproducibly and resumably.

Each shard is generated in full, written atomically, then recorded (size and sha256) in its own
manifest part (see data/shards.py): workers share nothing but the folder, and take no lock. A run
killed at any moment resumes at the first shard that is not recorded and intact; what it writes is
byte-identical to an uninterrupted run with the same seed. The folder may be on any tf.io.gfile
filesystem.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from data.shards import (FORMAT_VERSION, PairSetError, Shard, assemble_manifest, check_file,
                         header, is_complete, layout, npy_bytes, open_pair_set, read_manifest,
                         save_npy_atomic, shard_files, write_part)
from models.configs import DatasetConfig, SamplerConfig
from models.diffusion import describe_sampler, example_noise, teacher_fn
from models.weights import load_unet
from utils import fileio
from utils.images import make_grid, save_png, to_uint8
from utils.precision import disable_bf16, pairs_precision
from utils.strategy import worker_info


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """What determines the bytes of a pair set; a resumed run must match it exactly."""
    dataset: str
    seed: int
    n_examples: int
    shard_size: int
    n_test: int
    compact: bool
    image_shape: tuple[int, int, int]
    sampler: dict
    teacher_sha256: str | None
    precision: str = "float32"  # the teacher's arithmetic: "float32" or "bfloat16" (--bf16)


def settings_for(cfg: DatasetConfig, *, seed: int, n_examples: int | None = None,
                 shard_size: int | None = None, n_test: int | None = None,
                 compact: bool = False, fewer: bool = False, sampler: SamplerConfig | None = None,
                 teacher_sha256: str | None = None, precision: str = "float32") -> PairSettings:
    """The settings of a pair set: the dataset's, with any of them given here instead."""
    p, net = cfg.pairs, cfg.network
    if n_examples is None:
        n_examples = p.n_examples_fewer if fewer and p.n_examples_fewer else p.n_examples
    return PairSettings(cfg.name, seed, n_examples, shard_size or p.shard_size,
                        p.n_test if n_test is None else n_test, compact,
                        net.image_shape,
                        dataclasses.asdict(sampler or cfg.sampler), teacher_sha256, precision)


def bytes_needed(s: PairSettings, shards: list[Shard]) -> int:
    per = [npy_bytes((sh.count, *s.image_shape), np.uint8) +
           (0 if s.compact else npy_bytes((sh.count, *s.image_shape), np.float16)) for sh in shards]
    return sum(per)


def make_teacher_fn(teacher: Callable, sampler: SamplerConfig, strategy: tf.distribute.Strategy,
                    xla: bool) -> Callable[[np.ndarray], np.ndarray]:
    """X_T [B, H, W, C] -> the teacher solver's output in [-1, 1] (unclipped), the batch split
    over the replicas of this worker. One compiled while-loop per replica."""
    local = strategy.extended.worker_devices
    # XLA inside strategy.run with mirrored variables fails ("variable on a different device");
    # compile only where one replica runs per worker (TPUs compile anyway).
    sample = teacher_fn(teacher, sampler, xla and len(local) == 1)

    @tf.function
    def distributed(x):
        return strategy.run(sample, args=(x,))

    first_id = _first_local_replica_id(strategy)

    def run(x: np.ndarray) -> np.ndarray:
        n = len(x)
        pad = -n % len(local)  # a short last batch is padded to split evenly, then trimmed
        parts = np.split(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]), len(local))
        value = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group - first_id]))
        out = strategy.experimental_local_results(distributed(value))
        return np.concatenate([o.numpy() for o in out])[:n]
    return run


def _first_local_replica_id(strategy: tf.distribute.Strategy) -> int:
    """Global id of this worker's first replica (replica ids are global under multi-worker)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return strategy.cluster_resolver.task_id * len(strategy.extended.worker_devices)
    return 0


@dataclasses.dataclass(frozen=True)
class Generation:
    """How stage 1 runs (none of it changes the pairs' bytes but the precision)."""
    gen_batch: int
    xla: bool = True
    bf16: bool = False
    raw_teacher: bool = False
    progress: bool = True
    no_generate: bool = False
    check_sampler: bool = False  # a sampler asked for: an existing set must have been made with it


def ensure_pairs(folder: str, cfg: DatasetConfig, settings: PairSettings, teacher_path: str,
                 strategy: tf.distribute.Strategy, run: Generation) -> str:
    """Make sure the pair set in `folder` is complete, generating what is missing with the
    teacher at `teacher_path` (settings.teacher_sha256 and precision are filled in here); a set
    of the original's layout (no manifest) is used as it is. Returns the folder."""
    manifest = read_manifest(folder) if fileio.isdir(folder) else None
    original = (manifest is None and fileio.isdir(folder)
                and any(f.startswith("y_train_") for f in fileio.listdir(folder)))
    if run.no_generate or original:
        open_pair_set(folder, cfg.network.image_shape)  # complete, or a one-line error
        if run.check_sampler and manifest is not None:
            _check_same_settings(folder, {"sampler": header(manifest)["sampler"]},
                                 {"sampler": settings.sampler})
        return folder
    complete = manifest is not None and is_complete(manifest)
    precision, dtype, xla = pairs_precision(run.bf16, header(manifest)["precision"] if complete
                                            else None, run.xla)
    with strategy.scope():
        teacher, weights = load_unet(teacher_path, cfg, ema=not run.raw_teacher, compute_dtype=dtype)
    sampler = SamplerConfig(**settings.sampler)
    print(f"teacher: {weights.describe()}\nsampler: {describe_sampler(sampler)}")
    settings = dataclasses.replace(settings, teacher_sha256=weights.sha256, precision=precision)
    preview_path = os.path.join(folder, "preview.png")

    def preview(images):
        if not fileio.exists(preview_path):
            save_png(preview_path, make_grid(to_uint8(images[:64])))
    worker = worker_info()
    try:
        generate_pairs(folder, settings, make_teacher_fn(teacher, sampler, strategy, xla),
                       run.gen_batch, worker=worker, progress=run.progress, preview=preview)
    finally:
        if run.bf16:  # the student trains by its compute dtype, never by the CPU's graph rewrite
            disable_bf16()
    if worker[1] > 1:
        wait_until_complete(folder)
    return folder


def my_shards(shards: list[Shard], worker: tuple[int, int]) -> list[Shard]:
    """Shards this worker writes: disjoint across the workers of a job."""
    index, count = worker
    return [s for i, s in enumerate(shards) if i % count == index]


def generate_pairs(folder: str, s: PairSettings, teacher_fn: Callable[[np.ndarray], np.ndarray],
                   gen_batch: int, worker: tuple[int, int] = (0, 1), progress: bool = True,
                   preview: Callable[[np.ndarray], None] | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Generate whatever this worker's part of the pair set lacks; returns the manifest as this
    worker sees it when done (complete once every worker is done)."""
    fileio.makedirs(folder)
    settings = dataclasses.asdict(s)
    shards = layout(s.n_examples, s.shard_size, s.n_test)
    manifest = read_manifest(folder)
    if manifest:
        _check_same_settings(folder, manifest, settings)
    head = dict(format_version=FORMAT_VERSION, **settings,
                shards=[dataclasses.asdict(sh) for sh in shards], x_dtype="float16", y_dtype="uint8")
    head = json.loads(json.dumps(head))  # as read back (tuples become lists)
    recorded = manifest["files"] if manifest else {}
    todo = []
    for sh in my_shards(shards, worker):
        names = shard_files(sh, s.compact)
        problems = {n: check_file(folder, n, recorded.get(n)) for n in names}
        bad = {n: p for n, p in problems.items() if p}
        if bad:
            if any(p not in ("not recorded as complete", "missing") for p in bad.values()):
                log(f"regenerating {sh.name}: " + ", ".join(f"{n} {p}" for n, p in bad.items()))
            todo.append(sh)
    if fileio.is_local(folder):  # an object store has no free-space figure to check
        need, free = bytes_needed(s, todo), shutil.disk_usage(folder).free
        if need > free:
            raise PairSetError(f"not enough disk space in {folder}: the pairs need {need:,} bytes, "
                               f"{free:,} are free")
    bar = tqdm(total=sum(sh.count for sh in todo), unit="pair", disable=not progress or not todo,
               desc=f"pairs ({s.dataset})", smoothing=0.1)
    for sh in todo:
        x, y = _generate_shard(sh, s, teacher_fn, gen_batch, bar, preview)
        preview = None  # only the first batch of a run
        records = {sh.y_file: save_npy_atomic(os.path.join(folder, sh.y_file), y)}
        if not s.compact:
            records[sh.x_file] = save_npy_atomic(os.path.join(folder, sh.x_file),
                                                 x.astype(np.float16))
        write_part(folder, head, sh, records)  # the shard is done once this exists
    bar.close()
    return assemble_manifest(folder)


def wait_until_complete(folder: str, poll_s: float = 5.0,
                        log: Callable[[str], None] = print) -> dict:
    """Block until every worker's shards are recorded (a worker that finished its own share
    must not open the set for training while another still writes), then assemble manifest.json."""
    manifest, said = assemble_manifest(folder), False
    while manifest is None or not is_complete(manifest):
        if not said:
            log(f"pairs: this worker's shards are done; waiting for the other workers' in {folder}")
            said = True
        time.sleep(poll_s)
        manifest = assemble_manifest(folder)
    return manifest


def _generate_shard(sh: Shard, s: PairSettings, teacher_fn, gen_batch: int, bar, preview):
    x = np.empty((sh.count, *s.image_shape), np.float32)
    y = np.empty((sh.count, *s.image_shape), np.uint8)
    for start in range(0, sh.count, gen_batch):
        idx = np.arange(sh.start + start, sh.start + min(start + gen_batch, sh.count))
        xb = example_noise(tf.constant(idx), s.seed, sh.stream, s.image_shape).numpy()
        out = teacher_fn(xb)
        if preview is not None:
            preview(out)
            preview = None
        x[start:start + len(idx)] = xb
        y[start:start + len(idx)] = to_uint8(out)  # rounded; the original truncated
        bar.update(len(idx))
    return x, y


def _check_same_settings(folder: str, manifest: dict, settings: dict) -> None:
    def norm(v):  # JSON turns tuples into lists
        return list(v) if isinstance(v, tuple) else v

    def words(k, v):  # the sampler in words: "DDIM, 50 quadratic steps (...)"
        if k == "sampler" and isinstance(v, dict):
            try:
                return describe_sampler(SamplerConfig(**v))
            except (TypeError, ValueError):
                pass
        return repr(v)
    there = header(manifest)  # settings recorded only later filled in
    diff = [k for k, v in settings.items() if norm(there.get(k)) != norm(v)]
    if diff:
        shown = ", ".join(f"{k}: {words(k, there.get(k))} there, {words(k, settings[k])} now"
                          for k in diff[:3])
        raise PairSetError(f"{folder} holds pairs made with other settings ({shown}); "
                           f"use another --datadir or the same settings")
