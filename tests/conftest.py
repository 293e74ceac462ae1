"""Shared set-up: TensorFlow imported quietly, and the session's tiny teacher, pair set and trained
student, each built once per test run and shared by every test (and every pytest-xdist worker)
that needs it."""
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests never write to the user's cache folder (eval.py fid keeps its Inception port there).
os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(),
                                            f"denoising-student-tests-{os.getuid()}", "cache")

from utils.cli import quiet_tensorflow  # noqa: E402


def pytest_configure(config):
    """TensorFlow, imported quietly before any test module imports it; not in the pytest-xdist
    controller, which runs no test (the import costs each process about 6 CPU-seconds)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    controller = getattr(config.option, "numprocesses", None) and worker is None
    if not controller:
        quiet_tensorflow()
        if worker is not None:  # several workers share the cores: one thread each per op
            import tensorflow as tf
            tf.config.threading.set_intra_op_parallelism_threads(1)

# The session pair set: the tiny config's own sizes (256 training pairs in 4 shards of 64, 64
# held out), teacher batches of 32, seed 1. Plain graph (--no-xla): XLA compile time would dominate
# runs this short; tests/test_pairs.py checks that XLA and the plain graph agree.
PAIRS = ["--n_examples", "256", "--shard_size", "64", "--n_test", "64", "--gen_batch_size", "32",
         "--seed", "1", "--no_progress", "--no-xla"]
PAIR_SEED = 1
# The session student: 3 epochs of 8 steps at batch 32 from the tiny teacher, cosine decay, scored
# on 32 held-out pairs at each epoch end (a random-weight teacher is a hard target: a clear, steady
# fall is all 24 steps give; the digits end-to-end test shows the large drop).
STUDENT = ["--batch_size", "32", "--n_eval", "32", "--no_generate", "--epochs", "3", "--lr", "2e-3",
           "--lr_decay", "cosine", "--warmup_steps", "5", "--ema_decay", "0.5",
           "--ckpt_every", "1000"]


# Modules in the order of their slow tests' length (measured): the end-to-end runs, then the
# multi-process ones.
LONGEST_FIRST = ["test_end_to_end.py", "test_training.py", "test_pairs.py", "test_inception.py",
                 "test_storage.py", "test_export.py", "test_eval.py"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Slow tests first, longest first: xdist hands tests out in this order, so the long ones start
    early on every worker and the short ones even out the end. Under `--dist loadgroup`,
    pytest-xdist marks each grouped test's node id with "@group"; with pytest 9.2 it silently does
    not (pytest-dev/pytest-xdist#1386), and a group's costly module fixtures are then built on
    every worker: refuse to run like that."""
    items.sort(key=lambda i: (i.get_closest_marker("slow") is None,
                              LONGEST_FIRST.index(i.path.name) if i.path.name in LONGEST_FIRST
                              else len(LONGEST_FIRST)))
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group has no effect with pytest {pytest.__version__} "
                                f"(e.g. {lost[0]}): install requirements-dev.txt")


def shared(tmp_path_factory, name, build):
    """A folder built once for the whole run by `build(folder)`: under pytest-xdist the first
    worker to ask builds it (under a file lock) and the others wait for it and reuse it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # common to the workers of this run
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            done.write_text("")
    return folder


def run_training(argv):
    """training.py's main() in this process (for set-up; tests/helpers.py has the CLI runners)."""
    import training
    assert training.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A converted tiny checkpoint with random (non-zero) weights: the teacher of the session's
    pairs, and the tiny weights that the CLIs' error tests refuse for other datasets."""
    from tests.helpers import make_tiny_teacher
    folder = shared(tmp_path_factory, "teacher", lambda f: make_tiny_teacher(str(f / "tiny")))
    return str(folder / "tiny")


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, tiny_teacher):
    """The tiny teacher's complete pair set (stage 1, generated in this process)."""
    def build(folder):
        run_training(["tiny", folder / "run", "--teacher", tiny_teacher, "--datadir",
                      folder / "pairs", *PAIRS, "--generate_only"])
    return str(shared(tmp_path_factory, "pairs", build) / "pairs")


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_teacher, tiny_pairs):
    """A training run (SAVEDIR) of a short student trained on the session pairs: logs, best/ and
    last/ exports. Eval tests sample it; tests/test_training.py checks that it learned."""
    def build(folder):
        run_training(["tiny", folder / "run", "--teacher", tiny_teacher, "--datadir", tiny_pairs,
                      *PAIRS, *STUDENT])
    return str(shared(tmp_path_factory, "student", build) / "run")
