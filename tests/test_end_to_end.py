"""The whole method through the real CLIs on a tiny budget: teacher (stage 0), pairs (stage 1),
student (stage 2) in a training.py process (with XLA, the default), then eval.py figures and fid
on the result and the same training command again (in this process)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli, run_main


@pytest.mark.slow
def test_digits_end_to_end(tmp_path, capsys):
    run, pairs = tmp_path / "run", tmp_path / "pairs"
    argv = ["digits", str(run), "--datadir", str(pairs), "--teacher_dataset", "digits",
            "--teacher_steps", "100", "--n_examples", "384", "--shard_size", "128", "--n_test", "64",
            "--epochs", "2", "--lr_decay", "cosine", "--warmup_steps", "2", "--ckpt_every", "50",
            "--no_progress"]
    r = run_cli("training.py", *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    # stage 0: a teacher trained and exported, with its loss logged at checkpoints (steps 50, 100)
    teacher_log = [json.loads(x) for x in open(run / "teacher_run" / "logs" / "scalars.jsonl")]
    losses = [e["train_loss"] for e in teacher_log if "train_loss" in e]
    assert [e["step"] for e in teacher_log] == [50, 100] and losses[-1] < losses[0]
    meta = json.load(open(run / "teacher" / "weights.json"))
    assert meta["dataset"] == "digits" and meta["step"] == 100
    # provenance is portable: the command with SAVEDIR symbolic, no folder of this machine
    assert meta["command"].startswith("python training.py digits SAVEDIR --datadir")
    # stage 1: a complete pair set of the requested size
    manifest = json.load(open(pairs / "manifest.json"))
    assert manifest["n_examples"] == 384 and len(manifest["files"]) == 2 * (3 + 1)
    y = np.load(pairs / "y_train_0.npy")
    assert y.shape == (128, 8, 8, 1) and y.dtype == np.uint8 and y.std() > 10
    # stage 2: student checkpoints, best export, held-out loss below its initial value
    log = [json.loads(x) for x in open(run / "logs" / "scalars.jsonl")]
    held = [e["heldout_loss"] for e in log if "heldout_loss" in e]
    assert log[-1]["step"] == 12 and min(held) < held[0]
    rates = [e["learning_rate"] for e in log if "learning_rate" in e]
    assert rates[-1] < 1e-4 * max(rates)  # --lr_decay cosine reaches zero at the last step
    assert os.path.exists(run / "best" / "weights.json")
    for folder in ("teacher", "best", "last"):
        assert str(run) not in open(run / folder / "weights.json").read()
    assert json.load(open(run / "best" / "weights.json"))["command"] == meta["command"]
    # evaluation of what was trained (in this process: the training.py process was the CLI check)
    code, _, err = run_main("eval", ["figures", tmp_path / "fig", "digits", "--n_images", "49",
                                     "--model_dir", run], capsys)
    assert code == 0, err
    # 7x7 tiles of 8x8 with 1-pixel gutters, saved at digits' zoom of 4
    assert np.asarray(Image.open(tmp_path / "fig" / "digits_figure_0.png")).shape == (4 * (7 * 9 - 1),) * 2
    code, out, err = run_main("eval", ["fid", "digits", "--n_images", "200", "--batch_size", "100",
                                       "--model_dir", run], capsys)
    assert code == 0, err
    # A finite figure only: a 100-step teacher (EMA 0.999, still in its warmup) draws blobs that
    # score worse than uniform noise (FD ~480 vs ~180), and so does its student; that the shipped
    # student beats noise is tests/test_shipped_digits.py's check.
    assert np.isfinite(float(out.split("digits):")[-1].split()[0]))
    # running the same command again finds everything complete and changes nothing
    before = open(run / "best" / "weights.data-00000-of-00001", "rb").read()
    code, _, err = run_main("training", argv, capsys)
    assert code == 0, err[-3000:]
    assert open(run / "best" / "weights.data-00000-of-00001", "rb").read() == before
