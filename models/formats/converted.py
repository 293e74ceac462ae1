"""Our own format: a tf.train.Checkpoint keyed by official names plus weights.json (provenance,
GroupNorm epsilon and the network)."""
from __future__ import annotations

import os
from dataclasses import asdict

import tensorflow as tf

from models.configs import DatasetConfig, NetworkConfig
from models.formats.base import META_FILE, Weights, WeightsError, cause
from models.unet import UNet, official_variables
from utils import fileio
from utils.fileio import atomic_dir, write_json

CKPT_PREFIX = "weights"
FORMAT_VERSION = 1


def variables_checkpoint(model: UNet) -> tf.train.Checkpoint:
    """A checkpoint object keyed by official names, so files are readable without our classes."""
    return tf.train.Checkpoint(**official_variables(model))


def save_converted(model: UNet, out_dir: str, meta: dict, replace: bool = False) -> str:
    """Write `model` and its provenance to out_dir in our format (checkpoint + weights.json).

    Everything is written to a temporary sibling folder first and renamed into place, so out_dir is
    always complete. An existing out_dir is an error unless `replace` (then it is swapped out).
    On a `scheme://` filesystem (no atomic folder rename) weights.json is the seal instead: it is
    removed first and written last, so a folder without it holds no weights yet.
    """
    if fileio.exists(out_dir) and not replace and fileio.listdir(out_dir):
        raise WeightsError(f"{out_dir} already holds files; choose another directory")
    record = {"format_version": FORMAT_VERSION, "gn_eps": model.cfg.gn_eps,
              "network": asdict(model.cfg), **meta}
    if not fileio.is_local(out_dir):
        meta_path = os.path.join(out_dir, META_FILE)
        if fileio.exists(meta_path):
            fileio.remove(meta_path)
        fileio.rmtree(out_dir)
        variables_checkpoint(model).write(os.path.join(out_dir, CKPT_PREFIX))
        write_json(meta_path, record)
        return out_dir
    with atomic_dir(out_dir, replace=True) as tmp:
        variables_checkpoint(model).write(os.path.join(tmp, CKPT_PREFIX))
        write_json(os.path.join(tmp, META_FILE), record)
    return out_dir


def read_converted(out_dir: str) -> Weights:
    try:
        meta = fileio.read_json(os.path.join(out_dir, META_FILE))
        # the reader by prefix: load_checkpoint asks isdir() first, which ram:// answers yes
        # for any prefix of a file name
        reader = tf.compat.v1.train.NewCheckpointReader(os.path.join(out_dir, CKPT_PREFIX))
        keys = [k for k in reader.get_variable_to_shape_map() if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
        params = {k.split("/.ATTRIBUTES")[0].replace(".S", "/"): reader.get_tensor(k) for k in keys}
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise WeightsError(f"{out_dir}: unreadable converted checkpoint ({cause(e)})") from None
    return Weights(params, float(meta["gn_eps"]), meta.get("source", out_dir), "converted",
                   ema=meta.get("ema"), step=meta.get("step"), dataset=meta.get("dataset"),
                   sha256=meta.get("sha256"), command=meta.get("command"),
                   network=network_of(meta, out_dir))


def network_of(meta: dict, out_dir: str) -> NetworkConfig | None:
    """The network recorded in weights.json (None in files older than the record)."""
    if "network" not in meta:
        return None
    try:
        net = dict(meta["network"])
        net["ch_mult"], net["attn_resolutions"] = (tuple(net[k]) for k in ("ch_mult", "attn_resolutions"))
        return NetworkConfig(**net)
    except (TypeError, KeyError) as e:
        raise WeightsError(f"{out_dir}: {META_FILE} records an unknown network ({e})") from None


# -- the registry's interface (models/formats/__init__.py) ----------------------------------------
NAME = "converted"


def recognise(path: str) -> bool:
    return fileio.isdir(path) and fileio.exists(os.path.join(path, META_FILE))


def read(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    return read_converted(path)


def locate(folder: str, cfg: DatasetConfig, role: str) -> list[str]:
    """A training run's best/ (else last/), a converted folder, or one named after the dataset."""
    if role == "teacher":
        return [os.path.join(folder, cfg.name)]
    return [folder] + [os.path.join(folder, d) for d in ("best", "last", cfg.name)]


def write(folder: str, model: UNet, meta: dict, replace: bool = False) -> list[str]:
    save_converted(model, folder, meta, replace=replace)
    return sorted(fileio.listdir(folder))
