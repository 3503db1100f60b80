"""Converts google-research/vmoe checkpoints into keras_vmoe classifiers.

`load_vmoe_checkpoint(prefix, model_config)` takes the keyword arguments of
vmoe's `VisionTransformerMoe` (the `config.model` of vmoe's configs), builds
the matching `VMoEImageClassifier` (token- or expert-choice routers) or
`SoftMoEImageClassifier` (`SoftRouter`), and assigns every parameter of the
checkpoint through one name table. Shapes are all checked before anything is
assigned; a missing, extra or misshapen parameter raises an error naming it.
"""

import math
import os

import keras
import numpy as np

from keras_vmoe.convert.vmoe_checkpoint_reader import read_vmoe_checkpoint
from keras_vmoe.convert.vmoe_orbax_reader import read_vmoe_orbax_checkpoint
from keras_vmoe.errors import CheckpointError
from keras_vmoe.layers import SoftMoE
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier

TOKEN_CHOICE_ROUTERS = ("NoisyTopExpertsPerItemRouter",)
EXPERT_CHOICE_ROUTERS = ("NoisyTopItemsPerExpertRouter",)
SOFT_ROUTERS = ("SoftRouter",)
# vmoe's optimal-transport routers (projects/sparsity_constrained_ot): class
# name -> (our router name, its fixed options).
OT_ROUTERS = {
    "KLProjectionNoisyTopExpertsPerItemRouter": ("sinkhorn_token_choice", {}),
    "KLProjectionNoisyTopItemsPerExpertRouter": ("sinkhorn_expert_choice", {}),
    "KSparseProjectionTransportTopExpertsPerItemRouter": ("sparse_token_choice", {}),
    "KSparseProjectionTransportTopItemsPerExpertRouter": ("sparse_expert_choice", {"projection": "k_sparse"}),
    "SparseProjectionTransportTopItemsPerExpertRouter": ("sparse_expert_choice", {"projection": "dense"}),
}
_MODEL_KEYS = {
    "name",
    "num_classes",
    "patch_size",
    "hidden_size",
    "encoder",
    "classifier",
    "representation_size",
    "deterministic",
    "head_bias_init",
    "head_kernel_zero_init",
}
_ENCODER_KEYS = {
    "num_layers",
    "mlp_dim",
    "num_heads",
    "dropout_rate",
    "attention_dropout_rate",
    "attention_qk_norm",
    "moe",
    "position_emb",
    "deterministic",
}
_MOE_KEYS = {
    "layers",
    "num_experts",
    "group_size",
    "router",
    "dropout_rate",
    "split_rngs",
    "deterministic",
    "ensemble_size",
}


OT_KINDS = frozenset(kind for kind, _ in OT_ROUTERS.values())


def _check_keys(where, mapping, known):
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(
            f"vmoe model config: {where} has keys this converter does not know: "
            f"{unknown}. Known keys: {sorted(known)}."
        )


def _router_kind(router):
    name = str(router.get("name", "NoisyTopExpertsPerItemRouter")).rsplit(".", 1)[-1]
    for kind, names in (
        ("token_choice", TOKEN_CHOICE_ROUTERS),
        ("expert_choice", EXPERT_CHOICE_ROUTERS),
        ("soft", SOFT_ROUTERS),
    ):
        if name in names:
            return kind
    if name in OT_ROUTERS:
        return OT_ROUTERS[name][0]
    known = TOKEN_CHOICE_ROUTERS + EXPERT_CHOICE_ROUTERS + SOFT_ROUTERS + tuple(OT_ROUTERS)
    raise ValueError(
        f"vmoe model config: unsupported router {router.get('name')!r}; this converter knows "
        f"{', '.join(known)}."
    )


def _ot_router_options(router, kind):
    """Our router's own options from a vmoe OT router config (vmoe's defaults)."""
    name = str(router["name"]).rsplit(".", 1)[-1]
    options = dict(OT_ROUTERS[name][1])
    maxiter = router.get("maxiter", 20)
    softmax_combine = router.get("use_softmax_combine_weights", True)
    if kind.startswith("sinkhorn"):
        if router.get("use_lbfgs", False):
            raise ValueError(
                f"vmoe model config: {name} with use_lbfgs=True (jaxopt's LBFGS) is not supported; "
                "the Sinkhorn solver (use_lbfgs=False) is."
            )
        # ott runs its fixed loop in steps of 10 iterations.
        options.update(
            num_iterations=10 * (maxiter // 10), combine_weights="softmax" if softmax_combine else "plan"
        )
    else:
        if not softmax_combine:
            raise ValueError(
                f"vmoe model config: {name} with use_softmax_combine_weights=False is not supported."
            )
        options.update(max_steps=maxiter, learning_rate=router.get("adam_lr", 1e-2))
    return options


def _moe_arguments(moe, bfloat16_dispatch):
    """Backbone arguments for the MoE part of a vmoe encoder config."""
    _check_keys("encoder.moe", moe, _MOE_KEYS)
    router = dict(moe.get("router") or {})
    ensemble_size = moe.get("ensemble_size")
    if ensemble_size is not None and "name" in router:
        # vmoe's VisionTransformerMoeEnsemble names its router class itself.
        raise ValueError(
            "vmoe model config: an E^3 config (encoder.moe.ensemble_size) takes no router 'name' "
            f"(vmoe always uses NoisyTopExpertsPerItemEnsembleRouter); got {router['name']!r}."
        )
    kind = _router_kind(router)
    arguments = dict(
        moe_layers=tuple(moe.get("layers", ())),
        num_experts=moe["num_experts"],
        group_size=moe.get("group_size"),
    )
    if "dropout_rate" in moe:
        arguments["moe_dropout_rate"] = moe["dropout_rate"]
    if kind == "soft":
        num_slots = router.get("num_slots")
        if num_slots is not None:
            arguments.update(slots_per_expert=num_slots, capacity_factor=None)
        else:
            arguments.update(slots_per_expert=None, capacity_factor=router.get("capacity_factor", 1.0))
        arguments["noise_std"] = router.get("noise_std", 0.0)
        # vmoe's SoftRouter always wraps its dispatcher in bfloat16.
        use_bfloat16 = True if bfloat16_dispatch is None else bfloat16_dispatch
        arguments["dispatch_dtype"] = "bfloat16" if use_bfloat16 else None
        return kind, arguments

    dispatcher = dict(router.get("dispatcher") or {})
    if dispatcher.get("capacity") is not None:
        raise ValueError(
            "vmoe model config: a fixed dispatcher 'capacity' is not supported; give 'capacity_factor'."
        )
    use_bfloat16 = dispatcher.get("bfloat16", False) if bfloat16_dispatch is None else bfloat16_dispatch
    options = dict(
        noise_std=router.get("noise_std", 1.0),
        capacity_rounding=dispatcher.get("capacity_ceil_or_round", "ceil"),
        capacity_multiple_of=dispatcher.get("capacity_multiple_of", 4),
        dispatch_dtype="bfloat16" if use_bfloat16 else None,
    )
    if kind in OT_KINDS:
        options.update(_ot_router_options(router, kind))
    if kind == "token_choice":
        options.update(
            # vmoe's router class defaults.
            importance_loss_weight=router.get("importance_loss_weight", 1.0),
            load_loss_weight=router.get("load_loss_weight", 1.0),
            gshard_loss_weight=router.get("gshard_loss_weight", 0.0),
        )
    elif kind == "sinkhorn_token_choice":  # Its own defaults; no GShard loss.
        options.update(
            importance_loss_weight=router.get("importance_loss_weight", 0.0),
            load_loss_weight=router.get("load_loss_weight", 0.0),
            gshard_loss_weight=0.0,
        )
    elif kind == "sparse_token_choice":  # vmoe computes no loss for it.
        options.update(importance_loss_weight=0.0, load_loss_weight=0.0, gshard_loss_weight=0.0)
    if kind in ("token_choice", "sinkhorn_token_choice", "sparse_token_choice"):
        arguments.update(
            num_selected_experts=router.get("num_selected_experts", 1),
            batch_priority=dispatcher.get("batch_priority", False),
        )
    arguments.update(
        router=kind,
        capacity_factor=dispatcher.get("capacity_factor", 1.0),
        router_options=options,
    )
    if ensemble_size is not None:
        arguments["ensemble_size"] = ensemble_size
    return kind, arguments


def backbone_from_vmoe_config(model_config, image_shape, bfloat16_dispatch=None, dtype=None):
    """Builds the backbone that matches a vmoe `VisionTransformerMoe` config."""

    _check_keys("the model", model_config, _MODEL_KEYS)
    encoder = dict(model_config["encoder"])
    _check_keys("encoder", encoder, _ENCODER_KEYS)
    classifier = model_config.get("classifier", "token")
    if classifier == "0":
        classifier = "token"
    position = (encoder.get("position_emb") or {}).get("name", "learned")
    position = {"none": None}.get(position, position)
    arguments = dict(
        image_shape=image_shape,
        patch_size=tuple(model_config["patch_size"]),
        num_layers=encoder["num_layers"],
        hidden_dim=model_config["hidden_size"],
        mlp_dim=encoder["mlp_dim"],
        num_heads=encoder["num_heads"],
        pooling=classifier,
        use_class_token=classifier == "token",
        position_embedding=position,
        attention_qk_norm=encoder.get("attention_qk_norm", False),
        representation_size=model_config.get("representation_size"),
        dropout_rate=encoder.get("dropout_rate", 0.0),
        attention_dropout_rate=encoder.get("attention_dropout_rate", 0.0),
        approximate_gelu=True,  # flax's nn.gelu default.
        dtype=dtype,
    )
    moe = encoder.get("moe")
    if moe and moe.get("ensemble_size") is not None:
        # vmoe's EncoderMoeEnsemble always has learned position embeddings
        # and never passes attention_qk_norm to its blocks.
        arguments.update(position_embedding="learned", attention_qk_norm=False)
    if not moe or not moe.get("layers"):
        return VMoEBackbone(**arguments)
    kind, moe_arguments = _moe_arguments(dict(moe), bfloat16_dispatch)
    arguments.update(moe_arguments)
    if kind == "soft":
        return SoftMoEBackbone(**arguments)
    return VMoEBackbone(**arguments)


def _image_shape_from_params(params, model_config):
    """Infers (height, width, channels) from the embedding and position table."""
    kernel = params.get("embedding/kernel")
    if kernel is None:
        raise CheckpointError("The checkpoint has no 'embedding/kernel' parameter.")
    patch = tuple(model_config["patch_size"])
    channels = kernel.shape[2]
    table = params.get("Encoder/posembed_input/pos_embedding")
    if table is None:
        raise ValueError(
            "This checkpoint has no learned position embedding, so the image "
            "size cannot be inferred: pass image_shape=(height, width, channels)."
        )
    num_patches = table.shape[1] - int("cls" in params)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"The position embedding has {num_patches} patch positions, not a "
            "square grid: pass image_shape explicitly."
        )
    return (side * patch[0], side * patch[1], channels)


def _attention_table(prefix, layer):
    table = {}
    for name in ("query", "key", "value", "out"):
        dense = getattr(layer, name)
        table[f"{prefix}/{name}/kernel"] = dense.kernel
        table[f"{prefix}/{name}/bias"] = dense.bias
    if layer.qk_norm:
        table[f"{prefix}/query_ln/scale"] = layer.query_norm.gamma
        table[f"{prefix}/key_ln/scale"] = layer.key_norm.gamma
    return table


def _layer_norm_table(prefix, layer):
    return {f"{prefix}/scale": layer.gamma, f"{prefix}/bias": layer.beta}


def _mlp_table(prefix, mlp):
    return {
        f"{prefix}/Dense_0/kernel": mlp.dense_0.kernel,
        f"{prefix}/Dense_0/bias": mlp.dense_0.bias,
        f"{prefix}/Dense_1/kernel": mlp.dense_1.kernel,
        f"{prefix}/Dense_1/bias": mlp.dense_1.bias,
    }


def vmoe_name_table(classifier):
    """{vmoe parameter path: our variable} for a classifier (or backbone)."""

    backbone = getattr(classifier, "backbone", classifier)
    table = {
        "embedding/kernel": backbone.get_layer("patch_embedding").conv.kernel,
        "embedding/bias": backbone.get_layer("patch_embedding").conv.bias,
    }
    if backbone.use_class_token:
        table["cls"] = backbone.get_layer("class_token").token
    if backbone.position_embedding == "learned":
        table["Encoder/posembed_input/pos_embedding"] = backbone.get_layer("position_embedding").embedding
    for index, block in enumerate(backbone.encoder_blocks):
        prefix = f"Encoder/encoderblock_{index}"
        table.update(_layer_norm_table(f"{prefix}/LayerNorm_0", block.attention_norm))
        table.update(_attention_table(f"{prefix}/SelfAttention", block.attention))
        table.update(_layer_norm_table(f"{prefix}/LayerNorm_1", block.mlp_norm))
        if index in backbone.moe_layers:
            moe = block.mlp
            table.update(
                {
                    f"{prefix}/Moe/Mlp/Dense_0/kernel": moe.kernel_0,
                    f"{prefix}/Moe/Mlp/Dense_0/bias": moe.bias_0,
                    f"{prefix}/Moe/Mlp/Dense_1/kernel": moe.kernel_1,
                    f"{prefix}/Moe/Mlp/Dense_1/bias": moe.bias_1,
                }
            )
            if isinstance(moe, SoftMoE):
                table[f"{prefix}/Moe/Router/mu"] = moe.router.mu
                table[f"{prefix}/Moe/Router/scale"] = moe.router.scale
            else:
                table[f"{prefix}/Moe/Router/dense/kernel"] = moe.router.kernel
        else:
            table.update(_mlp_table(f"{prefix}/Mlp", block.mlp))
    return table | _head_table(backbone, classifier)


def _head_table(backbone, classifier):
    table = {}
    table.update(_layer_norm_table("Encoder/encoder_norm", backbone.get_layer("encoder_norm")))
    if backbone.pooling == "map":
        pooling = backbone.get_layer("map_pooling")
        table["MapHead/probe"] = pooling.probe
        table.update(_attention_table("MapHead/MultiHeadDotProductAttention", pooling.attention))
        table.update(_layer_norm_table("MapHead/LayerNorm", pooling.norm))
        table.update(_mlp_table("MapHead/Mlp", pooling.mlp))
    if backbone.representation_size is not None:
        pre_logits = backbone.get_layer("pre_logits")
        table["pre_logits/kernel"] = pre_logits.kernel
        table["pre_logits/bias"] = pre_logits.bias
    if backbone is not classifier:
        table["head/kernel"] = classifier.head.kernel
        table["head/bias"] = classifier.head.bias
    return table


def ensemble_router_kernels(params, classifier, source):
    """vmoe's E^3 router kernels (D, M, E / M) -> ours (D, E), C order (pool
    m owns experts m * E / M ... (m + 1) * E / M - 1). `params` is changed."""
    backbone = getattr(classifier, "backbone", classifier)
    members = getattr(backbone, "ensemble_size", 1)
    if members == 1:
        return params
    for index, moe in zip(backbone.moe_layers, backbone.moe_mlps):
        path = f"Encoder/encoderblock_{index}/Moe/Router/dense/kernel"
        kernel = params.get(path)
        expected = (moe.router.kernel.shape[0], members, moe.num_experts // members)
        if kernel is None:
            continue  # assign_parameters names it.
        if tuple(kernel.shape) != expected:
            raise CheckpointError(
                f"{source}: the E^3 router kernel {path!r} has shape {tuple(kernel.shape)}, but the "
                f"config (ensemble_size={members}, num_experts={moe.num_experts}) expects {expected} "
                "(hidden size, members, experts per member)."
            )
        params[path] = np.reshape(np.asarray(kernel), (expected[0], -1))
    return params


def assign_parameters(table, params, source, verbose=False):
    """Assigns `params` to the variables of `table`, all or nothing.

    Every parameter must have a variable and every variable a parameter, with
    equal shapes; otherwise nothing is assigned and the error names them.
    """
    missing = sorted(set(table) - set(params))
    extra = sorted(set(params) - set(table))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not fit the model config: "
            + (f"parameters missing from the checkpoint: {missing}. " if missing else "")
            + (f"checkpoint parameters the model does not have: {extra}." if extra else "")
        )
    for path, variable in table.items():
        if tuple(params[path].shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{source}: parameter {path!r} has shape {tuple(params[path].shape)} "
                f"but the model built from the config expects {tuple(variable.shape)}."
            )
    progress = keras.utils.Progbar(len(table), unit_name="parameter") if verbose else None
    for number, (path, variable) in enumerate(table.items(), start=1):
        variable.assign(np.asarray(params[path], dtype="float32").astype(variable.dtype))
        if progress is not None and (number % 20 == 0 or number == len(table)):
            progress.update(number)


def load_vmoe_checkpoint(
    prefix,
    model_config,
    image_shape=None,
    bfloat16_dispatch=None,
    dtype=None,
    preprocessor=None,
    verbose=False,
):
    """Loads a google-research/vmoe checkpoint as a keras_vmoe classifier.

    Args:
        prefix: checkpoint path without `.index` / `.data-*` (a local path;
            download `gs://vmoe_checkpoints/<name>.*` first), or a directory:
            an Orbax checkpoint of vmoe's trainer, `workdir/ckpt` (its latest
            step), `ckpt/<step>` or `ckpt/<step>/state` (needs
            `pip install "keras-vmoe[orbax]"`; see `read_vmoe_orbax_checkpoint`).
        model_config: the vmoe model config dict (`config.model` in vmoe's
            configs: `num_classes`, `patch_size`, `hidden_size`, `classifier`,
            `encoder: {num_layers, mlp_dim, num_heads, moe: {...}}`).
        image_shape: (height, width, channels). Default: inferred from the
            checkpoint's position embedding (square images).
        bfloat16_dispatch: None (as vmoe: the config's dispatcher `bfloat16`
            flag; always for Soft MoE), True or False.
        dtype: dtype policy of the model (default float32).
        preprocessor: optional preprocessor of the classifier (e.g. a
            `VMoEImageClassifierPreprocessor` that scales uint8 pixels to
            [-1, 1]); `predict` / `fit` on raw images then go through it.
        verbose: progress bars while reading and assigning the parameters.

    Returns:
        A `VMoEImageClassifier` or `SoftMoEImageClassifier` (the backbone alone
        when `num_classes` is empty). vmoe models take pixels in [-1, 1].

    Example:
    ```python
    config = json.load(open("fixtures/vmoe/vmoe_tiny_token_choice/config.json"))
    model = load_vmoe_checkpoint("fixtures/vmoe/vmoe_tiny_token_choice/ckpt", config)
    logits = model.predict(images)
    ```
    """

    path = os.fspath(prefix)
    if os.path.isdir(path) and not os.path.exists(path + ".index"):
        params = read_vmoe_orbax_checkpoint(path, verbose=verbose)
    else:
        params = read_vmoe_checkpoint(path, verbose=verbose)
    if image_shape is None:
        image_shape = _image_shape_from_params(params, model_config)
    backbone = backbone_from_vmoe_config(model_config, image_shape, bfloat16_dispatch, dtype)
    num_classes = model_config.get("num_classes")
    if num_classes:
        task = SoftMoEImageClassifier if isinstance(backbone, SoftMoEBackbone) else VMoEImageClassifier
        model = task(
            backbone,
            num_classes,
            head_bias_init=model_config.get("head_bias_init", 0.0),
            head_kernel_zero_init=model_config.get("head_kernel_zero_init", True),
            preprocessor=preprocessor,
        )
    else:
        model = backbone
    params = ensemble_router_kernels(dict(params), model, f"Checkpoint {prefix}")
    assign_parameters(vmoe_name_table(model), params, f"Checkpoint {prefix}", verbose=verbose)
    return model
