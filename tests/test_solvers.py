"""The teacher's fast solver, DPM-Solver++(2M), against diffusers' DPMSolverMultistepScheduler itself
(its default settings, on the same network and noise) and against the exact solution of the
probability-flow ODE for Gaussian data; the solver choice's bad values; the losses' table."""
import math

import numpy as np
import pytest
import tensorflow as tf

from models.configs import CONFIGS, SamplerConfig
from models.diffusion import (LOSSES, choose_sampler, ddim_plan, dpmpp_2m_plan, loss_fn,
                              run_solver, solver_plan, timestep_sequence)
from tests.test_diffusion import MU, S, reference_abar, tf_optimal_eps
from utils.errors import UserError

TINY = CONFIGS["tiny"]


def dpmpp(steps: int, spacing: str = "linspace") -> SamplerConfig:
    return choose_sampler(TINY.sampler, "dpmpp_2m", steps, spacing)


def diffusers_scheduler(steps: int):
    """diffusers' DPMSolverMultistepScheduler with its defaults over the DDPM linear betas."""
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4,
                                              beta_end=0.02, beta_schedule="linear")
    cfg = s.config
    assert (cfg.algorithm_type, cfg.solver_order, cfg.timestep_spacing, cfg.lower_order_final,
            cfg.final_sigmas_type, cfg.solver_type) == ("dpmsolver++", 2, "linspace", True, "zero",
                                                        "midpoint")
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [1, 5, 10, 16, 25])
def test_timesteps_are_diffusers(steps):
    ours = list(dpmpp_2m_plan(dpmpp(steps)).t)
    assert ours == [int(t) for t in diffusers_scheduler(steps).timesteps]
    if steps == 10:  # REFERENCE: NumPy's round gives 500 for 499.5
        assert ours == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def tiny_network():
    from models.unet import UNet, official_variables
    from tests.reference.official import official_variable_shapes, random_params
    net = TINY.network
    params = random_params(official_variable_shapes(net.ch, net.ch_mult, net.num_res_blocks,
                                                    net.attn_resolutions, net.resolution), 3)
    model = UNet(net)
    for name, var in official_variables(model).items():
        var.assign(params[name])
    return model


@pytest.mark.parametrize("steps", [5, 10, 16])
def test_same_images_as_diffusers_on_the_same_network_and_noise(steps):
    torch = pytest.importorskip("torch")
    model = tiny_network()
    x_T = tf.random.stateless_normal([4, *TINY.network.image_shape], seed=[1, steps])
    ours = tf.function(lambda z: run_solver(lambda x, t: model(x, t), z,
                                            solver_plan(dpmpp(steps))))(x_T).numpy()
    scheduler = diffusers_scheduler(steps)
    x = torch.from_numpy(x_T.numpy())
    eps_model = tf.function(lambda v, t: model(v, tf.fill([4], t)))
    for t in scheduler.timesteps:  # diffusers' own loop, our network as its eps model
        eps = eps_model(tf.constant(x.numpy()), tf.constant(int(t))).numpy()
        x = scheduler.step(torch.from_numpy(eps), t, x).prev_sample
    theirs = x.numpy()
    assert np.abs(ours).max() > 0.1  # a real image-sized output, not a trivial one
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * max(1.0, np.abs(theirs).max()))


def exact_x0(x_T: np.ndarray, t: int, abar: np.ndarray) -> np.ndarray:
    """The probability-flow ODE's exact map from x_t to x_0 for data N(MU, S^2): affine in x_t."""
    a = abar[t]
    return MU + S * (x_T - math.sqrt(a) * MU) / math.sqrt(a * S ** 2 + 1 - a)


def solve(plan, x):
    eps_fn = tf_optimal_eps(reference_abar())
    return tf.function(lambda v: run_solver(eps_fn, v, plan))(tf.constant(x, tf.float32)).numpy()


def test_second_order_is_far_closer_to_the_exact_ode_solution_than_ddim():
    x = np.random.default_rng(0).standard_normal((4096, 3))
    exact = exact_x0(x, 999, reference_abar())
    # measured max errors (DPM-Solver++, DDIM): 16 steps 0.154, 0.335; 50 steps 0.0009, 0.114
    for steps, factor in ((16, 2), (50, 50)):
        ddim = choose_sampler(TINY.sampler, "ddim", steps, "linspace")
        err_dpm = np.abs(solve(solver_plan(dpmpp(steps)), x) - exact).max()
        err_ddim = np.abs(solve(solver_plan(ddim), x) - exact).max()
        assert err_dpm < err_ddim / factor, (steps, err_dpm, err_ddim)
    assert err_dpm < 2e-3


def test_first_order_step_is_ddim_between_the_same_timesteps():
    x = np.random.default_rng(1).standard_normal((256, 3))
    one = solve(solver_plan(dpmpp(1)), x)  # one step 999 -> sigma 0: first order
    ddim = solve(ddim_plan(choose_sampler(TINY.sampler, "ddim", 1, "linspace")), x)
    np.testing.assert_allclose(one, ddim, atol=1e-5)


def test_defaults_are_the_datasets_spacing_and_a_quarter_of_ddims_calls():
    # DDIM calls 96, 50, 49, 10; the uniform spacing (DDIM's code: stride T // N) makes 13 of 12
    for name, steps, calls in (("cifar10", 24, 24), ("lsun_church", 12, 13), ("digits", 12, 12),
                               ("tiny", 2, 2)):
        cfg = choose_sampler(CONFIGS[name].sampler, "dpmpp_2m")
        assert (cfg.steps, cfg.skip_type) == (steps, CONFIGS[name].sampler.skip_type)
        assert solver_plan(cfg).n_calls == calls
    assert choose_sampler(CONFIGS["cifar10"].sampler) == CONFIGS["cifar10"].sampler  # the paper's


def test_quadratic_spacing_is_the_datasets_timesteps():
    cfg = dpmpp(12, "quadratic")
    assert list(solver_plan(cfg).t) == sorted(set(timestep_sequence(cfg)), reverse=True)
    assert int(solver_plan(cfg).t[0]) == 800  # the paper's map starts at 0.8 T


@pytest.mark.parametrize("bad, says", [
    (dict(solver="heun"), "unknown solver 'heun'"),
    (dict(solver="dpmpp_2m", steps=0), "0 quadratic solver steps: from 2"),
    (dict(solver="ddim", spacing="karras"), "unknown spacing"),
    (dict(solver="dpmpp_2m", steps=2000, spacing="uniform"), "from 1 to 1000"),
    (dict(solver="ddim", steps=1), "1 quadratic solver steps: from 2 to 1000"),
])
def test_bad_solver_choices_are_refused(bad, says):
    with pytest.raises(UserError, match=says):
        choose_sampler(TINY.sampler, **bad)


def test_eta_stays_ddims():
    stochastic = SamplerConfig(steps=10, skip_type="uniform", eta=1.0)
    assert choose_sampler(stochastic, "ddim").eta == 1.0
    with pytest.raises(UserError, match="eta 1 is DDIM's"):
        choose_sampler(stochastic, "dpmpp_2m")


def test_pseudo_huber_is_the_formula_and_unknown_losses_are_refused():
    d = np.random.default_rng(2).normal(0, 0.1, (5, 8, 8, 3)).astype(np.float32)
    c = 0.00054 * math.sqrt(8 * 8 * 3)
    want = np.sqrt((d.astype(np.float64) ** 2).sum(axis=(1, 2, 3)) + c * c) - c
    np.testing.assert_allclose(LOSSES["pseudo_huber"](tf.constant(d)).numpy(), want, rtol=1e-5)
    assert set(LOSSES) == {"l1", "l2", "pseudo_huber"}
    with pytest.raises(UserError, match="unknown loss 'huber'"):
        loss_fn("huber")
