"""ringtrain.train.datasets: the packaged digits data and deterministic splits."""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np
import pytest

from ringtrain.errors import ConfigError
from ringtrain.train.datasets import Dataset, load_digits
from ringtrain.train.nn import Dense, ReLU, Sequential, accuracy, softmax_cross_entropy
from ringtrain.train.optim import Adam

DIGITS_DIR = resources.files("ringtrain.train") / "data"


def test_digits_have_the_published_shape_and_class_counts():
    digits = load_digits()
    assert len(digits) == 1797
    assert digits.x.shape == (1797, 64) and digits.x.dtype == np.float32
    assert digits.y.shape == (1797,) and digits.y.dtype == np.int64
    assert digits.classes == tuple(range(10))
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    # Every value is a pixel count 0..16 divided by 16.
    np.testing.assert_array_equal(digits.x * 16, np.round(digits.x * 16))
    assert np.bincount(digits.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_file_is_the_recorded_extraction_and_loads_without_pickle():
    with (DIGITS_DIR / "digits.npz").open("rb") as handle:
        with np.load(handle, allow_pickle=False) as archive:
            assert sorted(archive.files) == ["labels", "pixels"]
            pixels, labels = archive["pixels"], archive["labels"]
    assert pixels.dtype == labels.dtype == np.uint8
    license_text = (DIGITS_DIR / "DIGITS-LICENSE.txt").read_text(encoding="utf-8")
    # The license file records these digests; a changed data file must update both.
    for array in (pixels, labels):
        assert hashlib.sha256(array.tobytes()).hexdigest() in license_text
    assert "CC BY 4.0" in license_text and "Alpaydin" in license_text


def test_digits_arrays_are_read_only():
    digits = load_digits()
    with pytest.raises(ValueError):
        digits.x[0, 0] = 1.0
    with pytest.raises(ValueError):
        digits.y[0] = 1


def test_a_first_image_looks_like_a_zero():
    # The first sample of the set is a 0: a ring of ink around an empty centre.
    digits = load_digits()
    image = digits.x[0].reshape(8, 8)
    assert digits.y[0] == 0
    assert image[3:5, 3:5].max() < 0.25 and image[1:7, 1:7].max() > 0.75


def _indexed(n: int) -> Dataset:
    """A data set whose feature is the row number, so rows can be traced through a split."""
    return Dataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 3, (0, 1, 2))


def test_split_is_disjoint_covering_and_deterministic():
    data = _indexed(101)
    train, test = data.split(0.25, seed=4)
    assert len(test) == 25 and len(train) == 76
    rows = np.concatenate([train.x[:, 0], test.x[:, 0]]).astype(int)
    assert sorted(rows.tolist()) == list(range(101))
    np.testing.assert_array_equal(train.y, train.x[:, 0].astype(int) % 3)
    again_train, again_test = data.split(0.25, seed=4)
    np.testing.assert_array_equal(again_test.x, test.x)
    np.testing.assert_array_equal(again_train.x, train.x)
    _, other_test = data.split(0.25, seed=5)
    assert not np.array_equal(other_test.x, test.x)


def test_split_of_digits_keeps_classes():
    train, test = load_digits().split(0.2, seed=0)
    assert len(train) + len(test) == 1797
    assert train.classes == test.classes == tuple(range(10))


@pytest.mark.parametrize("fraction, seed", [(0.0, 0), (1.0, 0), (-0.1, 0), (0.001, 0),
                                            (0.5, -1), (0.5, 1.5)])
def test_bad_split_arguments_are_refused(fraction, seed):
    with pytest.raises(ConfigError):
        _indexed(10).split(fraction, seed)


def test_inconsistent_datasets_are_refused():
    with pytest.raises(ConfigError):
        Dataset(np.zeros((3, 2)), np.zeros(2, dtype=int), (0,))
    with pytest.raises(ConfigError):
        Dataset(np.zeros((2, 2)), np.array([0, 5]), (0, 1))


def test_a_small_model_learns_the_digits():
    # Labels that did not match the images would leave test accuracy near 10%.
    train, test = load_digits().split(0.2, seed=0)
    model = Sequential(Dense(64, 32), ReLU(), Dense(32, 10), seed=0)
    optimizer = Adam(model.params, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = rng.integers(0, len(train), size=64)
        _, dlogits = softmax_cross_entropy(model.forward(train.x[rows]), train.y[rows])
        model.backward(dlogits)
        optimizer.step(model.grads)
    assert accuracy(model.forward(test.x), test.y) > 0.9
