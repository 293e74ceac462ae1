"""All sampler math, written once: the schedule, the timestep sequences, the DDIM loop and the
student's one-step map.

The DDIM step x_{t'} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with x0 = (x - sqrt(1-a) eps)/sqrt(a)
is applied in the equivalent form x_{t'} = c_x x + c_eps eps + s z, with the coefficients computed once
in float64. In that form a step with a' = a is exactly the identity (c_x = 1, c_eps = 0), which is what
lets us drop the quadratic sequence's repeated zeros without changing a single bit, and the last step
(a' = 1) returns x0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from models.configs import SamplerConfig

STUDENT_T = 999  # the student is the teacher's network called at this constant timestep


def linear_betas(cfg: SamplerConfig) -> np.ndarray:
    return np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=np.float64)


def alpha_bars(cfg: SamplerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1 (float64)."""
    return np.cumprod(1.0 - linear_betas(cfg))


def timestep_sequence(cfg: SamplerConfig) -> list[int]:
    """The DDIM teacher's timesteps, ascending, exactly as the DDIM code defines them (repeats kept)."""
    if cfg.skip_type == "quadratic":
        seq = np.linspace(0, np.sqrt(cfg.num_timesteps * 0.8), cfg.steps) ** 2
        return [int(s) for s in seq]
    if cfg.skip_type == "uniform":
        return list(range(0, cfg.num_timesteps, cfg.num_timesteps // cfg.steps))
    raise ValueError(f"unknown skip_type {cfg.skip_type!r}")


@dataclass(frozen=True)
class DDIMPlan:
    """Per network call k: timestep t[k] and the update x <- c_x[k] x + c_eps[k] eps + sigma[k] z."""
    t: np.ndarray
    c_x: np.ndarray
    c_eps: np.ndarray
    sigma: np.ndarray

    @property
    def n_calls(self) -> int:
        return len(self.t)


def ddim_plan(cfg: SamplerConfig, eta: float | None = None, skip_identity: bool = True) -> DDIMPlan:
    """The teacher's steps as coefficients; identity steps (t == t_next) dropped unless asked not to."""
    eta = cfg.eta if eta is None else eta
    abar = alpha_bars(cfg)
    seq = timestep_sequence(cfg)
    seq_next = [-1] + seq[:-1]
    rows = []
    for t, t_next in zip(reversed(seq), reversed(seq_next)):
        if skip_identity and t == t_next:
            continue
        a, a_next = abar[t], (abar[t_next] if t_next >= 0 else 1.0)
        sigma = eta * np.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
        c_x = np.sqrt(a_next / a)
        c_eps = np.sqrt(1 - a_next - sigma ** 2) - np.sqrt(a_next * (1 - a) / a)
        rows.append((t, c_x, c_eps, sigma))
    t, c_x, c_eps, sigma = zip(*rows)
    f32 = lambda v: np.asarray(v, np.float64).astype(np.float32)
    return DDIMPlan(np.asarray(t, np.int32), f32(c_x), f32(c_eps), f32(sigma))


def ddim_sample(eps_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], x_T: tf.Tensor, plan: DDIMPlan,
                seed: tf.Tensor | None = None) -> tf.Tensor:
    """Run the DDIM loop from x_T; returns x0 (unclipped). Graph-friendly: call it inside a tf.function
    (and inside strategy.run) to get a compiled while-loop with one network call per step.

    `seed` (shape [2] int) drives the stateless noise of eta > 0; it is unused when eta = 0.
    """
    ts = tf.constant(plan.t)
    c_x, c_eps, sigma = (tf.constant(v, dtype=x_T.dtype) for v in (plan.c_x, plan.c_eps, plan.sigma))
    stochastic = bool(np.any(plan.sigma > 0))
    if stochastic and seed is None:
        raise ValueError("eta > 0 needs a seed")
    batch = tf.shape(x_T)[0]
    x = x_T
    for k in tf.range(plan.n_calls):
        eps = tf.cast(eps_fn(x, tf.fill([batch], ts[k])), x.dtype)
        x = c_x[k] * x + c_eps[k] * eps
        if stochastic:
            z = tf.random.stateless_normal(tf.shape(x), seed=tf.stack([seed[0], seed[1] + k]),
                                           dtype=x.dtype)
            x += sigma[k] * z
        # A network that broadcasts against t (shape [None] in a graph) can widen a batch of 1 to
        # None, which the while-loop refuses; the batch never changes, so pin it.
        x = tf.ensure_shape(x, x_T.shape)
    return x


def ddim_fn(model: Callable, cfg: SamplerConfig, xla: bool = False
            ) -> Callable[[tf.Tensor], tf.Tensor]:
    """z -> x0 by the DDIM loop over the network `model` (it predicts eps), compiled: one
    while-loop with one network call per step. Also runs inside strategy.run."""
    plan = ddim_plan(cfg)
    return tf.function(lambda z: ddim_sample(lambda x, t: model(x, t, training=False), z, plan),
                       jit_compile=xla, reduce_retracing=True)


def student_fn(model: Callable, xla: bool = False) -> Callable[[tf.Tensor], tf.Tensor]:
    """z -> x0 by the student's one network call, compiled."""
    return tf.function(lambda z: student_sample(model, z), jit_compile=xla, reduce_retracing=True)


def student_sample(model: Callable, z: tf.Tensor, t: int = STUDENT_T) -> tf.Tensor:
    """The student's one-step map x0 = z - f(z, t=999) (linear output; clip only when saving)."""
    return z - tf.cast(model(z, tf.fill([tf.shape(z)[0]], t), training=False), z.dtype)


def student_loss(model: Callable, z: tf.Tensor, y: tf.Tensor, kind: str) -> tf.Tensor:
    """Per-example distillation loss: the sum over pixels and channels of |y - x0| ("l1") or
    (y - x0)^2 ("l2"), x0 the student's one-step output. The trainer divides by the global batch."""
    diff = y - student_sample(model, z)
    per_pixel = tf.abs(diff) if kind == "l1" else tf.square(diff)
    return tf.reduce_sum(per_pixel, axis=[1, 2, 3])


def ddpm_loss(model: Callable, x0: tf.Tensor, eps: tf.Tensor, t: tf.Tensor, abar: tf.Tensor,
              training: bool = True) -> tf.Tensor:
    """Per-example DDPM loss (Ho et al.): mean over pixels of (eps - eps_theta(x_t, t))^2 with
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. `abar` is the alpha_bar table as a tensor."""
    a = tf.gather(abar, t)[:, None, None, None]
    x_t = tf.sqrt(a) * x0 + tf.sqrt(1.0 - a) * eps
    pred = tf.cast(model(x_t, t, training=training), x0.dtype)
    return tf.reduce_mean(tf.square(eps - pred), axis=[1, 2, 3])
