"""The V-MoE backbone: a ViT whose `moe_layers` blocks hold a `SparseMoE`."""

import inspect

import keras

from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.models.encoder_stack import moe_factory
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone
from keras_vmoe.models.vmoe.vmoe_architectures import VMOE_ARCHITECTURES
from keras_vmoe.models.vmoe.vmoe_architectures import architecture_config

SPARSE_MOE_ARGUMENTS = frozenset(inspect.signature(SparseMoE.__init__).parameters) - {"self", "kwargs"}


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VMoEBackbone(VisionTransformerBackbone):
    """V-MoE backbone ("Scaling Vision with Sparse Mixture of Experts").

    A Vision Transformer whose blocks listed in `moe_layers` replace their MLP
    by a `keras_vmoe.layers.SparseMoE`. With `moe_layers=()` it is a dense ViT.

    Args:
        image_shape, patch_size, num_layers, hidden_dim, mlp_dim, num_heads,
        pooling, use_class_token, position_embedding, attention_qk_norm,
        representation_size, dropout_rate, attention_dropout_rate,
        approximate_gelu, layer_norm_epsilon, patch_merger, dtype: see
            `VisionTransformerBackbone`.
        moe_layers: block indices with a MoE MLP; see `every_n` / `last_n`.
        num_experts: int. E.
        num_selected_experts: int. K (token choice).
        capacity_factor: float.
        group_size: int or None. Tokens routed together, over the whole batch.
        router: a router name (`keras_vmoe.layers.ROUTERS`: `"token_choice"`,
            `"expert_choice"`, `"sinkhorn_token_choice"`,
            `"sinkhorn_expert_choice"`, `"sparse_token_choice"`,
            `"sparse_expert_choice"`, `"sparse_top_k"`).
        batch_priority: bool. Batch Priority Routing.
        router_options: dict of further `SparseMoE` arguments (`noise_std`,
            `importance_loss_weight`, `load_loss_weight`, `gshard_loss_weight`,
            `z_loss_weight`, `capacity_rounding`, `capacity_multiple_of`,
            `dispatch_dtype`, `seed`) and the named router's own arguments
            (e.g. `num_iterations` for Sinkhorn).
        moe_dropout_rate: float or None. Dropout in the experts (default:
            `dropout_rate`).
        ensemble_size: int. M > 1 makes it an E^3 ensemble ("Sparse MoEs meet
            Efficient Ensembles"): each image is repeated M times before the
            first MoE block, member m routes within its own E / M experts
            (`SparseMoE(ensemble_size=M)`; K <= E / M, `group_size` counts
            the M copies), and the output has M rows per image (row
            b * M + m = member m of image b). M = 1 is the plain V-MoE.

    Example:
    >>> backbone = VMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=4, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(1, 3), num_experts=4,
    ...     num_selected_experts=2)
    >>> tuple(backbone(np.zeros((2, 32, 32, 3))).shape)
    (2, 32)

    With a PatchMerger after block 1, blocks 2 and 3 run on the class token
    and 4 merged tokens instead of 1 + 16:
    >>> merged = VMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=4, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(1, 3), num_experts=4,
    ...     num_selected_experts=2, patch_merger=dict(after_block=1, num_tokens=4))
    >>> tuple(merged.get_layer("encoder_block_3").output.shape)
    (None, 5, 32)
    """

    def __init__(
        self,
        image_shape,
        patch_size,
        num_layers,
        hidden_dim,
        mlp_dim,
        num_heads,
        moe_layers=(),
        num_experts=8,
        num_selected_experts=1,
        capacity_factor=1.0,
        group_size=None,
        router="token_choice",
        batch_priority=False,
        router_options=None,
        moe_dropout_rate=None,
        ensemble_size=1,
        **kwargs,
    ):
        router_options = dict(router_options or {})
        dropout_rate = kwargs.get("dropout_rate", 0.0)
        moe_dropout = dropout_rate if moe_dropout_rate is None else moe_dropout_rate

        # `router_options` holds SparseMoE arguments and, for a router given
        # by name, that router's own ones (e.g. Sinkhorn's num_iterations).
        layer_options = {k: v for k, v in router_options.items() if k in SPARSE_MOE_ARGUMENTS}
        own_options = {k: v for k, v in router_options.items() if k not in SPARSE_MOE_ARGUMENTS}

        moe_mlp = None
        if moe_layers:
            moe_mlp = moe_factory(
                SparseMoE,
                num_experts,
                mlp_dim,
                router=router,
                num_selected_experts=num_selected_experts,
                capacity_factor=capacity_factor,
                group_size=group_size,
                batch_priority=batch_priority,
                approximate_gelu=kwargs.get("approximate_gelu", True),
                dropout_rate=moe_dropout,
                dtype=kwargs.get("dtype"),
                router_options=own_options or None,
                ensemble_size=ensemble_size,
                **layer_options,
            )
        super().__init__(
            image_shape,
            patch_size,
            num_layers,
            hidden_dim,
            mlp_dim,
            num_heads,
            moe_layers=moe_layers,
            moe_mlp=moe_mlp,
            ensemble_size=ensemble_size,
            **kwargs,
        )
        self.num_experts = num_experts
        self.num_selected_experts = num_selected_experts
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.router = router
        self.batch_priority = batch_priority
        self.router_options = router_options
        self.moe_dropout_rate = moe_dropout_rate

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            num_selected_experts=self.num_selected_experts,
            capacity_factor=self.capacity_factor,
            group_size=self.group_size,
            router=self.router,
            batch_priority=self.batch_priority,
            router_options=self.router_options,
            moe_dropout_rate=self.moe_dropout_rate,
        )
        return config


VMoEBackbone.architecture_config = staticmethod(architecture_config)
VMoEBackbone.architectures = tuple(VMOE_ARCHITECTURES)
