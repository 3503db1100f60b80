"""Mixture-of-Experts MLPs: drop-in replacements for a block's dense `Mlp`.

Both layers map (batch, tokens, hidden_dim) to the same shape, along one
path (`MoELayer.call`): reshape the tokens into routing groups, (G,
group_size, D), over the whole batch as vmoe does (`group_size=None`: one
group per image); let the router make a plan; run dispatch -> experts ->
combine through `keras_vmoe.ops`, the sparse ops for a `RoutingPlan`, the
soft ones for a `SoftRoutingPlan`. `SparseMoE` and `SoftMoE` differ only in
the router they build from their arguments.
"""

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.distribution.expert_exchange import ExpertExchange
from keras_vmoe.layers.ensemble import check_ensemble_arguments
from keras_vmoe.layers.ensemble import check_ensemble_router
from keras_vmoe.layers.expert_bank import ExpertBank
from keras_vmoe.layers.mlp import Dropout
from keras_vmoe.layers.routing import Router
from keras_vmoe.layers.routing import SoftRouter
from keras_vmoe.layers.routing import make_router
from keras_vmoe.layers.routing import router_names
from keras_vmoe.layers.routing_plans import SoftRoutingPlan
from keras_vmoe.layers.routing_plans import compute_capacity
from keras_vmoe.layers.routing_plans import group_mean
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


class MoELayer(ExpertBank, keras.layers.Layer):
    """Expert weight banks, grouping and metric bookkeeping shared by MoE layers.

    Expert banks follow vmoe's layout: `kernel_0` (E, D, H), `bias_0` (E, H),
    `kernel_1` (E, H, D), `bias_1` (E, D); `use_bias=False` (ViT-22B, a
    keyword of every MoE layer) leaves out the two bias banks.

    After each call, `router_metrics` holds that call's router metrics
    (scalars, averaged over groups); tasks report them during `fit`.
    Layers that can drop tokens (`drops_tokens`) report `dropped_tokens`.
    Subclasses set `self.router` (a `keras_vmoe.layers.Router`).
    """

    drops_tokens = False

    @property
    def uses_token_modalities(self):
        """Whether `call` takes `token_modalities`: exactly when its router
        does (`Router.uses_token_modalities`)."""
        return getattr(getattr(self, "router", None), "uses_token_modalities", False)

    takes_token_modalities = uses_token_modalities  # The name of keras_vmoe 0.1.

    def __init__(
        self,
        num_experts,
        mlp_dim,
        group_size=None,
        approximate_gelu=True,
        dropout_rate=0.0,
        dispatch_dtype=None,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.use_bias = bool(use_bias)
        self.dispatch_dtype = check_choice(
            "dispatch_dtype", dispatch_dtype, (None, "bfloat16", "float16", "float32"), owner=owner
        )
        self.num_experts = check_int("num_experts", num_experts, minimum=1, owner=owner)
        self.mlp_dim = check_int("mlp_dim", mlp_dim, minimum=1, owner=owner)
        if group_size is not None:
            group_size = check_int("group_size", group_size, minimum=1, owner=owner)
        self.group_size = group_size
        self.approximate_gelu = bool(approximate_gelu)
        self.dropout_rate = check_float("dropout_rate", dropout_rate, 0.0, 1.0, owner=owner)
        self.dropout = Dropout(self.dropout_rate, dtype=self.dtype_policy)
        self.router_metrics = {}

    ensemble_size = 1  # SparseMoE's E^3 option; see `to_groups`.

    def resolve_group_size(self, input_shape):
        """The routing group size for inputs of `input_shape` (B, T, D)."""
        batch, tokens = input_shape[0], input_shape[1]
        group_size = self.group_size or (None if tokens is None else tokens * self.ensemble_size)
        if group_size is None:
            raise ValueError(
                f"{type(self).__name__} needs a known number of tokens per image (or an explicit group_size)."
            )
        if isinstance(batch, int) and isinstance(tokens, int) and (batch * tokens) % group_size:
            raise ValueError(
                f"{self.name}: {batch} images x {tokens} tokens = {batch * tokens} "
                f"tokens do not split into routing groups of group_size="
                f"{group_size}. Use a batch size whose token count is a multiple "
                f"of {group_size}, or group_size=None to route each image on its own."
            )
        return group_size

    def group_tokens(self, inputs):
        """(batch, tokens, D) -> (G, group_size, D): the routing groups."""
        return self.to_groups(inputs, self.resolve_group_size(inputs.shape))

    def to_groups(self, values, group_size):
        """(batch, tokens, ...) -> (G, group_size, ...). With `ensemble_size`
        M > 1 the batch holds M copies of each image (row b * M + m is member
        m of image b) and the groups keep an image's copies together, ordered
        (image, token, member) with the member fastest, as vmoe's E^3
        (`ensemble_routing.py`): (B*M, T, .) -> (B, T, M, .) -> (G, S, .)."""
        trailing = tuple(ops.shape(values)[2:])
        members = self.ensemble_size
        if members > 1:
            values = ops.reshape(values, (-1, members) + tuple(ops.shape(values)[1:]))
            values = ops.swapaxes(values, 1, 2)  # (B, T, M, ...)
        return ops.reshape(values, (-1, group_size) + trailing)

    def from_groups(self, values, tokens):
        """The inverse of `to_groups`: (G, S, ...) -> (batch, tokens, ...)."""
        trailing = tuple(ops.shape(values)[2:])
        members = self.ensemble_size
        if members == 1:
            return ops.reshape(values, (-1, tokens) + trailing)
        values = ops.reshape(values, (-1, tokens, members) + trailing)  # (B, T, M, ...)
        return ops.reshape(ops.swapaxes(values, 1, 2), (-1, tokens) + trailing)

    def routing_inputs(self, tokens):
        """The router's inputs besides the (G, S, D) `tokens` it routes: for
        an E^3 layer each token's member (`token_partitions`), which picks
        its pool of experts."""
        if self.ensemble_size == 1:
            return {}
        members = ops.arange(tokens.shape[1], dtype="int32") % self.ensemble_size
        return {"token_partitions": ops.broadcast_to(members[None], ops.shape(tokens)[:2])}

    def route(self, tokens, training=False, token_mask=None, **options):
        """The router's (plan, metrics) on (G, S, D) routing groups (from
        `group_tokens`), with the inputs `routing_inputs` adds."""
        options.update(self.routing_inputs(tokens))  # E^3: member m routes within expert pool m.
        return self.router(tokens, training=training, token_mask=token_mask, **options)

    def call(self, inputs, training=None, token_mask=None, token_modalities=None):
        """`token_mask` (batch, tokens) bool: False marks padding, which no
        expert processes (its output is zero; the block's residual carries
        it). `token_modalities` (batch, tokens) int: each token's modality,
        for routers that use them (LIMoE's); -1 marks padding."""
        shape = ops.shape(inputs)
        tokens = self.group_tokens(inputs)  # (G, S, D)
        group_size = tokens.shape[1]
        # Expert parallelism when a distribution lays out this layer's slots.
        exchange = ExpertExchange.for_layer(self, tokens.shape[0])
        if exchange is not None:
            tokens = exchange.split_groups(tokens)
        mask = None if token_mask is None else self.to_groups(ops.cast(token_mask, "bool"), group_size)
        options = {}
        if token_modalities is not None:
            if not self.router.uses_token_modalities:
                raise ValueError(
                    f"{self.name}: got `token_modalities`, but its router "
                    f"{type(self.router).__name__} does not use them; use a "
                    "keras_vmoe.layers.MultimodalTokenChoiceRouter (or `token_mask` for padding)."
                )
            options["token_modalities"] = self.to_groups(ops.cast(token_modalities, "int32"), group_size)
        plan, metrics = self.route(tokens, training=training, token_mask=mask, **options)
        tokens, experts = self.round_to_dispatch_dtype(tokens), self.rounded_experts(training)
        if isinstance(plan, SoftRoutingPlan):
            soft_moe = exchange.soft_moe if exchange is not None else moe_ops.soft_moe
            outputs = soft_moe(tokens, plan.dispatch_weights, plan.combine_weights, experts)
        else:
            sparse_moe = exchange.sparse_moe if exchange is not None else moe_ops.sparse_moe
            outputs = sparse_moe(tokens, plan, experts)
        self.record(metrics, training, mask)
        return ops.reshape(self.from_groups(outputs, shape[1]), shape)

    def record(self, metrics, training, token_mask=None):
        """Keeps the call's metrics, averaged over the groups that hold a
        real token, and, in training, adds the auxiliary loss."""
        used = None if token_mask is None else ops.cast(ops.any(token_mask, axis=1), "float32")
        scalars = {name: group_mean(value, used) for name, value in metrics.items()}
        if training:
            self.add_loss(scalars["auxiliary_loss"])
        self.router_metrics = scalars

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            mlp_dim=self.mlp_dim,
            group_size=self.group_size,
            approximate_gelu=self.approximate_gelu,
            dropout_rate=self.dropout_rate,
            dispatch_dtype=self.dispatch_dtype,
        )
        if not self.use_bias:  # Configs of biased layers stay as before.
            config["use_bias"] = False
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SparseMoE(MoELayer):
    """Sparse Mixture of MLP experts (V-MoE, arXiv:2106.05974).

    Args:
        num_experts: int. E.
        mlp_dim: int. Hidden width of each expert's MLP.
        router: `"token_choice"` (each token picks its top K experts),
            `"expert_choice"` (each expert picks its top C tokens), or a
            `keras_vmoe.layers.Router` instance. The arguments below that
            configure a router apply to the named ones.
        num_selected_experts: int. K, for token choice.
        capacity_factor: float. Slots per expert relative to an even split.
        group_size: int or None. Tokens routed together; groups are formed
            over the whole batch (B * T must be a multiple). None: per image.
        batch_priority: bool. Batch Priority Routing (token choice).
        noise_std: float. Routing noise in training is N(0, noise_std / E).
        importance_loss_weight, load_loss_weight, gshard_loss_weight,
        z_loss_weight: floats. Auxiliary loss weights (token choice).
        capacity_rounding: `"ceil"` or `"round"`; capacity_multiple_of: int
            or None. How the capacity is rounded (vmoe: ceil, multiple of 4).
        approximate_gelu: bool. tanh-approximate GELU in the experts (vmoe).
        dropout_rate: float. Dropout inside the experts.
        dispatch_dtype: None or `"bfloat16"`. Round tokens before the dispatch
            and expert outputs before the combine (vmoe's `bfloat16` dispatcher
            option, on in its paper configs).
        seed: int or None. Seed of the routing noise.
        ensemble_size: int. M, for E^3 ("Sparse MoEs meet Efficient
            Ensembles"): the batch holds M copies of each image (row b * M + m
            is member m of image b), an image's copies share its routing
            group, and member m routes only within the m-th pool of
            E / M experts (the token-choice routers' `expert_partitions`).
            `group_size` then counts all copies (images x tokens x M); None
            routes each image's M copies as one group.

    In training the layer adds its auxiliary loss with `add_loss`. A token
    whose every choice was dropped gets zeros (the block's residual carries it).

    Example:
    >>> moe = SparseMoE(num_experts=4, mlp_dim=32, num_selected_experts=2)
    >>> tuple(moe(keras.ops.ones((2, 16, 8))).shape)
    (2, 16, 8)
    """

    drops_tokens = True

    def __init__(
        self,
        num_experts,
        mlp_dim,
        router="token_choice",
        num_selected_experts=1,
        capacity_factor=1.0,
        group_size=None,
        batch_priority=False,
        noise_std=1.0,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        gshard_loss_weight=0.0,
        z_loss_weight=0.0,
        capacity_rounding="ceil",
        capacity_multiple_of=4,
        approximate_gelu=True,
        dropout_rate=0.0,
        dispatch_dtype=None,
        seed=None,
        router_options=None,
        ensemble_size=1,
        **kwargs,
    ):
        super().__init__(
            num_experts, mlp_dim, group_size, approximate_gelu, dropout_rate, dispatch_dtype, **kwargs
        )
        self.ensemble_size = check_ensemble_arguments(ensemble_size, self.num_experts, self.group_size)
        if isinstance(router, dict):
            router = keras.saving.deserialize_keras_object(router)
        if isinstance(router, str):
            if router == "soft":
                raise ValueError("SparseMoE: Soft MoE routing is the SoftMoE layer.")
            shared = dict(
                num_experts=num_experts,
                num_selected_experts=num_selected_experts,
                capacity_factor=capacity_factor,
                batch_priority=batch_priority,
                noise_std=noise_std,
                importance_loss_weight=importance_loss_weight,
                load_loss_weight=load_loss_weight,
                gshard_loss_weight=gshard_loss_weight,
                z_loss_weight=z_loss_weight,
                capacity_rounding=capacity_rounding,
                capacity_multiple_of=capacity_multiple_of,
                seed=seed,
                name="router",
            )
            if self.ensemble_size > 1:
                shared["expert_partitions"] = self.ensemble_size
            try:
                router = make_router(router, shared, router_options)
            except ValueError as error:
                raise ValueError(f"SparseMoE: {error}") from None
        elif router_options:
            raise ValueError("SparseMoE: `router_options` apply to a router given by name.")
        if not isinstance(router, Router) or isinstance(router, SoftRouter):
            raise ValueError(
                f"SparseMoE: `router` must be one of {', '.join(map(repr, router_names()))} or a "
                f"sparse keras_vmoe.layers.Router instance, got {router!r}."
            )
        if router.num_experts != self.num_experts:
            raise ValueError(
                f"SparseMoE: the router has {router.num_experts} experts but the "
                f"layer has num_experts={self.num_experts}."
            )
        check_ensemble_router(router, self.ensemble_size)
        self.router = router

    def build(self, input_shape):
        dim = input_shape[-1]
        if not self.router.built:  # A router from a config or the user may be built.
            self.router.build((None, None, dim))
        self.build_experts(dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            router=keras.saving.serialize_keras_object(self.router), ensemble_size=self.ensemble_size
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoE(MoELayer):
    """Soft Mixture of Experts (arXiv:2308.00951).

    Every slot is a weighted average of all tokens of its group, every expert
    processes its slots, and every token is a weighted average of all slot
    outputs. Nothing is dropped; all weights come from one set of logits.

    Args:
        num_experts: int. E.
        mlp_dim: int. Hidden width of each expert's MLP.
        slots_per_expert: int >= 1. P, the slots of each expert per group.
        capacity_factor: float or None. If given instead of
            `slots_per_expert`, P = round(group_size * capacity_factor / E).
        group_size: int or None. None (default): one group per image, so an
            image's output never depends on the other images.
        noise_std: float. Gaussian noise on the logits in training.
        dispatch_dtype: None or `"bfloat16"`. Round the tokens before the
            dispatch and the expert outputs before the combine to this dtype,
            which is what vmoe always does (bfloat16).
        approximate_gelu, dropout_rate, seed: as `SparseMoE`.

    Example:
    >>> moe = SoftMoE(num_experts=4, mlp_dim=32, slots_per_expert=2)
    >>> tuple(moe(keras.ops.ones((2, 16, 8))).shape)
    (2, 16, 8)
    """

    def __init__(
        self,
        num_experts,
        mlp_dim,
        slots_per_expert=1,
        capacity_factor=None,
        group_size=None,
        noise_std=0.0,
        dispatch_dtype=None,
        approximate_gelu=True,
        dropout_rate=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(
            num_experts, mlp_dim, group_size, approximate_gelu, dropout_rate, dispatch_dtype, **kwargs
        )
        if slots_per_expert is None and capacity_factor is None:
            raise ValueError(
                "SoftMoE: give either `slots_per_expert` or `capacity_factor` "
                "(slots per expert = round(group_size * capacity_factor / num_experts))."
            )
        if capacity_factor is not None:
            if slots_per_expert not in (None, 1):
                raise ValueError(
                    "SoftMoE: give `slots_per_expert` or `capacity_factor`, not both "
                    f"(got slots_per_expert={slots_per_expert}, "
                    f"capacity_factor={capacity_factor})."
                )
            slots_per_expert = None
            capacity_factor = check_float(
                "capacity_factor", capacity_factor, exclusive_minimum=0.0, owner="SoftMoE"
            )
        else:
            slots_per_expert = check_int("slots_per_expert", slots_per_expert, minimum=1, owner="SoftMoE")
        self.slots_per_expert = slots_per_expert
        self.capacity_factor = capacity_factor
        self.noise_std = noise_std
        self.seed = seed
        self.router = None

    def num_slots(self, group_size):
        """Slots per expert for groups of `group_size` tokens."""
        if self.slots_per_expert is not None:
            return self.slots_per_expert
        return compute_capacity(group_size, self.num_experts, self.capacity_factor, "round", multiple_of=None)

    def build(self, input_shape):
        dim = input_shape[-1]
        group_size = self.group_size or input_shape[1]
        if group_size is None:
            raise ValueError("SoftMoE needs a known number of tokens per image.")
        self.router = SoftRouter(
            self.num_experts,
            self.num_slots(group_size),
            noise_std=self.noise_std,
            seed=self.seed,
            name="router",
        )
        self.router.build((None, None, dim))
        self.build_experts(dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            slots_per_expert=self.slots_per_expert,
            capacity_factor=self.capacity_factor,
            noise_std=self.noise_std,
            seed=self.seed,
        )
        return config
