"""The embedding of the encoder: patches, the class token, registers and
position embeddings.

    images -> PatchEmbedding -> [ClassToken] -> PositionEmbedding
           -> [RegisterTokens] -> dropout -> (the encoder blocks)
"""

import keras
import numpy as np
from keras import ops

from keras_vmoe.validation import as_pair
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_int

POSITION_EMBEDDINGS = ("learned", "sincos2d", None)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PatchEmbedding(keras.layers.Layer):
    """Cuts images into patches and embeds each with one strided convolution.

    (batch, height, width, channels) -> (batch, num_patches, hidden_dim), the
    patches in row-major order.
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
        self.conv.build(input_shape)
        # Images with another channel count get Keras' error naming the axis.
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: input_shape[-1]})

    def call(self, images):
        x = self.conv(images)
        return ops.reshape(x, (ops.shape(x)[0], -1, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        _, height, width, _ = input_shape
        num_patches = (height // self.patch_size[0]) * (width // self.patch_size[1])
        return (input_shape[0], num_patches, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, patch_size=self.patch_size)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ClassToken(keras.layers.Layer):
    """Prepends one learned token (vmoe's `cls`, zero-initialised)."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="token")

    def call(self, tokens):
        token = ops.cast(self.token, tokens.dtype)
        token = ops.tile(token, (ops.shape(tokens)[0], 1, 1))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


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
