"""The original repository's Keras 2 .h5 files (teachers model_tf2_*.h5, students
*_ema_model.h5), whose weights are matched by creation order."""
from __future__ import annotations

import os

import numpy as np

from models.configs import DatasetConfig
from models.formats.base import ORIGINAL_GN_EPS, Weights, WeightsError, cause
from models.unet import UNet, official_variables
from utils.fileio import sha256_file


def original_h5_order(names: list[str], family: str) -> list[str]:
    """The order in which the original's Keras models created their weights.

    DDPM-derived models (cifar10, lsun) created their layers in the sorted order of the TF1 scopes;
    DDIM-derived ones (celeba) in PyTorch state_dict order (per level: blocks, then attentions, then
    the resampling conv). Within a layer the order is kernel, bias or gamma, beta.
    """
    by_scope: dict[str, list[str]] = {}
    for n in names:
        by_scope.setdefault(n.rsplit("/", 1)[0], []).append(n)
    if family == "ddpm":
        scopes = sorted(by_scope)
    elif family == "ddim":
        # Levels as registered in the DDIM Model: temb, conv_in, down.0.., mid, up.0.. (its `up`
        # list is built by insert(0, ...), so index order), norm_out, conv_out.
        rank = {"block": 0, "attn": 1, "downsample": 2, "upsample": 2}
        level_pos: dict[str, int] = {}
        for s in by_scope:
            level = s.split("/")[0]
            level_pos.setdefault("up_" if level.startswith("up_") else level, len(level_pos))

        def key(item):
            pos, s = item
            parts = s.split("/")
            if parts[0].startswith(("down_", "up_")):
                head, idx = parts[0].split("_")
                return level_pos[head + "_" if head == "up" else parts[0]], int(idx), \
                    rank[parts[1].split("_")[0]], pos
            return level_pos[parts[0]], 0, 0, pos
        scopes = [s for _, s in sorted(enumerate(by_scope), key=key)]
    else:
        raise ValueError(f"unknown family {family!r}")
    leaf_order = {"W": 0, "b": 1, "gamma": 0, "beta": 1}
    return [n for s in scopes for n in sorted(by_scope[s], key=lambda n: leaf_order[n.rsplit("/", 1)[1]])]


_H5_SUFFIX = {"kernel": ("W",), "bias": ("b",), "gamma": ("gamma",), "beta": ("beta",)}


def read_original_h5(path: str, cfg: DatasetConfig) -> Weights:
    """Keras 2 save_weights files (teachers `model_tf2_*.h5`, students `*_ema_model.h5`): weights are
    matched by position (as Keras 2 did), and every shape and kind (kernel/bias/gamma/beta) is checked."""
    try:
        import h5py
    except ImportError:
        raise WeightsError("reading .h5 files needs h5py: pip install h5py") from None
    try:
        with h5py.File(path, "r") as f:
            stored = [(name, np.asarray(f[g][name], np.float32))
                      for g in _attr_strings(f.attrs, "layer_names")
                      for name in _attr_strings(f[g].attrs, "weight_names")]
    except OSError as e:
        raise WeightsError(f"{path}: unreadable Keras h5 file ({cause(e)})") from None
    except KeyError:
        raise WeightsError(f"{path}: not a Keras save_weights file (no layer list)") from None
    expected = {k: tuple(v.shape) for k, v in official_variables(UNet(cfg.network)).items()}
    order = original_h5_order(list(expected), cfg.family)
    if len(stored) != len(order):
        raise WeightsError(f"{path}: {len(stored)} weights, but the {cfg.name} network has "
                           f"{len(order)}; is this a file for another dataset?")
    params = {}
    for (h5_name, value), name in zip(stored, order):
        kind = h5_name.rsplit("/", 1)[-1].split(":")[0]
        if name.rsplit("/", 1)[1] not in _H5_SUFFIX.get(kind, ()) or value.shape != expected[name]:
            raise WeightsError(f"{path}: weight {h5_name} {value.shape} does not fit {name} "
                               f"{expected[name]} of the {cfg.name} network")
        params[name] = value
    return Weights(params, ORIGINAL_GN_EPS, path, "original_h5", sha256=sha256_file(path))


def _attr_strings(attrs, key: str) -> list[str]:
    """A Keras 2 string-list attribute, joined from `key0`, `key1`, ... when it was split."""
    if key in attrs:
        chunks = [attrs[key]]
    else:
        chunks, i = [], 0
        while f"{key}{i}" in attrs:
            chunks.append(attrs[f"{key}{i}"])
            i += 1
        if not chunks:
            raise KeyError(f"no attribute {key!r}")
    return [s.decode("utf8") if isinstance(s, bytes) else str(s) for c in chunks for s in c]


# -- the registry's interface (models/formats/__init__.py) ----------------------------------------
NAME = "original_h5"


def recognise(path: str) -> bool:
    return path.endswith(".h5")  # read() says if it is missing, or needs h5py


def read(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    return read_original_h5(path, cfg)


def locate(folder: str, cfg: DatasetConfig, role: str) -> list[str]:
    """The original release's names: {dataset}_ema_model.h5 (students), model_tf2_{dataset}.h5
    (teachers)."""
    if role == "teacher":
        return [os.path.join(folder, f"model_tf2_{cfg.name}.h5")]
    return [folder, os.path.join(folder, f"{cfg.name}_ema_model.h5")]
