"""Fashion-MNIST's idx files and image folders (`keras_vmoe.data`), on files written here."""

import gzip

import numpy as np
import pytest
from PIL import Image

from keras_vmoe.data import ImageReadError
from keras_vmoe.data import load_fashion_mnist
from keras_vmoe.data import load_image_folder
from keras_vmoe.data.fashion_mnist import FASHION_MNIST_DIR
from keras_vmoe.data.fashion_mnist import read_idx


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, train=30, test=20):
    rng = np.random.RandomState(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.randint(0, 256, (count, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


def test_idx_files_read_back_as_rgb(tmp_path):
    fake_fashion_mnist(tmp_path)
    images, labels = load_fashion_mnist(tmp_path, "train")
    assert images.shape == (30, 28, 28, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(labels, np.arange(30) % 10)
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(images[..., 1], raw)
    some, some_labels = load_fashion_mnist(tmp_path, "test", limit=7)
    assert some.shape[0] == 7 and set(some_labels) <= set(range(10))


def test_missing_and_truncated_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "test")
    fake_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as file:
        data = file.read()
    with gzip.open(path, "wb") as file:
        file.write(data[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_fashion_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist(tmp_path, "validation")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_installed_fashion_mnist():
    images, labels = load_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28, 3)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


def test_an_image_folder_gives_classes_in_sorted_order(tmp_path):
    rng = np.random.RandomState(0)
    for name, count in (("dog", 2), ("cat", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.randint(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    (tmp_path / "cat" / "notes.txt").write_text("not an image suffix: skipped")
    images, labels, classes = load_image_folder(tmp_path, (16, 16))
    assert classes == ["cat", "dog"]
    assert images.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])


def test_an_empty_folder_and_an_unreadable_image_are_named(tmp_path):
    with pytest.raises(ImageReadError, match="no images under"):
        load_image_folder(tmp_path, (8, 8))
    (tmp_path / "cat").mkdir()
    broken = tmp_path / "cat" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=f"cannot read {broken} as an image"):
        load_image_folder(tmp_path, (8, 8))
    with pytest.raises(ImageReadError, match="image folder not found"):
        load_image_folder(tmp_path / "missing", (8, 8))
