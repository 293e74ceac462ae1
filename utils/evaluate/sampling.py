"""Drawing samples in batches from a student (one network call) or from its teacher (the solver
loop of models/diffusion.py), and the noise they start from.

The noise of sample i is a pure function of (seed, i), so a figure or folder is reproducible bit for
bit whatever the batch size, and a resumed folder continues exactly where it stopped.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from models.configs import DatasetConfig, SamplerConfig
from models.diffusion import describe_sampler, example_noise, student_fn, teacher_fn
from models.unet import UNet
from models.weights import Weights, WeightsError, find_student, load_unet, shipped
from utils.images import to_uint8

SAMPLE_STREAM = 2  # noise stream for evaluation samples (0 and 1 are the pair sets)
Sampler = Callable[[tf.Tensor], tf.Tensor]


def default_teacher(cfg: DatasetConfig) -> str:
    folder = shipped(cfg, "teacher")
    if folder is None:
        raise WeightsError(f"no shipped {cfg.name} teacher: pass --model_dir with teacher weights")
    return folder


def load_student(model_dir: str | None, cfg: DatasetConfig,
                 compute_dtype: str = "float32") -> tuple[UNet, Weights]:
    return load_unet(find_student(model_dir, cfg), cfg, compute_dtype=compute_dtype)


def make_sampler(cfg: DatasetConfig, model_dir: str | None, *, teacher: SamplerConfig | None = None,
                 compute_dtype: str = "float32", xla: bool = True, say=print) -> Sampler:
    """z -> x0: the student's one step, or with `teacher` (a SamplerConfig) the teacher's solver
    loop on the weights in model_dir (default: the shipped teacher)."""
    if teacher is not None:
        model, weights = load_unet(model_dir or default_teacher(cfg), cfg,
                                   compute_dtype=compute_dtype)
        say(f"teacher ({describe_sampler(teacher)}): {weights.describe()}")
        return teacher_fn(model, teacher, xla)
    model, weights = load_student(model_dir, cfg, compute_dtype=compute_dtype)
    say(f"student: {weights.describe()}")
    return student_fn(model, xla)


def noise_for(indices: np.ndarray | tf.Tensor, cfg: DatasetConfig, seed: int | tf.Tensor
              ) -> tf.Tensor:
    """The noise of evaluation samples `indices` (also traced into the exported `sample`)."""
    return example_noise(tf.convert_to_tensor(indices), seed, SAMPLE_STREAM,
                         cfg.network.image_shape)


def sample_batches(sample: Sampler, cfg: DatasetConfig, indices: np.ndarray, batch: int, seed: int
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
