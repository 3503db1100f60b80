"""The preprocessor of native-resolution (NaViT) classifiers: a list of
images of any sizes -> packed sequences, and labels laid out to match."""

import keras
import numpy as np
from keras_hub.models import Preprocessor

from keras_vmoe.layers.image_packing import ImagePatcher
from keras_vmoe.layers.image_packing import SequencePacker
from keras_vmoe.validation import as_pair
from keras_vmoe.validation import check_int

PACKED_KEYS = ("patches", "positions", "segment_ids")


def is_packed(x):
    """Whether `x` is already a packed batch (a dict of the three arrays)."""
    return isinstance(x, dict) and set(x) == set(PACKED_KEYS)


def image_list(images, channels=None):
    """A list of (H, W, C) NumPy images from a list or an (N, H, W, C)
    array; raises on shapes that are not images and on mixed channels."""
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        images = list(images) if images.ndim == 4 else [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(
            f"Native-resolution preprocessing takes a non-empty list of (height, width, channels) "
            f"images (or an (N, H, W, C) array); got {type(images).__name__}."
        )
    images = [np.asarray(image) for image in images]
    images = [image[:, :, None] if image.ndim == 2 else image for image in images]
    for index, image in enumerate(images):
        if image.ndim != 3:
            raise ValueError(f"Image {index} must be (height, width, channels), got shape {image.shape}.")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"Image {index} has a zero side: shape {image.shape}.")
    expected = channels if channels is not None else images[0].shape[-1]
    for index, image in enumerate(images):
        if image.shape[-1] != expected:
            source = "the model's" if channels is not None else "image 0's"
            raise ValueError(
                f"Image {index} has {image.shape[-1]} channels, but {source} count is {expected}: "
                "every image needs the same channels."
            )
    return images


@keras.saving.register_keras_serializable(package="keras_vmoe")
class NativeResolutionImageClassifierPreprocessor(Preprocessor):
    """Cuts images of any size and aspect ratio into patches at (nearly)
    their own resolution and packs them into sequences (NaViT): the
    preprocessor of a classifier whose backbone has `native_resolution=True`.

    Args:
        patch_size: int or (int, int), the backbone's.
        max_patches: int, the patch budget of an image, or (low, high), a
            budget range each training image draws from (evaluation: high).
        upscale: bool. False (default): an image within the budget keeps its
            own resolution (rounded down to whole patches) and larger ones
            are scaled down to the budget; True: every image is scaled to
            fill the budget.
        sequence_length: int, tokens per packed sequence.
        max_images_per_sequence: int, the backbone's.
        num_prefix_tokens: 0 or 1, the backbone's class token.
        max_grid: None or (rows, cols), the backbone's largest grid.
        channels: None or int: the channels every image must have.
        scale, offset: pixel scaling (1 / 127.5 and -1 give [-1, 1]).
        token_drop_rate: NaViT's token dropping in training, a rate or a
            (low, high) range of per-image rates; at least one patch stays.
        seed: int or None.

    `pack(images, y, sample_weight, training)` returns (x, y, sample_weight,
    image_index): `y` laid out as (sequences, N, ...) and `sample_weight`
    (sequences, N), 0 on empty image slots. `for_backbone(backbone,
    max_patches, sequence_length)` reads the backbone's options.

    Example:
    >>> preprocessor = NativeResolutionImageClassifierPreprocessor(
    ...     patch_size=8, max_patches=16, sequence_length=40, max_images_per_sequence=4)
    >>> images = [np.zeros((32, 16, 3), "uint8"), np.zeros((20, 40, 3), "uint8")]
    >>> x, y, weights, index = preprocessor.pack(images, np.array([3, 5]))
    >>> x["patches"].shape, y.tolist(), index.tolist()
    ((1, 40, 192), [[3, 5, 0, 0]], [[0, 0], [0, 1]])
    """

    def __init__(
        self,
        patch_size,
        max_patches,
        sequence_length,
        max_images_per_sequence,
        num_prefix_tokens=0,
        max_grid=None,
        channels=None,
        upscale=False,
        scale=None,
        offset=None,
        token_drop_rate=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.patch_size = as_pair("patch_size", patch_size, owner=owner)
        self.max_patches = max_patches if isinstance(max_patches, int) else tuple(max_patches)
        self.sequence_length = sequence_length
        self.max_images_per_sequence = max_images_per_sequence
        self.num_prefix_tokens = num_prefix_tokens
        self.max_grid = None if max_grid is None else as_pair("max_grid", max_grid, owner=owner)
        self.channels = None if channels is None else check_int("channels", channels, minimum=1, owner=owner)
        self.scale, self.offset, self.seed, self.upscale = scale, offset, seed, bool(upscale)
        self.token_drop_rate = token_drop_rate if np.isscalar(token_drop_rate) else tuple(token_drop_rate)
        self.patcher = ImagePatcher(
            patch_size, max_patches, self.max_grid, scale, offset, token_drop_rate, seed, upscale
        )
        self.packer = SequencePacker(sequence_length, max_images_per_sequence, num_prefix_tokens)
        largest = self.patcher.max_patches[1] + num_prefix_tokens
        if largest > sequence_length:
            raise ValueError(
                f"{owner}: an image at the largest patch budget ({self.patcher.max_patches[1]} patches"
                f"{' + 1 class token' if num_prefix_tokens else ''}) cannot fit a sequence of "
                f"sequence_length={sequence_length} tokens; lower max_patches or raise sequence_length "
                "(nothing is cropped)."
            )

    @classmethod
    def for_backbone(cls, backbone, max_patches, sequence_length, **kwargs):
        """A preprocessor with the options of a `native_resolution` backbone."""
        if not getattr(backbone, "native_resolution", False):
            raise ValueError(f"{cls.__name__} needs a backbone with native_resolution=True.")
        grid = tuple(s // p for s, p in zip(backbone.image_shape[:2], backbone.patch_size))
        return cls(
            patch_size=backbone.patch_size,
            max_patches=max_patches,
            sequence_length=sequence_length,
            max_images_per_sequence=backbone.max_images_per_sequence,
            num_prefix_tokens=int(backbone.use_class_token),
            max_grid=grid,
            channels=backbone.image_shape[-1],
            **kwargs,
        )

    def pack(self, images, y=None, sample_weight=None, training=False):
        images = image_list(images, self.channels)
        x, index = self.packer.pack([self.patcher(image, training=training) for image in images])
        shape = x["segment_ids"].shape[:1] + (self.max_images_per_sequence,)
        weights = np.zeros(shape, "float32")
        given = np.ones(len(images), "float32") if sample_weight is None else np.asarray(sample_weight)
        weights[index[:, 0], index[:, 1]] = given
        if y is not None:
            y = np.asarray(y)
            if len(y) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(y)} labels.")
            labels = np.zeros(shape + y.shape[1:], y.dtype)
            labels[index[:, 0], index[:, 1]] = y
            y = labels
        return x, y, weights, index

    def call(self, x, y=None, sample_weight=None):
        if not is_packed(x):
            x, y, sample_weight, _ = self.pack(x, y, sample_weight)
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            max_patches=self.max_patches,
            sequence_length=self.sequence_length,
            max_images_per_sequence=self.max_images_per_sequence,
            num_prefix_tokens=self.num_prefix_tokens,
            max_grid=self.max_grid,
            channels=self.channels,
            upscale=self.upscale,
            scale=self.scale,
            offset=self.offset,
            token_drop_rate=self.token_drop_rate,
            seed=self.seed,
        )
        return config


def image_rows(outputs, image_index):
    """(sequences, N, ...) per-slot outputs -> (num_images, ...), in the
    images' order."""
    outputs = np.asarray(keras.ops.convert_to_numpy(outputs))
    return outputs[image_index[:, 0], image_index[:, 1]]
