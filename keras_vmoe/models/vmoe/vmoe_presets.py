"""The V-MoE family's presets: google-research/vmoe's released checkpoints.

Each entry names a checkpoint under `gs://vmoe_checkpoints/` and the vmoe
model config that reads it (vmoe's own `configs/vmoe_paper` values, sizes from
this family's architecture table). `keras_vmoe.presets` resolves the names:
it downloads, converts with `load_vmoe_checkpoint` and caches them.
"""

import dataclasses

from keras_vmoe.models.vmoe.vmoe_architectures import VARIANTS

VMOE_BUCKET = "gs://vmoe_checkpoints"


@dataclasses.dataclass(frozen=True)
class VMoECheckpointPreset:
    """A released vmoe checkpoint and the vmoe model config that reads it.

    `model_config` is the `config.model` dict of vmoe's own config for the
    checkpoint; `image_size` the resolution it was trained or fine-tuned at.
    """

    name: str
    description: str
    model_config: dict
    image_size: int
    params: int

    @property
    def source(self):
        return f"{VMOE_BUCKET}/{self.name}"


def vmoe_paper_model_config(
    variant,
    patch_size,
    num_experts,
    num_selected_experts,
    moe_layers,
    num_classes,
    representation_size,
    capacity_factor,
    ensemble_size=None,
    head_bias_init=None,
):
    """vmoe's `configs/vmoe_paper/common.get_vmoe_config`, as a plain dict.

    One difference, for presets: `group_size` is None (each image is routed
    on its own), so that any batch size can be classified. vmoe routes groups
    of 8 images; with an evaluation capacity that drops no token (the S/32
    ILSVRC-2012 presets) both give the same outputs.
    """
    num_layers, hidden_size, mlp_dim, num_heads = VARIANTS[variant.lower()]
    router = dict(
        num_selected_experts=num_selected_experts,
        noise_std=1.0,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        dispatcher=dict(
            name="einsum",
            bfloat16=True,
            capacity_factor=capacity_factor,
            batch_priority=False,
        ),
    )
    moe = dict(layers=tuple(moe_layers), num_experts=num_experts, group_size=None, router=router)
    extra = {}
    if ensemble_size is not None:  # E^3: vmoe's `VisionTransformerMoeEnsemble`.
        moe["ensemble_size"] = ensemble_size
    if head_bias_init is not None:
        extra["head_bias_init"] = head_bias_init
    return dict(
        name="VisionTransformerMoe" if ensemble_size is None else "VisionTransformerMoeEnsemble",
        num_classes=num_classes,
        patch_size=(patch_size, patch_size),
        hidden_size=hidden_size,
        classifier="token",
        representation_size=representation_size,
        encoder=dict(
            num_layers=num_layers,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            moe=moe,
        ),
        **extra,
    )


# The checkpoints vmoe's README lists. Capacity factors are the ones vmoe
# evaluates these models with (4.0 for the S/32 pre-training runs, an
# evaluation override in their config; the fine-tuning configs' 1.5).
_S32_LAST2 = dict(variant="S", patch_size=32, num_experts=8, num_selected_experts=2, moe_layers=(5, 7))
# E^3 ("Sparse MoEs meet Efficient Ensembles"): M=2 members of 4 experts
# each, K=1 (vmoe's configs/eee_paper). With group_size None each image's two
# copies form one routing group.
_EEE_S32_LAST2 = dict(
    variant="S", patch_size=32, num_experts=8, num_selected_experts=1, moe_layers=(5, 7), ensemble_size=2
)
_B16_EVERY2 = dict(
    variant="B", patch_size=16, num_experts=8, num_selected_experts=2, moe_layers=(1, 3, 5, 7, 9, 11)
)
VMOE_CHECKPOINT_PRESETS = {
    preset.name: preset
    for preset in (
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_light1",
            "V-MoE S/32, 8 experts on the last two odd blocks, K=2, trained on ILSVRC-2012 "
            "for 300 epochs (RandAugment light1); 224x224, 1000 classes.",
            vmoe_paper_model_config(
                **_S32_LAST2, num_classes=1000, representation_size=512, capacity_factor=4.0
            ),
            224,
            56_999_400,
        ),
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            "vmoe_s32_last2_ilsvrc2012_randaug_light1 fine-tuned on ILSVRC-2012 at 384x384.",
            vmoe_paper_model_config(
                **_S32_LAST2, num_classes=1000, representation_size=None, capacity_factor=1.5
            ),
            384,
            56_785_384,
        ),
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_medium",
            "V-MoE S/32, 8 experts on the last two odd blocks, K=2, trained on ILSVRC-2012 "
            "for 1000 epochs (RandAugment medium); 224x224, 1000 classes.",
            vmoe_paper_model_config(
                **_S32_LAST2, num_classes=1000, representation_size=512, capacity_factor=4.0
            ),
            224,
            56_999_400,
        ),
        VMoECheckpointPreset(
            "vmoe_b16_imagenet21k_randaug_strong",
            "V-MoE B/16, 8 experts on every odd block, K=2, trained on ImageNet-21k "
            "(RandAugment strong); 224x224, 21843 classes.",
            vmoe_paper_model_config(
                **_B16_EVERY2, num_classes=21843, representation_size=None, capacity_factor=1.05
            ),
            224,
            300_974_931,
        ),
        VMoECheckpointPreset(
            "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
            "vmoe_b16_imagenet21k_randaug_strong fine-tuned on ILSVRC-2012 at 384x384.",
            vmoe_paper_model_config(
                **_B16_EVERY2, num_classes=1000, representation_size=None, capacity_factor=1.5
            ),
            384,
            285_238_504,
        ),
        VMoECheckpointPreset(
            "eee_s32_last2_ilsvrc2012",
            "E^3 S/32 (efficient ensemble of experts): 2 members, each routing (K=1) within its own "
            "4 of the 8 experts on the last two odd blocks; trained on ILSVRC-2012; 224x224, "
            "1000 classes. `predict` gives the ensemble's log mean probability.",
            vmoe_paper_model_config(
                **_EEE_S32_LAST2, num_classes=1000, representation_size=512, capacity_factor=1.5
            ),
            224,
            56_999_400,
        ),
        VMoECheckpointPreset(
            "eee_s32_last2_ilsvrc2012_ft_cifar100",
            "eee_s32_last2_ilsvrc2012 fine-tuned on CIFAR-100 at 128x128 (vmoe's "
            "configs/eee_paper, whose docstring gives 81.31% test top-1, mean of three fine-tuning seeds).",
            vmoe_paper_model_config(
                **_EEE_S32_LAST2,
                num_classes=100,
                representation_size=512,
                capacity_factor=1.5,
                head_bias_init=-10.0,
            ),
            128,
            56_520_804,
        ),
    )
}
