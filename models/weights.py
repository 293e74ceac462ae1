"""Weight import: official DDPM TF1 checkpoints, the DDIM CelebA .pth, the original repo's Keras h5
files, and our own converted checkpoints, all mapped onto the official DDPM variable names.

Every reader returns a `Weights` (official name -> array in the official layout, plus where it came
from and the GroupNorm epsilon the weights were trained with); `assign` puts them into a UNet and
refuses anything but an exact match.

    python -m models.convert --dataset cifar10 diffusion_cifar10_model/model.ckpt-790000 ./teachers/cifar10
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import tensorflow as tf

from utils import fileio
from utils.errors import UserError
from utils.fileio import atomic_dir, sha256_file, write_json
from models.configs import DatasetConfig
from models.unet import UNet, official_variables

OFFICIAL_GN_EPS = 1e-6  # tf.contrib group_norm (DDPM) and torch GroupNorm(eps=1e-6) (DDIM)
ORIGINAL_GN_EPS = 1e-3  # tensorflow-addons' default, used by the original repo's teachers and students
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")  # shipped weights
META_FILE = "weights.json"  # our converted checkpoint: this file + tf.train.Checkpoint prefix "weights"
CKPT_PREFIX = "weights"
FORMAT_VERSION = 1


class WeightsError(UserError, ValueError):
    """A weight file that cannot be used as asked: missing, corrupt, or for another network."""


@dataclass
class Weights:
    params: dict[str, np.ndarray]
    gn_eps: float
    source: str
    format: str  # "ddpm_tf1" | "ddim_pth" | "original_h5" | "converted"
    ema: bool | None = None
    step: int | None = None
    dataset: str | None = None
    sha256: str | None = None
    ignored: list[str] = field(default_factory=list)
    command: str | None = None  # the command that made them (ours), SAVEDIR left symbolic

    def describe(self) -> str:
        ema = {True: "EMA", False: "raw", None: "as stored"}[self.ema]
        step = f", step {self.step:,}" if self.step is not None else ""
        made = f", made by `{self.command}`" if self.command else ""
        return (f"{self.source} ({self.format}, {ema} weights{step}{made}; {len(self.params)} "
                f"tensors, GroupNorm eps {self.gn_eps:g}; ignored {len(self.ignored)} other entries)")


# -- format detection ----------------------------------------------------------------------------

def detect_format(path: str) -> str:
    if fileio.isdir(path):
        if fileio.exists(os.path.join(path, META_FILE)):
            return "converted"
        if tf1_prefix_in(path):
            return "ddpm_tf1"
        raise WeightsError(f"{path}: no weights here (expected {META_FILE}, a TF checkpoint, "
                           f"a .h5 or a .pth file)")
    if path.endswith(".h5"):
        return "original_h5"
    if path.endswith((".pth", ".pt")):
        return "ddim_pth"
    if fileio.exists(path + ".index"):
        return "ddpm_tf1"
    raise WeightsError(f"{path}: not found (or not a known weight format)")


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


def read_weights(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    """Read any supported file into official names. `ema` picks EMA vs raw weights where a file has both."""
    fmt = detect_format(path)
    if fmt == "converted":
        return read_converted(path)
    if fmt == "original_h5":
        return read_original_h5(path, cfg)
    if fmt == "ddim_pth":
        return read_ddim_pth(path, ema=ema)
    return read_ddpm_tf1(path, ema=ema)


# -- official DDPM TF1 checkpoint ----------------------------------------------------------------

_EMA_SUFFIX = "/ExponentialMovingAverage"
_TF1_SLOTS = re.compile(r"/(Adam|Adam_1|RMSProp|RMSProp_1|Momentum)$")


def read_ddpm_tf1(path: str, ema: bool = True) -> Weights:
    """Variables under `model/`, by name; EMA shadows (`.../ExponentialMovingAverage`) by default."""
    prefix = tf1_prefix_in(path) if fileio.isdir(path) else path
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable TF checkpoint ({_cause(e)})") from None
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
        raise WeightsError(f"{path}: unreadable TF checkpoint ({_cause(e)})") from None
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


# -- DDIM CelebA PyTorch checkpoint ----------------------------------------------------------------

def read_ddim_pth(path: str, ema: bool = True) -> Weights:
    """ckpt.pth = [model state_dict ('module.'-prefixed), optimizer, epoch, step, ema state_dict]."""
    try:
        import torch
    except ImportError:
        raise WeightsError("reading a DDIM .pth needs PyTorch (CPU is enough): "
                           "pip install torch") from None
    try:
        with warnings.catch_warnings():  # e.g. its note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            states = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except Exception as e:  # torch raises many types for truncated/corrupt archives
        raise WeightsError(f"{path}: unreadable PyTorch checkpoint ({_cause(e)})") from None
    if isinstance(states, dict):  # a bare state_dict
        states = [states]
    if not isinstance(states, (list, tuple)) or not isinstance(states[0], dict):
        raise WeightsError(f"{path}: not a DDIM checkpoint (expected a list of state_dicts)")
    if ema and len(states) < 5:
        raise WeightsError(f"{path}: no EMA state in this checkpoint; use --raw for the raw weights")
    state = states[-1] if ema else states[0]
    params, ignored = {}, []
    for key, tensor in state.items():
        name = ddim_to_official_name(key.removeprefix("module."))
        if name is None:
            ignored.append(key)
            continue
        params[name] = _torch_to_official_layout(name, tensor.detach().cpu().numpy())
    step = int(states[3]) if len(states) > 3 and isinstance(states[3], (int, np.integer)) else None
    return Weights(params, OFFICIAL_GN_EPS, path, "ddim_pth", ema=ema, step=step,
                   sha256=sha256_file(path), ignored=ignored)


def ddim_to_official_name(key: str) -> str | None:
    """`down.1.attn.0.q.weight` -> `down_1/attn_0/q/W`; None for entries that are not weights."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    out, i = [], 0
    body = parts[:-1]
    while i < len(body):
        p = body[i]
        if p in ("down", "up", "block", "attn") and i + 1 < len(body) and body[i + 1].isdigit():
            out.append(f"{p}_{body[i + 1]}")
            i += 2
        elif p == "temb" and body[i + 1:i + 2] == ["dense"]:
            out.append(f"temb/dense{body[i + 2]}")
            i += 3
            continue
        else:
            out.append(p)
            i += 1
    scope = "/".join(out)
    is_norm = re.search(r"(^|/)norm(1|2|_out)?$", scope) is not None
    leaf = {"weight": "gamma" if is_norm else "W", "bias": "beta" if is_norm else "b"}[parts[-1]]
    return f"{scope}/{leaf}"


def _torch_to_official_layout(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if a.ndim == 4 and a.shape[2:] == (1, 1) and re.search(r"/(q|k|v|proj_out|nin_shortcut)/W$", name):
        return np.ascontiguousarray(a[:, :, 0, 0].T)  # 1x1 conv [out, in, 1, 1] -> nin [in, out]
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)  # Linear [out, in] -> [in, out]
    return a


# -- the original repository's Keras 2 h5 files ----------------------------------------------------

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
        raise WeightsError(f"{path}: unreadable Keras h5 file ({_cause(e)})") from None
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


# -- our converted checkpoints ---------------------------------------------------------------------

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
        raise WeightsError(f"{out_dir}: unreadable converted checkpoint ({_cause(e)})") from None
    return Weights(params, float(meta["gn_eps"]), meta.get("source", out_dir), "converted",
                   ema=meta.get("ema"), step=meta.get("step"), dataset=meta.get("dataset"),
                   sha256=meta.get("sha256"), command=meta.get("command"))


# -- putting weights into a network ----------------------------------------------------------------

def assign(model: UNet, weights: Weights) -> None:
    """Copy every tensor into `model`; any missing, unused or mis-shaped tensor is an error."""
    ours = official_variables(model)
    missing = [n for n in ours if n not in weights.params]
    unused = [n for n in weights.params if n not in ours]
    wrong = [f"{n} {tuple(weights.params[n].shape)} vs {tuple(v.shape)}" for n, v in ours.items()
             if n in weights.params and tuple(weights.params[n].shape) != tuple(v.shape)]
    problems = [(missing, "missing"), (unused, "not in the network"), (wrong, "wrong shape")]
    if any(p for p, _ in problems):
        detail = "; ".join(f"{len(p)} {what}: {', '.join(p[:4])}{' ...' if len(p) > 4 else ''}"
                           for p, what in problems if p)
        raise WeightsError(f"{weights.source} does not fit the {model.cfg.resolution}px network "
                           f"(ch_mult {model.cfg.ch_mult}): {detail}")
    for n, v in ours.items():
        v.assign(weights.params[n])


def load_unet(path: str, cfg: DatasetConfig, ema: bool = True) -> tuple[UNet, Weights]:
    """A UNet for `cfg` holding the weights at `path`, run with the GroupNorm epsilon they came with."""
    weights = read_weights(path, cfg, ema=ema)
    if weights.dataset and weights.dataset != cfg.name:
        raise WeightsError(f"{path} holds {weights.dataset} weights, not {cfg.name}")
    model = UNet(cfg.replace(network={"gn_eps": weights.gn_eps}).network)
    assign(model, weights)
    return model, weights


def _cause(e: BaseException) -> str:
    """A short reason for a reader's failure, in our words: the libraries' own messages run to
    paragraphs and repeat the (possibly long) path, and cutting them leaves half a sentence."""
    code = getattr(e, "error_code", None)  # TF raises some as a bare OpError with a code
    if isinstance(e, FileNotFoundError) or code == tf.errors.NOT_FOUND:
        return "a file is missing"
    if isinstance(e, PermissionError) or code == tf.errors.PERMISSION_DENIED:
        return "permission denied"
    if isinstance(e, json.JSONDecodeError):
        return f"{META_FILE} is not valid JSON"
    return "incomplete or corrupt"
