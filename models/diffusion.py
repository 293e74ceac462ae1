"""All sampler math, written once: the schedule, the teacher's solvers as tables of per-call
coefficients run by one compiled loop, the noise of every example, the student's one-step map and
the losses.

Solvers (SamplerConfig.solver):
  ddim      DDIM (Song et al. 2021), the paper's teacher: x' = c_x x + c_eps eps + s z, with
            x0 = (x - sqrt(1-a) eps)/sqrt(a) folded into c_x and c_eps. In that form a step with
            a' = a is exactly the identity (c_x = 1, c_eps = 0), which is what lets us drop the
            quadratic sequence's repeated zeros without changing a single bit, and the last step
            (a' = 1) returns x0.
  dpmpp_2m  DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), data prediction, multistep order 2,
            as diffusers' DPMSolverMultistepScheduler runs it (solver_type "midpoint",
            lower_order_final, final_sigmas_type "zero"): with x0_k the call's data prediction,
            x' = (sigma'/sigma) x + w0 x0_k + w1 x0_{k-1}. Its first step is first order (exactly
            DDIM between the same timesteps), and its last steps to sigma = 0, i.e. returns x0.
Both are one table (SolverPlan), computed once in float64, and one loop (run_solver).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from models.configs import SamplerConfig
from utils.errors import UserError

STUDENT_T = 999  # the student is the teacher's network called at this constant timestep
SPACINGS = ("quadratic", "uniform", "linspace")


def linear_betas(cfg: SamplerConfig) -> np.ndarray:
    return np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=np.float64)


def alpha_bars(cfg: SamplerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1 (float64)."""
    return np.cumprod(1.0 - linear_betas(cfg))


def timestep_sequence(cfg: SamplerConfig) -> list[int]:
    """The sampler's timesteps, ascending (repeats kept). quadratic and uniform exactly as the DDIM
    code defines them (quadratic starts at 0.8 T); linspace as diffusers' timestep_spacing
    "linspace" (round(linspace(0, T - 1, N + 1)) without its last, 0: it starts at T - 1)."""
    if cfg.skip_type == "quadratic":
        seq = np.linspace(0, np.sqrt(cfg.num_timesteps * 0.8), cfg.steps) ** 2
        return [int(s) for s in seq]
    if cfg.skip_type == "uniform":
        return list(range(0, cfg.num_timesteps, cfg.num_timesteps // cfg.steps))
    if cfg.skip_type == "linspace":
        seq = np.linspace(0, cfg.num_timesteps - 1, cfg.steps + 1).round()[::-1][:-1]
        return sorted(int(s) for s in seq)
    raise ValueError(f"unknown skip_type {cfg.skip_type!r}")


# dpmpp_2m's default network calls: a quarter of the dataset's DDIM calls (bench/samplers.py,
# README). On digits (49 -> 12) the teacher's FD and confident share stay within 5% of DDIM-49's,
# its student scores better than DDIM's and its pairs take a third of the time; for cifar10's 96
# (-> 24) the digits teacher's error to the exact ODE solution at 24 calls is DDIM-96's.
DPMPP_CALL_FRACTION = 4


def dpmpp_default_steps(cfg: SamplerConfig) -> int:
    return max(2, round(ddim_plan(cfg).n_calls / DPMPP_CALL_FRACTION))


def choose_sampler(cfg: SamplerConfig, solver: str | None = None, steps: int | None = None,
                   spacing: str | None = None) -> SamplerConfig:
    """The dataset's sampler with a solver, steps and spacing chosen (None: the dataset's steps
    for ddim, dpmpp_default_steps for dpmpp_2m; the dataset's spacing for both: the paper's map, which
    DPM-Solver++ solves more accurately in few calls than over diffusers' linspace, whose last
    step jumps from t = T/N straight to x0)."""
    solver = solver or cfg.solver
    if spacing is not None and spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    chosen = dataclasses.replace(
        cfg, solver=solver, skip_type=spacing or cfg.skip_type,
        steps=steps if steps is not None else (cfg.steps if solver == "ddim"
                                               else dpmpp_default_steps(cfg)))
    least = 2 if chosen.skip_type == "quadratic" else 1  # one quadratic step is t = 0 alone
    if not least <= chosen.steps <= cfg.num_timesteps:
        raise UserError(f"{chosen.steps} {chosen.skip_type} solver steps: from {least} to "
                        f"{cfg.num_timesteps}")
    solver_plan(chosen)  # refuses an unknown solver, and what one cannot do (dpmpp_2m with eta)
    return chosen


def describe_sampler(cfg: SamplerConfig) -> str:
    """E.g. 'DDIM, 100 quadratic steps (96 network calls, from t = 800)'."""
    plan = solver_plan(cfg)
    eta = f", eta {cfg.eta:g}" if cfg.eta else ""
    return (f"{SOLVERS[cfg.solver][0]}{eta}, {cfg.steps} {cfg.skip_type} steps "
            f"({plan.n_calls} network calls, from t = {int(plan.t[0])})")


@dataclass(frozen=True)
class SolverPlan:
    """Per network call k at timestep t[k], with eps = the network's output and, where the solver
    uses it, x0 = x0_x[k] x + x0_eps[k] eps (the data prediction):
        x <- c_x[k] x + c_eps[k] eps + c_x0[k] x0 + c_prev[k] x0_{k-1} + sigma[k] z."""
    t: np.ndarray
    c_x: np.ndarray
    c_eps: np.ndarray
    sigma: np.ndarray
    c_x0: np.ndarray | None = None  # None: the solver uses no data prediction (DDIM)
    c_prev: np.ndarray | None = None
    x0_x: np.ndarray | None = None
    x0_eps: np.ndarray | None = None

    @property
    def n_calls(self) -> int:
        return len(self.t)


def _f32(v) -> np.ndarray:
    return np.asarray(v, np.float64).astype(np.float32)


def ddim_plan(cfg: SamplerConfig, eta: float | None = None, skip_identity: bool = True) -> SolverPlan:
    """DDIM's steps as coefficients; identity steps (t == t_next) dropped unless asked not to."""
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
    return SolverPlan(np.asarray(t, np.int32), _f32(c_x), _f32(c_eps), _f32(sigma))


def dpmpp_2m_plan(cfg: SamplerConfig) -> SolverPlan:
    """DPM-Solver++(2M) over the sampler's timesteps (repeats dropped), then to sigma = 0.
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t);
    a step from s to t: h = lambda_t - lambda_s, and with r = h_prev / h
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) (D0 + (D0 - D_prev) / (2 r))
    (first order, without the D_prev term, at the first step and the last)."""
    if cfg.eta:
        raise UserError(f"eta {cfg.eta:g} is DDIM's: DPM-Solver++ is deterministic (eta 0)")
    abar = alpha_bars(cfg)
    ts = sorted(set(timestep_sequence(cfg)), reverse=True)
    alpha = np.sqrt(abar[ts])
    sig = np.sqrt(1.0 - abar[ts])
    lam = np.log(alpha) - np.log(sig)
    rows = []
    for k in range(len(ts)):
        last = k == len(ts) - 1
        if last:  # to sigma = 0: x0 itself (lambda = inf, e^-h = 0)
            ratio, w = 0.0, 1.0
        else:
            h = lam[k + 1] - lam[k]
            ratio, w = sig[k + 1] / sig[k], -alpha[k + 1] * np.expm1(-h)
        if k == 0 or last:
            w0, w1 = w, 0.0
        else:
            r = (lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k])
            w0, w1 = w * (1 + 0.5 / r), -w * 0.5 / r
        rows.append((ratio, w0, w1, 1.0 / alpha[k], -sig[k] / alpha[k]))
    ratio, w0, w1, x0_x, x0_eps = (_f32(c) for c in zip(*rows))
    zero = np.zeros(len(ts), np.float32)
    return SolverPlan(np.asarray(ts, np.int32), ratio, zero, zero, c_x0=w0, c_prev=w1,
                      x0_x=x0_x, x0_eps=x0_eps)


# The solvers, one entry each: (name in print, the function making its coefficient table). Adding
# one here adds it to --solver, the pairs, eval and the teacher stage's grids.
SOLVERS: dict[str, tuple[str, Callable[[SamplerConfig], SolverPlan]]] = {
    "ddim": ("DDIM", ddim_plan),
    "dpmpp_2m": ("DPM-Solver++(2M)", dpmpp_2m_plan),
}


def solver_plan(cfg: SamplerConfig) -> SolverPlan:
    """The coefficient table of the sampler `cfg` describes (its solver, steps and spacing)."""
    if cfg.solver not in SOLVERS:
        raise UserError(f"unknown solver {cfg.solver!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[cfg.solver][1](cfg)


def solver_flags() -> dict:
    """add_solver_flags' arguments (utils.cli): the solvers, spacings and dpmpp_2m's default."""
    from models.configs import CONFIGS
    calls = ", ".join(f"{n} {dpmpp_default_steps(CONFIGS[n].sampler)}" for n in ("cifar10", "digits"))
    return dict(solvers=tuple(SOLVERS), spacings=SPACINGS,
                default_steps=f"1/{DPMPP_CALL_FRACTION} of the dataset's DDIM calls: {calls}")


def run_solver(eps_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], x_T: tf.Tensor,
               plan: SolverPlan, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Run a solver's plan from x_T; returns x0 (unclipped). Graph-friendly: call it inside a
    tf.function (and inside strategy.run) to get a compiled while-loop with one network call per
    step.

    `seed` (shape [2] int) drives the stateless noise of eta > 0; it is unused when eta = 0.
    """
    consts = lambda v: tf.constant(v, dtype=x_T.dtype)
    ts = tf.constant(plan.t)
    c_x, c_eps, sigma = (consts(v) for v in (plan.c_x, plan.c_eps, plan.sigma))
    stochastic = bool(np.any(plan.sigma > 0))
    multistep = plan.c_x0 is not None
    if stochastic and seed is None:
        raise ValueError("eta > 0 needs a seed")
    batch = tf.shape(x_T)[0]
    x, prev = x_T, tf.zeros_like(x_T)
    if multistep:
        c_x0, c_prev, x0_x, x0_eps = (consts(v) for v in (plan.c_x0, plan.c_prev, plan.x0_x,
                                                          plan.x0_eps))
    for k in tf.range(plan.n_calls):
        eps = tf.cast(eps_fn(x, tf.fill([batch], ts[k])), x.dtype)
        if multistep:
            x0 = x0_x[k] * x + x0_eps[k] * eps
            x = c_x[k] * x + c_x0[k] * x0 + c_prev[k] * prev
            prev = tf.ensure_shape(x0, x_T.shape)
        else:
            x = c_x[k] * x + c_eps[k] * eps
        if stochastic:
            z = tf.random.stateless_normal(tf.shape(x), seed=tf.stack([seed[0], seed[1] + k]),
                                           dtype=x.dtype)
            x += sigma[k] * z
        # A network that broadcasts against t (shape [None] in a graph) can widen a batch of 1 to
        # None, which the while-loop refuses; the batch never changes, so pin it.
        x = tf.ensure_shape(x, x_T.shape)
    return x


def teacher_fn(model: Callable, cfg: SamplerConfig, xla: bool = False
               ) -> Callable[[tf.Tensor], tf.Tensor]:
    """z -> x0 by the teacher's solver over the network `model` (it predicts eps), compiled: one
    while-loop with one network call per step. Also runs inside strategy.run."""
    plan = solver_plan(cfg)
    return tf.function(lambda z: run_solver(lambda x, t: model(x, t, training=False), z, plan),
                       jit_compile=xla, reduce_retracing=True)


def student_fn(model: Callable, xla: bool = False) -> Callable[[tf.Tensor], tf.Tensor]:
    """z -> x0 by the student's one network call, compiled."""
    return tf.function(lambda z: student_sample(model, z), jit_compile=xla, reduce_retracing=True)


def student_sample(model: Callable, z: tf.Tensor, t: int = STUDENT_T) -> tf.Tensor:
    """The student's one-step map x0 = z - f(z, t=999) (linear output; clip only when saving)."""
    return z - tf.cast(model(z, tf.fill([tf.shape(z)[0]], t), training=False), z.dtype)


# -- noise -----------------------------------------------------------------------------------------
_STREAM_STRIDE = 1 << 40  # keeps (stream, index) keys apart for any realistic set size


def example_noise(indices: tf.Tensor, seed: int | tf.Tensor, stream: int,
                  shape: tuple[int, int, int]) -> tf.Tensor:
    """X_T for the given example indices: N(0, I) from a stateless generator keyed by
    (seed, stream, index), rounded to float16 (the pair sets' stored precision) and returned as
    float32, so the teacher sees exactly the X that is stored. Independent of batching and of the
    replica count. Graph-compatible (seed and indices may be symbolic): the exported `sample`
    signature calls it. Streams: 0 training pairs, 1 held-out pairs, 2 evaluation samples."""
    return _noise(tf.cast(indices, tf.int64), tf.convert_to_tensor(seed, tf.int64), stream,
                  tuple(shape))


@tf.function(reduce_retracing=True)
def _noise(indices: tf.Tensor, seed: tf.Tensor, stream: int, shape: tuple) -> tf.Tensor:
    # compiled: run eagerly, the map's loop cost 0.3 s per 512 digits (most of the fixed cost of a
    # pair set); the same values either way
    keys = indices + stream * _STREAM_STRIDE

    def one(key):
        return tf.random.stateless_normal(shape, seed=tf.stack([seed, key]))
    x = tf.map_fn(one, keys, fn_output_signature=tf.float32)
    return tf.cast(tf.cast(x, tf.float16), tf.float32)


# -- losses ----------------------------------------------------------------------------------------

def _pseudo_huber(diff: tf.Tensor) -> tf.Tensor:
    """sqrt(||d||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, arXiv:2310.14189)."""
    dim = int(np.prod(diff.shape[1:]))
    c = 0.00054 * np.sqrt(dim)
    return tf.sqrt(tf.reduce_sum(tf.square(diff), axis=[1, 2, 3]) + c * c) - c


# Per-example distillation losses of the difference y - x0 (the original's: sums over pixels and
# channels). The trainer divides their sum by the global batch.
LOSSES: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "l1": lambda d: tf.reduce_sum(tf.abs(d), axis=[1, 2, 3]),  # the paper's cifar10
    "l2": lambda d: tf.reduce_sum(tf.square(d), axis=[1, 2, 3]),  # the paper's celeba, LSUN
    "pseudo_huber": _pseudo_huber,  # improved consistency training's
}


def loss_fn(kind: str) -> Callable[[tf.Tensor], tf.Tensor]:
    if kind not in LOSSES:
        raise UserError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[kind]


def student_loss(model: Callable, z: tf.Tensor, y: tf.Tensor, kind: str) -> tf.Tensor:
    """Per-example distillation loss LOSSES[kind] of y - x0, x0 the student's one-step output."""
    return loss_fn(kind)(y - student_sample(model, z))


def ddpm_loss(model: Callable, x0: tf.Tensor, eps: tf.Tensor, t: tf.Tensor, abar: tf.Tensor,
              training: bool = True) -> tf.Tensor:
    """Per-example DDPM loss (Ho et al.): mean over pixels of (eps - eps_theta(x_t, t))^2 with
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. `abar` is the alpha_bar table as a tensor."""
    a = tf.gather(abar, t)[:, None, None, None]
    x_t = tf.sqrt(a) * x0 + tf.sqrt(1.0 - a) * eps
    pred = tf.cast(model(x_t, t, training=training), x0.dtype)
    return tf.reduce_mean(tf.square(eps - pred), axis=[1, 2, 3])
