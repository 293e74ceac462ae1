"""Finding a student checkpoint and drawing samples from it (or from the DDIM teacher) in batches.

The noise of sample i is a pure function of (seed, i), so a figure or folder is reproducible bit for
bit whatever the batch size, and a resumed folder continues exactly where it stopped.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf

from data.shards import example_noise
from models.configs import DatasetConfig
from models.unet import UNet
from models.formats.diffusers import is_diffusers_folder
from models.weights import META_FILE, PRETRAINED, Weights, WeightsError, load_unet
from utils.images import to_uint8

SAMPLE_STREAM = 2  # noise stream for evaluation samples (0 and 1 are the pair sets)
ORIGINAL_DIR = "./denoising_student_models"
RELEASE = ("denoising_student_models.zip from the original release "
           "(https://drive.google.com/file/d/1tW5t3W4wqE5f0NXaaiYuFK_2JOBrf9cY)")


def shipped(cfg: DatasetConfig, role: str) -> str | None:
    """models/pretrained/{dataset}/{role} ("student", "teacher") if the repository ships it."""
    folder = os.path.join(PRETRAINED, cfg.name, role)
    return folder if os.path.isdir(folder) else None


def default_model_dir(cfg: DatasetConfig) -> str:
    return shipped(cfg, "student") or ORIGINAL_DIR


def default_teacher(cfg: DatasetConfig) -> str:
    folder = shipped(cfg, "teacher")
    if folder is None:
        raise WeightsError(f"no shipped {cfg.name} teacher: pass --model_dir with teacher weights")
    return folder


def find_student(model_dir: str, cfg: DatasetConfig) -> str:
    """The weight file/folder inside `model_dir`: a training run (its best/, else last/), a
    converted checkpoint, the original release's {dataset}_ema_model.h5, or a file given directly."""
    candidates = [model_dir, os.path.join(model_dir, "best"), os.path.join(model_dir, "last"),
                  os.path.join(model_dir, cfg.name)]
    for c in candidates:
        if os.path.isfile(os.path.join(c, META_FILE)):
            return c
    if os.path.isdir(model_dir) and is_diffusers_folder(model_dir):
        return model_dir
    h5 = os.path.join(model_dir, f"{cfg.name}_ema_model.h5")
    if os.path.isfile(h5):
        return h5
    if os.path.isfile(model_dir) and model_dir.endswith(".h5"):
        return model_dir
    raise WeightsError(f"no {cfg.name} student in {model_dir}: expected a training run (SAVEDIR "
                       f"with best/), a converted checkpoint (weights.json), a diffusers folder, or "
                       f"{cfg.name}_ema_model.h5 from {RELEASE} unzipped into {ORIGINAL_DIR}/")


def load_student(model_dir: str | None, cfg: DatasetConfig,
                 compute_dtype: str = "float32") -> tuple[UNet, Weights]:
    return load_unet(find_student(model_dir or default_model_dir(cfg), cfg), cfg,
                     compute_dtype=compute_dtype)


def noise_for(indices: np.ndarray | tf.Tensor, cfg: DatasetConfig, seed: int | tf.Tensor
              ) -> tf.Tensor:
    """The noise of evaluation samples `indices` (also traced into the exported `sample`)."""
    return example_noise(tf.convert_to_tensor(indices), seed, SAMPLE_STREAM,
                         cfg.network.image_shape)


def sample_batches(sample, cfg: DatasetConfig, indices: np.ndarray, batch: int, seed: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, uint8 images) for the given sample indices, `batch` at a time."""
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        yield idx, to_uint8(sample(noise_for(idx, cfg, seed)).numpy())


def slerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spherical interpolation between noise vectors a and b at weights w in [0, 1]."""
    a_flat, b_flat = a.ravel(), b.ravel()
    omega = np.arccos(np.clip(np.dot(a_flat, b_flat) / (np.linalg.norm(a_flat) * np.linalg.norm(b_flat)), -1, 1))
    if omega < 1e-6:
        return np.stack([(1 - x) * a + x * b for x in w])
    return np.stack([(np.sin((1 - x) * omega) * a + np.sin(x * omega) * b) / np.sin(omega) for x in w])
