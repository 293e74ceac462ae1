"""Pair generation (stage 1) and the shard format: reproducible, resumable, distributed, checked
(two replicas generating the same pairs: tests/test_training.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from data import shards
from data.pairs import generate_pairs, make_teacher_fn, settings_for
from data.shards import PairSetError, open_pair_set, read_manifest, heldout_batches
from models.configs import CONFIGS, SamplerConfig
from models.diffusion import ddim_plan, run_solver, solver_plan
from models.weights import load_unet
from tests.conftest import PAIR_SEED, PAIRS
from tests.helpers import ROOT, reader_batches, run_main

TINY = CONFIGS["tiny"]
SHAPE = TINY.network.image_shape
SEED = PAIR_SEED
# The settings of the session pair set (tests/conftest.py): 256 pairs in 4 shards of 64, 64 held
# out, seed 1, plain graph; regenerated here in other folders, they must give the same files.
GEN = [*PAIRS, "--generate_only"]
N_FILES = 2 * (4 + 1)  # x and y of 4 training shards and the held-out shard


def generate_args(teacher, datadir, *extra):
    return ["training.py", "tiny", os.path.join(datadir, "run"), "--teacher", teacher,
            "--datadir", datadir, *GEN, *extra]


def generate(teacher, datadir, capsys, *extra):
    """training.py --generate_only in this process: (exit code, stdout, stderr)."""
    return run_main("training", generate_args(teacher, datadir, *extra)[1:], capsys)


def files_of(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.endswith(".npy")}


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


@pytest.fixture(scope="module")
def reference_set(tiny_pairs):
    return tiny_pairs


def reference_noise(seed, stream, index):
    """X_T by its definition: stateless N(0, I) keyed by (seed, stream * 2^40 + index), float16."""
    x = tf.random.stateless_normal(SHAPE, seed=tf.constant([seed, stream * 2 ** 40 + index], tf.int64))
    return x.numpy().astype(np.float16)


def test_layout_manifest_and_definition_of_x(reference_set):
    m = read_manifest(reference_set)
    names = sorted(files_of(reference_set))
    assert names == sorted([f"{p}_{s}.npy" for p in "xy"
                            for s in ["test"] + [f"train_{k}" for k in range(4)]])
    assert m["seed"] == SEED and m["n_examples"] == 256 and m["format_version"] == 1
    for name, rec in m["files"].items():
        assert rec["sha256"] == shards.sha256_file(os.path.join(reference_set, name))
    x1 = np.load(os.path.join(reference_set, "x_train_1.npy"))
    assert x1.dtype == np.float16 and x1.shape == (64, *SHAPE)
    np.testing.assert_array_equal(x1[5], reference_noise(SEED, 0, 64 + 5))
    np.testing.assert_array_equal(np.load(os.path.join(reference_set, "x_test.npy"))[0],
                                  reference_noise(SEED, 1, 0))
    assert os.path.exists(os.path.join(reference_set, "preview.png"))


def test_targets_are_the_teacher_ddim_output_rounded(reference_set, teacher):
    model, _ = load_unet(teacher, TINY)
    x = np.load(os.path.join(reference_set, "x_train_2.npy")).astype(np.float32)
    out = tf.function(lambda v: run_solver(model, v, ddim_plan(TINY.sampler)))(x).numpy()
    expected = np.floor((np.clip(out, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)  # round half up
    stored = np.load(os.path.join(reference_set, "y_train_2.npy"))
    diff = np.abs(stored.astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # other kernels may round a .5 differently
    assert np.std(stored) > 5  # a real, non-constant teacher output


def test_xla_and_plain_graph_give_the_same_targets(reference_set, teacher):
    """The one XLA check outside the end-to-end test: generation's compiled teacher loop (the
    default) against the plain graph that the session pair set was made with."""
    model, _ = load_unet(teacher, TINY)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    x = np.load(os.path.join(reference_set, "x_train_0.npy"))[:32].astype(np.float32)
    xla, plain = (make_teacher_fn(model, TINY.sampler, strategy, xla=flag)(x) for flag in (True, False))
    assert xla.shape == plain.shape == (32, *SHAPE) and np.std(plain) > 0.05
    np.testing.assert_allclose(xla, plain, rtol=1e-4, atol=1e-4)
    to_uint8 = lambda v: np.floor((np.clip(v, -1, 1) + 1) * 127.5 + 0.5).astype(int)  # noqa: E731
    diff = np.abs(to_uint8(xla) - to_uint8(plain))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rare 1-level flips at a .5 boundary


@pytest.mark.slow
def test_sigkill_and_resume_is_byte_identical(reference_set, teacher, tmp_path, capsys):
    folder = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, *generate_args(teacher, folder)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some but not all shards are recorded
        m = read_manifest(folder) if os.path.isdir(folder) else None
        if m and len(m.get("files", {})) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = len(read_manifest(folder)["files"])
    assert 3 <= recorded < N_FILES, recorded
    code, _, err = generate(teacher, folder, capsys)  # resumed from the disk (in this process)
    assert code == 0, err
    assert files_of(folder) == files_of(reference_set)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_corrupt_shard_is_detected_and_regenerated(reference_set, teacher, tmp_path, capsys):
    folder = str(tmp_path / "corrupt")
    shutil.copytree(reference_set, folder)
    path = os.path.join(folder, "y_train_3.npy")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    code, out, err = generate(teacher, folder, capsys)
    assert code == 0, err
    assert "regenerating train_3: y_train_3.npy checksum mismatch" in out
    assert files_of(folder) == files_of(reference_set)


def test_other_settings_are_refused_without_touching_files(reference_set, teacher, tmp_path,
                                                          capsys):
    folder = str(tmp_path / "other")
    shutil.copytree(reference_set, folder)
    before = files_of(folder)
    code, _, err = generate(teacher, folder, capsys, "--seed", "8")  # the last --seed counts
    assert code == 2 and "Traceback" not in err
    assert "other settings (seed: 1 there, 8 now)" in err
    assert files_of(folder) == before


def test_another_sampler_is_refused_naming_both(reference_set, teacher, tmp_path, capsys):
    folder = str(tmp_path / "other")
    shutil.copytree(reference_set, folder)
    before = files_of(folder)
    code, _, err = generate(teacher, folder, capsys, "--solver", "dpmpp_2m", "--solver_steps", "4")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("sampler: DDIM, 10 quadratic steps (10 network calls, from t = 800) there, "
            "DPM-Solver++(2M), 4 quadratic steps (4 network calls, from t = 800) now") in err
    assert files_of(folder) == before


def test_no_generate_with_another_sampler_is_refused(reference_set, teacher, tmp_path, capsys):
    code, _, err = generate(teacher, reference_set, capsys, "--no_generate", "--solver",
                            "dpmpp_2m")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sampler: DDIM, 10 quadratic steps" in err and "DPM-Solver++(2M), 2 quadratic" in err


def test_dpmpp_pairs_are_the_solvers_output_and_recorded(teacher, tmp_path, capsys):
    folder = str(tmp_path / "dpmpp")
    code, _, err = generate(teacher, folder, capsys, "--solver", "dpmpp_2m", "--solver_steps",
                            "4", "--solver_spacing", "linspace", "--n_examples", "32",
                            "--shard_size", "32", "--n_test", "16")
    assert code == 0, err
    sampler = read_manifest(folder)["sampler"]
    assert (sampler["solver"], sampler["steps"], sampler["skip_type"]) == ("dpmpp_2m", 4, "linspace")
    # the stored Y: the solver's output on the stored X (diffusers' timesteps 999, 749, 500, 250)
    model, _ = load_unet(teacher, TINY)
    x = np.load(os.path.join(folder, "x_train_0.npy")).astype(np.float32)
    plan = solver_plan(SamplerConfig(**sampler))
    assert list(plan.t) == [999, 749, 500, 250]
    out = tf.function(lambda v: run_solver(model, v, plan))(x).numpy()
    y = np.load(os.path.join(folder, "y_train_0.npy"))
    expected = np.round((np.clip(out, -1, 1) + 1) * 127.5)
    assert np.abs(y.astype(int) - expected.astype(int)).max() <= 1


def _tiny_teacher_fn(teacher):
    model, _ = load_unet(teacher, TINY)
    return make_teacher_fn(model, TINY.sampler, tf.distribute.OneDeviceStrategy("/cpu:0"), xla=False)


def test_short_disk_is_a_clear_error(teacher, tmp_path, monkeypatch):
    from data import pairs
    s = settings_for(TINY, seed=0, n_examples=64, shard_size=32, n_test=0)
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(pairs.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    need = 2 * (shards.npy_bytes((32, *SHAPE), np.uint8) + shards.npy_bytes((32, *SHAPE), np.float16))
    with pytest.raises(PairSetError, match=f"need {need:,} bytes, 1,000 are free"):
        generate_pairs(str(tmp_path / "p"), s, _tiny_teacher_fn(teacher), 16, progress=False)


def test_compact_set_stores_no_x_and_reads_the_same_x(teacher, tmp_path):
    fn = _tiny_teacher_fn(teacher)
    full = settings_for(TINY, seed=3, n_examples=64, shard_size=32, n_test=16)
    compact = settings_for(TINY, seed=3, n_examples=64, shard_size=32, n_test=16, compact=True)
    generate_pairs(str(tmp_path / "full"), full, fn, 16, progress=False)
    generate_pairs(str(tmp_path / "compact"), compact, fn, 16, progress=False)
    assert not [f for f in os.listdir(tmp_path / "compact") if f.startswith("x_")]
    a, b = (open_pair_set(str(tmp_path / n), SHAPE, verify=True) for n in ("full", "compact"))
    _assert_same(reader_batches(b, 16, 1), reader_batches(a, 16, 1))  # X recomputed in the graph
    for (xa, _), (xb, _) in zip(heldout_batches(a, 10), heldout_batches(b, 10)):
        np.testing.assert_array_equal(xa, xb)
    size = lambda n: sum(os.path.getsize(tmp_path / n / f)  # noqa: E731
                         for f in os.listdir(tmp_path / n) if f.endswith(".npy"))
    per_pair = {n: size(n) / 80 for n in ("full", "compact")}
    print(f"bytes per pair: full {per_pair['full']:.0f}, compact {per_pair['compact']:.0f}")
    assert per_pair["compact"] < 0.35 * per_pair["full"]


def test_original_layout_without_manifest_is_read(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        np.save(tmp_path / f"x_train_{k}.npy", rng.standard_normal((20, *SHAPE)).astype(np.float16))
        np.save(tmp_path / f"y_train_{k}.npy", rng.integers(0, 256, (20, *SHAPE), dtype=np.uint8))
    np.save(tmp_path / "x_test.npy", rng.standard_normal((8, *SHAPE)).astype(np.float16))
    np.save(tmp_path / "y_test.npy", rng.integers(0, 256, (8, *SHAPE), dtype=np.uint8))
    p = open_pair_set(str(tmp_path), SHAPE)
    assert p.n_train == 60 and p.test.count == 8 and not p.compact
    seen = np.concatenate([y for _, y in reader_batches(p, 10, seed=0)])
    everything = np.concatenate([np.load(tmp_path / f"y_train_{k}.npy") for k in range(3)])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, everything))  # each pair once per epoch
    np.save(tmp_path / "y_train_1.npy", np.zeros((20, 4, 4, 3), np.uint8))
    with pytest.raises(PairSetError,
                       match=r"y_train_1.npy: uint8\[20, 4, 4, 3\], expected uint8\[20, 8, 8, 3\]"):
        open_pair_set(str(tmp_path), SHAPE)


def _identifiable_set(folder, counts):
    """Shards whose y encodes (shard, row) and whose x is distinct noise (the original layout)."""
    rng = np.random.default_rng(7)
    arrays = []
    for k, n in enumerate(counts):
        y = np.zeros((n, *SHAPE), np.uint8)
        y[:, 0, 0, 0], y[:, 0, 0, 1] = k, np.arange(n)
        x = rng.standard_normal((n, *SHAPE)).astype(np.float16)
        np.save(folder / f"y_train_{k}.npy", y)
        np.save(folder / f"x_train_{k}.npy", x)
        arrays.append((x, y))
    return open_pair_set(str(folder), SHAPE), arrays


def _assert_same(got, want):
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gy, wy)
        np.testing.assert_array_equal(gx, wx)


def test_reader_batches_follow_the_documented_order_for_any_workers_and_resume(tmp_path):
    """Against tests/reference/reader.py (the order re-derived from its definition): 1, 2 and 3
    workers, a resume mid-epoch, a read across the epoch boundary, two replicas per host."""
    from tests.reference.reader import epoch_examples, expected_batches
    pairs, arrays = _identifiable_set(tmp_path, [25, 25, 25, 25, 13])  # 113 pairs, 3 groups
    batch, seed = 12, 1  # 9 steps an epoch, 5 pairs dropped
    epochs = [expected_batches(arrays, seed, e, batch) for e in (0, 1)]
    _assert_same(reader_batches(pairs, batch, seed, 0), epochs[0])
    assert epochs[0][0][1].tobytes() != epochs[1][0][1].tobytes()  # epochs differ
    examples = epoch_examples([len(y) for _, y in arrays], seed, 0)
    assert len(set(examples)) == 113 and len({k for k, _ in examples[:50]}) == 2  # a group: 2 shards
    for n_workers in (2, 3):
        for w in range(n_workers):
            _assert_same(reader_batches(pairs, batch, seed, 0, part=(w, n_workers)),
                         expected_batches(arrays, seed, 0, batch, w, n_workers))
    _assert_same(reader_batches(pairs, batch, seed, 0, start=4), epochs[0][4:])  # resumed
    _assert_same(reader_batches(pairs, batch, seed, 0, start=7, n=5), epochs[0][7:] + epochs[1][:3])
    halves = reader_batches(pairs, batch, seed, 1, part=(1, 2), per_replica=3)  # 2 replicas a host
    host = expected_batches(arrays, seed, 1, batch, 1, 2)
    _assert_same(halves, [(x[i:i + 3], y[i:i + 3]) for x, y in host for i in (0, 3)])


@pytest.mark.slow
def test_two_workers_write_one_set_at_once_then_train(reference_set, teacher, tmp_path):
    """Two TF_CONFIG workers, started together on one local folder: each generates its half of
    the shards (no lock, no leftovers), the set equals the one-process set byte for byte, and then
    both train the student on it together (MultiWorkerMirroredStrategy, 2 steps)."""
    import json
    import socket

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    ports = [free_port(), free_port()]
    folder, run = str(tmp_path / "mw"), str(tmp_path / "run")
    args = ["training.py", "tiny", run, "--teacher", teacher, "--datadir", folder, *PAIRS,
            "--batch_size", "32", "--ckpt_every", "2", "--n_eval", "32", "--epochs", "0.25"]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": i}}
        procs.append(subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": ROOT, "TF_CONFIG": json.dumps(tf_config)}))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    names = os.listdir(folder)
    assert not [n for n in names if "lock" in n or n.startswith(".tmp")], names
    assert files_of(folder) == files_of(reference_set)  # X and Y of every shard, byte for byte
    assert read_manifest(folder)["files"] == read_manifest(reference_set)["files"]
    with open(os.path.join(folder, "manifest.json")) as f:
        assert len(json.load(f)["files"]) == N_FILES  # assembled by whichever worker ended last
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "logs", "scalars.jsonl"))]
    assert max(steps) == 2
    assert os.path.exists(os.path.join(run, "best", "weights.json"))
