"""KID, precision/recall and the Inception Score against NumPy re-derivations of the papers'
formulas, on synthetic features with known answers (on features of real images:
tests/test_inception.py); IS on a small graph with TTUR's tensor names; `eval.py fid --metrics` as users run it: one network pass per set,
result lines, statistics files with features, several runs, JSON, and bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers import run_main
from utils.evaluate import inception, metrics

# -- the formulas, written out in NumPy -------------------------------------------------------------

def kid_reference(gen, real, seed, subsets, size):
    """Binkowski et al. 2018, eq. (unbiased MMD^2 estimator) with k(x, y) = (x.y / d + 1)^3: the
    mean of k over distinct pairs within each set, minus twice the mean over pairs across, on
    subsets drawn as StyleGAN's kernel_inception_distance.py draws them (generated, then real)."""
    rng = np.random.RandomState(seed)
    d, vals = gen.shape[1], []
    for _ in range(subsets):
        x = gen[rng.choice(len(gen), size, replace=False)].astype(np.float64)
        y = real[rng.choice(len(real), size, replace=False)].astype(np.float64)
        k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        off = ~np.eye(size, dtype=bool)
        vals.append(k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean())
    return np.mean(vals), np.std(vals)


def pr_reference(gen, real, k=3):
    """Kynkaanniemi et al. 2019 by brute force: full squared-distance matrices in float64."""
    def sq(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    r_real = np.sort(sq(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_gen = np.sort(sq(gen, gen), axis=1)[:, k]
    precision = (sq(gen, real) <= r_real[None, :]).any(1).mean()
    recall = (sq(real, gen) <= r_gen[None, :]).any(1).mean()
    return precision, recall


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(0, 1, (300, 16)), rng.normal(0.3, 1, (250, 16))
    ours = metrics.kid(gen, real, seed=5, subsets=20, subset_size=100)
    np.testing.assert_allclose(ours, kid_reference(gen, real, 5, 20, 100), rtol=1e-4)
    # min(1000, n): subsets of all 250 real images here
    assert metrics.kid(gen, real, seed=5, subsets=3)[0] == pytest.approx(
        kid_reference(gen, real, 5, 3, 250)[0], rel=1e-4)


def test_known_answers_itself_and_far_apart():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (400, 8))
    far = a + 100.0
    same_kid, _ = metrics.kid(a, a.copy(), subsets=10, subset_size=200)
    far_kid, _ = metrics.kid(a, far, subsets=10, subset_size=200)
    assert abs(same_kid) < 1e-3 * far_kid
    assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(a, far) == (0.0, 0.0)


@pytest.mark.parametrize("block", [7, 2048])
def test_precision_recall_by_blocks_equal_brute_force(block, monkeypatch):
    monkeypatch.setattr(metrics, "BLOCK", block)
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (60, 5)).astype(np.float32)
    gen = (rng.normal(0.5, 1.3, (45, 5))).astype(np.float32)
    radii = metrics.manifold_radii(real, block=block)
    assert metrics.inside(gen, real, radii, block=block).mean() == pytest.approx(
        pr_reference(gen, real)[0])
    p, r = metrics.precision_recall(gen, real)
    want = pr_reference(gen, real)
    assert (p, r) == pytest.approx(want) and 0 < p < 1 and 0 < r < 1


# -- the Inception Score on a graph with TTUR's names ---------------------------------------------

D, CLASSES = 6, 9


def write_graph_with_head(path, bias: float = 3.0):
    """A frozen graph with TTUR's names: ExpandDims:0 (float [1, H, W, 3]) -> pool_3:0 [1, 1, 1, D]
    -> pool_3/_reshape -> softmax/logits/MatMul (weights [D, CLASSES]) -> softmax/logits (a
    bias add, which the Inception Score leaves out) -> softmax."""
    rng = np.random.default_rng(3)
    w_pool = rng.normal(0, 0.05, (3, D)).astype(np.float32)
    w_cls = rng.normal(0, 1.0, (D, CLASSES)).astype(np.float32)
    b_cls = np.full(CLASSES, bias, np.float32) * np.arange(CLASSES)
    graph = tf.Graph()
    with graph.as_default():
        img = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name="image")
        x = tf.expand_dims(img, 0, name="ExpandDims")
        mean = tf.reduce_mean(x, axis=[1, 2])  # [1, 3]
        pool = tf.reshape(tf.nn.relu(tf.matmul(mean - 128.0, w_pool)), [-1, 1, 1, D], name="pool_3")
        flat = tf.reshape(pool, [1, D], name="pool_3/_reshape")
        logits = tf.matmul(flat, tf.constant(w_cls), name="softmax/logits/MatMul")
        tf.nn.softmax(tf.nn.bias_add(logits, b_cls, name="softmax/logits"), name="softmax")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return w_cls, b_cls, w_pool


def is_reference(probs, splits=10):
    """Salimans et al. 2016 as improved-gan's inception_score.py: exp(E KL(p(y|x) || p(y)))."""
    scores = []
    for i in range(splits):  # inception_score.py's slices: every image in some split
        p = probs[(i * len(probs) // splits):((i + 1) * len(probs) // splits)].astype(np.float64)
        marginal = p.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * (np.log(q) - np.log(marginal))) for q in p])))
    return np.mean(scores), np.std(scores)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_inception_score_uses_the_matmul_weights_without_the_bias(tmp_path):
    w_cls, b_cls, _ = write_graph_with_head(tmp_path / "g.pb")
    net = inception.load_inception(str(tmp_path / "g.pb"))
    assert net.has_classifier
    images = np.random.default_rng(4).integers(0, 256, (43, 5, 7, 3), dtype=np.uint8)  # not 10k
    feats, probs = net.features_and_probs(images)
    np.testing.assert_allclose(feats, net(images), rtol=1e-6)
    np.testing.assert_allclose(probs, softmax(feats.astype(np.float64) @ w_cls), rtol=1e-4,
                               atol=1e-7)
    ours = metrics.inception_score(probs)
    want = is_reference(softmax(feats.astype(np.float64) @ w_cls))
    with_bias = is_reference(softmax(feats.astype(np.float64) @ w_cls + b_cls))
    assert ours == pytest.approx(want, rel=1e-4)
    assert abs(with_bias[0] - want[0]) > 0.05  # the bias would change it: it is left out


# -- eval.py fid --metrics ------------------------------------------------------------------------

def image_folder(path, n, seed, shift=0):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(rng.normal(128 + shift, 60, (8, 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"{i:05d}.png")
    return str(path)


class Counting:
    """The network, counting its calls (one pass per set: a call per batch)."""

    def __init__(self, net):
        self.net, self.calls = net, 0
        self.dim, self.provenance, self.has_classifier = net.dim, net.provenance, True

    def __call__(self, images):
        self.calls += 1
        return self.net(images)

    def features_and_probs(self, images, probs=True):
        self.calls += 1
        return self.net.features_and_probs(images, probs)


def graph_features_np(folder, w_pool):
    """The small graph's pool_3 features of a folder's PNGs, in NumPy: relu((mean - 128) w)."""
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f)), np.float64)
                       for f in sorted(os.listdir(folder))])
    return np.maximum((images.mean(axis=(1, 2)) - 128.0) @ w_pool, 0)


def fid_np(a, b):
    """Frechet distance of two feature sets in NumPy (eigenvalues of S_a S_b, small d)."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b) - 2 * tr_sqrt


def test_all_metrics_from_one_pass_per_set(tmp_path, capsys, monkeypatch):
    w_cls, _, w_pool = write_graph_with_head(tmp_path / "g.pb")
    counting = Counting(inception.load_inception(str(tmp_path / "g.pb")))
    monkeypatch.setattr(inception, "load_inception", lambda path=None: counting)
    a, b = image_folder(tmp_path / "a", 40, 0), image_folder(tmp_path / "b", 30, 1, shift=20)
    code, out, err = run_main("eval", [
        "fid", "tiny", "--images", a, "--reference", b, "--metrics", "fid,kid,pr,is",
        "--fid_batch", "16", "--inception", tmp_path / "g.pb", "--json", tmp_path / "r.json"],
        capsys)
    assert code == 0, err
    assert counting.calls == 3 + 2  # 40 images in batches of 16, then 30
    lines = [line for line in out.splitlines() if ": " in line and not line.startswith(
        ("network", "warning", "wrote"))]
    assert [line.split(" ")[0] for line in lines] == ["FID", "KID", "precision", "recall", "IS"]
    for line in lines:
        assert "40 images of" in line and "30 images of" in line and "TTUR graph g.pb" in line
    assert "inside the reference's manifold" in lines[2] and "inside the measured" in lines[3]
    # every value against the formulas on the graph's features computed here in NumPy
    f_a, f_b = graph_features_np(a, w_pool), graph_features_np(b, w_pool)
    precision, recall = pr_reference(f_a, f_b)
    want = {"FID": fid_np(f_a, f_b), "KID": kid_reference(f_a, f_b, 0, 100, 30)[0],
            "precision": precision, "recall": recall,
            "IS": is_reference(softmax(f_a @ w_cls))[0]}
    result = json.load(open(tmp_path / "r.json"))["results"]
    for line, (name, value) in zip(lines, want.items()):
        printed = float(line.rsplit(": ", 1)[1].split()[0])  # 4 decimals, then KID's and IS's std
        assert printed == pytest.approx(value, rel=1e-3, abs=1e-4), name
        stored = result[name.lower()]
        assert (stored["mean"] if isinstance(stored, dict) else stored) == pytest.approx(
            value, rel=1e-3, abs=1e-5), name
    # not a degenerate case: two different sets, a score above 1
    assert want["FID"] > 1e-3 and want["KID"] > 1e-4 and want["IS"] > 1.01


def test_statistics_keep_the_features_and_serve_every_metric(tmp_path, capsys):
    write_graph_with_head(tmp_path / "g.pb")
    a, b = image_folder(tmp_path / "a", 24, 0), image_folder(tmp_path / "b", 20, 1, shift=20)
    g = str(tmp_path / "g.pb")
    code, _, err = run_main("eval", ["fid", "tiny", "--images", b, "--save_stats",
                                     tmp_path / "b.npz", "--reference", a, "--inception", g],
                            capsys)
    assert code == 0, err
    with np.load(tmp_path / "b.npz") as f:
        assert f["features"].shape == (20, D) and f["features"].dtype == np.float16
    args = ["fid", "tiny", "--images", a, "--metrics", "fid,kid,pr", "--inception", g]
    code, from_stats, err = run_main("eval", [*args, "--reference", tmp_path / "b.npz"], capsys)
    assert code == 0, err
    code, from_images, err = run_main("eval", [*args, "--reference", b], capsys)
    assert code == 0, err
    value = lambda out, name: float(next(line for line in out.splitlines()  # noqa: E731
                                         if line.startswith(name)).rsplit(": ", 1)[1].split()[0])
    for name in ("FID", "KID", "precision", "recall"):  # float16 features: the same results
        assert value(from_stats, name) == pytest.approx(value(from_images, name), rel=2e-3,
                                                        abs=2e-4), name


def test_several_runs_give_mean_and_std_and_measure_the_reference_once(tiny_student, tmp_path,
                                                                     capsys, monkeypatch):
    write_graph_with_head(tmp_path / "g.pb")
    counting = Counting(inception.load_inception(str(tmp_path / "g.pb")))
    monkeypatch.setattr(inception, "load_inception", lambda path=None: counting)
    ref = image_folder(tmp_path / "ref", 20, 1)
    code, out, err = run_main("eval", [
        "fid", "tiny", "--model_dir", tiny_student, "--n_images", "12", "--n_runs", "3",
        "--reference", ref, "--metrics", "fid,kid", "--fid_batch", "12", "--no-xla",
        "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert counting.calls == 3 * 1 + 2  # one batch per run; the reference (20) once, in 2
    runs = json.load(open(tmp_path / "r.json"))
    assert runs["seeds"] == [0, 1, 2]
    fids = [v for v in runs["results"]["fid"]["runs"]]
    assert len(set(fids)) == 3  # three different sample sets
    assert runs["results"]["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert "FID over 3 runs (seeds 0-2) of 12 samples vs 20 images of" in out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    g_head, g_plain = tmp_path / "g.pb", tmp_path / "plain.pb"
    write_graph_with_head(g_head)
    from tests.test_fid import _write_fake_inception
    _write_fake_inception(g_plain)  # pool_3 and a softmax, but no softmax/logits/MatMul
    a = image_folder(tmp_path / "a", 6, 0)
    ttur_stats = tmp_path / "fid_stats_tiny.npz"  # TTUR's layout: mu and sigma only
    np.savez(ttur_stats, mu=np.zeros(D), sigma=np.eye(D))
    cases = [
        (["--images", a, "--metrics", "fid,sharpness"], "unknown metric 'sharpness'"),
        (["--images", a, "--metrics", "is", "--inception", g_plain], "lacks: pass --inception"),
        (["--images", a, "--metrics", "kid", "--reference", ttur_stats, "--inception", g_head],
         "hold mu and sigma only"),
        (["--images", a, "--metrics", "pr", "--reference", ttur_stats, "--inception", g_head],
         "pr need the features"),
        (["--images", a, "--n_runs", "2", "--reference", ttur_stats], "not with --images"),
        (["--images", a, "--metrics", "is", "--reference", a, "--inception", g_head],
         "is needs at least 10 images a side; the measured set has 6"),
        (["--images", a, "--metrics", "pr", "--reference", image_folder(tmp_path / "three", 3, 2),
          "--inception", g_head], "pr needs at least 4 images a side; the reference set has 3"),
    ]
    for extra, says in cases:
        before = sorted(os.listdir(tmp_path))
        code, out, err = run_main("eval", ["fid", "tiny", *extra, "--json", tmp_path / "r.json"],
                                  capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert sorted(os.listdir(tmp_path)) == before, extra
    code, _, err = run_main("eval", ["fid", "digits", "--metrics", "kid"], capsys)
    assert code == 2 and "--metrics do not apply" in err
