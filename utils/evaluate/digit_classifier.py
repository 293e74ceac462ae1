"""A small CNN trained on the real 8x8 digits: the feature network of a Frechet distance on digits.

FID's Inception never saw 8x8 digits, so the digits demo measures its samples with this classifier
instead: the 64-d activations of its "features" layer play the part of Inception's pool_3. Numbers
are only comparable with other digits FDs computed with the same shipped weights.

    python -m utils.evaluate.digit_classifier --train     # train (seed 0) and write the shipped files
    python -m utils.evaluate.digit_classifier             # evaluate the shipped classifier

    feats = DigitFeatures()                      # loads models/pretrained/digits/classifier
    fd = digits_fd(uint8_images)                 # [N, 8, 8, 1] uint8 -> FD against the test split

The weights are a tf.train.Checkpoint (`classifier.index` + `classifier.data-00000-of-00001`):
no pickle, and not an `.h5`, which the repository's .gitignore hides. The checkpoint maps each
variable's Keras path (e.g. `conv1/kernel`) to its value explicitly, so it depends on the layer
names below, not on how Keras happens to track layers internally.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

if __name__ == "__main__":  # `python -m utils.evaluate.digit_classifier`: quiet before TF loads
    from utils.cli import quiet_tensorflow
    quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from data.datasets import digits_with_labels  # noqa: E402
from models.weights import PRETRAINED  # noqa: E402
from utils.errors import UserError, first_line  # noqa: E402
from utils.fileio import atomic_dir, write_json  # noqa: E402
from utils.images import to_uint8  # noqa: E402
from utils.evaluate.fid import feature_statistics, frechet_distance  # noqa: E402

# Beside the shipped digits models, so that loading does not depend on the working directory.
DEFAULT_FOLDER = os.path.join(PRETRAINED, "digits", "classifier")
CHECKPOINT_NAME = "classifier"  # -> classifier.index, classifier.data-00000-of-00001
INFO_NAME = "classifier.json"
FEATURES_LAYER = "features"
FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
DEFAULT_EPOCHS = 60
BATCH_SIZE = 32
LEARNING_RATE = 2e-3


class ClassifierError(UserError, ValueError):
    """No usable digit classifier in the folder asked for."""


# -- the network ----------------------------------------------------------------------------------

def build_classifier() -> keras.Model:
    """Conv32-Conv64-MaxPool-Conv64-GAP-Dense64 ("features", ReLU)-Dense10 logits (~61k params).

    Layer names are fixed: they are the checkpoint's keys.
    """
    x = inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(FEATURE_DIM, activation="relu", name=FEATURES_LAYER)(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="digit_classifier")


def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by -1, 0 or +1 pixel in each direction; the border is background (-1)."""
    n = len(x)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(0, 3, n), rng.integers(0, 3, n)
    rows = dy[:, None] + np.arange(8)[None, :]  # [N, 8] row indices into the padded images
    cols = dx[:, None] + np.arange(8)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_classifier(seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                     verbose: bool = False) -> keras.Model:
    """Train on the "train" split only (the "test" split stays held out) with 1-pixel shifts.

    Deterministic given the seed as far as TF allows: the data order and the augmentation come
    from a NumPy generator, the initial weights from keras.utils.set_random_seed.
    """
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = digits_with_labels("train")
    model = build_classifier()
    steps = epochs * int(np.ceil(len(x) / BATCH_SIZE))
    # Cosine decay to 0: the last epochs settle the weights instead of bouncing around.
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        # shuffle=False: the order above is ours, so it does not depend on TF's shuffling.
        model.fit(_shift(x[order], rng), y[order], batch_size=BATCH_SIZE, epochs=epoch + 1,
                  initial_epoch=epoch, shuffle=False, verbose=2 if verbose else 0)
    return model


def accuracy(model: keras.Model, split: str = "test") -> float:
    """Fraction of the split's digits whose argmax logit is the label."""
    x, y = digits_with_labels(split)
    logits = np.asarray(model.predict(x, batch_size=512, verbose=0))
    return float(np.mean(np.argmax(logits, axis=1) == y))


# -- saving and loading (tf.train.Checkpoint, no pickle) ------------------------------------------

def _checkpoint(model: keras.Model) -> tf.train.Checkpoint:
    """An explicit {variable path: variable} checkpoint ("conv1/kernel" -> key "conv1__kernel")."""
    return tf.train.Checkpoint(**{w.path.replace("/", "__"): w for w in model.weights})


def save_classifier(model: keras.Model, folder: str = DEFAULT_FOLDER,
                    info: dict | None = None) -> None:
    """Write the weights (classifier.index/.data-*) and, if given, classifier.json as the folder's
    whole content; the folder is replaced only once complete (a killed run leaves the old one)."""
    with atomic_dir(folder, replace=True) as tmp:
        _checkpoint(model).write(os.path.join(tmp, CHECKPOINT_NAME))
        if info is not None:
            write_json(os.path.join(tmp, INFO_NAME), info)


def load_classifier(folder: str = DEFAULT_FOLDER) -> keras.Model:
    """Build the architecture and restore the weights from folder; ClassifierError if missing or
    unusable."""
    prefix = os.path.join(folder, CHECKPOINT_NAME)
    if not os.path.exists(prefix + ".index"):
        raise ClassifierError(f"no digit classifier in {folder!r} (expected {CHECKPOINT_NAME}.index and "
                         f"{CHECKPOINT_NAME}.data-*; train one with "
                         f"`python -m utils.evaluate.digit_classifier --train`)")
    model = build_classifier()
    try:
        # assert_consumed: every variable restored and nothing in the file left unused, so a
        # checkpoint of another architecture cannot load half-way.
        _checkpoint(model).read(prefix).assert_consumed()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise ClassifierError(f"cannot load the digit classifier from {folder!r}: "
                              f"{first_line(e)}") from None
    return model


# -- features and the Frechet distance ------------------------------------------------------------

class DigitFeatures:
    """The 64-d "features" activations of the classifier, as float64 [N, 64].

    Input: [N, 8, 8, 1] images, either uint8 in 0..255 (as written to PNG by the project:
    value = round((x + 1) * 127.5)) or floating point in [-1, 1]. Other integer dtypes, and floats
    outside [-1, 1] (e.g. 0..255 floats), are rejected rather than silently rescaled.
    """

    def __init__(self, model: keras.Model | None = None, batch_size: int = 500) -> None:
        model = load_classifier() if model is None else model
        self.model = keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output)
        self.batch_size = batch_size
        # One trace for every batch size (the last batch is usually smaller).
        self._forward = tf.function(lambda x: self.model(x, training=False),
                                    input_signature=[tf.TensorSpec((None,) + IMAGE_SHAPE,
                                                                   tf.float32)])

    @staticmethod
    def to_float(images: np.ndarray) -> np.ndarray:
        """Validate and convert images to float32 in [-1, 1], [N, 8, 8, 1]."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"DigitFeatures needs [N, 8, 8, 1] images, got shape {x.shape}")
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 127.5 - 1.0
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"DigitFeatures takes uint8 (0..255) or float ([-1, 1]) images, "
                             f"got dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError("DigitFeatures: the images contain NaN or infinite values")
        # A little slack for rounding; 0..255 floats (a forgotten rescale) fail loudly.
        if x.size and (x.min() < -1.001 or x.max() > 1.001):
            raise ValueError(f"float images must be in [-1, 1] (uint8 for 0..255), got values in "
                             f"[{x.min():g}, {x.max():g}]")
        return x.astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = self.to_float(images)
        out = [self._forward(tf.constant(x[i:i + self.batch_size])).numpy()
               for i in range(0, len(x), self.batch_size)]
        return (np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))).astype(np.float64)


_shipped: dict[str, object] = {}  # the shipped classifier and its feature extractor, loaded once


def _classifier() -> keras.Model:
    if "model" not in _shipped:
        _shipped["model"] = load_classifier()
    return _shipped["model"]


def _features(features: DigitFeatures | None) -> DigitFeatures:
    """The given extractor, or the shipped classifier's."""
    if features is not None:
        return features
    if "features" not in _shipped:
        _shipped["features"] = DigitFeatures(_classifier())
    return _shipped["features"]


def real_digits_uint8(split: str = "test") -> np.ndarray:
    """The real digits of a split quantised exactly like the project's PNGs (to_uint8)."""
    return to_uint8(digits_with_labels(split)[0])


def digits_fd(images_uint8: np.ndarray, reference: str = "test",
              features: DigitFeatures | None = None) -> float:
    """Frechet distance between the images' features and those of the real digits of `reference`.

    The real digits go through the same uint8 quantisation as generated PNGs, so that rounding
    is not counted as a difference. Needs at least 2 images; the reference statistics are
    recomputed each call (360 or 1,437 images: milliseconds).
    """
    f = _features(features)
    mu_g, s_g = feature_statistics(f(images_uint8))
    mu_r, s_r = feature_statistics(f(real_digits_uint8(reference)))
    return frechet_distance(mu_g, s_g, mu_r, s_r)


# -- sample quality beyond the FD: confidence, class balance, memorisation -----------------------

# A sample "is confidently one digit" when one class gets probability > 0.999. Our classifier is
# sure of itself (0.9 passes 97% of held-out real digits but also 43% of uniform noise); at 0.999,
# held-out real digits score 79% and uniform noise about 3%, so the share separates digits from
# blobs.
CONFIDENT = 0.999


def class_probabilities(images_uint8: np.ndarray, model: keras.Model | None = None) -> np.ndarray:
    """Softmax class probabilities [N, 10] of the shipped classifier (or `model`)."""
    model = model or _classifier()
    x = DigitFeatures.to_float(images_uint8)
    logits = np.concatenate([np.asarray(model(x[i:i + 500], training=False))
                             for i in range(0, len(x), 500)])
    return np.asarray(tf.nn.softmax(logits), np.float64)


def confident_share(probs: np.ndarray, threshold: float = CONFIDENT) -> float:
    """Fraction of images whose most likely class has probability above `threshold`."""
    return float(np.mean(probs.max(axis=1) > threshold))


def class_shares(probs: np.ndarray) -> np.ndarray:
    """Fraction of images assigned (argmax) to each of the 10 classes."""
    return np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES) / len(probs)


def nearest_distances(images_uint8: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels in [-1, 1]) from each image to its nearest reference image.

    Samples that copy training digits sit much closer to the training set than held-out real
    digits do; this is the number to compare.
    """
    b = DigitFeatures.to_float(reference).reshape(len(reference), -1).astype(np.float64)
    out = np.empty(len(images_uint8))
    for start in range(0, len(images_uint8), 4096):  # blocks: memory does not grow with n
        a = DigitFeatures.to_float(images_uint8[start:start + 4096]).reshape(-1, b.shape[1])
        a = a.astype(np.float64)
        sq = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
        out[start:start + len(a)] = np.sqrt(np.maximum(sq.min(axis=1), 0.0))
    return out


# -- CLI ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train (--train) or evaluate the digits classifier.")
    p.add_argument("--train", action="store_true", help="train and write the shipped files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--folder", default=DEFAULT_FOLDER)
    args = p.parse_args(argv)
    model = (train_classifier(args.seed, args.epochs, verbose=True) if args.train
             else load_classifier(args.folder))
    acc = accuracy(model, "test")
    fd = digits_fd(real_digits_uint8("train"), "test", DigitFeatures(model))
    print(f"held-out (test split) accuracy: {acc:.4f}")
    print(f"real-vs-real FD (train split vs test split): {fd:.4f}")
    if args.train:
        info = {"format": "tf.train.Checkpoint {variable path with / -> __: value}",
                "architecture": "utils.evaluate.digit_classifier.build_classifier",
                "test_accuracy": round(acc, 6), "fd_train_vs_test": round(fd, 6),
                "seed": args.seed, "epochs": args.epochs, "batch_size": BATCH_SIZE,
                "learning_rate": LEARNING_RATE, "augmentation": "random 1-pixel shifts",
                "train_count": len(digits_with_labels("train")[1]),
                "test_count": len(digits_with_labels("test")[1]),
                "parameters": int(model.count_params()),
                "tensorflow": tf.__version__, "keras": keras.__version__}
        save_classifier(model, args.folder, info)
        print(f"wrote {args.folder}")
    return 0


if __name__ == "__main__":
    from utils.cli import run
    run(main)
