"""Sparse upcycling: a MoE model that starts from a dense one.

"Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(Komatsuzaki et al., ICLR 2023): the MLP of each chosen block becomes a MoE
layer whose experts all start as copies of that MLP; every other weight is
kept, and the router, which the dense model lacks, starts from its usual
random initialisation. Training then continues; the copies diverge as the
router learns to send them different tokens.

Example:
```python
dense = keras_vmoe.models.VMoEImageClassifier.from_preset("vit_tiny_cifar10")
moe = keras_vmoe.upcycle(dense, num_experts=8, moe_layers=(3, 5),
                         router="expert_choice", capacity_factor=1.0)
moe.compile(...); moe.fit(images, labels)
```
"""

import keras
import numpy as np

from keras_vmoe.convert.keras_hub_models import from_keras_hub
from keras_vmoe.convert.keras_hub_models import keras_hub_converter
from keras_vmoe.layers import ROUTERS
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.layers.moe import SoftMoE
from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.layers.routing import router_names
from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VisionTransformerBackbone
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models import VMoEImageClassifier


def _vmoe_arguments(router, num_selected_experts, capacity_factor, group_size, options):
    arguments = dict(
        router=router,
        num_selected_experts=num_selected_experts,
        capacity_factor=1.0 if capacity_factor is None else capacity_factor,
        group_size=group_size,
    )
    for name in ("batch_priority", "moe_dropout_rate"):
        if name in options:
            arguments[name] = options.pop(name)
    if options:
        arguments["router_options"] = options
    return arguments


def _soft_arguments(slots_per_expert, capacity_factor, group_size, options):
    if slots_per_expert is None and capacity_factor is None:
        slots_per_expert = 1
    return dict(
        slots_per_expert=slots_per_expert, capacity_factor=capacity_factor, group_size=group_size, **options
    )


def _copy_weights(source, target):
    """target.set_weights(source.get_weights()), naming the layer on a mismatch."""
    weights = source.get_weights()
    if [w.shape for w in weights] != [tuple(v.shape) for v in target.weights]:
        raise ValueError(f"upcycle: the weights of layer {source.name!r} do not fit the new model.")
    target.set_weights(weights)


def _copy_mlp_into_experts(mlp, moe):
    """Every expert of `moe` becomes a copy of the dense `mlp`."""

    num_experts = moe.num_experts
    for bank, weight in (
        (moe.kernel_0, mlp.dense_0.kernel),
        (moe.bias_0, mlp.dense_0.bias),
        (moe.kernel_1, mlp.dense_1.kernel),
        (moe.bias_1, mlp.dense_1.bias),
    ):
        value = keras.ops.convert_to_numpy(weight)
        bank.assign(np.broadcast_to(value, (num_experts, *value.shape)).astype(bank.dtype))


def _upcycle_vlm_image_tower(model, num_experts, moe_layers, **arguments):
    """A PaliGemma-style VLM upcycles its image tower: the rest is copied and
    the VLM rebuilt around the new tower. None for any other model."""

    if not isinstance(model, (PaliGemmaMoEBackbone, PaliGemmaMoECausalLM)):
        return None
    backbone = model.backbone if isinstance(model, PaliGemmaMoECausalLM) else model
    tower = upcycle(backbone.image_encoder, num_experts, moe_layers, **arguments)
    backbone = backbone.with_image_encoder(tower)
    if isinstance(model, PaliGemmaMoEBackbone):
        return backbone
    return type(model)(backbone, preprocessor=model.preprocessor)


def upcycle(
    model,
    num_experts,
    moe_layers,
    router="token_choice",
    num_selected_experts=1,
    capacity_factor=None,
    slots_per_expert=None,
    group_size=None,
    ensemble_size=1,
    **moe_options,
):
    """Turns the dense MLPs of `moe_layers` into MoE layers of copied experts.

    Args:
        model: a `VisionTransformerBackbone` (a dense ViT, a V-MoE, a Soft
            MoE), a `VisionTransformerImageClassifier` on one, a keras-hub
            model that `keras_vmoe.convert.from_keras_hub` converts (ViT,
            SigLIP, DINOv2, PaliGemma; converted first), or a PaliGemma-style
            `PaliGemmaMoECausalLM` / `PaliGemmaMoEBackbone`, whose image
            tower is upcycled (`moe_layers` are tower blocks) and whose
            decoder and projection are kept.
        num_experts: int >= 2.
        moe_layers: block indices whose dense MLP becomes a MoE layer.
        router: a sparse router's name (`keras_vmoe.layers.ROUTERS`:
            `"token_choice"`, `"expert_choice"`, `"sinkhorn_token_choice"`,
            ...; a `VMoEBackbone` with `SparseMoE` layers), or `"soft"` (a
            `SoftMoEBackbone`).
        num_selected_experts: K, for token choice.
        capacity_factor: sparse routers: default 1.0; Soft MoE: slots from
            the group size instead of `slots_per_expert`.
        slots_per_expert: Soft MoE (default 1).
        group_size: tokens routed together (default: each image on its own).
        ensemble_size: M > 1 makes the result an E^3 ensemble (sparse
            routers; see `VMoEBackbone`): member m routes within experts
            m * E / M ... (m + 1) * E / M - 1, a V-MoE's router kernel
            (D, E) kept as is, which is vmoe's C-order reshape to
            (D, M, E / M) in its E^3 fine-tuning configs. To turn a V-MoE
            into an E^3 ensemble without new MoE blocks, pass its
            `num_experts` and `moe_layers=()`.
        **moe_options: further arguments of the new backbone's MoE layers:
            `batch_priority`, `moe_dropout_rate` and `router_options` entries
            (`noise_std`, `importance_loss_weight`, ...) for sparse routers;
            `noise_std`, `dispatch_dtype`, `moe_dropout_rate` for Soft MoE.

    Returns:
        The same kind of model: a `VMoEBackbone` / `SoftMoEBackbone`, or a
        `VMoEImageClassifier` / `SoftMoEImageClassifier` with the head and
        preprocessing of `model`; for a VLM, a new VLM (with the same
        preprocessor) on the upcycled tower.

    With `router="token_choice"`, `num_selected_experts=num_experts` and a
    capacity for every token, the upcycled model computes the dense model's
    function: each token's output is its gates (summing to 1) times E
    identical MLP outputs.
    """

    if router != "soft" and router not in ROUTERS:
        known = ", ".join(map(repr, [*router_names(), "soft"]))
        raise ValueError(f"upcycle: router must be one of {known}, got {router!r}.")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 2:
        raise ValueError(
            f"upcycle: num_experts must be an int >= 2 (one expert is the dense MLP), got {num_experts!r}."
        )
    if not isinstance(model, str) and keras_hub_converter(model) is not None:
        model = from_keras_hub(model)
    vlm = _upcycle_vlm_image_tower(
        model,
        num_experts,
        moe_layers,
        router=router,
        num_selected_experts=num_selected_experts,
        capacity_factor=capacity_factor,
        slots_per_expert=slots_per_expert,
        group_size=group_size,
        **moe_options,
    )
    if vlm is not None:
        return vlm
    task = model if isinstance(model, VisionTransformerImageClassifier) else None
    backbone = task.backbone if task is not None else model
    if not isinstance(backbone, VisionTransformerBackbone):
        raise ValueError(
            "upcycle: expected a keras_vmoe backbone or image classifier, or a keras-hub "
            f"model that keras_vmoe.convert.from_keras_hub converts; got {type(model).__name__}."
        )
    moe_layers = tuple(moe_layers)
    for index in moe_layers:
        if not isinstance(index, int) or not 0 <= index < backbone.num_layers:
            raise ValueError(
                f"upcycle: moe_layers has block index {index!r}, but the model has blocks 0 to "
                f"{backbone.num_layers - 1}."
            )
        if not isinstance(backbone.get_layer(f"encoder_block_{index}").mlp, Mlp):
            raise ValueError(
                f"upcycle: block {index} is already a MoE block (moe_layers={backbone.moe_layers}); "
                "only dense MLPs can be upcycled."
            )
    ensembling = ensemble_size != 1 and bool(backbone.moe_layers)  # A V-MoE into an E^3 ensemble.
    if len(set(moe_layers)) != len(moe_layers) or not (moe_layers or ensembling):
        raise ValueError(f"upcycle: moe_layers must list distinct block indices, got {moe_layers}.")
    soft = router == "soft"
    if soft and ensemble_size != 1:
        raise ValueError("upcycle: E^3 ensembles (ensemble_size > 1) need a sparse router, not 'soft'.")
    if backbone.moe_layers and backbone.moe_mlps[0].num_experts != num_experts:
        raise ValueError(
            f"upcycle: the model's MoE blocks {backbone.moe_layers} have "
            f"{backbone.moe_mlps[0].num_experts} experts, so num_experts must be "
            f"{backbone.moe_mlps[0].num_experts}, got {num_experts}."
        )
    if backbone.moe_layers:
        kept = SoftMoE if soft else SparseMoE
        if not all(isinstance(moe, kept) for moe in backbone.moe_mlps):
            raise ValueError(
                f"upcycle: the model's MoE blocks {backbone.moe_layers} are not {kept.__name__} "
                f"layers, so it cannot also hold router={router!r} blocks."
            )

    # The base encoder's configuration (pooling, qk-norm, dtype, ...) as is.
    config = VisionTransformerBackbone.get_config(backbone)
    config["moe_layers"] = tuple(sorted(set(backbone.moe_layers) | set(moe_layers)))
    config.pop("name", None)
    classifier_cls = SoftMoEImageClassifier if soft else VMoEImageClassifier
    if soft:
        config.update(
            num_experts=num_experts,
            **_soft_arguments(slots_per_expert, capacity_factor, group_size, dict(moe_options)),
        )
    else:
        config.update(
            num_experts=num_experts,
            ensemble_size=ensemble_size,
            **_vmoe_arguments(router, num_selected_experts, capacity_factor, group_size, dict(moe_options)),
        )
    upcycled = classifier_cls.backbone_cls(**config)

    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer) or not layer.weights:
            continue
        target = upcycled.get_layer(layer.name)
        if not layer.name.startswith("encoder_block_"):
            _copy_weights(layer, target)
            continue
        for part in ("attention_norm", "attention", "mlp_norm"):
            _copy_weights(getattr(layer, part), getattr(target, part))
        if layer.layer_scale_init is not None:
            # Copies, not the arrays themselves: JAX donates buffers in fit.
            target.attention_scale.assign(keras.ops.convert_to_numpy(layer.attention_scale))
            target.mlp_scale.assign(keras.ops.convert_to_numpy(layer.mlp_scale))
        if isinstance(layer.mlp, Mlp) and not isinstance(target.mlp, Mlp):
            _copy_mlp_into_experts(layer.mlp, target.mlp)
        else:
            _copy_weights(layer.mlp, target.mlp)

    if task is None:
        return upcycled
    preprocessor_cls = classifier_cls.preprocessor_cls
    preprocessor = None
    if task.preprocessor is not None:
        preprocessor = preprocessor_cls(
            preprocessor_cls.image_converter_cls.from_config(task.preprocessor.image_converter.get_config())
        )
    classifier = classifier_cls(
        upcycled,
        num_classes=task.num_classes,
        preprocessor=preprocessor,
        dropout=task.dropout,
        head_bias_init=task.head_bias_init,
        head_kernel_zero_init=task.head_kernel_zero_init,
    )
    _copy_weights(task.head, classifier.head)
    return classifier
