"""The DDPM/DDIM U-Net (Ho et al. 2020; Song et al. 2021), built from a NetworkConfig.

Every weight is created under its official DDPM TF1 name (`down_1/attn_0/q/W`, ...), so weight import
is a name lookup: `official_variables(model)` returns {official name: variable}. Layouts also follow
the official code: conv W [kh, kw, in, out], dense/nin W [in, out], GroupNorm gamma/beta [C].
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from models.configs import NetworkConfig


def timestep_embedding(t: tf.Tensor, dim: int) -> tf.Tensor:
    """Sinusoidal embedding of (possibly float) timesteps: [sin(t f_i), cos(t f_i)], f_i = 1e4^(-i/(half-1))."""
    half = dim // 2
    freqs = tf.exp(tf.range(half, dtype=tf.float32) * -(math.log(10000.0) / (half - 1)))
    args = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
    return tf.concat([tf.sin(args), tf.cos(args)], axis=1)


class _Leaf(keras.layers.Layer):
    """A layer owning official-named weights; `scope` is its official variable scope."""

    def __init__(self, scope: str, **kwargs):
        super().__init__(name=scope.replace("/", "."), **kwargs)
        self.scope = scope
        self.params: dict[str, keras.Variable] = {}

    def _weight(self, key: str, shape: tuple, init) -> keras.Variable:
        self.params[key] = self.add_weight(shape=shape, initializer=init, name=key)
        return self.params[key]


class Dense(_Leaf):
    """x @ W + b over the last axis; also the official `nin` (1x1 conv) on 4-D inputs."""

    def __init__(self, scope: str, n_in: int, n_out: int, init_scale: float = 1.0, **kwargs):
        super().__init__(scope, **kwargs)
        self.W = self._weight("W", (n_in, n_out), _variance_scaling(init_scale))
        self.b = self._weight("b", (n_out,), "zeros")
        self.built = True

    def call(self, x):
        return tf.tensordot(x, tf.cast(self.W, x.dtype), axes=1) + tf.cast(self.b, x.dtype)


class Conv3x3(_Leaf):
    def __init__(self, scope: str, n_in: int, n_out: int, stride: int = 1, init_scale: float = 1.0,
                 **kwargs):
        super().__init__(scope, **kwargs)
        self.stride = stride
        self.W = self._weight("W", (3, 3, n_in, n_out), _variance_scaling(init_scale))
        self.b = self._weight("b", (n_out,), "zeros")
        self.built = True

    def call(self, x):
        y = tf.nn.conv2d(x, tf.cast(self.W, x.dtype), strides=self.stride, padding="SAME")
        return tf.nn.bias_add(y, tf.cast(self.b, x.dtype))


class GroupNorm(_Leaf):
    """GroupNorm in float32 whatever the compute dtype (moments in bfloat16 lose too much)."""

    def __init__(self, scope: str, channels: int, groups: int, eps: float, **kwargs):
        super().__init__(scope, **kwargs)
        self.groups, self.eps = groups, eps
        self.gamma = self._weight("gamma", (channels,), "ones")
        self.beta = self._weight("beta", (channels,), "zeros")
        self.built = True

    def call(self, x):
        dtype = x.dtype
        x = tf.cast(x, tf.float32)
        shape = tf.shape(x)
        c = x.shape[-1]
        g = tf.reshape(x, tf.concat([shape[:3], [self.groups, c // self.groups]], 0))
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        g = (g - mean) * tf.math.rsqrt(var + self.eps)
        x = tf.reshape(g, shape) * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(x, dtype)


def _variance_scaling(scale: float):
    # The official init (fan_avg, uniform); init_scale 0 zeroes the last layer of each branch.
    if scale == 0.0:
        return "zeros"
    return keras.initializers.VarianceScaling(scale, mode="fan_avg", distribution="uniform")


class UNet(keras.Model):
    """eps_theta(x, t): [B, H, W, in_ch] x [B] -> [B, H, W, out_ch]."""

    def __init__(self, cfg: NetworkConfig, compute_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        # Weights stay float32; "bfloat16" runs convolutions and matmuls in bfloat16 (GroupNorm in
        # float32) and returns float32.
        self.run_dtype = tf.as_dtype(compute_dtype)
        self.leaves: dict[str, _Leaf] = {}
        ch, temb_ch = cfg.ch, cfg.ch * 4
        self._add(Dense("temb/dense0", ch, temb_ch))
        self._add(Dense("temb/dense1", temb_ch, temb_ch))
        self._add(Conv3x3("conv_in", cfg.in_ch, ch))

        # Walk the network once to create every block with its official name and channel counts.
        skips, c, res = [ch], ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                self._res_block(f"down_{i}/block_{j}", c, ch * mult)
                c = ch * mult
                if res in cfg.attn_resolutions:
                    self._attn_block(f"down_{i}/attn_{j}", c)
                skips.append(c)
            if i != len(cfg.ch_mult) - 1:
                self._add(Conv3x3(f"down_{i}/downsample/conv", c, c, stride=2))
                skips.append(c)
                res //= 2
        self._res_block("mid/block_1", c, c)
        self._attn_block("mid/attn_1", c)
        self._res_block("mid/block_2", c, c)
        for i in reversed(range(len(cfg.ch_mult))):
            for j in range(cfg.num_res_blocks + 1):
                self._res_block(f"up_{i}/block_{j}", c + skips.pop(), ch * cfg.ch_mult[i])
                c = ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    self._attn_block(f"up_{i}/attn_{j}", c)
            if i != 0:
                self._add(Conv3x3(f"up_{i}/upsample/conv", c, c))
                res *= 2
        self._add(GroupNorm("norm_out", c, cfg.gn_groups, cfg.gn_eps))
        self._add(Conv3x3("conv_out", c, cfg.out_ch, init_scale=0.0))
        self.built = True

    # -- construction -------------------------------------------------------------------------
    def _add(self, leaf: _Leaf) -> None:
        self.leaves[leaf.scope] = leaf

    def _norm(self, scope: str, c: int) -> None:
        self._add(GroupNorm(scope, c, self.cfg.gn_groups, self.cfg.gn_eps))

    def _res_block(self, scope: str, c_in: int, c_out: int) -> None:
        self._norm(f"{scope}/norm1", c_in)
        self._add(Conv3x3(f"{scope}/conv1", c_in, c_out))
        self._add(Dense(f"{scope}/temb_proj", self.cfg.ch * 4, c_out))
        self._norm(f"{scope}/norm2", c_out)
        self._add(Conv3x3(f"{scope}/conv2", c_out, c_out, init_scale=0.0))
        if c_in != c_out:
            self._add(Dense(f"{scope}/nin_shortcut", c_in, c_out))

    def _attn_block(self, scope: str, c: int) -> None:
        self._norm(f"{scope}/norm", c)
        for name in ("q", "k", "v"):
            self._add(Dense(f"{scope}/{name}", c, c))
        self._add(Dense(f"{scope}/proj_out", c, c, init_scale=0.0))

    # -- forward ------------------------------------------------------------------------------
    def call(self, x, t, training=False):
        cfg, L = self.cfg, self.leaves
        x = tf.cast(x, self.run_dtype)
        temb = timestep_embedding(t, cfg.ch)
        temb = L["temb/dense1"](tf.nn.silu(L["temb/dense0"](temb)))
        temb = tf.cast(temb, x.dtype)

        hs = [L["conv_in"](x)]
        for i in range(len(cfg.ch_mult)):
            for j in range(cfg.num_res_blocks):
                h = self._res(f"down_{i}/block_{j}", hs[-1], temb, training)
                if f"down_{i}/attn_{j}/q" in L:
                    h = self._attn(f"down_{i}/attn_{j}", h)
                hs.append(h)
            if i != len(cfg.ch_mult) - 1:
                hs.append(L[f"down_{i}/downsample/conv"](hs[-1]))
        h = self._res("mid/block_1", hs[-1], temb, training)
        h = self._attn("mid/attn_1", h)
        h = self._res("mid/block_2", h, temb, training)
        for i in reversed(range(len(cfg.ch_mult))):
            for j in range(cfg.num_res_blocks + 1):
                h = self._res(f"up_{i}/block_{j}", tf.concat([h, hs.pop()], axis=-1), temb, training)
                if f"up_{i}/attn_{j}/q" in L:
                    h = self._attn(f"up_{i}/attn_{j}", h)
            if i != 0:
                h = _upsample_nearest(h)
                h = L[f"up_{i}/upsample/conv"](h)
        h = tf.nn.silu(L["norm_out"](h))
        return tf.cast(L["conv_out"](h), tf.float32)

    def _res(self, scope: str, x, temb, training):
        L = self.leaves
        h = L[f"{scope}/conv1"](tf.nn.silu(L[f"{scope}/norm1"](x)))
        h += L[f"{scope}/temb_proj"](tf.nn.silu(temb))[:, None, None, :]
        h = tf.nn.silu(L[f"{scope}/norm2"](h))
        if training and self.cfg.dropout > 0:
            h = tf.nn.dropout(h, rate=self.cfg.dropout)
        h = L[f"{scope}/conv2"](h)
        if f"{scope}/nin_shortcut" in L:
            x = L[f"{scope}/nin_shortcut"](x)
        return x + h

    def _attn(self, scope: str, x):
        L = self.leaves
        shape = tf.shape(x)
        c = x.shape[-1]
        h = L[f"{scope}/norm"](x)
        q, k, v = (tf.reshape(L[f"{scope}/{n}"](h), [shape[0], -1, c]) for n in "qkv")
        w = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * (c ** -0.5), axis=-1)
        h = tf.reshape(tf.matmul(w, v), shape)
        return x + L[f"{scope}/proj_out"](h)


def _upsample_nearest(x):
    # Static sizes where known, so the next conv sees its channel count (TFLite needs it).
    b, h, w, c = (d if d is not None else tf.shape(x)[i] for i, d in enumerate(x.shape))
    x = tf.tile(x[:, :, None, :, None, :], [1, 1, 2, 1, 2, 1])
    return tf.reshape(x, [b, h * 2, w * 2, c])


def official_variables(model: UNet) -> dict[str, keras.Variable]:
    """{official DDPM name without the `model/` scope: variable}, in creation order."""
    return {f"{scope}/{key}": var for scope, leaf in model.leaves.items()
            for key, var in leaf.params.items()}


def count_parameters(model: UNet) -> int:
    return sum(int(v.numpy().size) for v in official_variables(model).values())
