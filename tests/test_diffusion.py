"""The sampler math against independent references: the definitions of docs/facts.md re-derived in
NumPy and the closed-form optimal noise predictor for Gaussian data."""
import math

import numpy as np
import pytest
import tensorflow as tf

from models.configs import CONFIGS, SamplerConfig
from models.diffusion import (alpha_bars, ddim_plan, run_solver, student_sample,
                              timestep_sequence)

MU, S = 0.3, 0.5  # data ~ N(MU, S^2 I)


def reference_abar() -> np.ndarray:
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)])
    return np.cumprod(1 - betas)


def optimal_eps_np(x, abar_t):
    return math.sqrt(1 - abar_t) * (x - math.sqrt(abar_t) * MU) / (abar_t * S ** 2 + 1 - abar_t)


def reference_ddim_np(x, seq, abar):
    """The DDIM loop as written in the DDIM paper's code (eta = 0), in float64."""
    seq_next = [-1] + seq[:-1]
    for t, t_next in zip(reversed(seq), reversed(seq_next)):
        a, a_next = abar[t], (abar[t_next] if t_next >= 0 else 1.0)
        eps = optimal_eps_np(x, a)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x0


def tf_optimal_eps(abar):
    table = tf.constant(abar, tf.float32)

    def eps_fn(x, t):
        a = tf.gather(table, t)[:, None]
        return tf.sqrt(1 - a) * (x - tf.sqrt(a) * MU) / (a * S ** 2 + 1 - a)
    return eps_fn


def test_schedule_matches_definition():
    np.testing.assert_allclose(alpha_bars(CONFIGS["cifar10"].sampler), reference_abar(), rtol=1e-12)


def test_sequences_match_reference_definitions():
    quad = [int(v) for v in np.linspace(0, math.sqrt(800), 100) ** 2]
    assert timestep_sequence(CONFIGS["cifar10"].sampler) == quad
    assert timestep_sequence(CONFIGS["celeba"].sampler) == quad
    assert len(set(quad)) == 96 and quad[:4] == [0, 0, 0, 0] and quad[-1] == 800
    assert timestep_sequence(CONFIGS["lsun_church"].sampler) == list(range(0, 1000, 20))
    assert timestep_sequence(CONFIGS["lsun_bedroom"].sampler) == list(range(0, 1000, 20))


def test_plan_drops_only_identity_steps():
    plan = ddim_plan(CONFIGS["cifar10"].sampler)
    assert plan.n_calls == 96
    assert list(plan.t) == sorted(set(timestep_sequence(CONFIGS["cifar10"].sampler)), reverse=True)
    assert ddim_plan(CONFIGS["lsun_church"].sampler).n_calls == 50


@pytest.mark.parametrize("dataset", ["cifar10", "lsun_church"])
def test_ddim_matches_numpy_loop(dataset):
    cfg = CONFIGS[dataset].sampler
    abar = reference_abar()
    x_T = np.random.default_rng(0).standard_normal((64, 5))
    ref = reference_ddim_np(x_T.copy(), timestep_sequence(cfg), abar)
    ours = tf.function(lambda x: run_solver(tf_optimal_eps(abar), x, ddim_plan(cfg)))(
        tf.constant(x_T, tf.float32)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_skipping_identity_steps_is_bit_identical():
    cfg = CONFIGS["cifar10"].sampler
    eps_fn = tf_optimal_eps(reference_abar())
    x = tf.random.stateless_normal([256, 16], seed=[3, 4])
    run = lambda plan: tf.function(lambda v: run_solver(eps_fn, v, plan))(x).numpy()  # noqa: E731
    full, skipped = run(ddim_plan(cfg, skip_identity=False)), run(ddim_plan(cfg))
    assert ddim_plan(cfg, skip_identity=False).n_calls == 100
    assert np.array_equal(full, skipped)


def test_deterministic_ddim_transports_noise_to_the_data_distribution():
    cfg = SamplerConfig(steps=200, skip_type="uniform")
    eps_fn = tf_optimal_eps(reference_abar())
    x = tf.random.stateless_normal([20000, 4], seed=[5, 6])
    y = tf.function(lambda v: run_solver(eps_fn, v, ddim_plan(cfg)))(x).numpy()
    assert abs(y.mean() - MU) < 0.03 * MU + 0.01
    assert abs(y.std() - S) < 0.03 * S


def test_stochastic_ddim_is_seeded_and_still_transports():
    # eta = 1 is ancestral (DDPM-like) sampling: exact only in the limit of all 1000 steps.
    cfg = SamplerConfig(steps=1000, skip_type="uniform")
    eps_fn = tf_optimal_eps(reference_abar())
    plan = ddim_plan(cfg, eta=1.0)
    assert plan.sigma[0] > 0 and plan.sigma[-1] == 0
    x = tf.random.stateless_normal([20000, 4], seed=[7, 8])
    f = tf.function(lambda v, s: run_solver(eps_fn, v, plan, seed=s))
    a, b = f(x, tf.constant([1, 2])).numpy(), f(x, tf.constant([1, 2])).numpy()
    assert np.array_equal(a, b)
    assert abs(a.mean() - MU) < 0.03 * MU + 0.01 and abs(a.std() - S) < 0.03 * S


def test_student_is_residual_at_t999():
    seen = {}

    def fake_net(z, t, training=False):
        seen["t"] = t.numpy()
        return 0.25 * z
    z = tf.random.stateless_normal([3, 4, 4, 3], seed=[1, 1])
    np.testing.assert_allclose(student_sample(fake_net, z).numpy(), 0.75 * z.numpy(), rtol=1e-6)
    assert list(seen["t"]) == [999, 999, 999]


@pytest.mark.parametrize("xla", [False, True])
def test_ddim_runs_a_batch_of_one(xla):
    # The eps function broadcasts against t (shape [None] in the graph), as the UNet's timestep
    # embedding does: a batch of 1 used to widen to None and stop the while-loop.
    cfg = CONFIGS["lsun_church"].sampler
    abar = reference_abar()
    x_T = np.random.default_rng(1).standard_normal((1, 5))
    ref = reference_ddim_np(x_T.copy(), timestep_sequence(cfg), abar)
    ours = tf.function(lambda x: run_solver(tf_optimal_eps(abar), x, ddim_plan(cfg)),
                       jit_compile=xla)(tf.constant(x_T, tf.float32)).numpy()
    assert ours.shape == (1, 5)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
