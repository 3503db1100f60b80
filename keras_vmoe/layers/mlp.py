"""The dense MLP of a Transformer block (vmoe's `MlpBlock`)."""

import keras
from keras import ops

from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


class Dropout(keras.layers.Dropout):
    """`keras.layers.Dropout` that hands its inputs back without a layer call
    where it is the identity (rate 0, or `training=False`): in eager PyTorch
    a Keras layer call costs tens of microseconds, and a MoE layer's experts
    make two per expert."""

    def __call__(self, inputs, training=None, **kwargs):
        if self.rate == 0 or training is False:
            return inputs
        return super().__call__(inputs, training=training, **kwargs)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class Mlp(keras.layers.Layer):
    """Dense -> GELU -> dropout -> Dense -> dropout, back to the input width.

    Args:
        mlp_dim: int. Width of the hidden layer.
        approximate_gelu: bool. Use the tanh approximation of GELU (vmoe,
            big_vision) rather than the exact form (keras-hub's ViT).
        dropout_rate: float. Dropout after the activation and the output.
        use_bias: bool. False: no biases (ViT-22B).

    Example:
    >>> mlp = Mlp(mlp_dim=64)
    >>> tuple(mlp(keras.ops.ones((2, 5, 16))).shape)
    (2, 5, 16)
    """

    def __init__(self, mlp_dim, approximate_gelu=True, dropout_rate=0.0, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, minimum=1, owner="Mlp")
        self.approximate_gelu = bool(approximate_gelu)
        self.dropout_rate = check_float("dropout_rate", dropout_rate, 0.0, 1.0, owner="Mlp")
        self.use_bias = bool(use_bias)
        self.dense_0 = keras.layers.Dense(
            mlp_dim, use_bias=self.use_bias, dtype=self.dtype_policy, name="dense_0"
        )
        self.dense_1 = None
        self.dropout = Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense_0.build(input_shape)
        self.dense_1 = keras.layers.Dense(
            input_shape[-1], use_bias=self.use_bias, dtype=self.dtype_policy, name="dense_1"
        )
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))

    def call(self, inputs, training=None):
        x = self.dense_0(inputs)
        x = ops.gelu(x, approximate=self.approximate_gelu)
        x = self.dropout(x, training=training)
        x = self.dense_1(x)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            mlp_dim=self.mlp_dim,
            approximate_gelu=self.approximate_gelu,
            dropout_rate=self.dropout_rate,
        )
        if not self.use_bias:  # Configs of biased MLPs stay as before.
            config["use_bias"] = False
        return config
