"""The shipped digits classifier (the feature network of the digits Frechet distance): it loads, it
classifies held-out digits (checked against scikit-learn's labels directly), its features do not
depend on the input encoding, and its FD orders real, real and noise images sensibly."""
from __future__ import annotations

import os

import numpy as np
import pytest

from utils.evaluate import digit_classifier as dc
from utils.images import to_uint8


@pytest.fixture(scope="module")
def model():
    return dc.load_classifier()


@pytest.fixture(scope="module")
def features(model):
    return dc.DigitFeatures(model)


def _sklearn_test_split() -> tuple[np.ndarray, np.ndarray]:
    """Every fifth digit, straight from scikit-learn (not through data.datasets)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    idx = np.arange(0, len(data.target), 5)
    x = data.images[idx].astype(np.float32)[..., None] / 16.0 * 2.0 - 1.0
    return x, data.target[idx]


def test_architecture_is_small_with_64d_features():
    m = dc.build_classifier()
    assert m.count_params() < 200_000
    assert m.get_layer("features").output.shape[-1] == 64
    assert m.output.shape[-1] == 10


def test_shipped_files_are_small_and_not_gitignored_formats():
    names = sorted(os.listdir(dc.DEFAULT_FOLDER))
    assert "classifier.index" in names and "classifier.json" in names
    total = sum(os.path.getsize(os.path.join(dc.DEFAULT_FOLDER, n)) for n in names)
    assert total < 1_000_000
    assert not any(n.endswith((".h5", ".npy", ".pth")) or ".ckpt" in n for n in names)


def test_shipped_classifier_held_out_accuracy(model):
    x, y = _sklearn_test_split()
    assert len(y) == 360
    pred = np.argmax(np.asarray(model(x, training=False)), axis=1)
    acc = float(np.mean(pred == y))
    assert acc >= 0.97
    assert dc.accuracy(model, "test") == pytest.approx(acc)


def test_features_uint8_and_float_inputs_agree(features):
    x, _ = _sklearn_test_split()
    q = to_uint8(x)
    f_q = features(q)
    assert f_q.dtype == np.float64 and f_q.shape == (360, 64)
    # The same pixel values given as floats: identical up to float32 rounding.
    np.testing.assert_allclose(features(q.astype(np.float32) / 127.5 - 1.0), f_q,
                               rtol=1e-5, atol=1e-5)
    # The unquantised originals differ by < 1/255 per pixel: features move only slightly.
    scale = np.abs(f_q).max()
    assert np.abs(features(x) - f_q).max() < 0.02 * scale
    # Batching does not change anything.
    np.testing.assert_allclose(dc.DigitFeatures(features.model, batch_size=7)(q), f_q,
                               rtol=1e-5, atol=1e-5)
    assert features(q[:0]).shape == (0, 64)


@pytest.mark.parametrize("bad", [
    np.full((2, 8, 8, 1), 200.0, np.float32),  # floats in 0..255: a forgotten rescale
    np.zeros((2, 8, 8, 1), np.int64),  # ambiguous integer encoding
    np.zeros((2, 8, 8), np.uint8),  # missing channel axis
    np.full((2, 8, 8, 1), np.nan, np.float32),
])
def test_features_reject_ambiguous_inputs(features, bad):
    with pytest.raises(ValueError):
        features(bad)


def test_fd_ordering(features):
    test_u8 = dc.real_digits_uint8("test")
    assert dc.digits_fd(test_u8, "test", features) == pytest.approx(0.0, abs=1e-6)
    real = dc.digits_fd(dc.real_digits_uint8("train"), "test", features)
    noise = np.random.default_rng(0).integers(0, 256, (360, 8, 8, 1)).astype(np.uint8)
    fd_noise = dc.digits_fd(noise, "test", features)
    assert 0.0 < real and fd_noise > 20 * real
    # The default path (the shipped classifier, loaded once) gives the same figure.
    assert dc.digits_fd(noise) == pytest.approx(fd_noise, rel=1e-9)


def test_save_load_roundtrip_and_errors(model, tmp_path):
    dc.save_classifier(model, str(tmp_path / "c"), {"note": "test"})
    assert sorted(os.listdir(tmp_path / "c")) == [
        "classifier.data-00000-of-00001", "classifier.index", "classifier.json"]
    x, _ = _sklearn_test_split()
    np.testing.assert_array_equal(np.asarray(dc.load_classifier(str(tmp_path / "c"))(x)),
                                  np.asarray(model(x)))
    with pytest.raises(ValueError, match="no digit classifier"):
        dc.load_classifier(str(tmp_path / "missing"))
    # A checkpoint of another network must not load half-way.
    import keras
    import tensorflow as tf
    other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3, name="conv1")])
    os.makedirs(tmp_path / "other")
    tf.train.Checkpoint(**{w.path.replace("/", "__"): w for w in other.weights}).write(
        str(tmp_path / "other" / "classifier"))
    with pytest.raises(ValueError, match="cannot load"):
        dc.load_classifier(str(tmp_path / "other"))


def test_training_is_deterministic_given_the_seed():
    a, b = (dc.train_classifier(seed=3, epochs=1) for _ in range(2))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    c = dc.train_classifier(seed=4, epochs=1)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_quality_measures_against_brute_force(model):
    """nearest_distances, class_shares and confident_share re-derived with plain loops."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)
    fa, fb = a.astype(np.float64) / 127.5 - 1, b.astype(np.float64) / 127.5 - 1
    want = [min(np.sqrt(((x - y) ** 2).sum()) for y in fb) for x in fa]
    np.testing.assert_allclose(dc.nearest_distances(a, b), want, rtol=1e-5)
    assert dc.nearest_distances(b[:5], b).max() < 1e-6  # an image in the reference: distance 0
    probs = dc.class_probabilities(a, model)
    logits = np.asarray(model(fa.astype(np.float32), training=False), np.float64)
    soft = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, soft / soft.sum(1, keepdims=True), atol=1e-5)
    counts = [sum(1 for p in probs if int(np.argmax(p)) == k) / len(probs) for k in range(10)]
    np.testing.assert_allclose(dc.class_shares(probs), counts)
    assert dc.confident_share(probs, 0.5) == np.mean([p.max() > 0.5 for p in probs])


def test_confidence_separates_real_digits_from_noise(model):
    """The threshold's purpose: most held-out real digits pass it, uniform noise rarely does."""
    x, _ = _sklearn_test_split()
    noise = np.random.default_rng(0).integers(0, 256, (500, 8, 8, 1), dtype=np.uint8)
    real = dc.confident_share(dc.class_probabilities(to_uint8(x), model))
    assert real > 0.7 and dc.confident_share(dc.class_probabilities(noise, model)) < 0.15
