"""The whole method through the real CLIs on a small budget.

1. The paper's workflow, `training.py digits RUN` (with XLA, the default): pairs from the shipped
   teacher (stage 1), then the student (stage 2); eval.py figures and fid on the result, and the
   same command again. In this process: tests/test_bad_input.py checks each CLI's exit code and
   stderr in a process of its own.
2. Stage 0, `--teacher_dataset digits`: a DDPM teacher trained on the real digits, exported with
   its provenance, and its pairs (in this process, plain graph)."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_main
from utils.evaluate import digit_classifier as dc

N_FID = 200


def fd_of(out: str) -> float:
    return float(out.strip().rsplit(": ", 1)[-1])


@pytest.mark.slow
def test_digits_distillation_end_to_end(tmp_path, capsys):
    run, pairs = tmp_path / "run", tmp_path / "pairs"
    # One teacher batch shape (64) for every shard: one XLA compilation of the DDIM loop. 64 steps
    # of 16 pairs, with an EMA decay of 0.95 that follows them (the default 0.995 lags: 80 steps
    # of 32 pairs scored FD 253 with it, worse than noise, and 16 with 0.95).
    argv = ["digits", str(run), "--datadir", str(pairs), "--n_examples", "256", "--shard_size",
            "128", "--n_test", "64", "--gen_batch_size", "64", "--batch_size", "16", "--epochs",
            "4", "--lr", "3e-3", "--warmup_steps", "10", "--lr_decay", "cosine", "--ema_decay",
            "0.95", "--ckpt_every", "80", "--no_progress"]
    code, _, err = run_main("training", argv, capsys)
    assert code == 0, err[-3000:]
    # stage 1: a complete pair set of the requested size, from the shipped teacher
    manifest = json.load(open(pairs / "manifest.json"))
    assert manifest["n_examples"] == 256 and len(manifest["files"]) == 2 * (2 + 1)
    y = np.load(pairs / "y_train_0.npy")
    assert y.shape == (128, 8, 8, 1) and y.dtype == np.uint8 and y.std() > 10
    # stage 2: checkpoints, best export, held-out loss far below its initial value
    log = [json.loads(x) for x in open(run / "logs" / "scalars.jsonl")]
    held = [e["heldout_loss"] for e in log if "heldout_loss" in e]
    assert log[-1]["step"] == 64 and min(held) < 0.5 * held[0]
    rates = [e["learning_rate"] for e in log if "learning_rate" in e]
    assert rates[-1] < 1e-4 * max(rates)  # --lr_decay cosine reaches zero at the last step
    meta = json.load(open(run / "best" / "weights.json"))
    # provenance is portable: the command with its folders symbolic, no folder of this machine
    assert meta["command"].startswith("python training.py digits SAVEDIR --datadir DATADIR ")
    for folder in ("best", "last"):
        text = open(run / folder / "weights.json").read()
        assert str(tmp_path) not in text
    # evaluation of what was trained (plain graph: the training run was the XLA check)
    code, _, err = run_main("eval", ["figures", tmp_path / "fig", "digits", "--n_images", "49",
                                     "--model_dir", run, "--no-xla"], capsys)
    assert code == 0, err
    # 7x7 tiles of 8x8 with 1-pixel gutters, saved at digits' zoom of 4
    grid = np.asarray(Image.open(tmp_path / "fig" / "digits_figure_0.png"))
    assert grid.shape == (4 * (7 * 9 - 1),) * 2
    code, out, err = run_main("eval", ["fid", "digits", "--n_images", str(N_FID), "--batch_size",
                                       "100", "--model_dir", run, "--no-xla"], capsys)
    assert code == 0, err
    # 64 steps from the shipped teacher (FD 25 when measured; uniform noise 183): far better
    noise = np.random.default_rng(0).integers(0, 256, (N_FID, 8, 8, 1), dtype=np.uint8)
    fd, noise_fd = fd_of(out), dc.digits_fd(noise)
    assert fd < 0.3 * noise_fd, f"digits-classifier FD: student {fd:.1f}, noise {noise_fd:.1f}"
    # running the same command again finds everything complete and changes nothing
    before = open(run / "best" / "weights.data-00000-of-00001", "rb").read()
    code, _, err = run_main("training", argv, capsys)
    assert code == 0, err[-3000:]
    assert open(run / "best" / "weights.data-00000-of-00001", "rb").read() == before


@pytest.mark.slow
def test_digits_teacher_stage_end_to_end(tmp_path, capsys):
    run, pairs = tmp_path / "run", tmp_path / "pairs"
    argv = ["digits", str(run), "--datadir", str(pairs), "--teacher_dataset", "digits",
            "--teacher_steps", "20", "--ckpt_every", "10", "--n_examples", "16",
            "--shard_size", "16", "--n_test", "16", "--generate_only", "--no-xla", "--no_progress"]
    code, _, err = run_main("training", argv, capsys)
    assert code == 0, err[-3000:]
    # a teacher trained and exported, with its loss logged at checkpoints (steps 10, 20)
    teacher_log = [json.loads(x) for x in open(run / "teacher_run" / "logs" / "scalars.jsonl")]
    losses = [e["train_loss"] for e in teacher_log if "train_loss" in e]
    assert [e["step"] for e in teacher_log] == [10, 20] and losses[-1] < losses[0]
    meta = json.load(open(run / "teacher" / "weights.json"))
    assert meta["dataset"] == "digits" and meta["step"] == 20
    assert meta["command"].startswith("python training.py digits SAVEDIR --datadir DATADIR ")
    assert str(tmp_path) not in open(run / "teacher" / "weights.json").read()
    # its pairs: a complete set of the requested size
    manifest = json.load(open(pairs / "manifest.json"))
    assert manifest["n_examples"] == 16 and len(manifest["files"]) == 2 * (1 + 1)
