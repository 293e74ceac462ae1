"""The one door for weights: find them, recognise a file's format, read it into official DDPM names,
put it into a network, and write it out. One module per format in models/formats/ (its registry):

    ddpm_tf1      official DDPM TF1 checkpoints (hojonathanho/diffusion)
    ddim_pth      the DDIM CelebA ckpt.pth (ermongroup/ddim)
    original_h5   the original repository's Keras .h5 teachers and students
    diffusers     Hugging Face diffusers UNet2DModel and pipeline folders (the hub's google/ddpm-*)
    converted     ours: tf.train.Checkpoint + weights.json

Every reader returns a `Weights` (official name -> array in the official layout, where it came
from, the GroupNorm epsilon it was trained with, and its network where the file records one);
`assign` puts them into a UNet and refuses anything but an exact match. The network travels with
the weights: a teacher whose network differs from the dataset's is accepted when it makes images
of the dataset's shape, and the student gets the teacher's network.

    python -m models.convert --dataset cifar10 diffusion_cifar10_model/model.ckpt-790000 ./teachers/cifar10
"""
from __future__ import annotations

import dataclasses
import os

from models.configs import DatasetConfig, NetworkConfig
from models.formats import FORMATS
from models.formats.base import (OFFICIAL_GN_EPS, ORIGINAL_GN_EPS, Weights,  # noqa: F401
                                 WeightsError, fit_report)
from models.formats.converted import read_converted, save_converted, variables_checkpoint  # noqa: F401
from models.unet import UNet, official_variables
from utils import fileio

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")  # shipped weights
DEFAULT_TEACHER_DIRS = ("./teachers", "./official_models", "./Original_Models")
DEFAULT_STUDENT_DIR = "./denoising_student_models"  # where the original release unzips
RELEASE = ("denoising_student_models.zip from the original release "
           "(https://drive.google.com/file/d/1tW5t3W4wqE5f0NXaaiYuFK_2JOBrf9cY)")
TEACHER_SOURCES = ("official DDPM checkpoints: https://github.com/hojonathanho/diffusion; "
                   "DDIM CelebA: https://github.com/ermongroup/ddim")


def recognise(path: str) -> str | None:
    """The name of the format of the file or folder at `path`; None if it is none of ours."""
    for name, fmt in FORMATS.items():
        if fmt.recognise(path):
            return name
    return None


def detect_format(path: str) -> str:
    name = recognise(path)
    if name is None:
        what = "no weights here" if fileio.isdir(path) else "not found (or not a known weight format)"
        raise WeightsError(f"{path}: {what} (expected one of: {', '.join(FORMATS)})")
    return name


def read_weights(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    """Read any supported file into official names. `ema` picks EMA vs raw weights where a file
    has both; `cfg` gives the network of files that do not record one, and the sampler a
    diffusers scheduler config must agree with."""
    return FORMATS[detect_format(path)].read(path, cfg, ema)


def write_weights(fmt: str, folder: str, model: UNet, meta: dict, replace: bool = False
                  ) -> list[str]:
    """The model's weights in format `fmt` into `folder` (a new or empty one, unless `replace`);
    returns the file names written."""
    if not hasattr(FORMATS.get(fmt), "write"):
        raise WeightsError(f"no writer for the {fmt} format")
    return FORMATS[fmt].write(folder, model, meta, replace=replace)


def candidates(folders: list[str], cfg: DatasetConfig, role: str) -> list[str]:
    """Where any format's weights for `role` would be inside `folders`, in search order (for a
    teacher, first the official release's layout: cfg.teacher_file, e.g.
    diffusion_cifar10_model/model.ckpt-790000 or celeba/ckpt.pth)."""
    out = []
    for folder in folders:
        if role == "teacher" and cfg.teacher_file:
            out.append(os.path.join(folder, cfg.teacher_file))
        for fmt in FORMATS.values():
            out += [p for p in fmt.locate(folder, cfg, role) if p not in out]
    return out


def find_weights(folders: list[str], cfg: DatasetConfig, role: str) -> str | None:
    """The first weights found for `role` ("student" or "teacher") inside `folders`."""
    for path in candidates(folders, cfg, role):
        try:
            if fileio.exists_or_prefix(path) and recognise(path):
                return path
        except WeightsError:  # e.g. a folder of several TF checkpoints: not this one
            continue
    return None


def shipped(cfg: DatasetConfig, role: str) -> str | None:
    """models/pretrained/{dataset}/{role} ("student", "teacher") if the repository ships it."""
    folder = os.path.join(PRETRAINED, cfg.name, role)
    return folder if os.path.isdir(folder) else None


def find_student(model_dir: str | None, cfg: DatasetConfig) -> str:
    """The student's weights inside `model_dir` (default: the shipped student, else the original
    release's folder): a training run (its best/, else last/), any format's file or folder."""
    model_dir = model_dir or shipped(cfg, "student") or DEFAULT_STUDENT_DIR
    found = find_weights([model_dir], cfg, "student")
    if found is None:
        raise WeightsError(f"no {cfg.name} student in {model_dir}: expected a training run (SAVEDIR "
                           f"with best/), a converted checkpoint (weights.json), a diffusers folder, or "
                           f"{cfg.name}_ema_model.h5 from {RELEASE} unzipped into {DEFAULT_STUDENT_DIR}/")
    return found


def find_teacher(cfg: DatasetConfig) -> str:
    """The dataset's teacher: shipped in models/pretrained, else in the default folders."""
    found = shipped(cfg, "teacher") or find_weights(list(DEFAULT_TEACHER_DIRS), cfg, "teacher")
    if found is None:
        where = candidates(list(DEFAULT_TEACHER_DIRS), cfg, "teacher")
        raise WeightsError(f"no teacher weights for {cfg.name}: pass --teacher, or put them at one "
                           f"of {', '.join(where)} ({TEACHER_SOURCES}), or train one with "
                           f"--teacher_dataset")
    return found


# -- putting weights into a network ----------------------------------------------------------------

def assign(model: UNet, weights: Weights) -> None:
    """Copy every tensor into `model`; any missing, unused or mis-shaped tensor is an error."""
    ours = official_variables(model)
    missing = [n for n in ours if n not in weights.params]
    unused = [n for n in weights.params if n not in ours]
    wrong = [f"{n} {tuple(weights.params[n].shape)} vs {tuple(v.shape)}" for n, v in ours.items()
             if n in weights.params and tuple(weights.params[n].shape) != tuple(v.shape)]
    if missing or unused or wrong:
        raise WeightsError(f"{weights.source} does not fit the {model.cfg.resolution}px network "
                           f"(ch_mult {model.cfg.ch_mult}): {fit_report(missing, unused, wrong)}")
    for n, v in ours.items():
        v.assign(weights.params[n])


def network_for(weights: Weights, cfg: DatasetConfig) -> NetworkConfig:
    """The network the weights run in: their own where they record one (it must make images of
    the dataset's shape), else the dataset's; with the GroupNorm epsilon they came with."""
    net = weights.network or cfg.network
    if net.image_shape != cfg.network.image_shape:
        have, need = ("x".join(map(str, s)) for s in (net.image_shape, cfg.network.image_shape))
        raise WeightsError(f"{weights.source} makes {have} images; {cfg.name} needs {need}")
    return dataclasses.replace(net, gn_eps=weights.gn_eps)


def load_unet(path: str, cfg: DatasetConfig, ema: bool = True,
              compute_dtype: str = "float32") -> tuple[UNet, Weights]:
    """A UNet holding the weights at `path`, in their own network (see network_for)."""
    weights = read_weights(path, cfg, ema=ema)
    if weights.dataset and weights.dataset != cfg.name:
        raise WeightsError(f"{path} holds {weights.dataset} weights, not {cfg.name}")
    model = UNet(network_for(weights, cfg), compute_dtype=compute_dtype)
    assign(model, weights)
    return model, weights
