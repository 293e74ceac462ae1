"""The one door for weights: detect a file's format, read it into official DDPM names, and put
it into a network. One module per format in models/formats/:

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
from models.formats.base import (META_FILE, OFFICIAL_GN_EPS, ORIGINAL_GN_EPS, Weights,  # noqa: F401
                                 WeightsError)
from models.formats.converted import (CKPT_PREFIX, read_converted, save_converted,  # noqa: F401
                                      variables_checkpoint)
from models.formats.ddim_pth import read_ddim_pth
from models.formats.ddpm_tf1 import read_ddpm_tf1, tf1_prefix_in
from models.formats.diffusers import is_diffusers_folder, read_diffusers
from models.formats.original_h5 import read_original_h5
from models.unet import UNet, official_variables
from utils import fileio

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")  # shipped weights


def detect_format(path: str) -> str:
    if fileio.isdir(path):
        if fileio.exists(os.path.join(path, META_FILE)):
            return "converted"
        if is_diffusers_folder(path):
            return "diffusers"
        if tf1_prefix_in(path):
            return "ddpm_tf1"
        raise WeightsError(f"{path}: no weights here (expected {META_FILE}, a diffusers "
                           f"config.json, a TF checkpoint, a .h5 or a .pth file)")
    if path.endswith(".h5"):
        return "original_h5"
    if path.endswith((".pth", ".pt")):
        return "ddim_pth"
    if fileio.exists(path + ".index"):
        return "ddpm_tf1"
    raise WeightsError(f"{path}: not found (or not a known weight format)")


def read_weights(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    """Read any supported file into official names. `ema` picks EMA vs raw weights where a file
    has both; `cfg` gives the network of files that do not record one, and the sampler a
    diffusers scheduler config must agree with."""
    fmt = detect_format(path)
    if fmt == "converted":
        return read_converted(path)
    if fmt == "diffusers":
        return read_diffusers(path, cfg.sampler)
    if fmt == "original_h5":
        return read_original_h5(path, cfg)
    if fmt == "ddim_pth":
        return read_ddim_pth(path, ema=ema)
    return read_ddpm_tf1(path, ema=ema)


# -- putting weights into a network ----------------------------------------------------------------

def assign(model: UNet, weights: Weights) -> None:
    """Copy every tensor into `model`; any missing, unused or mis-shaped tensor is an error."""
    ours = official_variables(model)
    missing = [n for n in ours if n not in weights.params]
    unused = [n for n in weights.params if n not in ours]
    wrong = [f"{n} {tuple(weights.params[n].shape)} vs {tuple(v.shape)}" for n, v in ours.items()
             if n in weights.params and tuple(weights.params[n].shape) != tuple(v.shape)]
    problems = [(missing, "missing"), (unused, "not in the network"), (wrong, "wrong shape")]
    if any(p for p, _ in problems):
        detail = "; ".join(f"{len(p)} {what}: {', '.join(p[:4])}{' ...' if len(p) > 4 else ''}"
                           for p, what in problems if p)
        raise WeightsError(f"{weights.source} does not fit the {model.cfg.resolution}px network "
                           f"(ch_mult {model.cfg.ch_mult}): {detail}")
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
