"""The embedding of the encoder: patches, the class token, registers and
position embeddings.

    images -> PatchEmbedding -> [ClassToken] -> PositionEmbedding
           -> [RegisterTokens] -> dropout -> (the encoder blocks)
"""

import keras
import numpy as np
from keras import ops

from keras_vmoe.layers.packing import image_extents
from keras_vmoe.validation import as_pair
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_int

POSITION_EMBEDDINGS = ("learned", "sincos2d", None)
# On packed sequences (NaViT): a row and a column table, indexed by the
# patch's position ("factorized") or by its fraction of the image's side
# ("factorized_fractional"); or the fixed 2-D sin-cos at the position.
PACKED_POSITION_EMBEDDINGS = ("factorized", "factorized_fractional", "sincos2d", None)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PatchEmbedding(keras.layers.Layer):
    """Cuts images into patches and embeds each with one strided convolution.

    (batch, height, width, channels) -> (batch, num_patches, hidden_dim), the
    patches in row-major order. Also takes patches already cut out (NaViT's
    packed sequences), (batch, tokens, ph * pw * channels) with each patch's
    pixels in (row, column, channel) order, and embeds them with the same
    kernel: the same weights serve both inputs.
    """

    def __init__(self, hidden_dim, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1, owner="PatchEmbedding")
        self.patch_size = as_pair("patch_size", patch_size, owner="PatchEmbedding")
        self.conv = keras.layers.Conv2D(
            hidden_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="conv",
        )

    def build(self, input_shape):
        if len(input_shape) == 3:  # Flattened patches.
            pixels = self.patch_size[0] * self.patch_size[1]
            if input_shape[-1] is None or input_shape[-1] % pixels:
                raise ValueError(
                    f"PatchEmbedding: flattened patches must have ph * pw * channels values, a "
                    f"multiple of {pixels} for patch_size {self.patch_size}; got {input_shape[-1]}."
                )
            self.conv.build((None,) + self.patch_size + (input_shape[-1] // pixels,))
        else:
            self.conv.build(input_shape)
        # Inputs with another channel count get Keras' error naming the axis.
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={-1: input_shape[-1]})

    def call(self, images):
        if len(images.shape) == 3:
            kernel = ops.reshape(ops.cast(self.conv.kernel, images.dtype), (-1, self.hidden_dim))
            return ops.matmul(images, kernel) + ops.cast(self.conv.bias, images.dtype)
        x = self.conv(images)
        return ops.reshape(x, (ops.shape(x)[0], -1, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        if len(input_shape) == 3:
            return tuple(input_shape[:2]) + (self.hidden_dim,)
        _, height, width, _ = input_shape
        num_patches = (height // self.patch_size[0]) * (width // self.patch_size[1])
        return (input_shape[0], num_patches, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, patch_size=self.patch_size)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ClassToken(keras.layers.Layer):
    """Prepends one learned token (vmoe's `cls`, zero-initialised).

    On packed sequences (NaViT), call with `prefix_mask` (batch, tokens) bool:
    the class token replaces the tokens marked True (the packer reserves one
    at the start of each image) and nothing is prepended.
    """

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="token")

    def call(self, tokens, prefix_mask=None):
        token = ops.cast(self.token, tokens.dtype)
        if prefix_mask is not None:
            return ops.where(ops.cast(prefix_mask, "bool")[:, :, None], token, tokens)
        token = ops.tile(token, (ops.shape(tokens)[0], 1, 1))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, tokens_shape, prefix_mask_shape=None):
        if prefix_mask_shape is not None:
            return tokens_shape
        length = None if tokens_shape[1] is None else tokens_shape[1] + 1
        return (tokens_shape[0], length, tokens_shape[2])


@keras.saving.register_keras_serializable(package="keras_vmoe")
class RegisterTokens(keras.layers.Layer):
    """Inserts `num_tokens` learned tokens after the first `index` tokens
    (DINOv2's registers, "Vision Transformers Need Registers": after the
    class token, after the position embedding, so they get no position).

    Args:
        num_tokens: int >= 1.
        index: int >= 0. Tokens kept in front of the registers (1 with a class
            token).

    Example:
    >>> layer = RegisterTokens(4, index=1)
    >>> tuple(layer(np.zeros((2, 1 + 16, 32), "float32")).shape)
    (2, 21, 32)
    """

    def __init__(self, num_tokens, index=0, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=1, owner="RegisterTokens")
        self.index = check_int("index", index, minimum=0, owner="RegisterTokens")

    def build(self, input_shape):
        self.tokens = self.add_weight(
            shape=(1, self.num_tokens, input_shape[-1]), initializer="zeros", name="tokens"
        )

    def call(self, tokens):
        registers = ops.cast(self.tokens, tokens.dtype)
        registers = ops.tile(registers, (ops.shape(tokens)[0], 1, 1))
        return ops.concatenate([tokens[:, : self.index], registers, tokens[:, self.index :]], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + self.num_tokens
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(num_tokens=self.num_tokens, index=self.index)
        return config


def sincos2d_position_embedding(grid_size, dim, temperature=10_000.0):
    """vmoe's fixed 2-D sin-cos embedding (MoCo v3): (grid_h * grid_w, dim)."""
    if dim % 4 != 0 or dim < 8:
        raise ValueError(
            f"A 'sincos2d' position embedding needs hidden_dim to be a multiple of 4 and >= 8, got {dim}."
        )
    y, x = np.mgrid[: grid_size[0], : grid_size[1]].astype("float32")
    y, x = y.ravel(), x.ravel()
    omega = np.arange(dim // 4, dtype="float32") / (dim // 4 - 1)
    omega = 1.0 / (temperature**omega)
    x = np.einsum("n,d->nd", x, omega)
    y = np.einsum("n,d->nd", y, omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PositionEmbedding(keras.layers.Layer):
    """Adds a position embedding to the tokens.

    Args:
        kind: `"learned"` (one vector per position, prefix tokens included, as
            vmoe and keras-hub's ViT do), `"sincos2d"` (fixed; prefix tokens get
            none, as in vmoe) or `None` (nothing added).
        grid_size: (rows, columns) of the patch grid.
        num_prefix_tokens: tokens before the patches (1 with a class token).
    """

    def __init__(self, kind, grid_size, num_prefix_tokens=0, **kwargs):
        super().__init__(**kwargs)
        self.kind = check_choice("position_embedding", kind, POSITION_EMBEDDINGS)
        self.grid_size = as_pair("grid_size", grid_size)
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)

    def build(self, input_shape):
        dim = input_shape[-1]
        num_patches = self.grid_size[0] * self.grid_size[1]
        if self.kind == "learned":
            self.embedding = self.add_weight(
                shape=(1, num_patches + self.num_prefix_tokens, dim),
                initializer=keras.initializers.RandomNormal(stddev=0.02),
                name="embedding",
            )
        elif self.kind == "sincos2d":
            self.fixed_embedding = sincos2d_position_embedding(self.grid_size, dim)[None]

    def call(self, tokens):
        if self.kind == "learned":
            return tokens + ops.cast(self.embedding, tokens.dtype)
        if self.kind == "sincos2d":
            embedding = ops.cast(self.fixed_embedding, tokens.dtype)
            prefix = tokens[:, : self.num_prefix_tokens]
            patches = tokens[:, self.num_prefix_tokens :] + embedding
            return ops.concatenate([prefix, patches], axis=1)
        return tokens

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, grid_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class FactorizedPositionEmbedding(keras.layers.Layer):
    """NaViT's position embeddings for packed sequences of images of any
    size: `tokens + row_table[r] + column_table[c]` at each patch's (r, c).

    Args:
        kind: `"factorized"` (learned tables indexed by the patch's row and
            column), `"factorized_fractional"` (learned tables indexed by
            floor(r / rows * table_rows), the patch's fraction of its image's
            side, so every resolution spans the whole table), `"sincos2d"`
            (vmoe's fixed 2-D sin-cos at (r, c)) or None.
        grid_size: (rows, columns) of the largest grid (the tables' sizes).

    Call with `(tokens, positions, segment_ids)`; tokens at position (-1, -1)
    (class tokens) get no embedding.

    Example:
    >>> layer = FactorizedPositionEmbedding("factorized", grid_size=(4, 4))
    >>> positions = np.array([[[0, 0], [0, 1], [3, 2]]], "int32")
    >>> x = layer(np.zeros((1, 3, 8), "float32"), positions, np.ones((1, 3), "int32"))
    >>> tuple(x.shape)
    (1, 3, 8)
    """

    def __init__(self, kind, grid_size, max_images=1, **kwargs):
        super().__init__(**kwargs)
        self.kind = check_choice("position_embedding", kind, PACKED_POSITION_EMBEDDINGS)
        self.grid_size = as_pair("grid_size", grid_size)
        self.max_images = check_int("max_images", max_images, minimum=1, owner="FactorizedPositionEmbedding")

    def build(self, tokens_shape, positions_shape=None, segment_ids_shape=None):
        dim = tokens_shape[-1]
        if self.kind in ("factorized", "factorized_fractional"):
            initializer = keras.initializers.RandomNormal(stddev=0.02)
            self.row_embedding = self.add_weight(
                shape=(self.grid_size[0], dim), initializer=initializer, name="row_embedding"
            )
            self.column_embedding = self.add_weight(
                shape=(self.grid_size[1], dim), initializer=initializer, name="column_embedding"
            )
        elif self.kind == "sincos2d":
            self.fixed_embedding = sincos2d_position_embedding(self.grid_size, dim)

    def call(self, tokens, positions, segment_ids):
        if self.kind is None:
            return tokens
        positions = ops.cast(positions, "int32")
        patch = ops.cast(positions[:, :, :1] >= 0, tokens.dtype)  # class tokens: (-1, -1)
        rows, columns = ops.maximum(positions[:, :, 0], 0), ops.maximum(positions[:, :, 1], 0)
        if self.kind == "sincos2d":
            index = rows * self.grid_size[1] + columns
            embedding = ops.take(ops.cast(self.fixed_embedding, tokens.dtype), index, axis=0)
            return tokens + patch * embedding
        if self.kind == "factorized_fractional":
            extents = image_extents(ops.maximum(positions, 0), segment_ids, self.max_images)
            fraction = lambda value, axis: ops.cast(  # noqa: E731
                ops.floor(
                    ops.cast(value, "float32") / ops.maximum(extents[:, :, axis], 1.0) * self.grid_size[axis]
                ),
                "int32",
            )
            rows, columns = fraction(rows, 0), fraction(columns, 1)
        rows = ops.minimum(rows, self.grid_size[0] - 1)
        columns = ops.minimum(columns, self.grid_size[1] - 1)
        embedding = ops.take(ops.cast(self.row_embedding, tokens.dtype), rows, axis=0) + ops.take(
            ops.cast(self.column_embedding, tokens.dtype), columns, axis=0
        )
        return tokens + patch * embedding

    def compute_output_shape(self, tokens_shape, positions_shape=None, segment_ids_shape=None):
        return tokens_shape

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, grid_size=self.grid_size, max_images=self.max_images)
        return config
