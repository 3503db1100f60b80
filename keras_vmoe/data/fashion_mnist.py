"""Fashion-MNIST from its four idx files (`apt-get install dataset-fashion-mnist`
puts them under `/usr/share/datasets/fashion-mnist/`).

Its 28x28 grey images of clothing (10 classes, 60,000 train / 10,000 test,
MIT licence) are a transfer target unlike the CIFAR-10 the presets learned.
The images come back as RGB (the grey channel repeated), as the zoo's
models take three channels.

Example:
```python
images, labels = keras_vmoe.data.load_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
images.shape  # (10000, 28, 28, 3)
```
"""

import gzip
import pathlib

import numpy as np

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


def read_idx(path):
    """The uint8 array of an idx file (gzip-compressed), checked against its header."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic number {data[:4]!r}).")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: its header announces {shape} bytes, it holds {body.size}.")
    return body.reshape(shape)


def load_fashion_mnist(directory=FASHION_MNIST_DIR, split="test", limit=None):
    """One split of Fashion-MNIST.

    Args:
        directory: the folder with the four `*-idx*-ubyte.gz` files.
        split: "train" or "test".
        limit: None, or that many images drawn at random with a fixed seed.

    Returns:
        `(images, labels)`: uint8 (N, 28, 28, 3) and int32 (N,).
    """
    if split not in FILES:
        raise ValueError(f"load_fashion_mnist: split must be 'train' or 'test', got {split!r}.")
    directory = pathlib.Path(directory)
    paths = [directory / FILES[split].format(kind, rank) for kind, rank in (("images", 3), ("labels", 1))]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"no Fashion-MNIST {split} split in {directory} (missing {', '.join(missing)}); "
            "install it with `apt-get install dataset-fashion-mnist` (files under "
            f"{FASHION_MNIST_DIR}) or pass the folder holding the idx files."
        )
    images, labels = (read_idx(path) for path in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match.")
    if limit is not None and limit < len(images):
        chosen = np.sort(np.random.default_rng(0).choice(len(images), limit, replace=False))
        images, labels = images[chosen], labels[chosen]
    return np.repeat(images[..., None], 3, axis=-1), labels.astype("int32")
