"""Image files: decoding with clear errors, square thumbnails, class folders.

Example:
```python
images, labels, class_names = keras_vmoe.data.load_image_folder("pets/", image_size=(32, 32))
```
"""

import pathlib

import keras
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file that is missing, too large or cannot be decoded."""


def open_image(path, max_pixels=None):
    """Decodes an image file to RGB, or raises `ImageReadError` naming the file.

    Images over `max_pixels` (default: Pillow's `Image.MAX_IMAGE_PIXELS`, its
    guard against decompression bombs) are refused before decoding, with
    their size; a file that is not an image, or whose decoding fails half-way
    (truncated, corrupt), is refused with the decoder's reason.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"not a file: {path}")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    default_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own check raises (or warns) at open; ours names the size,
        # the limit and how to raise it.
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = default_limit
        with image:
            width, height = image.size
            if limit and width * height > limit:
                raise ImageReadError(
                    f"{path} is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{limit:,} pixels (Pillow's guard against decompression bombs); pass "
                    f"--max-pixels {width * height} to read it anyway"
                )
            return image.convert("RGB")
    except ImageReadError:
        raise
    except Exception as error:  # Pillow's decoders raise many kinds.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageReadError(f"cannot read {path} as an image ({reason})") from error


def square_image(image, size):
    """A PIL image centre-cropped to a square and resized to `size` (H, W)
    with antialiasing (Lanczos); uint8 (H, W, 3)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size[1], size[0]), Image.LANCZOS))


def load_image_folder(directory, image_size, max_pixels=None, verbose=False):
    """Images in one subfolder per class (`directory/CLASS/IMAGE`).

    Classes are the subfolders in sorted order; every file with an image
    suffix ({suffixes}) is decoded (any unreadable one is an error naming
    it) and centre-cropped and resized to `image_size` (H, W).

    Returns:
        `(images, labels, class_names)`: uint8 (N, H, W, 3), int32 (N,), and
        the list of class names.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ImageReadError(f"image folder not found: {directory}")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((directory / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ImageReadError(
            f"no images under {directory}: expected one subfolder per class holding image files "
            f"({', '.join(IMAGE_SUFFIXES)}); found {len(classes)} subfolders"
        )
    bar = keras.utils.Progbar(len(files), unit_name="image") if verbose else None
    images = []
    for path, _ in files:
        images.append(square_image(open_image(path, max_pixels), image_size))
        if bar:
            bar.add(1)
    labels = np.array([label for _, label in files], "int32")
    return np.stack(images), labels, classes


load_image_folder.__doc__ = load_image_folder.__doc__.format(suffixes=", ".join(IMAGE_SUFFIXES))
