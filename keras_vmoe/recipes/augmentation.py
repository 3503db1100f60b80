"""The CIFAR-10 recipes' data augmentation, on uint8 images in NumPy (DeiT's, scaled down)."""

import numpy as np


def random_crop_and_flip(images, rng, padding):
    """Random `padding`-pixel translations (reflect-padded) and horizontal flips."""
    count, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")
    top = rng.integers(0, 2 * padding + 1, count)
    left = rng.integers(0, 2 * padding + 1, count)
    rows = top[:, None] + np.arange(height)  # (N, H)
    columns = left[:, None] + np.arange(width)  # (N, W)
    flip = rng.random(count) < 0.5
    columns = np.where(flip[:, None], columns[:, ::-1], columns)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]


def random_erasing(images, rng, probability, min_size=8, max_size=16):
    """Sets a random square of each image, with `probability`, to mid-grey."""
    count, height, width, _ = images.shape
    size = rng.integers(min_size, max_size + 1, count)
    top = rng.integers(0, height - size + 1)
    left = rng.integers(0, width - size + 1)
    rows, columns = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + size)[:, None, None])
        & (columns >= left[:, None, None])
        & (columns < (left + size)[:, None, None])
        & (rng.random(count) < probability)[:, None, None]
    )
    return np.where(inside[..., None], np.uint8(128), images)


def mixup_and_cutmix(pixels, targets, rng, mixup_alpha, cutmix_alpha):
    """Mixes every image with a random partner: half by mixup, half by CutMix.

    pixels: (N, H, W, C) float32; targets: (N, classes) one-hot. Returns
    both mixed; a target mixes in proportion to each image's share.
    """
    if not mixup_alpha and not cutmix_alpha:
        return pixels, targets
    count, height, width, _ = pixels.shape
    partner = rng.permutation(count)
    use_cutmix = rng.random(count) < (0.5 if mixup_alpha and cutmix_alpha else float(bool(cutmix_alpha)))
    weight = np.where(
        use_cutmix,
        rng.beta(cutmix_alpha or 1.0, cutmix_alpha or 1.0, count),
        rng.beta(mixup_alpha or 1.0, mixup_alpha or 1.0, count),
    )
    # CutMix: a box of area (1 - weight) at a random centre, clipped to the image.
    box_height = np.round(height * np.sqrt(1 - weight)).astype(int)
    box_width = np.round(width * np.sqrt(1 - weight)).astype(int)
    centre_y, centre_x = rng.integers(0, height, count), rng.integers(0, width, count)
    top, bottom = (
        np.clip(centre_y - box_height // 2, 0, height),
        np.clip(centre_y + box_height // 2, 0, height),
    )
    left, right = np.clip(centre_x - box_width // 2, 0, width), np.clip(centre_x + box_width // 2, 0, width)
    rows, columns = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    in_box = (
        (rows >= top[:, None, None])
        & (rows < bottom[:, None, None])
        & (columns >= left[:, None, None])
        & (columns < right[:, None, None])
        & use_cutmix[:, None, None]
    )
    box_share = in_box.mean(axis=(1, 2))
    weight = np.where(use_cutmix, 1.0 - box_share, weight).astype("float32")
    mixed = np.where(
        in_box[..., None],
        pixels[partner],
        np.where(
            use_cutmix[:, None, None, None],
            pixels,
            weight[:, None, None, None] * pixels + (1 - weight[:, None, None, None]) * pixels[partner],
        ),
    )
    return mixed.astype("float32"), weight[:, None] * targets + (1 - weight[:, None]) * targets[partner]
