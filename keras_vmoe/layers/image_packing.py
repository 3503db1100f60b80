"""NaViT's "Patch n' Pack" preprocessing, in NumPy: images at their own
resolution and aspect ratio, cut into patches and packed into sequences of a
fixed length (the input format of `keras_vmoe.layers.packing`).

    image (H, W, C) -> ImagePatcher: resize keeping the aspect ratio to a
        patch budget, cut into patches (rows * cols, ph * pw * C) with their
        (row, col) positions, [random token dropping]
    patched images -> SequencePacker: greedy first-fit into sequences of L
        tokens and at most N images -> {"patches", "positions",
        "segment_ids"} (S, L, ...) and each image's (sequence, slot)

Nothing is cropped: an image is resized whole. It runs on NumPy arrays;
`NativeResolutionImageClassifierPreprocessor.packed_dataset` runs it on a
`tf.data` stream (`SequencePacker.stream`: batches of a fixed shape).
"""

import math
import numbers

import numpy as np
from PIL import Image

from keras_vmoe.validation import as_pair
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


def patch_grid(height, width, patch_size, max_patches, max_grid=None, upscale=True):
    """(rows, cols) of the largest patch grid with at most `max_patches`
    patches and (as nearly as whole patches allow) the image's aspect ratio;
    within `max_grid` (rows, cols) if given. With `upscale=False` an image
    is only scaled down: one within the budget keeps its own resolution,
    rounded down to whole patches."""
    height = check_int("image height", height, minimum=1, owner="patch_grid")
    width = check_int("image width", width, minimum=1, owner="patch_grid")
    max_patches = check_int("max_patches", max_patches, minimum=1, owner="patch_grid")
    ph, pw = patch_size
    scale = math.sqrt(max_patches * ph * pw / (height * width))
    if max_grid is not None:
        scale = min(scale, max_grid[0] * ph / height, max_grid[1] * pw / width)
    if not upscale:
        scale = min(scale, 1.0)
    # A small epsilon: a grid that fits exactly should not lose a row to rounding.
    rows = max(1, int(math.floor(height * scale / ph + 1e-6)))
    cols = max(1, int(math.floor(width * scale / pw + 1e-6)))
    if max_grid is not None:
        rows, cols = min(rows, max_grid[0]), min(cols, max_grid[1])
    cols = min(cols, max(1, max_patches // rows))
    rows = min(rows, max(1, max_patches // cols))
    return rows, cols


def resize_image(image, size):
    """(H, W, C) -> (size[0], size[1], C) float32, bilinear and antialiased
    (PIL, one channel at a time, so any channel count and value range)."""
    if image.shape[:2] == tuple(size):
        return image.astype("float32")
    channels = [
        np.asarray(
            Image.fromarray(image[:, :, c].astype("float32"), mode="F").resize(
                (size[1], size[0]), Image.BILINEAR
            )
        )
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


def patchify(image, patch_size):
    """(rows * ph, cols * pw, C) -> patches (rows * cols, ph * pw * C), each in
    (row, column, channel) order (`PatchEmbedding`'s kernel order), and their
    (row, col) positions (rows * cols, 2), row-major."""
    ph, pw = patch_size
    height, width, channels = image.shape
    rows, cols = height // ph, width // pw
    patches = image.reshape(rows, ph, cols, pw, channels).transpose(0, 2, 1, 3, 4)
    positions = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
    return patches.reshape(rows * cols, ph * pw * channels), positions.reshape(-1, 2).astype("int32")


class ImagePatcher:
    """Resizes an image to a patch budget, keeping its aspect ratio, and cuts
    it into patches with their (row, column) positions.

    Args:
        patch_size: int or (int, int).
        max_patches: int, the patch budget per image; or (low, high): in
            training each image draws its budget uniformly from the range (a
            resolution range), otherwise `high` is used.
        max_grid: None or (rows, cols), the model's largest grid (its
            `image_shape` over the patch size): images are scaled to fit it.
        scale, offset: pixels become `pixels * scale + offset` (1 / 127.5
            and -1 give vmoe's [-1, 1]).
        upscale: bool. False (default): images within the budget keep their
            own resolution (rounded down to whole patches); True: every
            image is scaled to fill the budget.
        token_drop_rate: NaViT's continuous token dropping, in training: a
            float in [0, 1), or a (low, high) range from which each image draws
            its own rate. The image's last (bottom-right) patch is always
            kept, so an image keeps at least one patch and its grid extent
            (the denominator of fractional positions); the rest are dropped
            uniformly at random.
        seed: int or None, for the budgets and the dropping.

    Example:
    >>> patcher = ImagePatcher(patch_size=8, max_patches=16)
    >>> patches, positions = patcher(np.zeros((30, 60, 3), "uint8"))
    >>> patches.shape, positions[-1].tolist()  # 30 x 60 pixels: 3 x 7 > 16 patches, scaled down
    ((10, 192), [1, 4])
    >>> patcher(np.zeros((16, 40, 3), "uint8"))[0].shape  # 2 x 5 patches: its own resolution
    (10, 192)
    """

    def __init__(
        self,
        patch_size,
        max_patches,
        max_grid=None,
        scale=None,
        offset=None,
        token_drop_rate=0.0,
        seed=None,
        upscale=False,
    ):
        self.upscale = bool(upscale)
        self.patch_size = as_pair("patch_size", patch_size, owner="ImagePatcher")
        self.max_patches = self._range("max_patches", max_patches, check_int, minimum=1)
        self.max_grid = None if max_grid is None else as_pair("max_grid", max_grid, owner="ImagePatcher")
        self.scale, self.offset = scale, offset
        self.token_drop_rate = self._range("token_drop_rate", token_drop_rate, check_float, minimum=0.0)
        if self.token_drop_rate[1] >= 1.0:
            raise ValueError(
                f"ImagePatcher: token_drop_rate must be below 1 (at least one patch is kept), "
                f"got {token_drop_rate!r}."
            )
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _range(name, value, check, minimum):
        low, high = (value, value) if isinstance(value, numbers.Number) else tuple(value)
        low = check(name, low, minimum=minimum, owner="ImagePatcher")
        high = check(name, high, minimum=low, owner="ImagePatcher")
        return low, high

    def grid(self, height, width, training=False):
        """The patch grid an image of this size gets."""
        low, high = self.max_patches
        budget = int(self.rng.integers(low, high + 1)) if training and low < high else high
        return patch_grid(height, width, self.patch_size, budget, self.max_grid, self.upscale)

    def __call__(self, image, training=False):
        """(H, W, C) image -> (patches (T, ph * pw * C) float32, positions (T, 2)
        int32)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(
                f"ImagePatcher: an image must be (height, width, channels), got shape {image.shape}."
            )
        if min(image.shape) < 1:
            raise ValueError(f"ImagePatcher: an image has a zero side or no channel: shape {image.shape}.")
        rows, cols = self.grid(image.shape[0], image.shape[1], training)
        pixels = resize_image(image, (rows * self.patch_size[0], cols * self.patch_size[1]))
        if self.scale is not None:
            pixels = pixels * self.scale
        if self.offset is not None:
            pixels = pixels + self.offset
        patches, positions = patchify(pixels.astype("float32"), self.patch_size)
        low, high = self.token_drop_rate
        if training and high > 0:
            rate = self.rng.uniform(low, high) if low < high else high
            keep = max(1, int(round(len(patches) * (1.0 - rate))))
            # The last (bottom-right) patch always stays, so that the kept
            # positions still span the image's grid: fractional position
            # embeddings divide by it. The others are drawn uniformly.
            others = self.rng.choice(len(patches) - 1, keep - 1, replace=False)
            kept = np.append(np.sort(others), len(patches) - 1)
            patches, positions = patches[kept], positions[kept]
        return patches, positions


class SequencePacker:
    """Packs patched images into sequences of `sequence_length` tokens with
    at most `max_images` images each: greedy first-fit, in the images' order
    (each image goes to the first sequence with room for all its tokens and
    an image slot, else to a new one), as in NaViT.

    Args:
        sequence_length: int, L.
        max_images: int, N, image slots per sequence.
        num_prefix_tokens: 0 or 1: a class-token slot reserved at the start
            of each image (position (-1, -1)).

    `pack(images, num_sequences=None)` takes a list of (patches, positions)
    and returns (batch, image_index): batch {"patches" (S, L, F) float32,
    "positions" (S, L, 2) int32, "segment_ids" (S, L) int32 (0: padding)}
    (S = `num_sequences` if given, else as many as needed) and image_index
    (num_images, 2), each image's (sequence, slot), in order. `stream`
    packs an endless stream into batches of a fixed S (for `tf.data`).

    Example:
    >>> packer = SequencePacker(sequence_length=8, max_images=2)
    >>> image = (np.zeros((3, 4), "float32"), np.zeros((3, 2), "int32"))
    >>> batch, index = packer.pack([image, image, image])
    >>> batch["segment_ids"].tolist(), index.tolist()
    ([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], [[0, 0], [0, 1], [1, 0]])
    """

    def __init__(self, sequence_length, max_images, num_prefix_tokens=0):
        self.sequence_length = check_int(
            "sequence_length", sequence_length, minimum=1, owner="SequencePacker"
        )
        self.max_images = check_int("max_images", max_images, minimum=1, owner="SequencePacker")
        self.num_prefix_tokens = check_int(
            "num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1, owner="SequencePacker"
        )
        if self.sequence_length < self.num_prefix_tokens + 1:
            raise ValueError(
                f"SequencePacker: sequence_length={sequence_length} is below one image of one patch "
                f"({self.num_prefix_tokens + 1} tokens with {self.num_prefix_tokens} class token)."
            )

    def check_length(self, index, length):
        if length > self.sequence_length:
            raise ValueError(
                f"SequencePacker: image {index} has {length} tokens, more than a sequence of "
                f"sequence_length={self.sequence_length}; lower the patch budget or raise "
                "sequence_length (nothing is cropped)."
            )

    def first_fit(self, length, used, counts):
        """The first sequence with room for `length` tokens and an image
        slot, or len(used) (a new one)."""
        fits = (
            sequence
            for sequence, (tokens, images) in enumerate(zip(used, counts))
            if tokens + length <= self.sequence_length and images < self.max_images
        )
        return next(fits, len(used))

    def assign(self, lengths):
        """Greedy first-fit: each image's (sequence, slot, offset)."""
        used, counts, places = [], [], []
        for index, length in enumerate(lengths):
            self.check_length(index, length)
            sequence = self.first_fit(length, used, counts)
            if sequence == len(used):
                used.append(0)
                counts.append(0)
            places.append((sequence, counts[sequence], used[sequence]))
            used[sequence] += length
            counts[sequence] += 1
        return places, len(used)

    def stream(self, images, num_sequences):
        """Packs a stream of images into batches of exactly `num_sequences`
        sequences (fixed shapes, one compiled step): greedy first-fit within
        the open batch; an image that fits none of its sequences closes it
        and opens the next. Yields (batch, image_index, stream_index): `pack`'s
        two results and each of the batch's images' index in the stream. The
        last batch is padded with empty sequences."""
        num_sequences = check_int("num_sequences", num_sequences, minimum=1, owner="SequencePacker")
        pending, used, counts = [], [], []
        for index, image in enumerate(images):
            length = len(image[0]) + self.num_prefix_tokens
            self.check_length(index, length)
            sequence = self.first_fit(length, used, counts)
            if sequence == num_sequences:
                yield self.batch_of(pending, num_sequences)
                pending, used, counts, sequence = [], [], [], 0
            if sequence == len(used):
                used.append(0)
                counts.append(0)
            pending.append((index, image))
            used[sequence] += length
            counts[sequence] += 1
        if pending:
            yield self.batch_of(pending, num_sequences)

    def batch_of(self, pending, num_sequences):
        """`pack` of (stream index, image) pairs, padded to `num_sequences`."""
        batch, index = self.pack([image for _, image in pending], num_sequences)
        return batch, index, np.array([position for position, _ in pending], "int64")

    def pack(self, images, num_sequences=None):
        images = list(images)
        if not images:
            raise ValueError("SequencePacker: no images to pack.")
        widths = {np.shape(patches)[-1] for patches, _ in images}
        if len(widths) != 1:
            raise ValueError(
                f"SequencePacker: the images' patches have different sizes {sorted(widths)} (values per "
                "patch, ph * pw * channels): inconsistent channel counts or patch sizes."
            )
        (width,) = widths
        prefix = self.num_prefix_tokens
        places, needed = self.assign([len(patches) + prefix for patches, _ in images])
        if num_sequences is not None and needed > num_sequences:
            raise ValueError(
                f"SequencePacker: the images need {needed} sequences, more than "
                f"num_sequences={num_sequences}."
            )
        shape = (needed if num_sequences is None else num_sequences, self.sequence_length)
        batch = {
            "patches": np.zeros(shape + (width,), "float32"),
            "positions": np.zeros(shape + (2,), "int32"),
            "segment_ids": np.zeros(shape, "int32"),
        }
        for (patches, positions), (sequence, slot, offset) in zip(images, places):
            end = offset + prefix + len(patches)
            batch["patches"][sequence, offset + prefix : end] = patches
            batch["positions"][sequence, offset:end] = np.concatenate(
                [np.full((prefix, 2), -1, "int32"), np.asarray(positions, "int32")]
            )
            batch["segment_ids"][sequence, offset:end] = slot + 1
        index = np.array([(sequence, slot) for sequence, slot, _ in places], "int32").reshape(-1, 2)
        return batch, index
