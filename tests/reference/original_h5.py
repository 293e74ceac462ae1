"""Fixture writer for h5 weight files laid out like tcl9876/Denoising_Student's.

The original (TF 2.4 / Keras 2, tfa GroupNormalization) shipped teacher files
``model_tf2_{ds}.h5`` (one h5 group per top-level Keras layer of the
DDPM/DDIM_Checkpoint_Model) and student files ``{ds}_ema_model.h5`` (written by
Onestep_Model, whose only layer is the wrapped checkpoint model, so ONE group holds
every weight). Keras 2 loads these purely by position, so what matters is the flat
weight order; layer/variable names below are plausible Keras auto-names only (the
real counters depend on the authors' processes and cannot be known).

Independent of the code under test: imports only h5py, numpy and tests.reference.official.

Public API:
  original_flat_order - official TF names in the original Keras weight order
  write_original_h5   - write a teacher/student h5; returns [(h5 weight name, official name)]
"""

from __future__ import annotations

from typing import Iterable

import h5py
import numpy as np

from tests.reference.official import _torch_module_order

# Keras 2 (hdf5_format.HDF5_OBJECT_HEADER_LIMIT): bigger attributes are split in chunks.
KERAS_ATTR_LIMIT = 64512

_MODEL_NAME = {"ddpm": "ddpm__checkpoint__model", "ddim": "ddim__checkpoint__model"}
_SUFFIX = {"W": "kernel:0", "b": "bias:0", "gamma": "gamma:0", "beta": "beta:0"}
_CONVS = {"conv1", "conv2", "conv", "conv_in", "conv_out"}


def original_flat_order(names: Iterable[str], family: str) -> list[str]:
    """Official names (no ``model/``) in the order the original Keras model holds them."""
    names = list(names)
    if family == "ddpm":
        # The Keras layers were created in list_variables' (sorted) order, but tfa's GN
        # creates gamma before beta, so every adjacent (beta, gamma) pair is swapped.
        out, i = sorted(names), 0
        while i < len(out):
            if out[i].endswith("/beta"):
                scope = out[i][: -len("beta")]
                if i + 1 >= len(out) or out[i + 1] != scope + "gamma":
                    raise ValueError(f"GroupNorm {scope!r} lacks an adjacent gamma")
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 1  # skip the pair just swapped
            i += 1
        return out
    if family == "ddim":
        # PyTorch state_dict (registration) order; per module weight (W/gamma) then bias.
        present = set(names)
        out = [f"{s}/{leaf}" for s in _torch_module_order(names)
               for leaf in ("W", "gamma", "b", "beta") if f"{s}/{leaf}" in present]
        if len(out) != len(names):
            raise ValueError("names not covered by the DDIM order")
        return out
    raise ValueError(f"family must be 'ddpm' or 'ddim', got {family!r}")


def _top_unit(name: str) -> str:
    """Scope of the top-level Keras layer owning ``name`` (e.g. ``down_1/block_0``)."""
    parts = name.split("/")
    nested = parts[0] in ("mid", "temb") or parts[0].split("_")[0] in ("down", "up")
    return "/".join(parts[:2]) if nested else parts[0]


def _unit_class(unit: str) -> str | None:
    """Keras class name (snake case) of a composite top-level layer; None for plain ones."""
    last = unit.split("/")[-1]
    for prefix, cls in (("block_", "resnet_block"), ("attn_", "attn_block"),
                        ("downsample", "downsample"), ("upsample", "upsample")):
        if last.startswith(prefix):
            return cls
    return None


def _leaf_class(scope: str) -> str:
    last = scope.split("/")[-1]
    if last.startswith("norm"):  # norm1, norm2, norm, norm_out
        return "group_normalization"
    return "conv2d" if last in _CONVS else "dense"


class _Namer:
    """Keras-style global per-class counters: first ``conv2d``, then ``conv2d_1``, ..."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}

    def __call__(self, cls: str) -> str:
        k = self._n.get(cls, 0)
        self._n[cls] = k + 1
        return cls if k == 0 else f"{cls}_{k}"


def _keras_layout(names: list[str], family: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(top-level layer name, [(keras weight name, official name), ...])] in model.layers order.

    Construction order is taken equal to weight order (true for the original's attribute
    order), so a composite's name is drawn before its sublayers', as in Keras.
    """
    model, namer = _MODEL_NAME[family], _Namer()
    layers: list[tuple[str, list[tuple[str, str]]]] = []
    scope_names: dict[str, str] = {}
    seen: set[str] = set()
    cur_unit = None
    for n in original_flat_order(names, family):
        unit, (scope, leaf) = _top_unit(n), n.rsplit("/", 1)
        if unit != cur_unit:
            if unit in seen:  # a Keras layer's weights are always consecutive
                raise ValueError(f"weights of layer {unit!r} are not contiguous")
            seen.add(unit)
            cur_unit, cls = unit, _unit_class(unit)
            top = namer(cls if cls else _leaf_class(scope))
            layers.append((top, []))
        if scope not in scope_names:  # sublayer of a composite (or the plain layer itself)
            scope_names[scope] = f"{top}/{namer(_leaf_class(scope))}" if cls else top
        layers[-1][1].append((f"{model}/{scope_names[scope]}/{_SUFFIX[leaf]}", n))
    return layers


def _set_list_attr(obj: h5py.Group | h5py.File, key: str, values: list[str], limit: int) -> None:
    """Store a list of strings as an 'S' array, splitting into key0, key1, ... when one
    array would exceed ``limit`` bytes (how Keras 2 keeps object headers small)."""
    arr = np.array([v.encode("utf8") for v in values], dtype="S")
    if any(len(v) > limit for v in arr):
        raise ValueError(f"an entry of {key!r} alone exceeds {limit} bytes")
    n_chunks = 1
    while any(c.nbytes > limit for c in np.array_split(arr, n_chunks)):
        n_chunks += 1
    if n_chunks == 1:
        obj.attrs[key] = arr
    else:
        for i, chunk in enumerate(np.array_split(arr, n_chunks)):
            obj.attrs[f"{key}{i}"] = chunk  # chunks keep the full array's itemsize, as Keras does


def write_original_h5(
    path: str,
    params: dict[str, np.ndarray],
    family: str,
    kind: str,
    *,
    keras_version: bytes = b"2.4.0",
    _max_attr_bytes: int = KERAS_ATTR_LIMIT,
) -> list[tuple[str, str]]:
    """Write ``params`` (official names/layouts) as the original's Keras 2 h5 file.

    kind="teacher": one group per top-level layer (Checkpoint_Model.save_weights);
    kind="student": one group named after the checkpoint model (Onestep_Model.save_weights).
    Each weight is the dataset ``<group>/<keras weight name>`` (nested via '/').
    Returns [(keras weight name, official name)] in file (= load) order.
    """
    if family not in _MODEL_NAME or kind not in ("teacher", "student"):
        raise ValueError(f"bad family/kind: {family!r}/{kind!r}")
    layers = _keras_layout(list(params), family)
    if kind == "student":
        layers = [(_MODEL_NAME[family], [w for _, ws in layers for w in ws])]
    with h5py.File(path, "w") as f:
        _set_list_attr(f, "layer_names", [name for name, _ in layers], _max_attr_bytes)
        f.attrs["backend"] = np.bytes_(b"tensorflow")
        f.attrs["keras_version"] = np.bytes_(keras_version)
        for name, weights in layers:
            g = f.create_group(name)
            _set_list_attr(g, "weight_names", [k for k, _ in weights], _max_attr_bytes)
            for k, official in weights:
                g.create_dataset(k, data=np.asarray(params[official], dtype=np.float32))
    return [w for _, ws in layers for w in ws]
