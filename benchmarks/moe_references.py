"""Public MoE implementations, rewritten with `keras.ops` as benchmark baselines.

- `OneHotEinsumMoE`: google-research/vmoe's einsum dispatcher with top-K per
  token routing (`vmoe/moe.py`: `_get_top_experts_per_item_common`,
  `_get_top_experts_per_item_einsum_dispatcher`, `EinsumDispatcher`;
  `vmoe/nn/routing.py`: `NoisyTopExpertsPerItemRouter`). Routing builds dense
  (G, S, E, C) dispatch and combine tensors and moves tokens with two
  einsums, so its cost and memory grow with group_size^2.
- `DenseMaskedMoE`: keras-hub's Mixtral block (`MixtralSparseMoeBlock` in
  `keras_hub/src/models/mixtral/mixtral_decoder.py`): every expert runs on
  every token and the outputs are weighted by the top-K masked, renormalised
  router weights, so it costs E / K times the active FLOPs.

- `ExpertsOnly`: no router and no dispatch: the tokens, repeated K times,
  go straight through `keras_vmoe`'s own expert bank as E x (K S / E)
  capacity slots. The floor under any dispatch of the same expert FLOPs:
  time above it is routing, dispatch and combine.
- `ExpertsOf`: the same floor for a built `SparseMoE` or `SoftMoE` (a
  model's own layer): its expert bank alone on the capacity slots (soft
  slots) its router gives each routing group, filled with the group's tokens.

Both keep the expert MLP of `keras_vmoe.layers.SparseMoE` (Dense -> tanh GELU
-> Dense, weight banks (E, D, H) and (E, H, D)) rather than Mixtral's SwiGLU,
so that only the way tokens reach the experts differs from the layer under
test.
"""

import keras
from keras import ops

from keras_vmoe.layers.expert_bank import ExpertBank
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing_losses import importance_loss
from keras_vmoe.layers.routing_losses import load_loss


class ExpertBankMoE(keras.layers.Layer):
    """A bias-free float32 router kernel (D, E) and E GELU MLP experts."""

    def __init__(self, num_experts, mlp_dim, num_selected_experts, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.mlp_dim = mlp_dim
        self.num_selected_experts = num_selected_experts
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        dim, num_experts = input_shape[-1], self.num_experts
        # The same per-expert Glorot initialisation as keras_vmoe's MoE layers.
        initializer = keras.initializers.VarianceScaling(
            scale=float(num_experts), mode="fan_avg", distribution="uniform"
        )
        self.router_kernel = self.add_weight(
            shape=(dim, num_experts), initializer="lecun_normal", name="router_kernel"
        )
        self.kernel_0 = self.add_weight(
            shape=(num_experts, dim, self.mlp_dim), initializer=initializer, name="kernel_0"
        )
        self.bias_0 = self.add_weight(shape=(num_experts, self.mlp_dim), initializer="zeros", name="bias_0")
        self.kernel_1 = self.add_weight(
            shape=(num_experts, self.mlp_dim, dim), initializer=initializer, name="kernel_1"
        )
        self.bias_1 = self.add_weight(shape=(num_experts, dim), initializer="zeros", name="bias_1")

    def expert_outputs(self, hidden):
        """(E, N, H) first-layer products, before the bias -> (E, N, D)."""
        hidden = ops.gelu(hidden + self.bias_0[:, None, :], approximate=True)
        return ops.matmul(hidden, self.kernel_1) + self.bias_1[:, None, :]

    def compute_output_shape(self, input_shape):
        return input_shape


class OneHotEinsumMoE(ExpertBankMoE):
    """vmoe's `EinsumDispatcher` behind its noisy top-K per token router.

    Tokens are split into groups of `group_size`; each expert has
    C = compute_capacity(group_size * K, E, capacity_factor) slots per group.
    In training, the router adds Gaussian noise of std 1 / E to the logits,
    and the importance and load losses (weights 0.005 each, as SparseMoE's
    defaults) are added with `add_loss`.
    """

    def __init__(self, num_experts, mlp_dim, num_selected_experts, capacity_factor, group_size, **kwargs):
        super().__init__(num_experts, mlp_dim, num_selected_experts, **kwargs)
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.capacity = compute_capacity(group_size * num_selected_experts, num_experts, capacity_factor)

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        dim = shape[-1]
        num_experts, k, capacity = self.num_experts, self.num_selected_experts, self.capacity
        tokens = ops.reshape(inputs, (-1, self.group_size, dim))  # (G, S, D)

        logits = ops.matmul(tokens, self.router_kernel)  # (G, S, E)
        gates = ops.softmax(logits, axis=-1)
        auxiliary_loss = 0.005 * importance_loss(gates)
        if training:
            noise_std = 1.0 / num_experts
            noise = keras.random.normal(ops.shape(logits), seed=self.seed_generator)
            noisy_logits = logits + noise_std * noise
            auxiliary_loss += 0.005 * load_loss(logits, noisy_logits, noise_std, k)
            gates = ops.softmax(noisy_logits, axis=-1)
            self.add_loss(ops.mean(auxiliary_loss))

        # Buffer position of every choice: top-1 choices of all tokens are
        # served before any top-2 choice, earlier tokens first.
        _, top_experts = ops.top_k(gates, k)  # (G, S, K)
        choices = ops.reshape(ops.transpose(top_experts, (0, 2, 1)), (-1, k * self.group_size))
        choice_one_hot = ops.one_hot(choices, num_experts, dtype="int32")  # (G, K*S, E)
        position = ops.cumsum(choice_one_hot, axis=1) * choice_one_hot - 1
        position = ops.reshape(position, (-1, k, self.group_size, num_experts))
        position = ops.max(position, axis=1)  # (G, S, E); -1 where not chosen
        # One-hot over the buffer; a position >= C (dropped) matches no slot.
        slots = ops.arange(capacity, dtype=position.dtype)
        dispatch = ops.cast(ops.expand_dims(position, -1) == slots, gates.dtype)  # (G, S, E, C)
        combine = ops.expand_dims(gates, -1) * dispatch

        expert_inputs = ops.einsum("gsec,gsd->egcd", dispatch, tokens)
        expert_inputs = ops.reshape(expert_inputs, (num_experts, -1, dim))  # (E, G*C, D)
        outputs = self.expert_outputs(ops.matmul(expert_inputs, self.kernel_0))
        outputs = ops.reshape(outputs, (num_experts, -1, capacity, dim))  # (E, G, C, D)
        return ops.reshape(ops.einsum("gsec,egcd->gsd", combine, outputs), shape)


class DenseMaskedMoE(ExpertBankMoE):
    """keras-hub's Mixtral MoE block: all experts on all tokens, then a
    weighted sum with the top-K router weights (renormalised over the K).

    In training, Mixtral's load-balancing loss (weight 0.02) is added.
    """

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        num_experts, k = self.num_experts, self.num_selected_experts
        tokens = ops.reshape(inputs, (-1, shape[-1]))  # (N, D)

        logits = ops.matmul(tokens, self.router_kernel)  # (N, E)
        probs = ops.softmax(logits, axis=-1)
        top_probs, top_experts = ops.top_k(probs, k)
        top_probs = top_probs / ops.sum(top_probs, axis=-1, keepdims=True)
        expert_mask = ops.one_hot(top_experts, num_experts, dtype=probs.dtype)  # (N, K, E)
        routing = ops.sum(expert_mask * top_probs[..., None], axis=1)  # (N, E)
        if training:
            tokens_per_expert = ops.mean(ops.mean(expert_mask, axis=0), axis=0)
            balance = ops.sum(tokens_per_expert * ops.mean(probs, axis=0)) * num_experts
            self.add_loss(0.02 * balance)

        hidden = ops.einsum("nd,edh->enh", tokens, self.kernel_0)
        outputs = self.expert_outputs(hidden)  # (E, N, D)
        outputs = ops.sum(outputs * ops.transpose(routing)[:, :, None], axis=0)
        return ops.reshape(outputs, shape)


class ExpertsOnly(ExpertBank, keras.layers.Layer):
    """The expert MLPs of `SparseMoE` (its `ExpertBank`, overrides included)
    on E x C slots, C = K x tokens / E, filled with the tokens repeated K
    times; the K outputs of a token are summed. Same expert FLOPs as a
    top-K `SparseMoE` at capacity factor 1, and nothing else."""

    def __init__(self, num_experts, mlp_dim, num_selected_experts, **kwargs):
        super().__init__(**kwargs)
        self.num_experts, self.mlp_dim, self.num_selected_experts = num_experts, mlp_dim, num_selected_experts
        self.use_bias, self.approximate_gelu, self.dispatch_dtype = True, True, None
        self.dropout = keras.layers.Dropout(0.0)

    def build(self, input_shape):
        self.build_experts(input_shape[-1])

    def call(self, inputs, training=None):
        shape, k = ops.shape(inputs), self.num_selected_experts
        tokens = ops.reshape(inputs, (-1, shape[-1]))  # (N, D)
        slots = ops.reshape(ops.tile(tokens, (k, 1)), (self.num_experts, -1, shape[-1]))  # (E, K*N/E, D)
        outputs = ops.reshape(self.run_experts(slots, training=training), (k, -1, shape[-1]))
        return ops.reshape(ops.sum(outputs, axis=0), shape)

    def compute_output_shape(self, input_shape):
        return input_shape


class ExpertsOf(keras.layers.Layer):
    """`moe`'s expert bank alone (its weights, overrides included) on the
    E x C slots per routing group that its router gives (C: the capacity of a
    token-choice router, the slots per expert of a soft one), filled with the
    group's tokens repeated; no router, no dispatch, no combine. Each token
    gets the mean of its group's expert outputs, so that every slot's output
    reaches the loss (the gradient of every slot is computed)."""

    def __init__(self, moe, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe

    def call(self, inputs, training=None):
        moe, shape = self.moe, ops.shape(inputs)
        tokens = moe.group_tokens(inputs)  # (G, S, D)
        groups, group_size, dim = tokens.shape
        slots = moe.num_experts * moe.router.capacity(group_size)
        repeats = -(-slots // group_size)
        slots_in = ops.tile(tokens, (1, repeats, 1))[:, :slots]  # (G, E*C, D)
        slots_in = ops.reshape(slots_in, (groups, moe.num_experts, -1, dim))  # (G, E, C, D)
        expert_inputs = ops.reshape(ops.swapaxes(slots_in, 0, 1), (moe.num_experts, -1, dim))  # (E, G*C, D)
        outputs = ops.reshape(
            moe.run_experts(expert_inputs, training=training), (moe.num_experts, groups, -1, dim)
        )
        group_means = ops.mean(outputs, axis=(0, 2))[:, None, :]  # (G, 1, D)
        return ops.reshape(tokens + group_means, shape)

    def compute_output_shape(self, input_shape):
        return input_shape
