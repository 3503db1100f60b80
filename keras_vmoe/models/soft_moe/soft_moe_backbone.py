"""The Soft MoE backbone: a ViT whose `moe_layers` blocks hold a `SoftMoE`."""

import keras

from keras_vmoe.layers.moe import SoftMoE
from keras_vmoe.models.encoder_stack import moe_factory
from keras_vmoe.models.soft_moe.soft_moe_architectures import SOFT_MOE_ARCHITECTURES
from keras_vmoe.models.soft_moe.soft_moe_architectures import architecture_config
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEBackbone(VisionTransformerBackbone):
    """Soft MoE backbone ("From Sparse to Soft Mixtures of Experts").

    A Vision Transformer whose blocks in `moe_layers` replace their MLP by a
    `keras_vmoe.layers.SoftMoE`. Defaults follow the paper: global average
    pooling and query/key LayerNorm.

    Args:
        image_shape, patch_size, num_layers, hidden_dim, mlp_dim, num_heads
        and the other encoder arguments (`patch_merger` included): see
        `VisionTransformerBackbone`. Soft MoE layers after a PatchMerger
        keep `slots_per_expert` (with `capacity_factor`, their slots follow
        the merged group size).
        moe_layers: block indices with a Soft MoE MLP.
        num_experts: int.
        slots_per_expert: int (default 1), or None with `capacity_factor`.
        capacity_factor: float or None.
        group_size: int or None (default: each image on its own).
        noise_std: float. Logit noise in training.
        dispatch_dtype: None or "bfloat16" (vmoe rounds to bfloat16).
        moe_dropout_rate: float or None (default: `dropout_rate`).

    Example:
    >>> backbone = SoftMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=4, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(2, 3), num_experts=4,
    ...     slots_per_expert=2)
    >>> tuple(backbone(np.zeros((2, 32, 32, 3))).shape)
    (2, 32)
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
        slots_per_expert=1,
        capacity_factor=None,
        group_size=None,
        noise_std=0.0,
        dispatch_dtype=None,
        moe_dropout_rate=None,
        pooling="gap",
        attention_qk_norm=True,
        **kwargs,
    ):
        dropout_rate = kwargs.get("dropout_rate", 0.0)
        moe_dropout = dropout_rate if moe_dropout_rate is None else moe_dropout_rate

        moe_mlp = None
        if moe_layers:
            moe_mlp = moe_factory(
                SoftMoE,
                num_experts,
                mlp_dim,
                slots_per_expert=slots_per_expert,
                capacity_factor=capacity_factor,
                group_size=group_size,
                noise_std=noise_std,
                dispatch_dtype=dispatch_dtype,
                approximate_gelu=kwargs.get("approximate_gelu", True),
                dropout_rate=moe_dropout,
                dtype=kwargs.get("dtype"),
            )
        super().__init__(
            image_shape,
            patch_size,
            num_layers,
            hidden_dim,
            mlp_dim,
            num_heads,
            pooling=pooling,
            attention_qk_norm=attention_qk_norm,
            moe_layers=moe_layers,
            moe_mlp=moe_mlp,
            **kwargs,
        )
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.noise_std = noise_std
        self.dispatch_dtype = dispatch_dtype
        self.moe_dropout_rate = moe_dropout_rate

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            slots_per_expert=self.slots_per_expert,
            capacity_factor=self.capacity_factor,
            group_size=self.group_size,
            noise_std=self.noise_std,
            dispatch_dtype=self.dispatch_dtype,
            moe_dropout_rate=self.moe_dropout_rate,
        )
        return config


SoftMoEBackbone.architecture_config = staticmethod(architecture_config)
SoftMoEBackbone.architectures = tuple(SOFT_MOE_ARCHITECTURES)
