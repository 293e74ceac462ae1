"""Real-image loaders: scikit-learn digits and tensorflow-datasets (offline, via mock data)."""
import numpy as np
import pytest

from data.datasets import DatasetError, digits_with_labels, tfds_images


def test_digits_splits_and_scaling():
    from sklearn.datasets import load_digits
    raw = load_digits()
    train, y_train = digits_with_labels("train")
    test, y_test = digits_with_labels("test")
    assert train.shape == (1437, 8, 8, 1) and test.shape == (360, 8, 8, 1)
    np.testing.assert_allclose(test[1, ..., 0], raw.images[5] / 8.0 - 1.0)  # index 5 is held out
    assert y_test[1] == raw.target[5]
    assert train.min() == -1.0 and train.max() == 1.0


def test_tfds_images_resized_and_scaled_offline():
    import tensorflow_datasets as tfds  # heavy: imported here, not when pytest collects
    with tfds.testing.mock_data(num_examples=6):
        x = tfds_images("mnist", resolution=8, channels=1)
    assert x.shape == (6, 8, 8, 1) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not prepared"):
        tfds_images("mnist", 8, 1, data_dir=str(tmp_path))
