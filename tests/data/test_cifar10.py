"""The CIFAR-10 reader: shapes, random subsets of a class-sorted archive, errors."""

import numpy as np
import pytest

from keras_vmoe.data import CIFAR10_CLASS_NAMES
from keras_vmoe.data import load_cifar10
from tests.helpers import CIFAR10
from tests.helpers import requires_cifar10


@pytest.fixture(scope="module")
def cifar10_test_split():
    """The whole test split, decoded once (about 2 s)."""
    return load_cifar10(CIFAR10, "test")


@requires_cifar10
def test_the_test_split_has_the_official_shapes_and_classes(cifar10_test_split):
    images, labels = cifar10_test_split
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
    # Real photographs, not an all-black decode.
    assert 60 < images.mean() < 200 and images.std() > 30
    with np.load(CIFAR10) as archive:
        assert tuple(archive["class_names"]) == CIFAR10_CLASS_NAMES


@requires_cifar10
def test_train_split_subset_is_shaped_like_the_full_split():
    images, labels = load_cifar10(str(CIFAR10), "train", limit=50)  # A str path works too.
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() <= 9


@requires_cifar10
def test_limit_draws_a_class_mixed_subset_of_the_split(cifar10_test_split):
    all_images, all_labels = cifar10_test_split
    # The archive is sorted by class: the first 200 images are all airplanes ...
    assert np.all(np.diff(all_labels) >= 0) and set(all_labels[:200]) == {0}
    images, labels = load_cifar10(CIFAR10, "test", limit=200)
    # ... but a limited load draws from every class (200 draws from 10
    # classes of 1000 each miss one with probability ~1e-8).
    assert images.shape == (200, 32, 32, 3) and labels.shape == (200,)
    assert set(labels) == set(range(10))
    assert np.bincount(labels, minlength=10).max() < 50  # Not dominated by one class.
    # Every drawn image is a distinct image of the split, with its own label.
    position = {image.tobytes(): index for index, image in enumerate(all_images)}
    indices = [position[image.tobytes()] for image in images]
    assert len(set(indices)) == 200
    np.testing.assert_array_equal(labels, all_labels[indices])


@requires_cifar10
def test_limit_is_deterministic_and_prefix_consistent():
    first = load_cifar10(CIFAR10, "test", limit=30)
    again = load_cifar10(CIFAR10, "test", limit=30)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # The fixed seed draws one permutation: a larger limit keeps the smaller subset.
    larger_images, _ = load_cifar10(CIFAR10, "test", limit=60)
    larger = {image.tobytes() for image in larger_images}
    assert all(image.tobytes() in larger for image in first[0])


@requires_cifar10
def test_limit_zero_and_limit_beyond_the_split(cifar10_test_split):
    images, labels = load_cifar10(CIFAR10, "test", limit=0)
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
    # A limit past the split's size is the whole split, in archive order.
    images, labels = load_cifar10(CIFAR10, "test", limit=10**6)
    np.testing.assert_array_equal(images, cifar10_test_split[0])
    np.testing.assert_array_equal(labels, cifar10_test_split[1])


@requires_cifar10
def test_verbose_shows_a_progress_bar(capsys):
    load_cifar10(CIFAR10, "test", limit=5, verbose=True)
    assert "5/5" in capsys.readouterr().out
    load_cifar10(CIFAR10, "test", limit=5)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("split", ["validation", "Train", None])
def test_a_bad_split_names_the_valid_ones(split, tmp_path):
    # The split is checked before the file: no archive needed.
    with pytest.raises(ValueError) as error:
        load_cifar10(tmp_path / "missing.npz", split)
    message = str(error.value)
    assert "load_cifar10" in message and repr(split) in message
    assert "'train'" in message and "'test'" in message


def test_a_missing_archive_says_where_and_what_was_expected(tmp_path):
    path = tmp_path / "nowhere" / "cifar10_jpeg.npz"
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(path, "test")
    message = str(error.value)
    assert str(path) in message
    assert "cifar10_jpeg.npz" in message and "test_jpeg" in message and "test_offsets" in message
    # A folder is not an archive either.
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 archive"):
        load_cifar10(tmp_path, "train")


def test_an_archive_without_the_split_lists_the_missing_arrays(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, train_jpeg=np.zeros(3, "uint8"), train_offsets=np.zeros(2, "int64"))
    with pytest.raises(ValueError) as error:
        load_cifar10(path, "train")
    assert "train_labels" in str(error.value) and "train_jpeg" not in str(error.value)
