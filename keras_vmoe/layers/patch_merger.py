"""PatchMerger ("Learning to Merge Tokens in Vision Transformers", arXiv:2202.12015).

Between two encoder blocks, N tokens become M learned weighted averages of
them, so every later block runs on M tokens:

    x = LayerNorm(tokens)                       # (B, N, D)
    weights = softmax_over_N(W^T x^T)           # (B, M, N), float32
    merged = weights @ x                        # (B, M, D)
"""

import keras
from keras import ops

from keras_vmoe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PatchMerger(keras.layers.Layer):
    """Merges the tokens into `num_tokens` learned convex combinations.

    The paper's module, `Y = softmax(W^T X^T) X`, with `X` the LayerNorm-ed
    input tokens and `W` a learned (D, M) matrix: output token m is a weighted
    average of the normalised input tokens, its weights softmaxed over the N
    inputs, so they are non-negative and sum to 1. The scores and the softmax
    run in float32 under a mixed precision policy (as the MoE routers do); the
    weighted sum runs in the compute dtype.

    Args:
        num_tokens: int >= 1. M, the tokens out. It may not exceed the tokens
            it merges (checked when the input length is known).
        num_prefix_tokens: int >= 0. Tokens at the start of the sequence (a
            class token) that pass through untouched, ahead of the merged
            ones: (B, P + N, D) -> (B, P + M, D). The default 0 merges
            everything: (B, N, D) -> (B, M, D).
        layer_norm_epsilon: float.

    Reference: google-research/vmoe (checked at its current head) has no
    PatchMerger, so this follows the paper's equation and description.
    Choices the equation leaves open, made here: the weighted sum takes the
    normalised tokens (the `X` the scores are computed from), not the raw
    residual stream, so the merged tokens enter the next block at LayerNorm
    scale; the scores are not scaled by 1/sqrt(D) (some re-implementations
    do); `W` starts LeCun-normal (std 1/sqrt(D)), so the initial scores of
    normalised tokens have unit scale and the first merges are smooth
    averages; and `num_prefix_tokens` keeps a class token out of the merge
    (see `VisionTransformerBackbone(patch_merger=...)`).

    Example:
    >>> merger = PatchMerger(num_tokens=4)
    >>> tokens = np.random.normal(size=(2, 16, 8)).astype("float32")
    >>> tuple(merger(tokens).shape)
    (2, 4, 8)
    >>> weights = keras.ops.convert_to_numpy(merger.merge_weights(tokens))
    >>> tuple(weights.shape), bool(np.allclose(weights.sum(axis=-1), 1.0, atol=1e-5))
    ((2, 4, 16), True)
    """

    def __init__(self, num_tokens, num_prefix_tokens=0, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=1, owner="PatchMerger")
        self.num_prefix_tokens = check_int(
            "num_prefix_tokens", num_prefix_tokens, minimum=0, owner="PatchMerger"
        )
        self.layer_norm_epsilon = layer_norm_epsilon
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )

    def check_length(self, length):
        """Raises if a sequence of `length` tokens cannot give `num_tokens`."""
        if length is None:
            return
        merged = length - self.num_prefix_tokens
        if self.num_tokens > merged:
            prefix = (
                f" ({self.num_prefix_tokens} prefix token(s) of the {length} pass through unmerged)"
                if self.num_prefix_tokens
                else ""
            )
            raise ValueError(
                f"{self.name}: num_tokens={self.num_tokens} is more than the {merged} "
                f"tokens it merges{prefix}; a PatchMerger can only reduce the tokens."
            )

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expects tokens of shape (batch, tokens, dim), got {input_shape}.")
        self.check_length(input_shape[1])
        dim = input_shape[-1]
        self.norm.build(input_shape)
        # (D, M), the paper's W; LeCun-normal over fan_in = D.
        self.kernel = self.add_weight(shape=(dim, self.num_tokens), initializer="lecun_normal", name="kernel")

    def _weights(self, normalized):
        """float32 softmax over the N tokens of W^T x^T: (B, M, N)."""
        scores = ops.einsum("bnd,dm->bmn", ops.cast(normalized, "float32"), ops.cast(self.kernel, "float32"))
        return ops.softmax(scores, axis=-1)

    def merge_weights(self, tokens):
        """The merge weights for `tokens` (the layer's input): (B, M, N), float32,
        N the merged (non-prefix) tokens; each row is non-negative and sums to 1."""
        return self._weights(self.norm(tokens[:, self.num_prefix_tokens :]))

    def call(self, tokens):
        self.check_length(tokens.shape[1])
        x = self.norm(tokens[:, self.num_prefix_tokens :])
        weights = ops.cast(self._weights(x), x.dtype)
        merged = ops.einsum("bmn,bnd->bmd", weights, x)
        if not self.num_prefix_tokens:
            return merged
        prefix = ops.cast(tokens[:, : self.num_prefix_tokens], merged.dtype)
        return ops.concatenate([prefix, merged], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_prefix_tokens + self.num_tokens, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tokens=self.num_tokens,
            num_prefix_tokens=self.num_prefix_tokens,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
