"""Real images: scikit-learn's digits (the embedded demo) and any tensorflow-datasets image set,
as float32 arrays in [-1, 1], [N, H, W, C], at the network's resolution and channel count.

tfds is used with download=False: offline, its download retries hang for minutes, so a dataset
that is not prepared is a clear error telling the user how to prepare it.
"""
from __future__ import annotations

import numpy as np

from models.configs import SKLEARN_DIGITS
from utils.errors import UserError


class DatasetError(UserError, ValueError):
    """Real images that cannot be had: an unknown or unprepared dataset, an unknown split."""


def digits(split: str = "train") -> np.ndarray:
    """The 1,797 8x8 digits of scikit-learn, [-1, 1], [N, 8, 8, 1]. Every fifth image is held out
    ("test", 360 images) for the classifier's accuracy and as the reference set; "all" is all."""
    x, _ = digits_with_labels(split)
    return x


def digits_with_labels(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]  # pixel values are 0..16
    held_out = np.arange(len(x)) % 5 == 0
    pick = {"train": ~held_out, "test": held_out, "all": np.ones(len(x), bool)}.get(split)
    if pick is None:
        raise DatasetError(f"unknown digits split {split!r} (train, test, all)")
    return x[pick], data.target[pick]


def tfds_images(name: str, resolution: int, channels: int, split: str = "train",
                data_dir: str | None = None, limit: int | None = None) -> np.ndarray:
    """All images of a prepared tfds dataset, resized (area) to resolution x resolution."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown names raise DatasetNotFoundError and others
        raise DatasetError(f"tensorflow-datasets has no dataset {name!r} ({e})") from None
    try:  # never download_and_prepare: offline, tfds retries for minutes
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except Exception:
        raise DatasetError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare "
                           f"it on a machine with internet (`tfds build {name}`) and pass "
                           f"--data_dir") from None
    out = []
    for example in ds.take(limit) if limit else ds:
        img = tf.cast(example["image"], tf.float32)
        if img.shape[-1] != channels:
            img = (tf.image.rgb_to_grayscale(img) if channels == 1
                   else tf.image.grayscale_to_rgb(img))
        img = tf.image.resize(img, [resolution, resolution], method="area")
        out.append(img.numpy() / 127.5 - 1.0)
    if not out:
        raise DatasetError(f"tfds dataset {name!r} split {split!r} is empty")
    return np.stack(out).astype(np.float32)


def real_images(source: str, image_shape: tuple[int, int, int], split: str = "train",
                data_dir: str | None = None) -> np.ndarray:
    """The images of `source` (a DatasetConfig.real_images: SKLEARN_DIGITS or a tfds name) at
    image_shape (height, width, channels); the digits come at their native 8x8x1."""
    if source == SKLEARN_DIGITS:
        return digits(split)
    height, _, channels = image_shape
    return tfds_images(source, height, channels, split, data_dir)
