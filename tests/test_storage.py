"""Pair sets and runs on any tf.io.gfile filesystem, and lock-free generation by several workers.

`ram://` (TensorFlow's in-process filesystem) stands in for an object store such as gs://: no
memory-mapping, no rename that the code relies on, no file lock. It lives in one process, so the
multi-process test (two workers writing one local set at once) is in tests/test_pairs.py.
References are independent of the code under test: X by its definition (stateless normal noise),
Y from a NumPy "teacher", the set written by one worker in one process, files written by hand in
the official .npy format.
"""
import dataclasses
import hashlib
import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from data.pairs import generate_pairs, make_teacher_fn, settings_for, wait_until_complete
from data.shards import PairSetError, heldout_batches, open_pair_set, read_manifest
from models.configs import CONFIGS
from models.weights import load_unet
from tests.helpers import reader_batches, run_main
from utils import fileio

TINY = CONFIGS["tiny"]
SHAPE = TINY.network.image_shape


def reference_noise(seed, stream, index):
    """X_T by its definition: stateless N(0, I) keyed by (seed, stream * 2^40 + index), float16."""
    x = tf.random.stateless_normal(SHAPE, seed=tf.constant([seed, stream * 2 ** 40 + index],
                                                           tf.int64))
    return x.numpy().astype(np.float16)


def numpy_teacher(x):
    """A stand-in teacher, cheap and exactly known: tanh(0.7 x)."""
    return np.tanh(0.7 * np.asarray(x, np.float32))


def expected_y(seed, stream, indices):
    x = np.stack([reference_noise(seed, stream, i) for i in indices]).astype(np.float32)
    return np.floor((np.clip(numpy_teacher(x), -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)


def npy_files(folder):
    return {f: fileio.read_bytes(os.path.join(folder, f)) for f in sorted(fileio.listdir(folder))
            if f.endswith(".npy")}


def load(folder, name):
    data = fileio.read_bytes(os.path.join(folder, name))
    import io
    return np.load(io.BytesIO(data))


SMALL = dict(seed=5, n_examples=100, shard_size=24, n_test=16)  # test + 5 train shards (last: 4)


def small_settings(**kw):
    return settings_for(TINY, **{**SMALL, **kw})


def epoch(pairs, part=(0, 1), start=0):
    return reader_batches(pairs, 8, seed=3, epoch=1, part=part, start=start)


@pytest.mark.parametrize("where", ["local", "ram"])
def test_set_assembled_from_worker_parts_equals_the_one_worker_set(tmp_path, where):
    one = str(tmp_path / "one")
    parts = str(tmp_path / "parts") if where == "local" else f"ram://{tmp_path.name}/parts"
    s = small_settings()
    generate_pairs(one, s, numpy_teacher, 10, progress=False)
    generate_pairs(parts, s, numpy_teacher, 10, worker=(0, 3), progress=False)
    # one worker of three done: its parts are there, the set is incomplete and no manifest.json yet
    names = fileio.listdir(parts)
    assert "manifest.json" not in names and "manifest.test.json" in names
    with pytest.raises(PairSetError, match="is incomplete: .* not recorded as complete"):
        open_pair_set(parts, SHAPE)
    # a worker done with its share waits (training.py) until the others' shards are recorded
    waiter = threading.Thread(target=wait_until_complete, args=(parts, 0.05, lambda _: None))
    waiter.start()
    generate_pairs(parts, s, numpy_teacher, 10, worker=(2, 3), progress=False)
    waiter.join(0.5)
    assert waiter.is_alive()  # two of three workers done: still waiting
    generate_pairs(parts, s, numpy_teacher, 10, worker=(1, 3), progress=False)
    waiter.join(10)
    assert not waiter.is_alive()
    names = fileio.listdir(parts)
    assert not [n for n in names if "lock" in n or n.startswith(".tmp")], names
    assert sorted(n for n in names if n.startswith("manifest.")) == sorted(
        ["manifest.json", "manifest.test.json"] + [f"manifest.train_{k}.json" for k in range(5)])
    assert npy_files(parts) == npy_files(one)  # byte for byte
    # the files hold X by definition and Y of the NumPy teacher (official .npy, read by np.load)
    np.testing.assert_array_equal(load(parts, "x_train_4.npy")[3], reference_noise(5, 0, 99))
    np.testing.assert_array_equal(load(parts, "y_train_1.npy"), expected_y(5, 0, range(24, 48)))
    np.testing.assert_array_equal(load(parts, "y_test.npy"), expected_y(5, 1, range(16)))
    # the reader: the same batches, for any split among workers, resumed anywhere, and held-out
    a, b = open_pair_set(one, SHAPE, verify=True), open_pair_set(parts, SHAPE, verify=True)
    ea, eb = epoch(a), epoch(b)
    assert len(ea) == 100 // 8
    for (xa, ya), (xb, yb) in zip(ea, eb):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    halves = [epoch(b, (w, 2), start=5) for w in range(2)]
    for (x0, y0), (x1, y1), (x, y) in zip(*halves, ea[5:]):
        np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
    for (xa, ya), (xb, yb) in zip(heldout_batches(a, 7), heldout_batches(b, 7)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # every example once per epoch, against the NumPy reference
    seen = list(map(bytes, np.concatenate([y for _, y in ea])))
    want = set(map(bytes, expected_y(5, 0, range(100))))
    assert len(seen) == len(set(seen)) == 96 and set(seen) <= want  # the last 4 are dropped
    if where == "ram":
        fileio.rmtree(parts)


def write_npy_by_hand(path, array):
    """The .npy format 1.0 as documented (magic, header padded to 64 bytes, C-order data)."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (
        array.dtype.str, tuple(array.shape))
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + \
        np.ascontiguousarray(array).tobytes()
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("where", ["local", "ram"])
def test_original_layout_on_any_filesystem(tmp_path, where):
    folder = str(tmp_path) if where == "local" else f"ram://{tmp_path.name}/orig"
    tf.io.gfile.makedirs(folder)
    rng = np.random.default_rng(0)
    ys = [rng.integers(0, 256, (20, *SHAPE), dtype=np.uint8) for _ in range(3)]
    for k, y in enumerate(ys):
        write_npy_by_hand(f"{folder}/x_train_{k}.npy",
                          rng.standard_normal((20, *SHAPE)).astype(np.float16))
        write_npy_by_hand(f"{folder}/y_train_{k}.npy", y)
    p = open_pair_set(folder, SHAPE)
    assert p.n_train == 60 and p.test is None
    seen = np.concatenate([y for _, y in reader_batches(p, 10, seed=0)])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, np.concatenate(ys)))
    with tf.io.gfile.GFile(f"{folder}/y_train_1.npy", "wb") as f:  # truncated
        f.write(fileio.read_bytes(f"{folder}/y_train_0.npy")[:500])
    with pytest.raises(PairSetError, match="y_train_1.npy: unreadable .*truncated"):
        open_pair_set(folder, SHAPE)


def legacy_manifest(folder, s, names):
    """manifest.json as earlier versions wrote it (one file, every record in it)."""
    from data.shards import layout
    files = {}
    for n in names:
        data = fileio.read_bytes(os.path.join(folder, n))
        a = load(folder, n)
        files[n] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "shape": list(a.shape), "dtype": str(a.dtype)}
    return {"format_version": 1, **json.loads(json.dumps(dataclasses.asdict(s))), "files": files,
            "shards": [dataclasses.asdict(sh) for sh in layout(s.n_examples, s.shard_size,
                                                               s.n_test)],
            "x_dtype": "float16", "y_dtype": "uint8"}


def test_single_file_manifest_of_earlier_versions_loads_and_resumes(tmp_path):
    s = small_settings()
    ref = str(tmp_path / "ref")
    generate_pairs(ref, s, numpy_teacher, 10, progress=False)
    old = str(tmp_path / "old")
    os.makedirs(old)
    for name in ["x_test.npy", "y_test.npy", "x_train_0.npy", "y_train_0.npy", "x_train_1.npy",
                 "y_train_1.npy", "x_train_2.npy"]:  # a run of an earlier version, killed
        with open(os.path.join(old, name), "wb") as f:
            f.write(fileio.read_bytes(os.path.join(ref, name)))
    recorded = ["x_test.npy", "y_test.npy", "x_train_0.npy", "y_train_0.npy", "x_train_1.npy",
                "y_train_1.npy"]
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(legacy_manifest(old, s, recorded), f)
    open(os.path.join(old, ".manifest.lock"), "w").close()  # what the old locking left behind
    with pytest.raises(PairSetError, match="incomplete: x_train_2.npy not recorded"):
        open_pair_set(old, SHAPE)
    calls = []
    generate_pairs(old, s, lambda x: calls.append(len(x)) or numpy_teacher(x), 10, progress=False)
    assert sum(calls) == 24 + 24 + 4  # train_2, train_3, train_4 only
    assert npy_files(old) == npy_files(ref)
    assert read_manifest(old)["files"] == read_manifest(ref)["files"]
    # a complete set of an earlier version (manifest.json only, no parts) opens as it is
    complete = str(tmp_path / "complete")
    os.makedirs(complete)
    for name, data in npy_files(ref).items():
        with open(os.path.join(complete, name), "wb") as f:
            f.write(data)
    with open(os.path.join(complete, "manifest.json"), "w") as f:
        json.dump(legacy_manifest(complete, s, list(npy_files(ref))), f)
    p = open_pair_set(complete, SHAPE, verify=True)
    assert p.n_train == 100 and p.seed == 5


def test_a_worker_killed_mid_write_leaves_its_shard_undone(tmp_path):
    s = small_settings()
    ref = str(tmp_path / "ref")
    generate_pairs(ref, s, numpy_teacher, 10, progress=False)
    # on an object store: an upload that fails before it finishes leaves no object
    path = f"ram://{tmp_path.name}/obj/manifest.train_0.json"
    tf.io.gfile.makedirs(os.path.dirname(path))
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_write(path, "w") as f:
            f.write('{"files": {')
            raise KeyboardInterrupt
    assert not tf.io.gfile.exists(path)
    # locally: a killed write leaves a temporary file, and a part damaged anyway is not trusted
    folder = str(tmp_path / "killed")
    generate_pairs(folder, s, numpy_teacher, 10, progress=False)
    os.remove(os.path.join(folder, "manifest.json"))
    part = os.path.join(folder, "manifest.train_2.json")
    text = open(part).read()
    with open(os.path.join(folder, ".tmp-manifest.train_3.json-x1y2"), "w") as f:
        f.write(text[:40])
    with open(part, "w") as f:
        f.write(text[:len(text) // 2])
    os.remove(os.path.join(folder, "manifest.train_4.json"))
    with pytest.raises(PairSetError, match="incomplete: x_train_2.npy not recorded"):
        open_pair_set(folder, SHAPE)
    calls = []
    generate_pairs(folder, s, lambda x: calls.append(len(x)) or numpy_teacher(x), 10,
                   progress=False)
    assert sum(calls) == 24 + 4  # train_2 and train_4 again; nothing else
    assert npy_files(folder) == npy_files(ref)
    assert read_manifest(folder)["files"] == read_manifest(ref)["files"]


def test_parts_of_another_set_in_the_folder_are_refused(tmp_path):
    folder = str(tmp_path / "p")
    generate_pairs(folder, small_settings(), numpy_teacher, 10, worker=(0, 2), progress=False)
    with pytest.raises(PairSetError, match="other settings \\(seed: 5 there, 6 now\\)"):
        generate_pairs(folder, small_settings(seed=6), numpy_teacher, 10, worker=(1, 2),
                       progress=False)
    part = json.load(open(os.path.join(folder, "manifest.test.json")))
    part["seed"] = 6
    with open(os.path.join(folder, "manifest.train_1.json"), "w") as f:
        json.dump({**part, "files": {}}, f)
    with pytest.raises(PairSetError, match="manifest.train_1.json disagrees .* on seed"):
        read_manifest(folder)


def tiny_teacher_fn(teacher):
    model, _ = load_unet(teacher, TINY)
    return make_teacher_fn(model, TINY.sampler, tf.distribute.OneDeviceStrategy("/cpu:0"), xla=False)


@pytest.mark.slow
def test_tiny_run_with_pairs_and_savedir_on_ram(tiny_teacher, tmp_path, capsys):
    """Pairs and student, every file on ram:// (one process), resumed there; the exported weights
    load back. 2 steps an epoch, a checkpoint at its end. (That pairs written on ram:// equal a
    local generation: test_set_assembled_from_worker_parts_equals_the_one_worker_set[ram].)"""
    teacher = tiny_teacher  # the session's (tests/conftest.py)
    data, run = f"ram://{tmp_path.name}/pairs", f"ram://{tmp_path.name}/run"
    args = ["tiny", run, "--teacher", teacher, "--datadir", data, "--n_examples", "32",
            "--shard_size", "16", "--n_test", "16", "--gen_batch_size", "16", "--seed", "4",
            "--batch_size", "16", "--ckpt_every", "2", "--n_eval", "16", "--no-xla",
            "--no_progress"]
    code, out, err = run_main("training", args + ["--epochs", "1"], capsys)
    assert code == 0, err
    assert f"pairs: complete in {data}" in out
    assert len(npy_files(data)) == 2 * (2 + 1)  # x and y of 2 train shards and the held-out
    assert fileio.exists(f"{data}/preview.png") and fileio.exists(f"{data}/manifest.json")
    files = set(fileio.listdir(run))
    assert {"checkpoints", "logs", "samples", "config.json", "best", "last"} <= files, files
    assert tf.train.latest_checkpoint(f"{run}/checkpoints").endswith("ckpt-2")
    logs = fileio.listdir(f"{run}/logs")
    assert any(n.startswith("events.out.tfevents") for n in logs)
    steps = [json.loads(line)["step"] for line in
             fileio.read_bytes(f"{run}/logs/scalars.jsonl").decode().splitlines()]
    assert steps == [0, 2, 2]  # held-out at 0; train + held-out rows at the checkpoint, 2
    assert json.loads(fileio.read_bytes(f"{run}/config.json"))["datadir"] == data
    assert sorted(fileio.listdir(f"{run}/samples")) == [f"step_{k:07d}.png" for k in (0, 2)]
    model, w = load_unet(f"{run}/best", TINY)
    assert w.dataset == "tiny" and w.ema and w.step in (0, 2)
    assert load_unet(f"{run}/last", TINY)[1].step == 2
    code, out, err = run_main("training", args + ["--epochs", "2"], capsys)  # resumes on ram://
    assert code == 0, err
    assert "resumed" in out
    assert tf.train.latest_checkpoint(f"{run}/checkpoints").endswith("ckpt-4")
    assert load_unet(f"{run}/last", TINY)[1].step == 4
    fileio.rmtree(f"ram://{tmp_path.name}")


def test_an_unknown_filesystem_is_a_one_line_error(capsys, tmp_path):
    for argv, message in [
            (["tiny", "nosuch://bucket/run"], "argument SAVEDIR: nosuch://bucket/run: File system "
                                              "scheme 'nosuch' not implemented"),
            (["tiny", str(tmp_path), "--datadir", "nosuch://x"],
             "argument --datadir: nosuch://x: File system scheme 'nosuch' not implemented"),
            (["tiny", str(tmp_path), "--datadir", f"ram://{tmp_path.name}/none", "--no_generate"],
             f"no pair set at ram://{tmp_path.name}/none")]:
        code, out, err = run_main("training", argv, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert err.count("\n") == 1 and message in err, err


def test_parts_of_earlier_versions_without_precision_still_resume(tmp_path):
    """Manifest parts written before the teacher's precision was recorded mean float32: a set half
    made by them resumes, and is not taken for two sets in one folder."""
    folder = str(tmp_path / "p")
    s = small_settings(n_examples=48, shard_size=24, n_test=0)
    generate_pairs(folder, s, numpy_teacher, 24, worker=(0, 2), progress=False)  # train_0 only
    part = os.path.join(folder, "manifest.train_0.json")
    old = json.load(open(part))
    del old["precision"]
    with open(part, "w") as f:
        json.dump(old, f)
    manifest = generate_pairs(folder, s, numpy_teacher, 24, worker=(1, 2), progress=False)
    assert sorted(manifest["files"]) == ["x_train_0.npy", "x_train_1.npy", "y_train_0.npy",
                                         "y_train_1.npy"]
    open_pair_set(folder, SHAPE, verify=True)
