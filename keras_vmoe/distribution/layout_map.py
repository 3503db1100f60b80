"""Layout maps for expert parallelism, and the checks that keep them honest.

`get_layout_map` returns an ordinary `keras.distribution.LayoutMap`; pass it
to `keras.distribution.ModelParallel` and build or load the model inside
that distribution's scope. Keys are regular expressions over variable paths
(`encoder_block_3/moe/kernel_0`), and over `<layer path>/dispatched` for the
expert inputs of a MoE layer (see `expert_exchange`).
"""

import re

import keras

from keras_vmoe.distribution.expert_exchange import DISPATCHED

# The last path component of a MoE layer: the backbones name theirs "moe";
# Keras names a bare `SparseMoE` / `SoftMoE` "sparse_mo_e" / "soft_mo_e".
MOE_LAYER = r".*mo_?e[^/]*"
# Expert weight banks (vmoe's layout), E first: name -> rank.
EXPERT_BANKS = {"kernel_0": 3, "bias_0": 2, "kernel_1": 3, "bias_1": 2}


def _check_axis(device_mesh, argument, axis):
    if axis is not None and axis not in device_mesh.axis_names:
        raise ValueError(
            f"get_layout_map: {argument}={axis!r} is not an axis of the device mesh; "
            f"its axes are {tuple(device_mesh.axis_names)} (shape {tuple(device_mesh.shape)})."
        )


def get_layout_map(device_mesh, expert_axis="expert", batch_axis="batch", model_axis=None):
    """A `LayoutMap` that shards every expert weight bank over `expert_axis`.

    - `kernel_0` (E, D, H), `bias_0` (E, H), `kernel_1` (E, H, D), `bias_1`
      (E, D) of every `SparseMoE` / `SoftMoE`: E over `expert_axis`, so each
      device holds E / (size of that axis) experts of every bank;
    - the dispatched (E, G * C, D) expert inputs: E over `expert_axis`, the
      groups' slots over `batch_axis`; with it the layers turn dispatch and
      combine into all-to-all exchanges on the expert axis (vmoe's scheme);
    - with `model_axis`, attention (heads) and dense MLPs (hidden units) are
      sharded over it, Megatron style. It may be the expert axis itself.

    Everything else (embeddings, norms, routers, the head) is replicated.
    Use it with `keras.distribution.ModelParallel(layout_map=...,
    batch_dim_name=batch_axis)`; check it against a model with
    `validate_layout_map`.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        expert_axis: str. The mesh axis the experts are sharded over; its
            size must divide every MoE layer's `num_experts`.
        batch_axis: str or None. The mesh axis the data is sharded over (the
            distribution's `batch_dim_name`). It may equal `expert_axis`
            (vmoe's layout on a 1-D mesh: data and experts on all devices).
        model_axis: str or None. Shard attention and dense MLPs over it.

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"))
    layout_map = keras_vmoe.distribution.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        classifier = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    ```
    """
    if keras.backend.backend() != "jax":
        # TensorFlow accepts a ModelParallel but shards nothing; PyTorch has no
        # keras.distribution backend at all (see the README).
        raise ValueError(
            f"get_layout_map: keras.distribution shards models only on the JAX backend "
            f"(Keras {keras.__version__}); the current backend is "
            f"'{keras.backend.backend()}'. Run with KERAS_BACKEND=jax for expert "
            "parallelism; on TensorFlow, tf.distribute.MirroredStrategy replicates "
            "the whole model (all experts on every device) for data parallelism."
        )
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            f"get_layout_map: device_mesh must be a keras.distribution.DeviceMesh, got {device_mesh!r}."
        )
    if expert_axis is None:
        raise ValueError("get_layout_map: expert_axis must name a mesh axis, got None.")
    _check_axis(device_mesh, "expert_axis", expert_axis)
    _check_axis(device_mesh, "batch_axis", batch_axis)
    _check_axis(device_mesh, "model_axis", model_axis)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for name, rank in EXPERT_BANKS.items():
        layout_map[f"{MOE_LAYER}/{name}"] = (expert_axis,) + (None,) * (rank - 1)
    slots_axis = None if batch_axis == expert_axis else batch_axis
    layout_map[f"{MOE_LAYER}/{DISPATCHED}"] = (expert_axis, slots_axis, None)
    if model_axis is not None:
        # Heads of query/key/value (D, heads, head_dim) and out (heads, head_dim, D).
        layout_map[r".*attention/(query|key|value)/kernel"] = (None, model_axis, None)
        layout_map[r".*attention/(query|key|value)/bias"] = (model_axis, None)
        layout_map[r".*attention/out/kernel"] = (model_axis, None, None)
        # Hidden units of the dense MLPs (D, H) and (H, D).
        layout_map[r".*mlp/dense_0/kernel"] = (None, model_axis)
        layout_map[r".*mlp/dense_0/bias"] = (model_axis,)
        layout_map[r".*mlp/dense_1/kernel"] = (model_axis, None)
    return layout_map


def _axis_sizes(layout):
    mesh = layout.device_mesh
    return dict(zip(mesh.axis_names, mesh.shape))


def _check_divides(layout, shape, what, owner=None):
    """Raises if a sharded dimension of `shape` does not split evenly."""
    if len(layout.axes) != len(shape):
        raise ValueError(
            f"{what}: its layout {layout.axes} has {len(layout.axes)} axes but the "
            f"tensor has rank {len(shape)} (shape {tuple(shape)})."
        )
    sizes = _axis_sizes(layout)
    for dim, (axis, size) in enumerate(zip(layout.axes, shape)):
        if axis is None or size is None or size % sizes[axis] == 0:
            continue
        if owner is not None and dim == 0:
            raise ValueError(
                f"{what}: {type(owner).__name__} has num_experts={size}, but the expert "
                f"mesh axis '{axis}' has {sizes[axis]} devices; {sizes[axis]} does not "
                f"divide {size}. Use a mesh whose expert axis size divides {size}."
            )
        raise ValueError(
            f"{what}: dimension {dim} (size {size}) is sharded over mesh axis '{axis}' "
            f"of size {sizes[axis]}, which does not divide it."
        )


def check_expert_layouts(layer, dim, hidden):
    """Called by a MoE layer before it creates its expert banks: with an
    active distribution, every bank's layout must split E evenly."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    shapes = {
        "kernel_0": (layer.num_experts, dim, hidden),
        "bias_0": (layer.num_experts, hidden),
        "kernel_1": (layer.num_experts, hidden, dim),
        "bias_1": (layer.num_experts, dim),
    }
    for name, shape in shapes.items():
        path = f"{layer.path}/{name}"
        layout = distribution.get_tensor_layout(path)
        if layout is not None:
            _check_divides(layout, shape, f"variable '{path}'", owner=layer)
    layout = distribution.get_tensor_layout(f"{layer.path}/{DISPATCHED}")
    if layout is not None and layout.axes[0] is not None:
        _check_divides(
            keras.distribution.TensorLayout(layout.axes[:1], layout.device_mesh),
            (layer.num_experts,),
            f"the expert inputs of '{layer.path}'",
            owner=layer,
        )


def is_moe_layer(layer):
    """Whether `layer` is a keras_vmoe MoE layer (`SparseMoE`, `SoftMoE`):
    told by its expert banks, so that this module, which the MoE layers
    import, does not import them back."""
    return hasattr(layer, "build_experts") and hasattr(layer, "router")


def validate_layout_map(layout_map, model):
    """Checks a `LayoutMap` against a built model; raises `ValueError` if not.

    - every key matches at least one variable path of the model, or a
      `<layer path>/output` (Keras' layer-output layouts) or a
      `<MoE layer path>/dispatched` of it (a typo would silently replicate);
    - every sharded variable dimension is divisible by its mesh axis (for
      the expert banks: the expert axis size divides num_experts);
    - no variable path matches two keys (Keras raises that at lookup too).

    Returns the {variable path: layout axes} of the sharded variables.
    """
    variables = {variable.path: variable for variable in model.variables}
    layers = list(model._flatten_layers(include_self=False))
    tensors = [f"{layer.path}/output" for layer in layers]
    tensors += [f"{layer.path}/{DISPATCHED}" for layer in layers if is_moe_layer(layer)]
    for key in layout_map:
        if not any(key == path or re.fullmatch(key, path) for path in (*variables, *tensors)):
            examples = ", ".join(repr(path) for path in list(variables)[:4])
            raise ValueError(
                f"Layout map key {key!r} matches no variable of model '{model.name}' "
                f"(nor a layer's '<path>/output' or a MoE layer's '<path>/{DISPATCHED}'). "
                f"Keys are regular expressions matched against whole paths, such as "
                f"{examples}; print(*(v.path for v in model.variables)) lists them all."
            )
    moe_layers = {layer.path: layer for layer in layers if is_moe_layer(layer)}
    sharded = {}
    for path, variable in variables.items():
        layout = layout_map[path]
        if layout is None:
            continue
        owner = moe_layers.get(path.rsplit("/", 1)[0])
        is_bank = owner is not None and path.rsplit("/", 1)[1] in EXPERT_BANKS
        _check_divides(layout, variable.shape, f"variable '{path}'", owner if is_bank else None)
        sharded[path] = layout.axes
    for path, layer in moe_layers.items():
        layout = layout_map[f"{path}/{DISPATCHED}"]
        if layout is not None and layout.axes[0] is not None:
            _check_divides(
                keras.distribution.TensorLayout(layout.axes[:1], layout.device_mesh),
                (layer.num_experts,),
                f"the expert inputs of '{path}'",
                owner=layer,
            )
    return sharded
