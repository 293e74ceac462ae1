"""FID machinery against independent references: scipy's sqrtm, np.cov, a NumPy re-computation of
a small frozen graph shaped like the Inception file, tfds mock data, and hand-computed crops."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from utils.evaluate import fid, image_sets, inception
from utils.evaluate.fid import FIDError
from utils.evaluate.inception import InceptionError

# -- frechet_distance -----------------------------------------------------------------------------


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (TTUR's original form)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(np.real(covmean)))


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_matches_scipy(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    expected = _scipy_fid(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # Symmetric in its two arguments, like the distance it is.
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_rank_deficient(d):
    # Fewer "samples" than dimensions in one covariance (rank d//4), as with small sample counts.
    rng = np.random.default_rng(100 + d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d, rank=d // 4), _random_cov(rng, d)
    expected = _scipy_fid(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_identical_and_diagonal():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(64), _random_cov(rng, 64)
    assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # Both singular and identical: still ~0, no complex parts.
    s_low = _random_cov(rng, 64, rank=5)
    assert fid.frechet_distance(mu, s_low, mu, s_low) == pytest.approx(0.0, abs=1e-8)
    # Diagonal closed form: ||mu1-mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0, 3, 16), rng.uniform(0, 3, 16)
    a[:3] = 0.0  # zero variances are allowed
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected,
                                                                                   rel=1e-10)


def test_frechet_distance_rejects_mismatch():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -- statistics -----------------------------------------------------------------------------------


def test_feature_statistics_and_streaming():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((203, 32)) * rng.uniform(0.1, 3, 32) + 50.0).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    np.testing.assert_allclose(mu, np.mean(feats.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)

    # compute_statistics over uint8 "images" whose features are a fixed projection: the streaming
    # float64 sums must equal the all-at-once statistics, whatever the batch boundaries.
    images = rng.integers(0, 256, (203, 4, 4, 3), dtype=np.uint8)
    proj = rng.standard_normal((48, 16))

    def feature_fn(x):
        return (x.reshape(len(x), -1).astype(np.float64) @ proj).astype(np.float32)

    ref_mu, ref_sigma = fid.feature_statistics(feature_fn(images))
    chunks = [images[:50], images[50:51], images[51:190], images[190:]]
    got = fid.compute_statistics(iter(chunks), feature_fn, batch_size=32, progress=False)
    assert got.count == 203
    np.testing.assert_allclose(got.mu, ref_mu, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got.sigma, ref_sigma, rtol=1e-9, atol=1e-6)

    # limit: only the first 100 images are used.
    got = fid.compute_statistics(chunks, feature_fn, 32, progress=False, limit=100)
    ref_mu_l, ref_sigma_l = fid.feature_statistics(feature_fn(images[:100]))
    assert got.count == 100
    np.testing.assert_allclose(got.mu, ref_mu_l, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(got.sigma, ref_sigma_l, rtol=1e-9, atol=1e-6)

    with pytest.raises(ValueError, match="uint8"):
        fid.compute_statistics([images.astype(np.float32)], feature_fn, 32, progress=False)


def test_save_load_statistics(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.standard_normal(8), _random_cov(rng, 8)
    path = str(tmp_path / "sub" / "stats.npz")
    fid.save_statistics(path, fid.Statistics(mu, sigma, 123, "net X"))
    got = fid.load_statistics(path, dim=8)
    np.testing.assert_array_equal(got.mu, mu)
    np.testing.assert_array_equal(got.sigma, sigma)
    assert (got.count, got.network) == (123, "net X")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["stats.npz"]  # no temp left
    with np.load(path, allow_pickle=False) as data:  # what TTUR's code reads: mu and sigma
        np.testing.assert_array_equal(data["mu"], mu)
    with pytest.raises(FIDError, match="holds 8-d features; the Inception network gives 2048"):
        fid.load_statistics(path, dim=2048)
    ttur = tmp_path / "fid_stats_cifar10_train.npz"  # TTUR's layout: mu and sigma only
    np.savez(ttur, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    got = fid.load_statistics(str(ttur))
    assert got.count is None and got.network is None and got.mu.dtype == np.float64

    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=mu, cov=sigma)
    with pytest.raises(FIDError, match="mu, sigma"):
        fid.load_statistics(str(bad))
    with pytest.raises(FIDError, match="not found"):
        fid.load_statistics(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(FIDError):
        fid.load_statistics(str(tmp_path / "junk.npz"))


# -- the graph-loading path -----------------------------------------------------------------------

D, SIZE = 16, 8  # feature size and resize target of the small stand-in graph
BN_EPS = 0.001


def _small_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 3, D)).astype(np.float32) * 0.5
    mean, var = rng.standard_normal(D) * 0.3, rng.uniform(0.5, 2.0, D)
    beta, gamma = rng.standard_normal(D) * 0.2, rng.uniform(0.5, 1.5, D)
    return w, [a.astype(np.float32) for a in (mean, var, beta, gamma)]


def _write_fake_inception(path) -> None:
    """A frozen TF1 GraphDef laid out like classify_image_graph_def.pb, at toy size:
    DecodeJpeg/contents -> DecodeJpeg -> Cast -> ExpandDims (static batch 1) -> ResizeBilinear
    -> Sub 128 -> Mul 1/128 -> conv -> BatchNormWithGlobalNormalization -> relu -> pool_3
    [1,1,1,D] -> pool_3/_reshape [1,D] -> softmax. Like the 2015 file it uses the batch-norm op
    removed at GraphDef version 9 and declares an older producer; it is written with
    _output_shapes annotations so the batch-1 shapes are pinned in the file."""
    w, bn_params = _small_weights()
    graph = tf.Graph()
    with graph.as_default():
        contents = tf.compat.v1.placeholder(tf.string, shape=[], name="DecodeJpeg/contents")
        img = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(img, tf.float32, name="Cast"), 0, name="ExpandDims")
        assert x.shape.as_list() == [1, None, None, 3]
        x = tf.raw_ops.ResizeBilinear(images=x, size=tf.constant([SIZE, SIZE]),
                                      name="ResizeBilinear")  # legacy: no half-pixel centers
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        conv = tf.nn.conv2d(x, tf.constant(w), 1, "VALID", name="conv")
        for name, value in zip(("bn/mean", "bn/var", "bn/beta", "bn/gamma"), bn_params):
            tf.constant(value, name=name)
        # TF 2.21 will not create the deprecated op, so an Identity stands in and is renamed below.
        bn = tf.identity(conv, name="bn")
        pool = tf.nn.avg_pool2d(tf.nn.relu(bn), SIZE - 2, 1, "VALID", name="pool_3")
        assert pool.shape.as_list() == [1, 1, 1, D]
        tf.nn.softmax(tf.reshape(pool, [1, D], name="pool_3/_reshape"), name="softmax")
    graph_def = graph.as_graph_def(add_shapes=True)
    (node,) = [n for n in graph_def.node if n.name == "bn"]
    node.op = "BatchNormWithGlobalNormalization"
    del node.input[:]
    node.input.extend(["conv", "bn/mean", "bn/var", "bn/beta", "bn/gamma"])
    node.attr["variance_epsilon"].f = BN_EPS
    node.attr["scale_after_normalization"].b = True
    graph_def.versions.producer = 8  # the op was removed at version 9
    path.write_bytes(graph_def.SerializeToString())


def _legacy_resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) of one HxWxC image."""
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y0, y1, fy = axis(img.shape[0])
    x0, x1, fx = axis(img.shape[1])
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def _numpy_features(images: np.ndarray) -> np.ndarray:
    w, (mean, var, beta, gamma) = _small_weights()
    w = w.astype(np.float64)
    out = []
    for img in images.astype(np.float64):
        x = (_legacy_resize_bilinear(img, SIZE) - 128.0) / 128.0
        conv = np.zeros((SIZE - 2, SIZE - 2, D))
        for i in range(3):
            for j in range(3):
                conv += x[i:i + SIZE - 2, j:j + SIZE - 2] @ w[i, j]
        bn = (conv - mean) / np.sqrt(var.astype(np.float64) + BN_EPS) * gamma + beta
        out.append(np.maximum(bn, 0).mean(axis=(0, 1)))
    return np.array(out)


def test_inception_loader_on_small_frozen_graph(tmp_path):
    path = tmp_path / "fake_inception.pb"
    _write_fake_inception(path)
    net = inception.load_inception(str(path))
    assert net.dim == D
    # The file pins batch 1 (ExpandDims, _output_shapes); the loaded function must not.
    assert net.output_shape.as_list() == [None, 1, 1, D]
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 13, 11, 3), dtype=np.uint8)  # batch 5 through a batch-1 graph
    feats = net(images)
    assert feats.shape == (5, D) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, _numpy_features(images), rtol=1e-4, atol=1e-4)
    # Another image size and batch size through the same function (the graph resizes itself).
    images2 = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(net(images2), _numpy_features(images2), rtol=1e-4, atol=1e-4)
    # And through compute_statistics.
    got = fid.compute_statistics([images], net, batch_size=2, progress=False)
    ref_mu, ref_sigma = fid.feature_statistics(_numpy_features(images))
    np.testing.assert_allclose(got.mu, ref_mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.sigma, ref_sigma, rtol=1e-3, atol=1e-5)
    assert net.provenance.tag == "ttur" and "sha256" in net.provenance.checksum


def test_inception_loader_errors(tmp_path):
    with pytest.raises(InceptionError, match="inception-2015-12-05.tgz") as e:
        inception.load_inception(str(tmp_path / "classify_image_graph_def.pb"))
    assert "not found" in str(e.value) and "\n" not in str(e.value)

    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 10)
    with pytest.raises(InceptionError, match="inception-2015-12-05.tgz") as e:
        inception.load_inception(str(garbage))
    assert "\n" not in str(e.value)

    # A valid GraphDef without the Inception tensors.
    other = tf.Graph()
    with other.as_default():
        tf.constant(1.0, name="x")
    wrong = tmp_path / "other.pb"
    wrong.write_bytes(other.as_graph_def().SerializeToString())
    with pytest.raises(InceptionError, match="pool_3"):
        inception.load_inception(str(wrong))


# -- reference images -----------------------------------------------------------------------------


def test_reference_images_cifar10_mock(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=7):
        ref = image_sets.reference_images("cifar10", "train", str(tmp_path), batch_size=3)
        batches = list(ref)
        assert [b.shape for b in ref] == [b.shape for b in batches]  # re-iterable
    assert [b.shape for b in batches] == [(3, 32, 32, 3), (3, 32, 32, 3), (1, 32, 32, 3)]
    assert all(b.dtype == np.uint8 for b in batches)


def test_reference_images_celeba_mock(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=3):
        batches = list(image_sets.reference_images("celeba", "train", str(tmp_path), batch_size=2))
    assert [b.shape for b in batches] == [(2, 64, 64, 3), (1, 64, 64, 3)]
    assert all(b.dtype == np.uint8 for b in batches)


def test_reference_images_not_prepared_or_unknown(tmp_path):
    with pytest.raises(FIDError, match="not prepared") as e:
        image_sets.reference_images("cifar10", "train", str(tmp_path))  # fails on the call, not later
    assert "--reference" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FIDError, match="--reference"):
        image_sets.reference_images("lsun_bedroom", "train", str(tmp_path))


def test_ddim_celeba_crop_picks_the_right_pixels():
    rows, cols = np.meshgrid(np.arange(218), np.arange(178), indexing="ij")
    img = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    crop = image_sets.ddim_celeba_crop(img)
    assert crop.shape == (128, 128, 3)
    # DDIM: cx=89, cy=121 -> top = cy-64 = 57, left = cx-64 = 25, 128x128.
    assert tuple(crop[0, 0, :2]) == (57, 25)
    assert tuple(crop[127, 127, :2]) == (57 + 127, 25 + 127)
    np.testing.assert_array_equal(crop[:, 0, 0], np.arange(57, 185))
    np.testing.assert_array_equal(crop[0, :, 1], np.arange(25, 153))
    with pytest.raises(ValueError):
        image_sets.ddim_celeba_crop(np.zeros((64, 64, 3), np.uint8))


def test_ddim_celeba_resize_is_antialiased_bilinear():
    # Independent reference for PIL's BILINEAR 2x shrink: a triangle filter widened by 2, i.e.
    # taps (1, 3, 3, 1)/8 per axis around each output pixel, renormalized at the borders.
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    m = np.zeros((64, 128))
    for i in range(64):
        for j, t in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1)):
            if 0 <= j < 128:
                m[i, j] = t
    m /= m.sum(axis=1, keepdims=True)
    expected = np.einsum("ai,bj,ijc->abc", m, m, img.astype(np.float64))
    got = image_sets.ddim_celeba_resize(img)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.max(np.abs(got.astype(np.float64) - expected)) <= 1.0  # PIL's fixed-point rounding
