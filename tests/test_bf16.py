"""--bf16: every path runs and stays within the drift measured by bench/bf16.py; float32 is
untouched. The CPU path (oneDNN's graph rewrite) needs oneDNN switched on before TensorFlow starts,
so those runs are real subprocesses, as a user runs them."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from models.configs import CONFIGS
from models.diffusion import student_fn
from tests.helpers import run_cli, run_main
from utils import precision
from utils.evaluate.sampling import load_student, noise_for

# Drift measured on this project's 2-core CPU (no bfloat16 units: emulated, the same rounding as
# native units); the bounds are about twice it. The shipped digits student through oneDNN's rewrite
# (bench/bf16.py, 4 x 1,437 samples): at most 47 levels (of 255) off its float32 images, 6.4% of
# pixels more than one level (256 samples in this test: 17 levels, 5.7%). The tiny random teacher's DDIM
# pairs (oneDNN; 10 steps compound the rounding): 89 levels, 2.7%; on an Intel Xeon with native
# AVX512-BF16/AMX units, the 64 pairs of this test (12,288 values): 68 levels at most, 2.66% more
# than one level, mean 0.45 levels, 99th percentile 17 levels. PAIRS_MAX is about twice those
# maxima (2.4x 68, 1.8x 89): a bound a uint8 difference can exceed (at most 255), unlike 255.
# The tiny export computing in bfloat16 (compute dtype): 1 level, 0.0%.
DIGITS_MAX, DIGITS_SHARE = 96, 0.13
PAIRS_MAX, PAIRS_SHARE = 160, 0.06
EXPORT_MAX, EXPORT_SHARE = 4, 0.01


def drift(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(int) - b.astype(int))
    return int(d.max()), float((d > 1).mean())


def test_prepare_turns_onednn_on_only_for_bf16(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    precision.prepare(["figures", "./f", "digits"])
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ  # float32 runs exactly as before
    precision.prepare(["figures", "./f", "digits", "--bf16"])
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    precision.prepare(["--bf16"])
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"  # the user's own setting is kept
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert precision.cpu_has_bf16(str(cpuinfo)) is True
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert precision.cpu_has_bf16(str(cpuinfo)) is False
    assert precision.cpu_has_bf16(str(tmp_path / "missing")) is None


def read_pngs(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(folder, f)))
                     for f in sorted(os.listdir(folder)) if f.endswith(".png")])


@pytest.mark.slow
def test_eval_bf16_on_the_cpu_path_stays_near_float32(tmp_path):
    out = tmp_path / "imgs"
    r = run_cli("eval.py", "tofolder", str(out), "digits", "--n_images", "128", "--batch_size",
                "128", "--bf16")
    assert r.returncode == 0, r.stderr
    assert "bf16: oneDNN mixed precision" in r.stdout
    if precision.cpu_has_bf16() is False:
        assert "this CPU has no bfloat16 units" in r.stdout
    cfg = CONFIGS["digits"]
    model, _ = load_student(None, cfg)
    ref = np.rint((np.clip(student_fn(model, True)(noise_for(np.arange(128), cfg, 0)).numpy(),
                           -1, 1) + 1) * 127.5).astype(np.uint8)[..., 0]
    biggest, share = drift(read_pngs(out), ref)
    print(f"digits student, bf16 vs float32: {biggest} levels at most, {share:.2%} > 1 level")
    assert 0 < biggest <= DIGITS_MAX and share <= DIGITS_SHARE  # bfloat16 really ran


def test_speed_bf16_times_the_student_in_bfloat16_too(capsys):
    # In this process TensorFlow has already started, with oneDNN on or off as it chose (on by
    # default on Intel CPUs with AVX512-BF16/AMX, off on others unless TF_ENABLE_ONEDNN_OPTS=1):
    # speed --bf16 takes the path of enable_bf16 for that, and says which.
    rewrite = not precision.on_accelerator() and precision.onednn_enabled()
    try:
        code, out, err = run_main("eval", ["speed", "tiny", "--bf16", "--batch_size", "4",
                                           "--repeats", "1", "--no-xla"], capsys)
    finally:  # the rewrite is process-wide: it would turn later tests' float32 into bfloat16
        precision.disable_bf16()
    assert code == 0, err
    if rewrite:
        assert "bf16: oneDNN mixed precision (a graph rewrite: the network runs without XLA)" in out
    else:
        assert "bf16: the network's compute dtype" in out
    assert "student, bfloat16:" in out and "x float32; largest output difference" in out


@pytest.mark.slow
def test_export_bf16_computes_in_bfloat16_near_float32(tiny_teacher, tmp_path, capsys):
    import tensorflow as tf

    from utils.images import to_uint8
    code, out, err = run_main("eval", ["export", tmp_path / "bf16", "tiny", "--model_dir",
                                       tiny_teacher, "--no-xla", "--bf16"], capsys)
    assert code == 0, err
    assert "Arithmetic: bfloat16" in (tmp_path / "bf16" / "README.txt").read_text()
    assert sorted(os.listdir(tmp_path / "bf16")) == ["README.txt", "denoise_float32.tflite",
                                                     "saved_model"]
    loaded = tf.saved_model.load(str(tmp_path / "bf16" / "saved_model"))
    got = loaded.signatures["sample"](seed=tf.constant(0, tf.int64), n=tf.constant(64))["images"]
    cfg = CONFIGS["tiny"]
    model, _ = load_student(tiny_teacher, cfg)  # the same weights in float32, here
    want = to_uint8(student_fn(model)(noise_for(np.arange(64), cfg, 0)).numpy())
    biggest, share = drift(got.numpy(), want)
    with capsys.disabled():
        print(f"tiny export, bf16 vs float32: {biggest} levels at most, {share:.2%} > 1 level")
    assert 0 < biggest <= EXPORT_MAX and share <= EXPORT_SHARE
    code, _, err = run_main("eval", ["export", tmp_path / "x", "tiny", "--model_dir", tiny_teacher,
                                     "--format", "diffusers", "--bf16"], capsys)
    assert code == 2 and "--bf16 applies to --format tf only" in err


@pytest.mark.slow
def test_bf16_pairs_are_recorded_and_near_float32(tiny_teacher, tiny_pairs, tmp_path, capsys):
    """The first shard of the session's pair set (seed 1), generated again with --bf16."""
    pairs = tmp_path / "pairs"
    args = ["training.py", "tiny", str(tmp_path / "run"), "--teacher", tiny_teacher, "--datadir",
            str(pairs), "--n_examples", "64", "--shard_size", "64", "--n_test", "16",
            "--gen_batch_size", "32", "--seed", "1", "--no_progress", "--generate_only"]
    r = run_cli(*args, "--bf16", "--no-xla")
    assert r.returncode == 0, r.stderr
    assert "bf16: the teacher's pairs in bfloat16" in r.stdout
    assert json.loads((pairs / "manifest.json").read_text())["precision"] == "bfloat16"
    ours, theirs = (np.load(os.path.join(d, "y_train_0.npy")) for d in (pairs, tiny_pairs))
    np.testing.assert_array_equal(np.load(pairs / "x_train_0.npy"),
                                  np.load(os.path.join(tiny_pairs, "x_train_0.npy")))  # same noise
    biggest, share = drift(ours, theirs)
    with capsys.disabled():  # capsys would swallow it
        print(f"tiny teacher pairs, bf16 vs float32: {biggest} levels at most, "
              f"{share:.2%} > 1 level")
    assert 0 < biggest <= PAIRS_MAX and share <= PAIRS_SHARE
    code, out, err = run_main("training", args[1:], capsys)  # float32: the complete set is kept
    assert code == 0 and "complete and kept, made in bfloat16" in out, err
    for name in ("manifest.json", "manifest.train_0.json"):  # now incomplete: not mixed
        (pairs / name).unlink()
    code, _, err = run_main("training", args[1:], capsys)
    assert code == 2 and "precision: 'bfloat16' there, 'float32' now" in err
