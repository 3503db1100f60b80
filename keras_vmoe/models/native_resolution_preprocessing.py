"""The preprocessor of native-resolution (NaViT) classifiers: a list of
images of any sizes -> packed sequences, and labels laid out to match."""

import numbers

import keras
import numpy as np
import tensorflow as tf
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
    images = [check_image(index, image) for index, image in enumerate(images)]
    expected = channels if channels is not None else images[0].shape[-1]
    for index, image in enumerate(images):
        check_image(index, image, expected, "the model's" if channels is not None else "image 0's")
    return images


def check_image(index, image, channels=None, source="the model's"):
    """An (H, W, C) NumPy image (H, W) gets a channel axis); raises on
    shapes that are not images and on a channel count other than
    `channels`."""
    image = np.asarray(image)
    image = image[:, :, None] if image.ndim == 2 else image
    if image.ndim != 3:
        raise ValueError(f"Image {index} must be (height, width, channels), got shape {image.shape}.")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"Image {index} has a zero side: shape {image.shape}.")
    if channels is not None and image.shape[-1] != channels:
        raise ValueError(
            f"Image {index} has {image.shape[-1]} channels, but {source} count is {channels}: "
            "every image needs the same channels."
        )
    return image


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
    image_index): `y` (an array, or a structure of arrays, one row per
    image) laid out as (sequences, N, ...) and `sample_weight`
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
        self.max_patches = (
            int(max_patches) if isinstance(max_patches, numbers.Integral) else tuple(max_patches)
        )
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
            num_prefix_tokens=int(getattr(backbone, "use_class_token", False)),
            max_grid=grid,
            channels=backbone.image_shape[-1],
            **kwargs,
        )

    def check_backbone(self, backbone, owner):
        """Raises unless this preprocessor's batches are what `backbone`
        reads: a mismatch would pool images nowhere, clamp positions off
        the grid, or cut an image's routing group short, silently."""
        grid = tuple(s // p for s, p in zip(backbone.image_shape[:2], backbone.patch_size))
        prefix = int(getattr(backbone, "use_class_token", False))
        largest = self.patcher.max_patches[1]
        if self.max_grid is not None:
            largest = min(largest, self.max_grid[0] * self.max_grid[1])
        mismatches = {
            "patch_size": (self.patch_size, tuple(backbone.patch_size)),
            "max_images_per_sequence": (self.max_images_per_sequence, backbone.max_images_per_sequence),
            "num_prefix_tokens": (self.num_prefix_tokens, prefix),
        }
        problems = [
            f"{name}={ours} (the backbone's: {theirs})" for name, (ours, theirs) in mismatches.items()
        ]
        problems = [p for p, (ours, theirs) in zip(problems, mismatches.values()) if ours != theirs]
        if self.max_grid is None or any(m > g for m, g in zip(self.max_grid, grid)):
            problems.append(f"max_grid={self.max_grid} (must be within the backbone's grid {grid})")
        if largest + prefix > backbone.max_image_tokens:
            problems.append(
                f"images of up to {largest + prefix} tokens (the backbone's max_image_tokens is "
                f"{backbone.max_image_tokens})"
            )
        if self.channels not in (None, backbone.image_shape[-1]):
            problems.append(f"channels={self.channels} (the backbone's: {backbone.image_shape[-1]})")
        if problems:
            raise ValueError(
                f"{owner}: the {type(self).__name__} does not match the backbone: "
                f"{'; '.join(problems)}. Build it with {type(self).__name__}.for_backbone(backbone, ...)."
            )

    def pack(self, images, y=None, sample_weight=None, training=False):
        images = image_list(images, self.channels)
        x, index = self.packer.pack([self.patcher(image, training=training) for image in images])
        return (x, *self.lay_out(index, len(x["segment_ids"]), y, sample_weight), index)

    def lay_out(self, index, num_sequences, y=None, sample_weight=None):
        """Per-image labels and weights -> (y, sample_weight) in the image
        slots `index` gives, (num_sequences, N, ...); weight 0 on empty
        slots."""
        shape = (num_sequences, self.max_images_per_sequence)
        given = np.ones(len(index), "float32") if sample_weight is None else sample_weight
        weights = self.slot_layout(np.asarray(given, "float32"), index, shape)
        if y is not None:
            y = keras.tree.map_structure(lambda labels: self.slot_layout(labels, index, shape), y)
        return y, weights

    @staticmethod
    def slot_layout(values, index, shape):
        """(num_images, ...) per-image values -> (sequences, N, ...), in the
        slots `index` gives, zeros in empty slots."""
        values = np.asarray(values)
        if len(values) != len(index):
            raise ValueError(f"Got {len(index)} images but {len(values)} labels or sample weights.")
        laid_out = np.zeros(shape + values.shape[1:], values.dtype)
        laid_out[index[:, 0], index[:, 1]] = values
        return laid_out

    def packed_dataset(self, dataset, num_sequences, training=False):
        """A `tf.data.Dataset` of packed batches of one fixed shape, from a
        dataset of single images of any sizes with their labels: elements
        `(image, y)` or `(image, y, sample_weight)`, each image (H, W, C).

        Patching and first-fit packing run in a generator (packing spans
        images, so it is not a per-element `map`); each pass over the
        dataset (each epoch) patches anew, redrawing the patch budgets and
        the token dropping when `training`. Batches are `(x, y,
        sample_weight)`: x {"patches" (S, L, ph * pw * C), "positions",
        "segment_ids"}, y (S, N, ...) and sample_weight (S, N), 0 on empty
        image slots, with S = `num_sequences`, for `fit` and `evaluate` on
        every backend.

        Example:
        >>> import tensorflow as tf
        >>> preprocessor = NativeResolutionImageClassifierPreprocessor(
        ...     patch_size=8, max_patches=16, sequence_length=32, max_images_per_sequence=4,
        ...     channels=3)
        >>> images = [np.zeros((8 * h, 16, 3), "uint8") for h in (1, 2, 3, 4)]
        >>> source = tf.data.Dataset.from_generator(
        ...     lambda: ((image, len(image) // 8) for image in images),
        ...     output_signature=(tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int32)))
        >>> x, y, weights = next(iter(preprocessor.packed_dataset(source, num_sequences=1)))
        >>> x["patches"].shape.as_list(), y.numpy().tolist(), weights.numpy().tolist()
        ([1, 32, 192], [[1, 2, 3, 4]], [[1.0, 1.0, 1.0, 1.0]])
        """
        owner = f"{type(self).__name__}.packed_dataset"
        num_sequences = check_int("num_sequences", num_sequences, minimum=1, owner=owner)
        spec = dataset.element_spec
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):
            raise ValueError(
                f"{owner} takes a dataset of (image, y) or (image, y, sample_weight) elements, one "
                f"image each; got elements {spec}. For predictions, pass a list of images to `predict`."
            )
        image_spec, y_spec = spec[0], spec[1]
        rank, channels = image_spec.shape.rank, self.channels
        if rank not in (None, 2, 3):
            raise ValueError(
                f"{owner}: an element's image must be (height, width, channels), got {image_spec}."
            )
        if channels is None:
            channels = 1 if rank == 2 else image_spec.shape[-1] if rank == 3 else None
        if channels is None:
            raise ValueError(
                f"{owner}: the images' channel count is not static; give the preprocessor `channels`."
            )
        shape = (num_sequences, self.max_images_per_sequence)
        tokens = (num_sequences, self.sequence_length)
        signature = (
            {
                "patches": tf.TensorSpec(tokens + (self.patch_size[0] * self.patch_size[1] * channels,)),
                "positions": tf.TensorSpec(tokens + (2,), tf.int32),
                "segment_ids": tf.TensorSpec(tokens, tf.int32),
            },
            tf.nest.map_structure(lambda y: tf.TensorSpec(shape + tuple(y.shape), y.dtype), y_spec),
            tf.TensorSpec(shape, tf.float32),
        )

        def batches():
            labels = {}

            def patched():
                index = -1
                for index, element in enumerate(dataset.as_numpy_iterator()):
                    if len(element) == 3 and np.shape(element[2]) != ():
                        raise ValueError(
                            f"{owner}: element {index}'s sample weight must be a scalar (one per "
                            f"image), got shape {np.shape(element[2])}."
                        )
                    labels[index] = element[1:]
                    yield self.patcher(check_image(index, element[0], channels), training=training)
                if index < 0:
                    raise ValueError(f"{owner}: the dataset has no elements.")

            for x, image_index, stream_index in self.packer.stream(patched(), num_sequences):
                given = [labels.pop(index) for index in stream_index]
                y = keras.tree.map_structure(lambda *values: np.stack(values), *[g[0] for g in given])
                weights = [g[1] for g in given] if len(given[0]) > 1 else None
                yield (x, *self.lay_out(image_index, num_sequences, y, weights))

        return tf.data.Dataset.from_generator(batches, output_signature=signature)

    def call(self, x, y=None, sample_weight=None):
        if not is_packed(x) and not isinstance(x, (list, tuple, np.ndarray)):
            raise ValueError(
                f"{type(self).__name__} packs a list of NumPy images, or passes packed batches "
                f"through; got {type(x).__name__}. For a tf.data.Dataset of single images, use "
                "`packed_dataset(dataset, num_sequences)` and pass its result to `fit`."
            )
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
