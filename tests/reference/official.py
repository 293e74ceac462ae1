"""Independent reference for the official DDPM (TF1) / DDIM (PyTorch) U-Net.

Everything here is written from the published architecture description only and
deliberately imports nothing from this repository's model/data/utils code, so that
tests comparing against it are not self-fulfilling.

Public API:
  official_variable_shapes  - official TF1 variable names (no ``model/`` scope) -> shapes
  random_params             - random float32 params for those shapes
  numpy_forward             - float64 NumPy forward pass from the named tensors
  write_ddpm_tf1_checkpoint - real TF1 checkpoint with EMA / Adam slot variables
  write_ddim_pth            - DDIM-style ``torch.save`` list (torch imported lazily)
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------- #
# 1. Variable names and shapes
# --------------------------------------------------------------------------- #

def _add_dense(out: dict, name: str, n_in: int, n_out: int) -> None:
    out[f"{name}/W"] = (n_in, n_out)
    out[f"{name}/b"] = (n_out,)


def _add_conv(out: dict, name: str, n_in: int, n_out: int, k: int = 3) -> None:
    out[f"{name}/W"] = (k, k, n_in, n_out)
    out[f"{name}/b"] = (n_out,)


def _add_norm(out: dict, name: str, c: int) -> None:
    # tf.contrib.layers.group_norm creates beta before gamma.
    out[f"{name}/beta"] = (c,)
    out[f"{name}/gamma"] = (c,)


def _add_resblock(out: dict, name: str, c_in: int, c_out: int, temb_ch: int) -> None:
    _add_norm(out, f"{name}/norm1", c_in)
    _add_conv(out, f"{name}/conv1", c_in, c_out)
    _add_dense(out, f"{name}/temb_proj", temb_ch, c_out)
    _add_norm(out, f"{name}/norm2", c_out)
    _add_conv(out, f"{name}/conv2", c_out, c_out)
    if c_in != c_out:
        _add_dense(out, f"{name}/nin_shortcut", c_in, c_out)  # nin: 2-D [in, out]


def _add_attn(out: dict, name: str, c: int) -> None:
    _add_norm(out, f"{name}/norm", c)
    for sub in ("q", "k", "v", "proj_out"):
        _add_dense(out, f"{name}/{sub}", c, c)


def official_variable_shapes(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Iterable[int],
    resolution: int,
    in_ch: int = 3,
    out_ch: int = 3,
) -> "OrderedDict[str, tuple[int, ...]]":
    """Return official DDPM TF1 variable names (without ``model/``) -> shape.

    Order follows the official graph's variable creation order.
    """
    attn_res = set(int(r) for r in attn_resolutions)
    n_lvl = len(ch_mult)
    temb_ch = ch * 4
    out: "OrderedDict[str, tuple[int, ...]]" = OrderedDict()

    _add_dense(out, "temb/dense0", ch, temb_ch)
    _add_dense(out, "temb/dense1", temb_ch, temb_ch)
    _add_conv(out, "conv_in", in_ch, ch)

    # Track skip-connection channels exactly like the official `hs` list.
    hs = [ch]
    res = resolution
    for i in range(n_lvl):
        c_out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            _add_resblock(out, f"down_{i}/block_{j}", hs[-1], c_out, temb_ch)
            if res in attn_res:
                _add_attn(out, f"down_{i}/attn_{j}", c_out)
            hs.append(c_out)
        if i != n_lvl - 1:
            _add_conv(out, f"down_{i}/downsample/conv", hs[-1], hs[-1])
            hs.append(hs[-1])
            res //= 2

    c = hs[-1]
    _add_resblock(out, "mid/block_1", c, c, temb_ch)
    _add_attn(out, "mid/attn_1", c)
    _add_resblock(out, "mid/block_2", c, c, temb_ch)

    for i in reversed(range(n_lvl)):
        c_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            _add_resblock(out, f"up_{i}/block_{j}", c + hs.pop(), c_out, temb_ch)
            c = c_out
            if res in attn_res:
                _add_attn(out, f"up_{i}/attn_{j}", c)
        if i != 0:
            _add_conv(out, f"up_{i}/upsample/conv", c, c)
            res *= 2
    assert not hs

    _add_norm(out, "norm_out", c)
    _add_conv(out, "conv_out", c, out_ch)
    return out


def count_params(shapes: dict) -> int:
    """Total number of scalars described by a name -> shape dict."""
    return int(sum(int(np.prod(s)) for s in shapes.values()))


# --------------------------------------------------------------------------- #
# 5. Random parameters
# --------------------------------------------------------------------------- #

def random_params(shapes: dict, seed: int) -> "OrderedDict[str, np.ndarray]":
    """Random float32 params: W ~ N(0, 1/fan_in), small biases, gamma ~ 1 +- 0.1.

    1/sqrt(fan_in) keeps activations O(1) through the deep net, so outputs are
    non-trivial and finite; attention logits stay O(1) so softmax is not one-hot.
    """
    rng = np.random.default_rng(seed)
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name, shape in shapes.items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "W":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) / math.sqrt(fan_in)
        elif leaf == "gamma":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:  # b, beta
            v = 0.05 * rng.standard_normal(shape)
        out[name] = v.astype(np.float32)
    return out


# --------------------------------------------------------------------------- #
# 2. Pure NumPy forward pass
# --------------------------------------------------------------------------- #

def _swish(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), written via exp(-|x|) to avoid overflow warnings.
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sig


def _timestep_embedding(t: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    freq = np.exp(-math.log(10000) / (half - 1) * np.arange(half, dtype=np.float64))
    arg = np.asarray(t, dtype=np.float64)[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, [(0, 0), (0, 1)])
    return emb


def _group_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, eps: float) -> np.ndarray:
    b, h, w, c = x.shape
    assert c % groups == 0, f"channels {c} not divisible by {groups} groups"
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)  # population variance, as tf.nn.moments
    xn = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return xn * gamma + beta


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    # TF 'SAME': extra padding goes after (bottom/right).
    n_out = -(-n // s)
    total = max((n_out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1) -> np.ndarray:
    """NHWC conv with HWIO kernel, TF 'SAME' zero padding; sum of shifted matmuls."""
    _, h, wd, _ = x.shape
    kh, kw, _, c_out = w.shape
    ph, pw = _same_pads(h, kh, stride), _same_pads(wd, kw, stride)
    xp = np.pad(x, [(0, 0), ph, pw, (0, 0)])
    ho, wo = -(-h // stride), -(-wd // stride)
    y = np.zeros(x.shape[:1] + (ho, wo, c_out), dtype=np.float64)
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride, :]
            y += patch @ w[dy, dx]
    return y + b


class _P:
    """Named-tensor lookup that casts to float64 and reports missing names clearly."""

    def __init__(self, params: dict):
        self._p = params

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._p:
            raise KeyError(f"missing parameter {name!r}")
        return np.asarray(self._p[name], dtype=np.float64)


def numpy_forward(
    params: dict,
    x: np.ndarray,
    t: np.ndarray,
    *,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Iterable[int],
    gn_eps: float = 1e-6,
    groups: int = 32,
) -> np.ndarray:
    """Official DDPM U-Net forward in float64 NumPy. x: [B,H,W,C], t: [B] -> [B,H,W,out_ch]."""
    P = _P(params)
    attn_res = set(int(r) for r in attn_resolutions)
    n_lvl = len(ch_mult)
    x = np.asarray(x, dtype=np.float64)

    def norm(h, name):
        return _group_norm(h, P(f"{name}/gamma"), P(f"{name}/beta"), groups, gn_eps)

    def conv(h, name, stride=1):
        return _conv2d(h, P(f"{name}/W"), P(f"{name}/b"), stride)

    def dense(h, name):
        return h @ P(f"{name}/W") + P(f"{name}/b")

    def resblock(h_in, name, temb):
        h = conv(_swish(norm(h_in, f"{name}/norm1")), f"{name}/conv1")
        h = h + dense(_swish(temb), f"{name}/temb_proj")[:, None, None, :]
        h = conv(_swish(norm(h, f"{name}/norm2")), f"{name}/conv2")
        if h_in.shape[-1] != h.shape[-1]:
            h_in = dense(h_in, f"{name}/nin_shortcut")  # 1x1 "nin" = matmul over channels
        return h_in + h

    def attn(h_in, name):
        b, hh, ww, c = h_in.shape
        h = norm(h_in, f"{name}/norm").reshape(b, hh * ww, c)
        q, k, v = (dense(h, f"{name}/{s}") for s in ("q", "k", "v"))
        logits = np.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
        logits -= logits.max(axis=-1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(axis=-1, keepdims=True)
        h = dense(np.einsum("bij,bjc->bic", w, v), f"{name}/proj_out")
        return h_in + h.reshape(b, hh, ww, c)

    temb = _timestep_embedding(np.asarray(t).reshape(-1), ch)
    temb = dense(_swish(dense(temb, "temb/dense0")), "temb/dense1")

    hs = [conv(x, "conv_in")]
    for i in range(n_lvl):
        for j in range(num_res_blocks):
            h = resblock(hs[-1], f"down_{i}/block_{j}", temb)
            if h.shape[1] in attn_res:
                h = attn(h, f"down_{i}/attn_{j}")
            hs.append(h)
        if i != n_lvl - 1:
            hs.append(conv(hs[-1], f"down_{i}/downsample/conv", stride=2))

    h = resblock(hs[-1], "mid/block_1", temb)
    h = attn(h, "mid/attn_1")
    h = resblock(h, "mid/block_2", temb)

    for i in reversed(range(n_lvl)):
        for j in range(num_res_blocks + 1):
            h = resblock(np.concatenate([h, hs.pop()], axis=-1), f"up_{i}/block_{j}", temb)
            if h.shape[1] in attn_res:
                h = attn(h, f"up_{i}/attn_{j}")
        if i != 0:
            h = h.repeat(2, axis=1).repeat(2, axis=2)  # nearest-neighbour x2
            h = conv(h, f"up_{i}/upsample/conv")
    assert not hs

    return conv(_swish(norm(h, "norm_out")), "conv_out")


# --------------------------------------------------------------------------- #
# 3. TF1 checkpoint writer
# --------------------------------------------------------------------------- #

def write_ddpm_tf1_checkpoint(
    path_prefix: str,
    params: dict,
    ema_params: dict | None,
    step: int,
    with_adam: bool = True,
    also_steps: Iterable[int] = (),
) -> str:
    """Write a real TF1 (graph-mode Saver) checkpoint ``<prefix>-<step>``; return its path.

    ``path_prefix`` is either a prefix whose basename ends in ``.ckpt`` (e.g.
    ``/d/model.ckpt`` -> ``/d/model.ckpt-<step>``) or otherwise a directory (created if
    needed; the files become ``<dir>/model.ckpt-<step>.*``).
    Variables: ``model/<name>``; with ema_params also ``model/<name>/ExponentialMovingAverage``
    (made by a real tf.compat.v1.train.ExponentialMovingAverage); with_adam also
    ``model/<name>/Adam``, ``.../Adam_1``, ``beta1_power``, ``beta2_power``; always
    ``global_step`` (int64). ``also_steps``: the same values saved again by the same Saver under
    these steps too (a run's later checkpoints); the last path is returned.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    path_prefix = os.fspath(path_prefix)
    if not os.path.basename(path_prefix.rstrip(os.sep)).endswith(".ckpt"):
        path_prefix = os.path.join(path_prefix, "model.ckpt")
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)

    names = list(params.keys())
    if ema_params is not None:
        missing = set(names) ^ set(ema_params.keys())
        if missing:
            raise ValueError(f"ema_params names differ from params: {sorted(missing)[:5]}")

    graph = tf.Graph()
    with graph.as_default():
        with v1.variable_scope("model"):
            # Zeros initialisers + later assignment keep big arrays out of the GraphDef.
            tvars = [
                v1.get_variable(n, shape=np.shape(params[n]), dtype=tf.float32,
                                initializer=v1.zeros_initializer())
                for n in names
            ]
        global_step = v1.train.get_or_create_global_step()

        ema_vars = []
        if ema_params is not None:
            ema = v1.train.ExponentialMovingAverage(decay=0.9999)
            ema.apply(tvars)
            ema_vars = [ema.average(v) for v in tvars]

        adam_m, adam_v = [], []
        if with_adam:
            opt = v1.train.AdamOptimizer(learning_rate=2e-4)
            # Never run; building it is what creates the slot and power variables.
            opt.apply_gradients([(tf.zeros_like(v), v) for v in tvars], global_step=global_step)
            adam_m = [opt.get_slot(v, "m") for v in tvars]
            adam_v = [opt.get_slot(v, "v") for v in tvars]
            beta1_power, beta2_power = opt._get_beta_accumulators()  # pylint: disable=protected-access

        # Values to write: distinct deterministic arrays for Adam slots so a loader
        # that grabs the wrong tensor is caught by value comparisons.
        rng = np.random.default_rng(12345 + int(step))
        assigns: list[tuple] = []
        for n, v in zip(names, tvars):
            assigns.append((v, np.asarray(params[n], np.float32)))
        for n, v in zip(names, ema_vars):
            assigns.append((v, np.asarray(ema_params[n], np.float32)))
        for v in adam_m:
            assigns.append((v, (1e-3 * rng.standard_normal(v.shape.as_list())).astype(np.float32)))
        for v in adam_v:
            assigns.append((v, (1e-6 * rng.random(v.shape.as_list())).astype(np.float32)))
        if with_adam:
            assigns.append((beta1_power, np.float32(0.9 ** (int(step) + 1))))
            assigns.append((beta2_power, np.float32(0.999 ** (int(step) + 1))))
        assigns.append((global_step, np.int64(step)))

        phs, ops = [], []
        for v, _ in assigns:
            ph = v1.placeholder(v.dtype.base_dtype, shape=v.shape)
            phs.append(ph)
            ops.append(v.assign(ph))

        saver = v1.train.Saver(var_list=v1.global_variables(), max_to_keep=None)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(ops, feed_dict={ph: val for ph, (_, val) in zip(phs, assigns)})
            path = saver.save(sess, path_prefix, global_step=int(step), write_meta_graph=False)
            for later in also_steps:
                sess.run(ops[-1], feed_dict={phs[-1]: np.int64(later)})  # global_step
                path = saver.save(sess, path_prefix, global_step=int(later), write_meta_graph=False)
            return path


# --------------------------------------------------------------------------- #
# 4. DDIM PyTorch checkpoint writer
# --------------------------------------------------------------------------- #

_RES_ORDER = ("norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut")
_ATTN_ORDER = ("norm", "q", "k", "v", "proj_out")


def _torch_module_order(tf_names: Iterable[str]) -> list[str]:
    """Official TF layer scopes (names minus /W, /b, ...) in DDIM registration order."""
    layers = []
    for n in tf_names:
        scope = n.rsplit("/", 1)[0]
        if scope not in layers:
            layers.append(scope)
    present = set(layers)

    def level_layers(prefix: str) -> list[str]:
        out = []
        lvl = sorted({int(l.split("/")[0].split("_")[1]) for l in present if l.startswith(prefix + "_")})
        for i in lvl:
            base = f"{prefix}_{i}"
            for kind, order in (("block", _RES_ORDER), ("attn", _ATTN_ORDER)):
                idx = sorted({int(l.split("/")[1].split("_")[1]) for l in present
                              if l.startswith(f"{base}/{kind}_")})
                for j in idx:
                    out += [f"{base}/{kind}_{j}/{s}" for s in order if f"{base}/{kind}_{j}/{s}" in present]
            for rs in ("downsample/conv", "upsample/conv"):
                if f"{base}/{rs}" in present:
                    out.append(f"{base}/{rs}")
        return out

    order = ["temb/dense0", "temb/dense1", "conv_in"]
    order += level_layers("down")
    order += [f"mid/block_1/{s}" for s in _RES_ORDER if f"mid/block_1/{s}" in present]
    order += [f"mid/attn_1/{s}" for s in _ATTN_ORDER]
    order += [f"mid/block_2/{s}" for s in _RES_ORDER if f"mid/block_2/{s}" in present]
    order += level_layers("up")  # DDIM prepends `up` levels, so up.0 comes first
    order += ["norm_out", "conv_out"]
    if set(order) != present:
        raise ValueError(f"unmapped layers: {sorted(present ^ set(order))[:5]}")
    return order


def _torch_layer_name(scope: str) -> str:
    """e.g. ``down_1/block_0/conv1`` -> ``down.1.block.0.conv1``; ``mid/block_1`` stays."""
    parts = scope.split("/")
    out: list[str] = []
    for k, p in enumerate(parts):
        if p in ("dense0", "dense1"):
            out += ["dense", p[-1]]
        elif k == 0 and re.fullmatch(r"(down|up)_\d+", p):
            out += p.split("_")
        elif k == 1 and parts[0] != "mid" and re.fullmatch(r"(block|attn)_\d+", p):
            out += p.split("_")  # ModuleList index; mid keeps its attribute names
        else:
            out.append(p)
    return ".".join(out)


def _to_torch_layout(scope: str, leaf: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if leaf != "W":
        return a  # biases, gamma, beta: 1-D, unchanged
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    last = scope.rsplit("/", 1)[-1]
    if last in ("nin_shortcut", "q", "k", "v", "proj_out"):
        return np.ascontiguousarray(a.T[:, :, None, None])  # DDIM uses 1x1 Conv2d
    return np.ascontiguousarray(a.T)  # Linear: [in,out] -> [out,in]


def tf_to_ddim_state_dict(params_tf_names: dict) -> "OrderedDict[str, np.ndarray]":
    """Official TF names/layouts -> DDIM state_dict names/layouts (NumPy, registration order)."""
    leaf_map = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for scope in _torch_module_order(params_tf_names.keys()):
        tname = _torch_layer_name(scope)
        for leaf in ("W", "gamma", "b", "beta"):  # torch order: weight before bias
            key = f"{scope}/{leaf}"
            if key in params_tf_names:
                out[f"{tname}.{leaf_map[leaf]}"] = _to_torch_layout(scope, leaf, params_tf_names[key])
    if len(out) != len(params_tf_names):
        raise ValueError("some TF variables were not converted")
    return out


def write_ddim_pth(
    path: str,
    params_tf_names: dict,
    ema_params_tf_names: dict,
    *,
    epoch: int = 1,
    step: int = 1000,
) -> str:
    """Save a DDIM-style checkpoint list ``[model_sd('module.'), optim_sd, epoch, step, ema_sd]``."""
    import torch  # lazy: torch is optional in this project

    def to_torch(sd: dict, prefix: str) -> "OrderedDict[str, object]":
        return OrderedDict((prefix + k, torch.from_numpy(v.copy())) for k, v in tf_to_ddim_state_dict(sd).items())

    model_sd = to_torch(params_tf_names, "module.")  # nn.DataParallel wrapper prefix
    ema_sd = dict(to_torch(ema_params_tf_names, ""))  # DDIM EMAHelper.shadow is a plain dict
    optim_sd = {"state": {}, "param_groups": []}
    torch.save([model_sd, optim_sd, int(epoch), int(step), ema_sd], path)
    return path
