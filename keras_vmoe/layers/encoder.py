"""The pieces of the one Vision Transformer encoder.

They follow google-research/vmoe's `VisionTransformerMoe` one to one, so that
vmoe and big_vision checkpoints map onto them parameter by parameter:

    images -> (the embedding, `embedding.py`) -> EncoderBlock x num_layers
           -> LayerNorm -> pooling -> [pre-logits]

Each `EncoderBlock` takes its MLP as a layer: a dense `Mlp`, a `SparseMoE` or
a `SoftMoE`.
"""

import math

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.layers.mlp import Dropout
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.layers.packing import from_image_groups
from keras_vmoe.layers.packing import probe_attention_mask
from keras_vmoe.layers.packing import segment_attention_mask
from keras_vmoe.layers.packing import segment_one_hot
from keras_vmoe.layers.packing import segment_pool
from keras_vmoe.layers.packing import to_image_groups
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int

POOLINGS = ("token", "gap", "map", None)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MultiHeadDotProductAttention(keras.layers.Layer):
    """Multi-head attention laid out like flax's `MultiHeadDotProductAttention`.

    Query, key and value kernels are (dim, heads, head_dim) and the output
    kernel (heads, head_dim, dim). With `qk_norm`, query and key are
    LayerNorm-ed over head_dim with a scale and no bias (ViT-22B, Soft MoE).
    Without attention dropout it runs `keras.ops.dot_product_attention`, so
    each backend may use its fused kernel.

    Call with `(query_tokens)` for self-attention or `(query_tokens, kv_tokens)`;
    `attention_mask` (batch, queries, keys), True where a query may attend to
    a key (LIMoE's image and text tokens attend only within their modality).
    `use_bias=False`: no biases in the four projections (ViT-22B).
    """

    def __init__(
        self,
        num_heads,
        qk_norm=False,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads, minimum=1, owner="attention")
        self.qk_norm = bool(qk_norm)
        self.use_bias = bool(use_bias)
        self.dropout_rate = check_float("attention_dropout_rate", dropout_rate, 0.0, 1.0)
        self.layer_norm_epsilon = layer_norm_epsilon

    def build(self, query_shape, value_shape=None):
        dim = query_shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"hidden_dim={dim} must be divisible by num_heads={self.num_heads}.")
        head_dim = dim // self.num_heads
        self.head_dim = head_dim

        def projection(name):
            layer = keras.layers.EinsumDense(
                "btd,dhk->bthk",
                output_shape=(None, self.num_heads, head_dim),
                bias_axes="hk" if self.use_bias else None,
                kernel_initializer="glorot_uniform",
                dtype=self.dtype_policy,
                name=name,
            )
            layer.build((None, None, dim))
            return layer

        self.query = projection("query")
        self.key = projection("key")
        self.value = projection("value")
        self.out = keras.layers.EinsumDense(
            "bthk,hkd->btd",
            output_shape=(None, dim),
            bias_axes="d" if self.use_bias else None,
            kernel_initializer="glorot_uniform",
            dtype=self.dtype_policy,
            name="out",
        )
        self.out.build((None, None, self.num_heads, head_dim))
        if self.qk_norm:
            self.query_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                center=False,
                dtype=self.dtype_policy,
                name="query_norm",
            )
            self.query_norm.build((None, None, self.num_heads, head_dim))
            self.key_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                center=False,
                dtype=self.dtype_policy,
                name="key_norm",
            )
            self.key_norm.build((None, None, self.num_heads, head_dim))
        self.dropout = Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def call(self, query, value=None, training=None, attention_mask=None):
        value = query if value is None else value
        mask = None if attention_mask is None else ops.cast(attention_mask, "bool")[:, None]
        q, k, v = self.query(query), self.key(value), self.value(value)
        if self.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        if self.dropout_rate > 0 and training:
            # (batch, heads, queries, keys); softmax in float32.
            logits = ops.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(self.head_dim)
            logits = ops.cast(logits, "float32")
            if mask is not None:
                logits = ops.where(mask, logits, ops.full_like(logits, -1e9))
            weights = ops.softmax(logits, axis=-1)
            weights = self.dropout(ops.cast(weights, v.dtype), training=training)
            x = ops.einsum("bhqs,bshk->bqhk", weights, v)
        else:
            x = moe_ops.dot_product_attention(q, k, v, mask=mask)
        return self.out(x)

    def compute_output_shape(self, query_shape, value_shape=None):
        return query_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            qk_norm=self.qk_norm,
            dropout_rate=self.dropout_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        if not self.use_bias:  # Configs of biased layers stay as before.
            config["use_bias"] = False
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class EncoderBlock(keras.layers.Layer):
    """Pre-LayerNorm Transformer block whose MLP is a pluggable layer.

        x = x + dropout(attention(norm(x)))
        x = x + mlp(norm(x))

    or, with `parallel_block=True` (ViT-22B), one LayerNorm feeding both:

        x = x + dropout(attention(norm(x))) + mlp(norm(x))

    Args:
        num_heads: int. Attention heads.
        mlp: the MLP layer: `Mlp`, `SparseMoE`, `SoftMoE` (or any layer mapping
            (batch, tokens, dim) to the same shape). MoE layers add their
            auxiliary losses themselves.
        attention_qk_norm: bool. LayerNorm on queries and keys.
        dropout_rate: float. Dropout after attention.
        attention_dropout_rate: float. Dropout on the attention weights.
        layer_norm_epsilon: float.
        layer_scale_init: None, or a float: LayerScale (CaiT, DINOv2), a
            learned per-channel scale on the attention and MLP branches,
            `x + scale * branch(norm(x))`, starting at this value.
        parallel_block: bool. Attention and MLP in parallel from one
            LayerNorm (`attention_norm`; the block has no `mlp_norm`).
        use_bias: bool. False: no biases in the attention projections (the
            MLP's are its own option, `Mlp(use_bias=False)`).

    Example:
    >>> block = EncoderBlock(2, Mlp(32, use_bias=False), parallel_block=True, use_bias=False)
    >>> tuple(block(np.ones((1, 5, 16), "float32")).shape)
    (1, 5, 16)
    """

    def __init__(
        self,
        num_heads,
        mlp,
        attention_qk_norm=False,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        layer_scale_init=None,
        parallel_block=False,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(mlp, dict):
            mlp = keras.saving.deserialize_keras_object(mlp)
        if not isinstance(mlp, keras.layers.Layer):
            raise ValueError(f"EncoderBlock: `mlp` must be a Keras layer, got {mlp!r}.")
        self.num_heads = num_heads
        self.attention_qk_norm = bool(attention_qk_norm)
        self.dropout_rate = check_float("dropout_rate", dropout_rate, 0.0, 1.0)
        self.attention_dropout_rate = attention_dropout_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.layer_scale_init = (
            None
            if layer_scale_init is None
            else check_float("layer_scale_init", layer_scale_init, owner="EncoderBlock")
        )
        self.parallel_block = bool(parallel_block)
        self.use_bias = bool(use_bias)
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention = MultiHeadDotProductAttention(
            num_heads,
            qk_norm=attention_qk_norm,
            dropout_rate=attention_dropout_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            use_bias=use_bias,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.dropout = Dropout(self.dropout_rate, dtype=self.dtype_policy)
        self.mlp_norm = None
        if not self.parallel_block:
            self.mlp_norm = keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="mlp_norm"
            )
        self.mlp = mlp

    def build(self, input_shape):
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        if self.mlp_norm is not None:
            self.mlp_norm.build(input_shape)
        if not self.mlp.built:  # A block restored from its config already built it.
            self.mlp.build(input_shape)
        if self.layer_scale_init is not None:
            initializer = keras.initializers.Constant(self.layer_scale_init)
            self.attention_scale = self.add_weight(
                shape=(input_shape[-1],), initializer=initializer, name="attention_scale"
            )
            self.mlp_scale = self.add_weight(
                shape=(input_shape[-1],), initializer=initializer, name="mlp_scale"
            )

    def attend(self, inputs, training=None, attention_mask=None):
        """The block's first half: `(residual, mlp_inputs)`, the attention
        with its residual and the normalised tokens the MLP (and so a MoE
        layer's router) receives: `mlp_norm(residual)`, or with a parallel
        block the one LayerNorm of the inputs."""
        normed = self.attention_norm(inputs)
        x = self.attention(normed, training=training, attention_mask=attention_mask)
        if self.layer_scale_init is not None:
            x = x * ops.cast(self.attention_scale, x.dtype)
        residual = inputs + self.dropout(x, training=training)
        return residual, normed if self.parallel_block else self.mlp_norm(residual)

    def call(
        self,
        inputs,
        training=None,
        attention_mask=None,
        token_modalities=None,
        segment_ids=None,
        image_groups=None,
    ):
        """`attention_mask`: (batch, tokens, tokens) bool, see the attention.
        `token_modalities`: (batch, tokens) int, passed to an MLP that takes
        them (a `SparseMoE`, for its router: LIMoE); -1 marks padding.
        `segment_ids`: (batch, tokens) int, a packed sequence (NaViT, see
        `keras_vmoe.layers.packing`): attention stays within each image and a
        MoE MLP leaves padding (0) unrouted; with `image_groups` (from
        `packing.image_groups`) it routes one group per image, otherwise one
        group per sequence."""
        if segment_ids is not None:
            segment_mask = segment_attention_mask(segment_ids)
            attention_mask = (
                segment_mask
                if attention_mask is None
                else ops.logical_and(segment_mask, ops.cast(attention_mask, "bool"))
            )
        state = self.attend(inputs, training=training, attention_mask=attention_mask)
        return self.feed_forward(
            state,
            training=training,
            token_modalities=token_modalities,
            segment_ids=segment_ids,
            image_groups=image_groups,
        )

    def router_tokens(self, state):
        """(G, S, D): the routing groups this block's MoE router receives,
        from the output of `attend` (the one place that says what a router
        sees; routing inspection and the LIMoE probe use it)."""
        return self.mlp.group_tokens(state[1])

    def feed_forward(self, state, training=None, token_modalities=None, segment_ids=None, image_groups=None):
        """The block's second half, on the output of `attend`: the MLP with
        its residual."""
        residual, x = state
        routes = hasattr(self.mlp, "group_tokens")
        uses_modalities = token_modalities is not None and getattr(self.mlp, "uses_token_modalities", False)
        modalities = {"token_modalities": token_modalities} if uses_modalities else {}
        if segment_ids is not None and routes and image_groups is not None:
            groups, mask = to_image_groups(x, image_groups)  # (B * N, P, D): one group per image
            if uses_modalities:
                modalities["token_modalities"] = to_image_groups(token_modalities, image_groups)[0]
            y = self.mlp(groups, training=training, token_mask=mask, **modalities)
            y = from_image_groups(y, image_groups, segment_ids)
        elif segment_ids is not None and routes:
            y = self.mlp(x, training=training, token_mask=segment_ids > 0, **modalities)
        else:
            y = self.mlp(x, training=training, **modalities)
        # An MLP restored with a policy of its own returns its compute dtype.
        y = ops.cast(y, residual.dtype)
        if self.layer_scale_init is not None:
            y = y * ops.cast(self.mlp_scale, y.dtype)
        return residual + y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp=keras.saving.serialize_keras_object(self.mlp),
            attention_qk_norm=self.attention_qk_norm,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
            layer_scale_init=self.layer_scale_init,
        )
        # ViT-22B options: saved only when set, so other configs stay as before.
        if self.parallel_block:
            config["parallel_block"] = True
        if not self.use_bias:
            config["use_bias"] = False
        return config


def pooled_spec(tokens, segment_ids, max_images):
    """A pooling's output: (batch, dim), or (batch, N, dim) on packed input."""
    middle = () if segment_ids is None else (max_images,)
    return keras.KerasTensor((tokens.shape[0],) + middle + (tokens.shape[-1],), dtype=tokens.dtype)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SequencePooling(keras.layers.Layer):
    """`"token"`: the first token; `"gap"`: the mean of the patch tokens.

    With `"gap"`, prefix tokens (a class token) are left out of the mean.
    On a packed sequence (NaViT) call with `segment_ids` (batch, tokens),
    `max_images` N and, with class tokens, `prefix_mask` (batch, tokens):
    one vector per image, (batch, N, dim), zeros for empty image slots.
    """

    def __init__(self, mode, num_prefix_tokens=0, **kwargs):
        super().__init__(**kwargs)
        self.mode = check_choice("pooling", mode, ("token", "gap"))
        self.num_prefix_tokens = num_prefix_tokens

    def call(self, tokens, segment_ids=None, prefix_mask=None, max_images=None):
        if segment_ids is not None:
            return segment_pool(tokens, segment_ids, max_images, self.mode, prefix_mask)
        if self.mode == "token":
            return tokens[:, 0]
        return ops.mean(tokens[:, self.num_prefix_tokens :], axis=1)

    def compute_output_spec(self, tokens, segment_ids=None, prefix_mask=None, max_images=None):
        return pooled_spec(tokens, segment_ids, max_images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, num_prefix_tokens=self.num_prefix_tokens)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MultiHeadAttentionPooling(keras.layers.Layer):
    """Multi-head attention pooling (vmoe's `MapHead`): a learned probe attends
    to all tokens, then a residual MLP: `(x + mlp(norm(x)))[:, 0]`. On a
    packed sequence (`segment_ids`, `max_images` N) one probe per image slot
    attends to its image's tokens only: (batch, N, dim)."""

    def __init__(
        self,
        num_heads,
        mlp_dim,
        qk_norm=False,
        approximate_gelu=True,
        layer_norm_epsilon=1e-6,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.use_bias = bool(use_bias)
        self.qk_norm = bool(qk_norm)
        self.approximate_gelu = bool(approximate_gelu)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention = MultiHeadDotProductAttention(
            num_heads,
            qk_norm=qk_norm,
            layer_norm_epsilon=layer_norm_epsilon,
            use_bias=use_bias,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.mlp = Mlp(mlp_dim, approximate_gelu, use_bias=use_bias, dtype=self.dtype_policy, name="mlp")

    def build(self, input_shape):
        dim = input_shape[-1]
        self.probe = self.add_weight(shape=(1, 1, dim), initializer="glorot_uniform", name="probe")
        self.attention.build((None, 1, dim), input_shape)
        self.norm.build((None, 1, dim))
        self.mlp.build((None, 1, dim))

    def call(self, tokens, segment_ids=None, max_images=None):
        probes, mask = 1, None
        if segment_ids is not None:
            probes, mask = max_images, probe_attention_mask(segment_ids, max_images)
        probe = ops.tile(ops.cast(self.probe, tokens.dtype), (ops.shape(tokens)[0], probes, 1))
        x = self.attention(probe, tokens, attention_mask=mask)
        x = x + self.mlp(self.norm(x))
        if segment_ids is None:
            return x[:, 0]
        filled = ops.any(segment_one_hot(segment_ids, max_images, "int32") > 0, axis=1)  # (B, N)
        return x * ops.cast(filled, x.dtype)[:, :, None]  # An empty slot's probe saw every token: zero it.

    def compute_output_spec(self, tokens, segment_ids=None, max_images=None):
        return pooled_spec(tokens, segment_ids, max_images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            qk_norm=self.qk_norm,
            approximate_gelu=self.approximate_gelu,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        if not self.use_bias:
            config["use_bias"] = False
        return config
