"""eval.py export: the SavedModel checked in a process where only TensorFlow is importable, against
eval's own PNGs and an independent forward pass; the TFLite models run by the TFLite interpreter."""
import importlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from models.configs import CONFIGS
from models.weights import load_unet
from tests.helpers import ROOT, run_main
from utils.evaluate.export import tflite_denoiser, tflite_model, tflite_name

# One worker runs this module (make test: --dist loadgroup): the export and the TensorFlow-only
# process reading it are module fixtures, too costly to make on both.
pytestmark = pytest.mark.xdist_group("export")
DIGITS = CONFIGS["digits"]
STUDENT = os.path.join(ROOT, "models", "pretrained", "digits", "student")
SEED, N = 3_000_000_000, 50  # a seed beyond int32, and more images than tofolder's batch of 20

# Run with `python -I` from a temporary folder: no project code on sys.path. Writes its results to
# an .npz; fails if any module was loaded from the repository.
FRESH = """
import os
import sys
import numpy as np
import tensorflow as tf

saved, z_file, out, root, seed, n = sys.argv[1:]
model = tf.saved_model.load(saved)
seed, n = tf.constant(int(seed), tf.int64), tf.constant(int(n), tf.int32)
results = {name: model.signatures[name](seed=seed, n=n)["images"].numpy()
           for name in ("sample", "serving_default")}
results["empty"] = model.signatures["sample"](seed=seed, n=tf.constant(0))["images"].numpy()
results["denoise"] = model.signatures["denoise"](z=tf.constant(np.load(z_file)))["images"].numpy()
try:
    model.signatures["sample"](seed=seed, n=tf.constant(-1))
    results["negative_n_refused"] = np.array(False)
except tf.errors.InvalidArgumentError:
    results["negative_n_refused"] = np.array(True)
# TF Serving's way: a TF1 session restoring the variables through the SavedModel's own saver.
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    sig = tf.compat.v1.saved_model.load(sess, ["serve"], saved).signature_def["sample"]
    feeds = {sig.inputs["seed"].name: int(seed), sig.inputs["n"].name: int(n)}
    results["session"] = sess.run(sig.outputs["images"].name, feeds)
# modules loaded from the repository (a virtual environment inside it does not count)
ours = [m for m in list(sys.modules.values())
        if (getattr(m, "__file__", None) or "").startswith(root + os.sep)
        and not m.__file__.startswith(sys.prefix + os.sep)]
assert not ours, ours
np.savez(out, **results)
"""


def eval_main(argv):
    return importlib.import_module("eval").main([str(a) for a in argv])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits"
    out.mkdir()  # an existing empty folder is accepted
    assert eval_main(["export", out, "digits"]) == 0
    return out


@pytest.fixture(scope="module")
def z():
    return np.random.default_rng(0).standard_normal((64, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(z):
    """The student's one step, written out here: x0 = z - f(z, 999), clipped, scaled, rounded."""
    model, _ = load_unet(STUDENT, DIGITS)
    x0 = z - model(tf.constant(z), tf.fill([len(z)], 999)).numpy()
    images = np.rint((np.clip(x0, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    assert (images == 0).any() and (images == 255).any()  # the clipping is exercised
    return images


@pytest.fixture(scope="module")
def fresh(export_dir, z, tmp_path_factory):
    """What a process with nothing but TensorFlow gets from the SavedModel."""
    work = tmp_path_factory.mktemp("fresh")
    np.save(work / "z.npy", z)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", FRESH, str(export_dir / "saved_model"),
                        str(work / "z.npy"), str(work / "out.npz"), ROOT, str(SEED), str(N)],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(work / "out.npz"))


def eval_pngs(tmp_path, capsys, *flags):
    """eval.py's own images: `tofolder` (in this process)."""
    code, _, err = run_main("eval", ["tofolder", tmp_path / "imgs", "digits", "--seed", SEED,
                                     "--n_images", N, *flags], capsys)
    assert code == 0, err
    return np.stack([np.asarray(Image.open(tmp_path / "imgs" / f"{i:05d}.png"))[..., None]
                     for i in range(N)])


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_sample_is_bit_identical_to_eval_tofolder(fresh, tmp_path, capsys):
    pngs = eval_pngs(tmp_path, capsys)
    assert fresh["sample"].dtype == np.uint8 and fresh["sample"].shape == (N, 8, 8, 1)
    assert np.array_equal(fresh["sample"], pngs)
    assert np.array_equal(fresh["serving_default"], pngs)


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_savedmodel_loads_in_a_tf1_session_like_tf_serving(fresh):
    # The TF1 loader restores variables through the SavedModel's saver, as TF Serving's C++ loader
    # does; Keras 3 variables exported through the Keras model come out uninitialised there.
    assert np.array_equal(fresh["session"], fresh["sample"])


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_sample_edge_cases(fresh):
    assert fresh["empty"].shape == (0, 8, 8, 1) and fresh["empty"].dtype == np.uint8
    assert fresh["negative_n_refused"]


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_denoise_matches_the_student_computed_here(fresh, reference):
    got = fresh["denoise"]
    assert got.dtype == np.uint8 and got.shape == reference.shape
    diff = np.abs(got.astype(int) - reference)
    # XLA (the export) and eager kernels may round a pixel near a .5 boundary differently.
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_tflite_float32_matches_the_student(export_dir, z, reference):
    with warnings.catch_warnings():
        # Still works in TF 2.21; its successor is the ai-edge-litert package.
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_path=str(export_dir / "denoise_float32.tflite"))
    got = interpreter.get_signature_runner("denoise")(z=z)["images"]
    assert got.dtype == np.uint8 and got.shape == reference.shape
    assert (np.abs(got.astype(int) - reference) <= 1).mean() >= 0.999


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_fp16_tflite_loads_and_shrinks(export_dir, z, tmp_path):
    """Drift is reported by bench/export.py, not asserted; but the weights must really shrink
    (a converter that silently keeps float32 would keep the size). int8: the test at the end."""
    path = tmp_path / tflite_name("fp16")
    path.write_bytes(tflite_model(str(export_dir / "saved_model"), "fp16"))
    images = tflite_denoiser(str(path))(z[:5])
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert os.path.getsize(path) < 0.6 * os.path.getsize(export_dir / "denoise_float32.tflite")


@pytest.mark.slow  # the export module fixture: a whole export and a fresh process
def test_readme_names_files_signatures_and_weights(export_dir):
    assert sorted(os.listdir(export_dir)) == ["README.txt", "denoise_float32.tflite", "saved_model"]
    text = (export_dir / "README.txt").read_text()
    _, weights = load_unet(STUDENT, DIGITS)
    for part in (weights.describe(), 'signature "sample" (also "serving_default")',
                 'signature "denoise"', "images uint8 [n, 8, 8, 1]", "z float32 [N, 8, 8, 1]",
                 "denoise_float32.tflite", "XLA on"):
        assert part in text, part


def test_existing_export_is_refused_and_left_unchanged(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_main("eval", ["export", out, "digits"], capsys)
    assert code == 2 and err.count("\n") == 1 and "never overwritten" in err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left behind
    (tmp_path / "file").write_text("x")
    code, _, err = run_main("eval", ["export", tmp_path / "file", "digits"], capsys)
    assert code == 2 and "is a file, not a directory" in err and err.count("\n") == 1


def test_bad_arguments_are_refused(tmp_path, capsys):
    code, _, err = run_main("eval", ["export", tmp_path / "a", "digits", "--tflite", "int4"], capsys)
    assert code == 2 and "invalid choice: 'int4'" in err
    code, _, err = run_main("eval", ["export", tmp_path / "b", "digits", "--model_dir",
                                     tmp_path / "missing"], capsys)
    assert code == 2 and err.startswith("error: argument --model_dir") and "not found" in err
    assert err.count("\n") == 1 and os.listdir(tmp_path) == []
    (tmp_path / "empty").mkdir()  # exists, but holds no student
    code, _, err = run_main("eval", ["export", tmp_path / "c", "digits", "--model_dir",
                                     tmp_path / "empty"], capsys)
    assert code == 2 and err.startswith("error: no digits student") and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["empty"]


@pytest.mark.slow  # an export, failing half-way
def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import utils.evaluate.export

    def broken(*args):
        raise RuntimeError("converter failed")
    monkeypatch.setattr(utils.evaluate.export, "tflite_model", broken)
    model, weights = load_unet(STUDENT, DIGITS)
    with pytest.raises(RuntimeError, match="converter failed"):
        utils.evaluate.export.export(str(tmp_path / "export"), model, weights, DIGITS)
    assert os.listdir(tmp_path) == []


def test_help_names_the_signatures_and_options(capsys):
    code, out, _ = run_main("eval", ["export", "--help"], capsys)
    assert code == 0
    for part in ("sample(seed int64, n int32)", "denoise(z float32", "serving_default = sample",
                 "--tflite {float32,fp16,int8}", "--no-xla", "never overwritten"):
        assert part in out, part


@pytest.mark.slow
def test_no_xla_int8_export_matches_tofolder_no_xla(export_dir, tmp_path, z, capsys):
    code, _, err = run_main("eval", ["export", tmp_path / "export", "digits", "--no-xla",
                                     "--tflite", "int8"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "export")) == ["README.txt", "denoise_int8.tflite",
                                                       "saved_model"]
    assert "XLA off" in (tmp_path / "export" / "README.txt").read_text()
    sample = tf.saved_model.load(str(tmp_path / "export" / "saved_model")).signatures["sample"]
    got = sample(seed=tf.constant(SEED, tf.int64), n=tf.constant(N))["images"].numpy()
    assert np.array_equal(got, eval_pngs(tmp_path, capsys, "--no-xla"))
    int8 = tmp_path / "export" / "denoise_int8.tflite"
    images = tflite_denoiser(str(int8))(z[:3])
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    # the weights really shrink (drift: bench/export.py)
    assert os.path.getsize(int8) < 0.4 * os.path.getsize(export_dir / "denoise_float32.tflite")
