"""Image-caption pairs from a COCO-style JPEG archive (`coco_mini_captions.npz`).

The archive holds the images as one concatenated JPEG byte array plus
offsets (image `i` is `jpeg[offsets[i]:offsets[i + 1]]`) and `captions`, a
(num_images, captions_per_image) string array; `image_ids` and `split` are
optional.

Example:
```python
images, captions = keras_vmoe.data.load_coco_captions("coco_mini_captions.npz", image_size=64)
images.shape, captions.shape  # ((159, 64, 64, 3), (159, 5))
```
"""

import io
import pathlib

import numpy as np
from PIL import Image


def _square(image, size):
    """Centre-crops to a square, then resizes to (size, size) (bilinear, antialiased)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def load_coco_captions(path, image_size, limit=None, split=None):
    """Decodes the images of a caption archive and returns them with their captions.

    Args:
        path: the `.npz` archive.
        image_size: int. Every image is centre-cropped to a square and
            resized to (image_size, image_size) (the photographs differ in
            size and aspect ratio).
        limit: None, or only the first `limit` images (after `split`).
        split: None, or keep the images whose `split` entry equals it (e.g.
            `"train2017"`, `"val2017"`).

    Returns:
        `(images, captions)`: uint8 `(N, image_size, image_size, 3)` and a
        str `(N, captions_per_image)` array.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_coco_captions: no caption archive at {path}; expected an .npz file with "
            "the arrays jpeg, offsets and captions."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_coco_captions: image_size must be an int >= 1, got {image_size!r}.")
    with np.load(path) as archive:
        missing = [key for key in ("jpeg", "offsets", "captions") if key not in archive]
        if missing:
            raise ValueError(f"load_coco_captions: {path} lacks the arrays {missing}.")
        if split is not None and "split" not in archive:
            raise ValueError(f"load_coco_captions: {path} has no `split` array to select {split!r}.")
        jpeg, offsets, captions = archive["jpeg"], archive["offsets"], archive["captions"]
        splits = archive["split"] if split is not None else None
    indices = np.arange(len(captions))
    if split is not None:
        indices = indices[splits == split]
        if not len(indices):
            raise ValueError(
                f"load_coco_captions: no image of split {split!r}; the archive has "
                f"{sorted(set(splits.tolist()))}."
            )
    if limit is not None:
        if int(limit) < 0:
            raise ValueError(f"load_coco_captions: limit must be None or >= 0, got {limit}.")
        indices = indices[: int(limit)]
    images = np.empty((len(indices), image_size, image_size, 3), "uint8")
    for row, index in enumerate(indices):
        data = jpeg[offsets[index] : offsets[index + 1]].tobytes()
        images[row] = _square(Image.open(io.BytesIO(data)).convert("RGB"), image_size)
    return images, captions[indices].astype(str)
