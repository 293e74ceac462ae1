"""The U-Net: exact parameter counts, official variable names, timestep embedding, forward pass."""
import math

import numpy as np
import pytest
import tensorflow as tf

from models.configs import CONFIGS
from models.unet import UNet, count_parameters, official_variables, timestep_embedding
from tests.reference.official import count_params, official_variable_shapes


def reference_shapes(dataset):
    net = CONFIGS[dataset].network
    return official_variable_shapes(net.ch, net.ch_mult, net.num_res_blocks, net.attn_resolutions,
                                    net.resolution, net.in_ch, net.out_ch)


@pytest.fixture(scope="module")
def cifar10_model():
    """The one full-size network built here (35.7M), shared by the tests below."""
    return UNet(CONFIGS["cifar10"].network)


@pytest.mark.parametrize("dataset,expected", [
    ("cifar10", 35_746_307), ("celeba", 78_700_803),
    ("lsun_bedroom", 113_673_219), ("lsun_church", 113_673_219)])
def test_parameter_counts_are_exact(dataset, expected):
    # Counted from the official variable list, which the next test proves each network matches
    # name for name and shape for shape (the LSUN sets share one network).
    assert CONFIGS["lsun_bedroom"].network == CONFIGS["lsun_church"].network
    assert count_params(reference_shapes(dataset)) == expected


def test_built_network_count_is_the_shape_count(cifar10_model):
    expected = count_params(reference_shapes("cifar10"))
    assert count_parameters(cifar10_model) == expected == 35_746_307
    assert sum(int(np.prod(w.shape)) for w in cifar10_model.weights) == expected  # nothing hidden


@pytest.mark.parametrize("dataset", ["cifar10", "celeba", "lsun_church", "tiny"])
def test_names_and_shapes_match_the_official_list(dataset, request):
    model = (request.getfixturevalue("cifar10_model") if dataset == "cifar10"
             else UNet(CONFIGS[dataset].network))
    ours = {k: tuple(v.shape) for k, v in official_variables(model).items()}
    assert ours == {k: tuple(v) for k, v in reference_shapes(dataset).items()}


def test_timestep_embedding_matches_numpy_formula():
    t = np.array([0, 1, 17, 500, 999], np.float64)
    half = 64
    freqs = np.exp(-math.log(10000) / (half - 1) * np.arange(half))
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(timestep_embedding(tf.constant(t), 128).numpy(), ref, atol=2e-4)


def test_full_cifar10_forward_shape_and_finite(cifar10_model):
    model = cifar10_model  # its weights are overwritten here: the tests above only read shapes
    rng = np.random.default_rng(0)
    for v in model.weights:  # conv_out is zero-initialised; give every weight a value
        v.assign(rng.normal(0, 0.02, v.shape).astype(np.float32) + (1.0 if "gamma" in v.path else 0))
    y = model(tf.random.normal([2, 32, 32, 3]), tf.constant([999, 10]))
    assert y.shape == (2, 32, 32, 3)
    assert np.all(np.isfinite(y.numpy())) and float(tf.math.reduce_std(y)) > 0
