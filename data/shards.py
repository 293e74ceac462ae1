"""The on-disk pair format, written once: files, manifest, checks, and opening a set to read.

A pair set is a folder laid out as the original code wrote it, plus a manifest:

    x_test.npy  y_test.npy  x_train_0.npy  y_train_0.npy  ...  manifest.json

X (the teacher's input noise) is float16 [N, H, W, C]; Y (the teacher's output image) is uint8,
rounded from [-1, 1]. The noise of example i is a pure function of (seed, stream, i) through a
counter-based generator (stream 0: train, 1: test), so any shard can be regenerated bit for bit and a
"compact" set can omit X entirely and recompute it when reading. Sets written by the original code
(no manifest) are read too.

The folder may be on any tf.io.gfile filesystem (`gs://...`, `ram://...`). The training reader is
data/reader.py; the held-out pairs are memory-mapped here where the folder is local.

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

from models.diffusion import example_noise
from utils import fileio
from utils.errors import UserError
from utils.fileio import atomic_write, sha256_file, write_json

MANIFEST = "manifest.json"
_PART = re.compile(r"manifest\.((?:test|train_\d+))\.json")  # a shard's manifest part
FORMAT_VERSION = 1
TRAIN, TEST = 0, 1  # noise streams


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


# -- values ----------------------------------------------------------------------------------------

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
    return fileio.read_json(path, error=PairSetError, what="manifest")


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
SAMPLER_RECORDED_LATER = {"solver": "ddim"}


def header(manifest: dict) -> dict:
    """Everything of a manifest (or part) but the file records: the set's settings and layout
    (settings recorded only later filled in with what they meant before)."""
    head = {**RECORDED_LATER, **{k: v for k, v in manifest.items() if k != "files"}}
    if isinstance(head.get("sampler"), dict):
        head["sampler"] = {**SAMPLER_RECORDED_LATER, **head["sampler"]}
    return head


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
