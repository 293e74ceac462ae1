"""The digits models shipped in models/pretrained: small, with portable provenance, and drawing
digits (a sanity bound against noise only; bench/digits_quality.py measures the real figures)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from models.configs import get_config
from utils.evaluate import digit_classifier as dc
from models.weights import PRETRAINED
from models.diffusion import student_fn
from utils.evaluate.sampling import load_student, sample_batches

CFG = get_config("digits")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_shipped_weights_are_small_and_say_portably_how_they_were_made(role):
    folder = os.path.join(PRETRAINED, "digits", role)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 10_000_000
    meta = json.load(open(os.path.join(folder, "weights.json")))
    assert meta["command"].startswith("python training.py digits SAVEDIR")
    assert isinstance(meta["step"], int) and meta["step"] > 0
    strings = [v for v in meta.values() if isinstance(v, str)]
    assert not any(os.path.isabs(s) or "/work/" in s for s in strings), strings


def test_shipped_student_draws_digits_far_better_than_noise():
    model, _ = load_student(None, CFG)
    images = np.concatenate([b for _, b in sample_batches(student_fn(model), CFG, np.arange(400),
                                                          200, seed=3)])
    noise = np.random.default_rng(3).integers(0, 256, images.shape, dtype=np.uint8)
    assert dc.digits_fd(images) < dc.digits_fd(noise) / 4
    confident = dc.confident_share(dc.class_probabilities(images))
    assert confident > 3 * dc.confident_share(dc.class_probabilities(noise))


def test_digits_distils_the_shipped_teacher_unless_asked_to_train_one(tmp_path):
    """`training.py digits SAVEDIR` uses the shipped teacher, as cifar10 uses the official one;
    --teacher_dataset digits trains one instead (here: finds the one already trained in SAVEDIR)."""
    import training
    from models.weights import save_converted
    from models.unet import UNet

    args = training.build_parser().parse_args(["digits", str(tmp_path)])
    assert training.resolve_teacher(args, CFG) == os.path.join(PRETRAINED, "digits", "teacher")
    trained = save_converted(UNet(CFG.network), str(tmp_path / "teacher"), {"dataset": "digits"})
    args = training.build_parser().parse_args(["digits", str(tmp_path), "--teacher_dataset",
                                               "digits"])
    assert training.resolve_teacher(args, CFG) == trained


def test_recorded_command_leaves_the_folders_of_the_training_machine_symbolic():
    import training
    cmd = training.recorded_command(["digits", "/abs/run dir", "--lr", "1e-4"], "/abs/run dir")
    assert cmd == "python training.py digits SAVEDIR --lr 1e-4"
    shipped = os.path.join(PRETRAINED, "digits", "teacher")  # typed as an absolute path
    cmd = training.recorded_command(["digits", "/r", "--datadir", "/d/p", "--teacher", shipped,
                                     "--data_dir=/raw", "--n_examples", "64"], "/r")
    assert cmd == ("python training.py digits SAVEDIR --datadir DATADIR --teacher "
                   "models/pretrained/digits/teacher --data_dir=DATA_DIR --n_examples 64")
    cmd = training.recorded_command(["digits", "/r", "--teacher", "/elsewhere/t"], "/r")
    assert cmd == "python training.py digits SAVEDIR --teacher TEACHER"
