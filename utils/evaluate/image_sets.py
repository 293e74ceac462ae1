"""The image sets `eval.py fid` measures: a folder of images, a dataset's real images (from
tensorflow-datasets, never downloaded), as uint8 batches; DDIM's CelebA crop."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf
from PIL import Image
from tqdm import tqdm

from models.configs import CONFIGS, SKLEARN_DIGITS, get_config
from utils.errors import first_line
from utils.evaluate.fid import FIDError

# DDIM's CelebA crop (ermongroup/ddim, datasets/__init__.py: cx=89, cy=121, a 128x128 box,
# torchvision F.crop(img, top=cy-64, left=cx-64, 128, 128)), then Resize(64).
CELEBA_TOP, CELEBA_LEFT, CELEBA_CROP = 57, 25, 128
CELEBA_SHAPE = (218, 178)
CELEBA_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageFolder:
    """The images of a folder (PNG or JPEG, sorted by name, the first `limit`) as re-iterable
    uint8 [N, H, W, C] batches in PIL `mode` ("RGB": grey images made RGB; "L": one channel). Every file is checked on creation
    (headers and checksums, not decoded), so a broken one stops the run before hours of work."""

    def __init__(self, folder: str, batch_size: int = 50, limit: int | None = None,
                 mode: str = "RGB"):
        if not os.path.isdir(folder):
            raise FIDError(f"{folder} is not a folder of images")
        try:
            names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        except OSError as e:
            raise FIDError(f"{folder}: unreadable folder ({e.strerror or e})") from None
        if not names:
            raise FIDError(f"{folder} holds no images (.png, .jpg)")
        self.folder, self.batch_size, self.mode = folder, batch_size, mode
        self.files = names[:limit] if limit else names
        self.num_examples = len(self.files)
        for name in tqdm(self.files, desc=f"checking {folder}", unit="img", leave=False,
                         disable=len(self.files) < 5000):
            self._open(name, verify=True)

    def _open(self, name: str, verify: bool = False) -> np.ndarray | None:
        path = os.path.join(self.folder, name)
        try:
            with Image.open(path) as im:
                if verify:
                    im.verify()
                    return None
                img = np.asarray(im.convert(self.mode), np.uint8)
                return img[..., None] if img.ndim == 2 else img
        except (OSError, SyntaxError, ValueError):  # PIL's errors for broken files
            raise FIDError(f"{path}: not a readable image (truncated or corrupt)") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches of up to batch_size images of one size (a size change starts a new batch)."""
        batch: list[np.ndarray] = []
        for name in self.files:
            img = self._open(name)
            if batch and (len(batch) == self.batch_size or img.shape != batch[0].shape):
                yield np.stack(batch)
                batch = []
            batch.append(img)
        if batch:
            yield np.stack(batch)


# -- reference images -----------------------------------------------------------------------------

def ddim_celeba_crop(img: np.ndarray) -> np.ndarray:
    """DDIM's 128x128 face crop of an aligned 218x178 CelebA image: rows 57:185, cols 25:153."""
    if img.shape[:2] != CELEBA_SHAPE:
        raise ValueError(f"CelebA images must be {CELEBA_SHAPE[0]}x{CELEBA_SHAPE[1]}, "
                         f"got {img.shape}")
    return img[CELEBA_TOP:CELEBA_TOP + CELEBA_CROP, CELEBA_LEFT:CELEBA_LEFT + CELEBA_CROP]


def ddim_celeba_resize(img: np.ndarray, size: int = CELEBA_SIZE) -> np.ndarray:
    """Resize a uint8 HxWx3 crop to size x size like torchvision's Resize on a PIL image.

    torchvision.transforms.Resize on a PIL image calls PIL's resize with BILINEAR, which
    antialiases when shrinking (the triangle filter is widened by the scale factor: 128 -> 64
    averages 4 source pixels per axis with weights 1,3,3,1), unlike tf.image.resize's bilinear.
    PIL itself is used here so the uint8 rounding matches DDIM's pipeline too.
    """
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
        (size, size), Image.BILINEAR), dtype=np.uint8)


class ReferenceImages:
    """Re-iterable uint8 [N, H, W, 3] batches of a prepared tfds split (see reference_images)."""

    def __init__(self, crop: str | None, ds: tf.data.Dataset, num_examples: int | None) -> None:
        self.crop = crop  # DatasetConfig.fid_crop
        self.num_examples = num_examples  # for progress bars; None if tfds does not know it
        self._ds = ds

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self._ds.as_numpy_iterator():
            if self.crop == "ddim_celeba":
                batch = np.stack([ddim_celeba_resize(ddim_celeba_crop(img)) for img in batch])
            yield batch.astype(np.uint8, copy=False)


def reference_images(dataset: str, split: str = "train", data_dir: str | None = None,
                     batch_size: int = 250) -> ReferenceImages:
    """Batches (uint8 [N, H, W, 3]) of real images of `dataset` from tensorflow-datasets.

    cifar10: the images as stored (32x32; use split 'train' for the usual 50k reference).
    celeba: tfds 'celeb_a' aligned 218x178 images, DDIM's crop then PIL bilinear resize to 64x64.
    Never downloads: the dataset must already be prepared in `data_dir` (tfds's own retries hang
    for minutes offline), otherwise FIDError says how to prepare it or to use a stats file.
    The checks run on this call, before any Inception work, not on the first batch.
    """
    import tensorflow_datasets as tfds  # heavy; only needed here

    cfg = get_config(dataset)
    name = cfg.real_images
    if name is None or name == SKLEARN_DIGITS:
        known = [n for n, c in CONFIGS.items() if c.real_images and c.real_images != SKLEARN_DIGITS]
        raise FIDError(f"no reference images for dataset {dataset!r} (known: "
                       f"{', '.join(known)}); pass --reference FILE.npz")
    builder = tfds.builder(name, data_dir=data_dir)
    where = data_dir or "the default tensorflow-datasets directory"
    try:
        # as_dataset only looks at the local directory; download_and_prepare is never called.
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:
        raise FIDError(f"{name} is not prepared in {where}; run `tfds build {name}"
                       f"{' --data_dir ' + data_dir if data_dir else ''}` or pass "
                       f"--reference FILE.npz") from None
    except (ValueError, KeyError) as e:  # e.g. an unknown split name
        raise FIDError(f"cannot read {name} split {split!r} from {where}: "
                       f"{first_line(e)}") from None
    try:
        num_examples: int | None = int(builder.info.splits[split].num_examples) or None
    except Exception:  # split arithmetic tfds cannot size, or mocked metadata
        num_examples = None
    ds = ds.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE)
    return ReferenceImages(cfg.fid_crop, ds.batch(batch_size).prefetch(2), num_examples)
