"""eval.py as users run it: grids, folders, interpolation, speed, released-format students, errors.
The commands run in this process (run_main) unless the process itself is under test (SIGKILL and
resume, peak memory); the student is the session's short trained one (tests/conftest.py)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from models.configs import CONFIGS
from models.diffusion import student_sample
from models.weights import load_unet
from tests.helpers import ROOT, run_cli, run_main
from tests.reference.official import official_variable_shapes, random_params
from tests.reference.original_h5 import write_original_h5

TINY = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def student(tiny_student):
    """A training run (SAVEDIR): what --model_dir takes; eval loads its best/ export."""
    return tiny_student


def png(path):
    return np.asarray(Image.open(path))


def reference_samples(run_dir, seed, n, indices=None):
    """Samples by definition: noise i = stateless N(0, I) keyed (seed, 2 * 2^40 + i) in float16,
    x0 = z - f(z, 999), mapped to uint8 with rounding. `indices`: only those of the n (a dict)."""
    model, _ = load_unet(os.path.join(run_dir, "best"), TINY)  # a run's best/ export
    keys = list(range(n) if indices is None else sorted(set(indices)))
    z = np.stack([tf.random.stateless_normal(TINY.network.image_shape,
                                             seed=tf.constant([seed, 2 * 2 ** 40 + i], tf.int64))
                  .numpy().astype(np.float16).astype(np.float32) for i in keys])
    x0 = tf.function(lambda v: student_sample(model, v))(z).numpy()
    images = np.floor((np.clip(x0, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)
    return images if indices is None else dict(zip(keys, images))


def figures(capsys, out, model_dir, *extra):
    """eval.py figures in this process: (exit code, stdout, stderr)."""
    return run_main("eval", ["figures", out, "tiny", "--model_dir", model_dir, "--no-xla", *extra],
                    capsys)


def test_grid_tiles_are_the_seeded_samples_and_never_overwritten(student, tmp_path, capsys):
    code, _, err = figures(capsys, tmp_path, student, "--n_images", "10", "--batch_size", "4",
                           "--seed", "3")
    assert code == 0, err
    grid = png(tmp_path / "tiny_figure_0.png")
    res = TINY.network.resolution
    cell = res + 1  # a tile and its 1-pixel gutter
    assert grid.shape == (3 * cell - 1, 4 * cell - 1, 3)  # ceil(sqrt(10)) = 4 per row
    ref = reference_samples(student, seed=3, n=10)
    for i in range(10):
        r_, c_ = divmod(i, 4)
        tile = grid[r_ * cell:r_ * cell + res, c_ * cell:c_ * cell + res]
        assert np.abs(tile.astype(int) - ref[i]).max() <= 1, i
    # the gutter below the first row, and the empty cells of the last
    assert (grid[res, :] == 255).all() and (grid[2 * cell:, 2 * cell:] == 255).all()
    code, _, err = figures(capsys, tmp_path, student, "--n_images", "10", "--batch_size", "7",
                           "--seed", "3")
    assert code == 0, err
    assert open(tmp_path / "tiny_figure_1.png", "rb").read() == open(tmp_path / "tiny_figure_0.png", "rb").read()
    code, _, err = figures(capsys, tmp_path, student, "--n_images", "10", "--seed", "3", "--zoom", "3")
    assert code == 0, err
    big = png(tmp_path / "tiny_figure_2.png")
    rows, cols = np.arange(big.shape[0]) // 3, np.arange(big.shape[1]) // 3
    assert big.shape == (3 * grid.shape[0], 3 * grid.shape[1], 3)
    assert np.array_equal(big, grid[rows[:, None], cols[None, :]])  # pixel (y, x) = grid (y//3, x//3)


def test_released_h5_student_samples_like_its_conversion(tmp_path, capsys):
    net = TINY.network
    params = random_params(official_variable_shapes(net.ch, net.ch_mult, net.num_res_blocks,
                                                    net.attn_resolutions, net.resolution), seed=9)
    release = tmp_path / "denoising_student_models"
    release.mkdir()
    write_original_h5(str(release / "tiny_ema_model.h5"), params, family="ddpm", kind="student")
    code, _, err = run_main("models.convert", ["--dataset", "tiny", release / "tiny_ema_model.h5",
                                               tmp_path / "converted"], capsys)
    assert code == 0, err
    for name, model_dir in (("h5", release), ("conv", tmp_path / "converted")):
        code, out, err = figures(capsys, tmp_path / name, model_dir, "--n_images", "4", "--seed", "1")
        assert code == 0, err
        assert "GroupNorm eps 0.001" in out  # the original's tensorflow-addons epsilon
    assert np.array_equal(png(tmp_path / "h5" / "tiny_figure_0.png"),
                          png(tmp_path / "conv" / "tiny_figure_0.png"))


@pytest.mark.slow
def test_tofolder_killed_and_resumed_gives_exactly_n_pngs(student, tmp_path, capsys):
    n = 200
    args = ["eval.py", "tofolder", str(tmp_path / "imgs"), "tiny", "--n_images", str(n),
            "--batch_size", "8", "--model_dir", student, "--no-xla"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 300
    pngs = lambda: [f for f in os.listdir(tmp_path / "imgs") if f.endswith(".png")  # noqa: E731
                    and not f.startswith(".tmp")] if (tmp_path / "imgs").exists() else []
    while time.time() < deadline and len(pngs()) < 40:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(pngs())
    assert 40 <= done < n
    code, _, err = run_main("eval", args[1:], capsys)  # resumed (in this process) from the disk
    assert code == 0, err
    files = sorted(f for f in os.listdir(tmp_path / "imgs") if not f.startswith(".tmp"))
    assert files == [f"{i:05d}.png" for i in range(n)]
    checked = (0, done - 1, done, n - 1)
    ref = reference_samples(student, seed=0, n=n, indices=checked)
    for i in checked:
        assert np.abs(png(tmp_path / "imgs" / files[i]).astype(int) - ref[i]).max() <= 1


@pytest.mark.slow
def test_2500_image_figure_stays_within_one_batch_of_memory(student, tmp_path):
    """25 batches of 100 against one: a figure made batch by batch. One fresh process makes the
    100-image figure, then the 2,500-image one; the second may raise the peak RSS by little more
    than its grid. (Measured: the 2,500 images in one batch would add about 180 MB, 4 times the
    bound; batch by batch they add about 17 MB.)"""
    code = ("import resource, runpy, sys\n"
            "out, model_dir = sys.argv[1:]\n"
            "for n in (100, 2500):\n"
            "    sys.argv = ['eval.py', 'figures', out + str(n), 'tiny', '--n_images', str(n),"
            " '--batch_size', '100', '--model_dir', model_dir, '--no-xla']\n"
            "    try:\n        runpy.run_path('eval.py', run_name='__main__')\n"
            "    except SystemExit as e:\n        assert not e.code, e.code\n"
            "    print('PEAK', n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    r = run_cli("-c", code, str(tmp_path / "fig"), student)
    assert r.returncode == 0, r.stderr
    small, big = (int(line.split()[2]) for line in r.stdout.splitlines() if line.startswith("PEAK"))
    grid_mb = (50 * (TINY.network.resolution + 1)) ** 2 * 3 / 2 ** 20
    print(f"peak RSS: {small} MB after 100 images, {big} MB after 2,500 (grid {grid_mb:.1f} MB)")
    assert big - small < 2 * grid_mb + 40


def test_speed_runs_with_random_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./denoising_student_models here: random weights
    code, out, err = run_main("eval", ["speed", "tiny", "--batch_size", "8", "--repeats", "1",
                                       "--no-xla"], capsys)
    assert code == 0, err
    calls = len({int(v) for v in np.linspace(0, np.sqrt(800), 10) ** 2})  # tiny: 10 quadratic steps
    assert "weights: random" in out and f"teacher ({calls} calls)" in out
    # one network call against `calls` of the same network: the student must come out faster
    speedup = float(out.split("student / teacher:")[1].split("x faster")[0])
    assert speedup > 1, out


def test_tofolder_remakes_pngs_that_do_not_verify(student, tmp_path, capsys):
    out = tmp_path / "imgs"
    args = ["tofolder", out, "tiny", "--n_images", "6", "--batch_size", "4", "--model_dir", student,
            "--no-xla"]
    assert run_main("eval", args, capsys)[0] == 0
    names = [out / f"{i:05d}.png" for i in range(6)]
    half = names[1].read_bytes()
    names[1].write_bytes(half[:len(half) // 2])  # a truncated copy
    names[2].write_bytes(b"")  # a disk that filled up
    names[3].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # PNG signature, broken chunks
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(names[4])  # a valid PNG of the wrong size
    kept = {i: os.stat(names[i]).st_mtime_ns for i in (0, 5)}
    code, stdout, _ = run_main("eval", args, capsys)
    assert code == 0, stdout
    ref = reference_samples(student, seed=0, n=6)
    for i, name in enumerate(names):
        assert np.abs(png(name).astype(int) - ref[i]).max() <= 1, i
    assert {i: os.stat(names[i]).st_mtime_ns for i in kept} == kept  # the good ones untouched


def test_teacher_tofolder_with_dpmpp_is_the_solvers_output(tmp_path, capsys):
    """--sampler teacher --solver dpmpp_2m: the shipped digits teacher's DPM-Solver++ samples, the
    images of run_solver over 5 of the dataset's quadratic timesteps from the evaluation noise."""
    from models.configs import CONFIGS as ALL
    from models.diffusion import choose_sampler, run_solver, solver_plan
    from models.weights import shipped
    digits = ALL["digits"]
    code, out, err = run_main("eval", ["tofolder", tmp_path, "digits", "--sampler", "teacher",
                                       "--solver", "dpmpp_2m", "--solver_steps", "5",
                                       "--n_images", "6", "--no-xla"], capsys)
    assert code == 0, err
    assert "teacher (DPM-Solver++(2M), 5 quadratic steps (5 network calls, from t = 800))" in out
    teacher, _ = load_unet(shipped(digits, "teacher"), digits)
    plan = solver_plan(choose_sampler(digits.sampler, "dpmpp_2m", 5))
    z = np.stack([tf.random.stateless_normal(digits.network.image_shape,
                                             seed=tf.constant([0, 2 * 2 ** 40 + i], tf.int64))
                  .numpy().astype(np.float16).astype(np.float32) for i in range(6)])
    x0 = tf.function(lambda v: run_solver(teacher, v, plan))(z).numpy()
    want = np.floor((np.clip(x0, -1, 1) + 1) * 127.5 + 0.5).astype(int)
    for i in range(6):
        got = png(tmp_path / f"{i:05d}.png").astype(int).reshape(want[i].shape)
        assert np.abs(got - want[i]).max() <= 1, i
