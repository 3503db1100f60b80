"""COCO image-caption pairs from a JPEG archive (`coco_mini_captions.npz`).

Keys: `jpeg` and `offsets` (image `i` is `jpeg[offsets[i]:offsets[i + 1]]`),
`captions` (str, (images, captions per image)), `image_ids`, `split`.

Example:
```python
images, captions = keras_vmoe.data.load_coco_captions("coco_mini_captions.npz", image_size=32)
images.shape, captions.shape  # ((159, 32, 32, 3), (159, 5))
```
"""

import io
import pathlib

import numpy as np
from PIL import Image


def load_coco_captions(path, image_size=None, split=None, limit=None):
    """Decodes the images of a COCO caption archive and returns their captions.

    Args:
        path: the `.npz` archive.
        image_size: None (keep each image's size; returns a list), or an int:
            centre-crop to a square and resize with antialiasing to
            `image_size` x `image_size` (returns one uint8 array).
        split: None (all), or keep only the images of this COCO split
            (`"train2017"`, `"val2017"`).
        limit: None, or only the first `limit` images (after `split`).

    Returns:
        `(images, captions)`: uint8 images and a str `(N, captions per image)` array.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_coco_captions: no caption archive at {path}; expected coco_mini_captions.npz "
            "with the keys jpeg, offsets and captions."
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"load_coco_captions: image_size must be None or an int >= 1, got {image_size!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"load_coco_captions: limit must be None or an int >= 0, got {limit!r}.")
    with np.load(path) as archive:
        missing = [key for key in ("jpeg", "offsets", "captions") if key not in archive]
        if missing:
            raise ValueError(f"load_coco_captions: {path} lacks the arrays {missing}.")
        jpeg, offsets, captions = archive["jpeg"], archive["offsets"], archive["captions"]
        splits = archive["split"] if "split" in archive else None
    indices = np.arange(len(captions))
    if split is not None:
        if splits is None or split not in set(splits.tolist()):
            raise ValueError(
                f"load_coco_captions: split {split!r} not in {path} "
                f"(it has {sorted(set(splits.tolist())) if splits is not None else 'no splits'})."
            )
        indices = indices[splits == split]
    if limit is not None:
        indices = indices[:limit]
    images = []
    for index in indices:
        image = Image.open(io.BytesIO(jpeg[offsets[index] : offsets[index + 1]].tobytes())).convert("RGB")
        if image_size is not None:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize(
                (int(image_size), int(image_size)), Image.Resampling.LANCZOS
            )
        images.append(np.asarray(image))
    if image_size is not None:
        images = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), "uint8")
    return images, captions[indices].astype(str)
