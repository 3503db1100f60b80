"""CIFAR-10 from a JPEG archive (`cifar10_jpeg.npz`).

The archive holds each split as one concatenated JPEG byte array plus
offsets: image `i` is `jpeg[offsets[i]:offsets[i + 1]]`. Keys:
`{split}_jpeg`, `{split}_offsets`, `{split}_labels` and `class_names`.

Example:
```python
images, labels = keras_vmoe.data.load_cifar10("cifar10_jpeg.npz", "test")
images.shape, images.dtype  # ((10000, 32, 32, 3), dtype('uint8'))
```
"""

import io
import pathlib

import keras
import numpy as np
from PIL import Image

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPLITS = ("train", "test")


def load_cifar10(path, split, limit=None, verbose=False):
    """Decodes one split of a CIFAR-10 JPEG archive.

    Args:
        path: the `.npz` archive.
        split: `"train"` (50,000 images) or `"test"` (10,000).
        limit: None, or decode only `limit` images, drawn at random with a
            fixed seed (the archive is sorted by class, so the first images
            would all be airplanes).
        verbose: show a progress bar while decoding.

    Returns:
        `(images, labels)`: uint8 `(N, 32, 32, 3)` and int32 `(N,)`, in the
        archive's order, class by class. Shuffle them before `fit`:
        keras-hub's `Task.fit` batches arrays in order (it ignores
        `shuffle=True` for them).
    """
    if split not in SPLITS:
        raise ValueError(f"load_cifar10: split must be one of {SPLITS}, got {split!r}.")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_cifar10: no CIFAR-10 archive at {path}; expected a cifar10_jpeg.npz file "
            f"with the keys {split}_jpeg, {split}_offsets and {split}_labels."
        )
    with np.load(path) as archive:
        missing = [k for k in (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels") if k not in archive]
        if missing:
            raise ValueError(f"load_cifar10: {path} lacks the arrays {missing}.")
        jpeg = archive[f"{split}_jpeg"]
        offsets = archive[f"{split}_offsets"]
        labels = archive[f"{split}_labels"].astype("int32")
    indices = np.arange(len(labels))
    if limit is not None and int(limit) < 0:
        raise ValueError(f"load_cifar10: limit must be None or >= 0, got {limit}.")
    if limit is not None:
        indices = np.sort(np.random.default_rng(0).permutation(len(labels))[: int(limit)])
    count = len(indices)
    images = np.empty((count, 32, 32, 3), "uint8")
    progress = keras.utils.Progbar(count, unit_name="image") if verbose else None
    for i, index in enumerate(indices):
        data = jpeg[offsets[index] : offsets[index + 1]].tobytes()
        images[i] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if progress is not None and ((i + 1) % 2000 == 0 or i + 1 == count):
            progress.update(i + 1)
    return images, labels[indices]
