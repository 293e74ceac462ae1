"""The official DDPM TF1 checkpoints (hojonathanho/diffusion): variables under `model/`, EMA
shadows under `.../ExponentialMovingAverage`."""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import tensorflow as tf

from models.configs import DatasetConfig
from models.formats.base import OFFICIAL_GN_EPS, Weights, WeightsError, cause
from utils import fileio
from utils.fileio import sha256_file


def tf1_prefix_in(folder: str) -> str | None:
    """The one TF checkpoint in `folder` (its prefix), found from the `*.index` files present.

    The folder's `checkpoint` index file is not consulted: the official release's name the authors'
    own absolute paths, and a copied folder's would point back at the original.
    """
    prefixes = sorted(f[:-len(".index")] for f in fileio.listdir(folder) if f.endswith(".index"))
    if len(prefixes) > 1:
        raise WeightsError(f"{folder} holds {len(prefixes)} checkpoints ({', '.join(prefixes)}); "
                           f"pass one, e.g. {os.path.join(folder, prefixes[-1])}")
    return os.path.join(folder, prefixes[0]) if prefixes else None


_EMA_SUFFIX = "/ExponentialMovingAverage"
_TF1_SLOTS = re.compile(r"/(Adam|Adam_1|RMSProp|RMSProp_1|Momentum)$")


def read_ddpm_tf1(path: str, ema: bool = True) -> Weights:
    """Variables under `model/`, by name; EMA shadows (`.../ExponentialMovingAverage`) by default."""
    prefix = tf1_prefix_in(path) if fileio.isdir(path) else path
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable TF checkpoint ({cause(e)})") from None
    raw = sorted(n for n in shapes if n.startswith("model/") and not n.endswith(_EMA_SUFFIX)
                 and not _TF1_SLOTS.search(n))
    if not raw:
        raise WeightsError(f"{path}: no variables under model/ (not an official DDPM checkpoint)")
    if ema:
        missing = [n for n in raw if n + _EMA_SUFFIX not in shapes]
        if missing:
            raise WeightsError(f"{path}: no EMA shadow for {len(missing)} variables, e.g. "
                               f"{missing[0]}; use the raw weights explicitly (--raw) if intended")
    used = {n: n + _EMA_SUFFIX if ema else n for n in raw}
    try:
        params = {n[len("model/"):]: np.asarray(reader.get_tensor(key), np.float32)
                  for n, key in used.items()}
        step = int(reader.get_tensor("global_step")) if "global_step" in shapes else None
    except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: truncated data file
        raise WeightsError(f"{path}: unreadable TF checkpoint ({cause(e)})") from None
    ignored = sorted(set(shapes) - set(used.values()))
    return Weights(params, OFFICIAL_GN_EPS, prefix, "ddpm_tf1", ema=ema, step=step,
                   sha256=_checkpoint_sha256(prefix), ignored=ignored)


def _checkpoint_sha256(prefix: str) -> str:
    """sha256 over the checkpoint's files (index, then data shards) in name order."""
    folder, base = os.path.split(prefix)
    files = sorted(f for f in fileio.listdir(folder or ".") if f.startswith(base + "."))
    h = hashlib.sha256()
    for name in files:
        h.update(sha256_file(os.path.join(folder, name)).encode())
    return h.hexdigest()


# -- the registry's interface (models/formats/__init__.py) ----------------------------------------
NAME = "ddpm_tf1"


def recognise(path: str) -> bool:
    if fileio.isdir(path):
        return tf1_prefix_in(path) is not None
    return fileio.exists(path + ".index")


def read(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    return read_ddpm_tf1(path, ema=ema)


def locate(folder: str, cfg: DatasetConfig, role: str) -> list[str]:
    return []  # the official release's layout (DatasetConfig.teacher_file): weights.find_teacher
