"""The DDPM/DDIM U-Net (Ho et al. 2020; Song et al. 2021), built from a NetworkConfig.

The network is built once from blocks (ResBlock, AttnBlock, Resample, grouped into Levels), each
owning its leaves (Dense, Conv3x3, GroupNorm). Every weight is created under its official DDPM TF1
name (`down_1/attn_0/q/W`, ...), so weight import is a name lookup: `official_variables(model)`
returns {official name: variable}. Layouts also follow the official code: conv W [kh, kw, in, out],
dense/nin W [in, out], GroupNorm gamma/beta [C].
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


# -- blocks: each owns its leaves (created once, in the official order) and runs them -------------
# Blocks are Keras layers so that their weights are tracked; they are run through `run`, not
# __call__, so Keras never casts their inputs (the bfloat16 path stays as the network wrote it).

class _Block(keras.layers.Layer):
    def __init__(self, scope: str, **kwargs):
        super().__init__(name=scope.replace("/", "."), **kwargs)
        self.scope = scope
        self.built = True

    def leaves(self) -> list[_Leaf]:
        """The official-named layers of this block, in creation order."""
        raise NotImplementedError


class ResBlock(_Block):
    """GroupNorm-SiLU-conv, plus the timestep projection, GroupNorm-SiLU-(dropout)-conv, plus the
    input (through a 1x1 `nin_shortcut` when the channel count changes)."""

    def __init__(self, scope: str, c_in: int, c_out: int, net: NetworkConfig, **kwargs):
        super().__init__(scope, **kwargs)
        self.dropout = net.dropout
        self.norm1 = GroupNorm(f"{scope}/norm1", c_in, net.gn_groups, net.gn_eps)
        self.conv1 = Conv3x3(f"{scope}/conv1", c_in, c_out)
        self.temb_proj = Dense(f"{scope}/temb_proj", net.ch * 4, c_out)
        self.norm2 = GroupNorm(f"{scope}/norm2", c_out, net.gn_groups, net.gn_eps)
        self.conv2 = Conv3x3(f"{scope}/conv2", c_out, c_out, init_scale=0.0)
        self.nin_shortcut = Dense(f"{scope}/nin_shortcut", c_in, c_out) if c_in != c_out else None

    def leaves(self) -> list[_Leaf]:
        main = [self.norm1, self.conv1, self.temb_proj, self.norm2, self.conv2]
        return main + ([self.nin_shortcut] if self.nin_shortcut is not None else [])

    def run(self, x, temb, training: bool):
        h = self.conv1(tf.nn.silu(self.norm1(x)))
        h += self.temb_proj(tf.nn.silu(temb))[:, None, None, :]
        h = tf.nn.silu(self.norm2(h))
        if training and self.dropout > 0:
            h = tf.nn.dropout(h, rate=self.dropout)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(_Block):
    """Single-head self-attention over the pixels, added to the input."""

    def __init__(self, scope: str, c: int, net: NetworkConfig, **kwargs):
        super().__init__(scope, **kwargs)
        self.norm = GroupNorm(f"{scope}/norm", c, net.gn_groups, net.gn_eps)
        self.q, self.k, self.v = (Dense(f"{scope}/{n}", c, c) for n in "qkv")
        self.proj_out = Dense(f"{scope}/proj_out", c, c, init_scale=0.0)

    def leaves(self) -> list[_Leaf]:
        return [self.norm, self.q, self.k, self.v, self.proj_out]

    def run(self, x):
        shape = tf.shape(x)
        c = x.shape[-1]
        h = self.norm(x)
        q, k, v = (tf.reshape(layer(h), [shape[0], -1, c]) for layer in (self.q, self.k, self.v))
        w = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * (c ** -0.5), axis=-1)
        h = tf.reshape(tf.matmul(w, v), shape)
        return x + self.proj_out(h)


class Resample(_Block):
    """Halve the resolution (a stride-2 conv) or double it (nearest neighbour, then a conv)."""

    def __init__(self, scope: str, c: int, up: bool, **kwargs):
        super().__init__(scope, **kwargs)
        self.up = up
        self.conv = Conv3x3(f"{scope}/conv", c, c, stride=1 if up else 2)

    def leaves(self) -> list[_Leaf]:
        return [self.conv]

    def run(self, x):
        return self.conv(_upsample_nearest(x) if self.up else x)


class Level(_Block):
    """One resolution of the U-Net: res blocks, each followed by attention at the attention
    resolutions, then the resampling conv (none at the lowest level down, the top level up)."""

    def __init__(self, scope: str, res_blocks: list[ResBlock], attn: list[AttnBlock],
                 resample: Resample | None, **kwargs):
        super().__init__(scope, **kwargs)
        self.res_blocks, self.attn, self.resample = res_blocks, attn, resample

    def leaves(self) -> list[_Leaf]:
        out = []
        for j, block in enumerate(self.res_blocks):
            out += block.leaves() + (self.attn[j].leaves() if self.attn else [])
        return out + (self.resample.leaves() if self.resample is not None else [])

    def block(self, j: int, x, temb, training: bool):
        """Res block j, then its attention if this level has any."""
        h = self.res_blocks[j].run(x, temb, training)
        return self.attn[j].run(h) if self.attn else h


class UNet(keras.Model):
    """eps_theta(x, t): [B, H, W, in_ch] x [B] -> [B, H, W, out_ch]. The topology is walked once,
    here, to build the blocks; `call` runs them in order."""

    def __init__(self, cfg: NetworkConfig, compute_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        # Weights stay float32; "bfloat16" runs convolutions and matmuls in bfloat16 (GroupNorm in
        # float32) and returns float32.
        self.run_dtype = tf.as_dtype(compute_dtype)
        ch, n_levels = cfg.ch, len(cfg.ch_mult)
        self.temb_dense = [Dense("temb/dense0", ch, ch * 4), Dense("temb/dense1", ch * 4, ch * 4)]
        self.conv_in = Conv3x3("conv_in", cfg.in_ch, ch)
        skips, c, res = [ch], ch, cfg.resolution  # channels of each skip connection
        self.down: list[Level] = []
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attn = [], []
            for j in range(cfg.num_res_blocks):
                blocks.append(ResBlock(f"down_{i}/block_{j}", c, ch * mult, cfg))
                c = ch * mult
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(f"down_{i}/attn_{j}", c, cfg))
                skips.append(c)
            resample = None
            if i != n_levels - 1:
                resample = Resample(f"down_{i}/downsample", c, up=False)
                skips.append(c)
                res //= 2
            self.down.append(Level(f"down_{i}", blocks, attn, resample))
        self.mid = [ResBlock("mid/block_1", c, c, cfg), AttnBlock("mid/attn_1", c, cfg),
                    ResBlock("mid/block_2", c, c, cfg)]
        self.up: list[Level] = []  # from the lowest resolution up, as they run
        for i in reversed(range(n_levels)):
            blocks, attn = [], []
            for j in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(f"up_{i}/block_{j}", c + skips.pop(), ch * cfg.ch_mult[i],
                                       cfg))
                c = ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(f"up_{i}/attn_{j}", c, cfg))
            resample = None
            if i != 0:
                resample = Resample(f"up_{i}/upsample", c, up=True)
                res *= 2
            self.up.append(Level(f"up_{i}", blocks, attn, resample))
        self.norm_out = GroupNorm("norm_out", c, cfg.gn_groups, cfg.gn_eps)
        self.conv_out = Conv3x3("conv_out", c, cfg.out_ch, init_scale=0.0)
        self.built = True

    def leaves(self) -> list[_Leaf]:
        """Every official-named layer, in the official creation order."""
        def of(blocks: list[_Block]) -> list[_Leaf]:
            return [leaf for block in blocks for leaf in block.leaves()]
        return ([*self.temb_dense, self.conv_in] + of(self.down) + of(self.mid) + of(self.up)
                + [self.norm_out, self.conv_out])

    def call(self, x, t, training=False):
        x = tf.cast(x, self.run_dtype)
        temb = timestep_embedding(t, self.cfg.ch)
        temb = self.temb_dense[1](tf.nn.silu(self.temb_dense[0](temb)))
        temb = tf.cast(temb, x.dtype)

        hs = [self.conv_in(x)]
        for level in self.down:
            for j in range(len(level.res_blocks)):
                hs.append(level.block(j, hs[-1], temb, training))
            if level.resample is not None:
                hs.append(level.resample.run(hs[-1]))
        block_1, attn, block_2 = self.mid
        h = block_2.run(attn.run(block_1.run(hs[-1], temb, training)), temb, training)
        for level in self.up:
            for j in range(len(level.res_blocks)):
                h = level.block(j, tf.concat([h, hs.pop()], axis=-1), temb, training)
            if level.resample is not None:
                h = level.resample.run(h)
        h = tf.nn.silu(self.norm_out(h))
        return tf.cast(self.conv_out(h), tf.float32)


def _upsample_nearest(x):
    # Static sizes where known, so the next conv sees its channel count (TFLite needs it).
    b, h, w, c = (d if d is not None else tf.shape(x)[i] for i, d in enumerate(x.shape))
    x = tf.tile(x[:, :, None, :, None, :], [1, 1, 2, 1, 2, 1])
    return tf.reshape(x, [b, h * 2, w * 2, c])


def official_variables(model: UNet) -> dict[str, keras.Variable]:
    """{official DDPM name without the `model/` scope: variable}, in creation order."""
    return {f"{leaf.scope}/{key}": var for leaf in model.leaves() for key, var in leaf.params.items()}


def count_parameters(model: UNet) -> int:
    return sum(int(v.numpy().size) for v in official_variables(model).values())


def in_compute_dtype(model: UNet, dtype: str) -> UNet:
    """The model, or a copy of it (same weights) that computes in `dtype`."""
    if tf.as_dtype(dtype) == model.run_dtype:
        return model
    copy = UNet(model.cfg, compute_dtype=dtype)
    for a, b in zip(copy.weights, model.weights):
        a.assign(b)
    return copy
