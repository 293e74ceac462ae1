"""Bad input to each CLI, as tables: every case exits with code 2, prints exactly one line on stderr
(no traceback, no usage block) and writes nothing. The cases run in this process (run_main), since
the process is not what they test; one subprocess per CLI checks the real exit code and stderr,
with TensorFlow's C++ logging at its most verbose."""
import os

import pytest

from tests.helpers import run_cli, run_main
from utils.cli import nonneg_int, positive_float, positive_int, seed_int, unit_interval

# Every numeric flag with values it must refuse. argparse-level: refused before any work.
POSITIVE_INT = ["0", "-1", "2.5", "x"]
POSITIVE_FLOAT = ["0", "-1e-3", "nan", "inf", "x"]
UNIT_INTERVAL = ["1", "1.0", "-0.1", "nan", "x"]
SEED = ["-1", "4294967296", "x"]
TRAINING_NUMBERS = {
    **{f: POSITIVE_INT for f in ("--teacher_steps", "--n_examples", "--shard_size", "--n_test",
                                 "--gen_batch_size", "--cpu_replicas", "--batch_size",
                                 "--grad_accum", "--ckpt_every", "--n_eval")},
    **{f: POSITIVE_FLOAT for f in ("--epochs", "--lr", "--adam_epsilon")},
    **{f: UNIT_INTERVAL for f in ("--beta_1", "--beta_2", "--ema_decay")},
    "--warmup_steps": ["-1", "1.5", "x"], "--seed": SEED, "--steps_per_call": POSITIVE_INT,
    "--solver_steps": POSITIVE_INT,
}
SAMPLING_NUMBERS = {"--n_images": POSITIVE_INT, "--batch_size": POSITIVE_INT, "--seed": SEED,
                    "--solver_steps": POSITIVE_INT}
EVAL_NUMBERS = {
    "figures": {**SAMPLING_NUMBERS, "--zoom": POSITIVE_INT},
    "tofolder": {**SAMPLING_NUMBERS, "--zoom": POSITIVE_INT},
    "interpolate": {**SAMPLING_NUMBERS, "--zoom": POSITIVE_INT, "--n_rows": POSITIVE_INT,
                    "--n_steps": POSITIVE_INT},
    "fid": {**SAMPLING_NUMBERS, "--fid_batch": POSITIVE_INT, "--n_runs": POSITIVE_INT},
    "speed": {"--batch_size": POSITIVE_INT, "--repeats": POSITIVE_INT,
              "--solver_steps": POSITIVE_INT},
}


def numeric_cases(head, table):
    return [([*head, flag, value], f"argument {flag}: ") for flag, values in table.items()
            for value in values]


# Paths: RUN a new folder, FILE a file, MISSING nothing, EMPTY an empty folder, FULL a folder with a
# file in it, STUDENT a tiny converted checkpoint, BADPNG a folder with a broken PNG.
TRAINING_CASES = [
    (["tiny", "FILE", "--no_generate"], "argument SAVEDIR: FILE is a file, not a directory"),
    (["tiny", "FILE/run"], "argument SAVEDIR: cannot create FILE/run: FILE is a file"),
    (["tiny", ""], "argument SAVEDIR: empty path"),
    (["imagenet", "RUN"], "argument DATASET: invalid choice: 'imagenet'"),
    (["tiny"], "the following arguments are required: SAVEDIR"),
    (["tiny", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
    (["tiny", "RUN", "--datadir", "FILE"], "argument --datadir: FILE is a file, not a directory"),
    (["tiny", "RUN", "--teacher", "MISSING"], "argument --teacher: MISSING not found"),
    (["tiny", "RUN", "--data_dir", "MISSING"], "argument --data_dir: MISSING not found"),
    (["tiny", "RUN", "--data_dir", "FILE"], "argument --data_dir: FILE is not a directory"),
    (["tiny", "RUN", "--teacher_dataset", " "], "argument --teacher_dataset: must not be empty"),
    (["tiny", "RUN", "--tpu", ""], "argument --tpu: must not be empty"),
    (["tiny", "RUN", "--devices", ""], "argument --devices: must not be empty"),
    (["tiny", "RUN", "--loss", "l3"], "argument --loss: invalid choice: 'l3'"),
    (["tiny", "RUN", "--solver", "heun"], "argument --solver: invalid choice: 'heun'"),
    (["tiny", "RUN", "--solver_spacing", "karras"], "argument --solver_spacing: invalid choice"),
    (["tiny", "RUN", "--lr", "0"], "argument --lr: must be a positive number, got 0"),
    (["tiny", "RUN", "--grad_accum", "x"], "argument --grad_accum: expected an integer, got 'x'"),
    (["tiny", "RUN", "--beta_2", "1"], "argument --beta_2: must be a number in [0, 1), got 1"),
    # after parsing, still before any work
    (["tiny", "RUN", "--no_generate", "--datadir", "MISSING"], "no pair set at MISSING"),
    (["tiny", "RUN", "--no_generate"], "no pair set at ./datasets/tiny"),
    (["tiny", "RUN", "--devices", "/gpu:7"], "no device /gpu:7 here"),
    (["tiny", "RUN", "--grad_accum", "3"], "batch 32 is not divisible by 1 replica(s) x 3"),
    (["tiny", "RUN", "--batch_size", "30", "--grad_accum", "4"], "batch 30 is not divisible"),
    *numeric_cases(["tiny", "RUN"], TRAINING_NUMBERS),
]

EVAL_CASES = [
    ([], "the following arguments are required: COMMAND"),
    (["info"], "the following arguments are required: DATASET"),
    (["figures", "RUN", "imagenet"], "argument DATASET: invalid choice: 'imagenet'"),
    *[([cmd, "FILE", "tiny"], "argument DIR: FILE is a file, not a directory")
      for cmd in ("figures", "tofolder", "interpolate")],
    (["figures", "FILE/out", "tiny"], "argument DIR: cannot create FILE/out: FILE is a file"),
    (["figures", "RUN", "tiny", "--model_dir", "MISSING"], "argument --model_dir: MISSING not found"),
    (["speed", "tiny", "--model_dir", "MISSING"], "argument --model_dir: MISSING not found"),
    (["figures", "RUN", "tiny", "--sampler", "dpm"], "argument --sampler: invalid choice: 'dpm'"),
    (["fid", "tiny", "--images", "MISSING"], "argument --images: MISSING not found"),
    (["fid", "tiny", "--images", "FILE"], "argument --images: FILE is not a directory"),
    (["fid", "tiny", "--reference", "MISSING"], "argument --reference/--ref_stats: MISSING not found"),
    (["fid", "tiny", "--ref_stats", "FILE"], "neither a folder of images nor a statistics file"),
    (["fid", "tiny", "--save_stats", "FILE"], "argument --save_stats: FILE already exists"),
    (["fid", "tiny", "--images", "EMPTY", "--real"], "argument --real: not allowed with argument"),
    (["fid", "tiny", "--data_dir", "MISSING"], "argument --data_dir: MISSING not found"),
    (["figures", "RUN", "tiny", "--n_images", "0"], "must be a positive integer, got 0"),
    # after parsing: the weights and images are looked at before the output folder is made
    (["fid", "tiny", "--images", "EMPTY"], "EMPTY holds no images (.png, .jpg)"),
    (["fid", "tiny", "--images", "BADPNG"], "BADPNG/00000.png: not a readable image"),
    (["fid", "digits", "--images", "EMPTY"], "EMPTY holds no images"),
    (["fid", "digits", "--images", "BADPNG"], "BADPNG/00000.png: not a readable image"),
    (["figures", "RUN", "digits", "--model_dir", "STUDENT"], "holds tiny weights, not digits"),
    (["tofolder", "RUN", "digits", "--model_dir", "STUDENT"], "holds tiny weights, not digits"),
    (["interpolate", "RUN", "digits", "--model_dir", "STUDENT"], "holds tiny weights, not digits"),
    (["figures", "RUN", "cifar10", "--model_dir", "EMPTY"], "no cifar10 student in EMPTY"),
    (["figures", "RUN", "tiny", "--sampler", "teacher"], "no shipped tiny teacher"),
    (["figures", "RUN", "digits", "--solver", "dpmpp_2m"], "add --sampler teacher"),
    (["fid", "digits", "--solver", "dpmpp_2m"], "add --sampler teacher"),
    (["fid", "tiny", "--images", "BADPNG", "--sampler", "teacher"], "not with --images"),
    (["figures", "RUN", "digits", "--sampler", "teacher", "--solver_steps", "5000"],
     "from 2 to 1000"),
    (["speed", "tiny", "--solver", "euler"], "argument --solver: invalid choice: 'euler'"),
    *[case for cmd, table in EVAL_NUMBERS.items()
      for case in numeric_cases([cmd, *(["RUN"] if cmd in ("figures", "tofolder", "interpolate")
                                        else []), "tiny"], table)],
]

CONVERT_CASES = [
    (["STUDENT", "RUN"], "the following arguments are required: --dataset"),
    (["--dataset", "imagenet", "STUDENT", "RUN"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--dataset", "tiny", "MISSING", "RUN"], "argument SOURCE: MISSING not found"),
    (["--dataset", "tiny", "", "RUN"], "argument SOURCE: empty path"),
    (["--dataset", "tiny", "STUDENT", "FILE"], "argument OUT_DIR: FILE is a file, not a directory"),
    (["--dataset", "tiny", "STUDENT", "FILE/out"], "argument OUT_DIR: cannot create FILE/out"),
    (["--dataset", "tiny", "EMPTY", "RUN"], "EMPTY: no weights here"),
    (["--dataset", "tiny", "BADPNG/00000.png", "RUN"], "not found (or not a known weight format)"),
    (["--dataset", "tiny", "FILE.h5", "RUN"], "FILE.h5: unreadable Keras h5 file"),
    (["--dataset", "cifar10", "STUDENT", "RUN"], "holds tiny weights, not cifar10"),
    (["--dataset", "tiny", "STUDENT", "FULL"], "FULL already holds files"),
]


@pytest.fixture(scope="module")
def student(tiny_teacher):
    """Tiny weights in our converted format (the session's, tests/conftest.py); nothing else is
    written to its folder once made, so 'nothing written' can be watched there."""
    return tiny_teacher


@pytest.fixture
def places(tmp_path, monkeypatch, student):
    """The placeholders' paths, in a fresh folder that is also the working directory (so that
    relative defaults such as ./datasets/NAME are watched too)."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "file.h5").write_bytes(b"not an h5 file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "badpng").mkdir()
    (tmp_path / "badpng" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    monkeypatch.chdir(tmp_path)
    return {"RUN": tmp_path / "run", "FILE": tmp_path / "file", "MISSING": tmp_path / "missing",
            "EMPTY": tmp_path / "empty", "FULL": tmp_path / "full", "BADPNG": tmp_path / "badpng",
            "STUDENT": student}


def fill(text, places):
    """Placeholders (RUN, FILE/out, ...) replaced by their paths, in an argument or a message."""
    for name in sorted(places, key=len, reverse=True):
        text = text.replace(name, str(places[name]))
    return text


def tree(root):
    """Every path under root with its size and modification time: 'nothing written' is equality."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_one_line_error(code, err, expected):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], (expected, lines[0])


def check_cases(module, cases, places, student, capsys):
    watched = [os.getcwd(), os.path.dirname(student)]
    for argv, expected in cases:
        before = [tree(w) for w in watched]
        code, out, err = run_main(module, [fill(a, places) for a in argv], capsys)
        assert_one_line_error(code, err, fill(expected, places))
        assert [tree(w) for w in watched] == before, argv


def test_training_refuses_bad_input(places, student, capsys):
    check_cases("training", TRAINING_CASES, places, student, capsys)


def test_eval_refuses_bad_input(places, student, capsys):
    check_cases("eval", EVAL_CASES, places, student, capsys)


def test_convert_refuses_bad_input(places, student, capsys):
    check_cases("models.convert", CONVERT_CASES, places, student, capsys)


def test_every_numeric_flag_is_in_the_tables():
    """A new numeric flag without a row here would go untested."""
    import eval as eval_cli
    import training

    numeric = {int, float, positive_int, nonneg_int, seed_int, positive_float, unit_interval}

    def numeric_flags(parser):
        return {a.option_strings[0] for a in parser._actions if a.type in numeric}
    assert numeric_flags(training.build_parser()) == set(TRAINING_NUMBERS)
    subparsers = next(a for a in eval_cli.build_parser()._actions if a.dest == "command").choices
    for cmd, sub in subparsers.items():
        assert numeric_flags(sub) == set(EVAL_NUMBERS.get(cmd, {})), cmd


# -- the real processes: exit code and the whole of stderr, TensorFlow's C++ logging fully on ------

VERBOSE_TF = {"TF_CPP_MIN_LOG_LEVEL": "0"}


@pytest.mark.slow  # a process of its own
def test_training_unreachable_tpu_is_one_line(tmp_path):
    r = run_cli("training.py", "tiny", str(tmp_path / "run"), "--tpu", "no-such-tpu-here",
                env=VERBOSE_TF, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot use TPU 'no-such-tpu-here': ")
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a process of its own
def test_convert_bad_source_is_one_line(tmp_path):
    r = run_cli("-m", "models.convert", "--dataset", "tiny", str(tmp_path / "none"),
                str(tmp_path / "out"), env=VERBOSE_TF)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: argument SOURCE: {tmp_path / 'none'} not found "
                                     f"(see python -m models.convert --help)"]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a process of its own
def test_eval_teacher_batch_of_one_prints_nothing_on_stderr(tmp_path):
    # a batch of one through the compiled DDIM loop, at the most verbose TensorFlow log level
    r = run_cli("eval.py", "figures", str(tmp_path), "digits", "--n_images", "1", "--sampler",
                "teacher", env=VERBOSE_TF)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert os.listdir(tmp_path) == ["digits_figure_0.png"]
