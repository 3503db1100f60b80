"""Export for serving: a TensorFlow SavedModel or an ONNX file, from every backend.

`export_model(model, path, format)` (and `model.export(path, format=...)` on
every model of the zoo) traces the model's forward pass, `model(inputs,
training=False)`, on pixels as the model takes them: the exported artifact
does not preprocess (apply the task's image converter first, or see the
`preprocessing` that `keras-vmoe export` prints).

What runs where (Keras 3.15; the reasons are upstream's):

| backend    | SavedModel (`tf.saved_model.load`) | ONNX (onnxruntime)                 |
|------------|------------------------------------|------------------------------------|
| JAX        | yes, any batch size                | yes, fixed batch size (jax2onnx)   |
| TensorFlow | yes, any batch size                | yes, any batch size (tf2onnx)      |
| PyTorch    | no (see `UNSUPPORTED`)             | yes, fixed batch size (torch.export) |

While a model is traced for export, `keras_vmoe.ops.portable()` makes the
routers use a sort-based top-k (JAX's TopK lowers to a StableHLO composite
that TensorFlow's SavedModel reader cannot deserialise) and the reference
dispatch (no shape that depends on the routing).
"""

import importlib
import os
import pathlib
import shutil
import tempfile

import keras
import numpy as np

from keras_vmoe import ops as moe_ops

FORMATS = ("saved_model", "onnx")
# Keras' names for the same formats, accepted by `model.export` too.
KERAS_FORMATS = {"tf_saved_model": "saved_model", "saved_model": "saved_model", "onnx": "onnx"}

UNSUPPORTED = {
    ("torch", "saved_model"): (
        "a TensorFlow SavedModel cannot be exported from the PyTorch backend: Keras 3.15 traces "
        "PyTorch models with torch.export for it, which rejects the input structure of keras-hub "
        "tasks ('mismatch between the structure of inputs and dynamic_shapes'). Export to ONNX "
        "from PyTorch (format='onnx'), or export the SavedModel with KERAS_BACKEND=jax or "
        "tensorflow (the weights load unchanged on every backend)"
    ),
}
# Model classes an exporter cannot handle, by (class name, backend, format).
UNSUPPORTED_MODELS = {
    ("PaliGemmaMoEBackbone", "jax", "onnx"): (
        "ONNX export from JAX fails in jax2onnx 0.17, which cannot convert the one-argument "
        "jnp.arange(n) of keras-hub's PaliGemmaDecoderBlock; export to ONNX with "
        "KERAS_BACKEND=tensorflow or torch, or a SavedModel from JAX"
    ),
}


def _class_names(model):
    """Names of `model`'s classes and of its backbone's (a task holds one)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and backbone is not model:
        names |= {cls.__name__ for cls in type(backbone).__mro__}
    return names


# The converter each backend's ONNX export needs (`pip install keras-vmoe[export]`).
ONNX_CONVERTERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "onnxscript"}


class ExportError(ValueError):
    """A model cannot be exported in the asked format on this backend."""


def check_export_supported(format, backend=None):
    """Raises `ExportError` naming the reason (and what works) when `format`
    cannot be exported from `backend` (default: the current one)."""
    backend = backend or keras.backend.backend()
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {list(FORMATS)}")
    reason = UNSUPPORTED.get((backend, format))
    if reason is not None:
        raise ExportError(reason)
    if format == "onnx":
        module = ONNX_CONVERTERS.get(backend)
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ExportError(
                f"ONNX export on the {backend} backend needs {module}, which is not installed "
                f"({error}); install it with `pip install keras-vmoe[export]`"
            ) from error


def input_signature(model, batch_size=None, sequence_length=None):
    """The model's inputs as `keras.InputSpec`s, in the structure of
    `model.input`: the batch dimension is `batch_size` (None: any), any other
    unknown dimension (a text length) is `sequence_length`."""

    def spec(tensor):
        dims = tuple(sequence_length if dim is None else dim for dim in tensor.shape[1:])
        return keras.InputSpec(shape=(batch_size, *dims), dtype=tensor.dtype)

    return keras.tree.map_structure(spec, model.input)


def _zeros(signature):
    return keras.tree.map_structure(
        lambda spec: np.zeros(spec.shape, keras.backend.standardize_dtype(spec.dtype)), signature
    )


def export_model(model, path, format="saved_model", batch_size=None, sequence_length=None, verbose=False):
    """Exports `model`'s forward pass for serving.

    Args:
        model: a built Keras functional model of this zoo (a task or a
            backbone).
        path: the SavedModel folder, or the `.onnx` file, to write. Written
            under a temporary name first: a failed export leaves nothing.
        format: `"saved_model"` (TensorFlow Serving; `tf.saved_model.load`)
            or `"onnx"` (onnxruntime).
        batch_size: int or None. The batch dimension of the exported inputs.
            None: any batch size where the exporter allows it (SavedModel,
            ONNX from TensorFlow), else 1 (ONNX from JAX and PyTorch, whose
            exporters trace the routing with static shapes).
        sequence_length: int or None. The length of inputs whose length the
            model leaves open (text: the VLM's token ids). None keeps it open
            where the exporter allows it; JAX's and PyTorch's ONNX exporters
            need it.
        verbose: bool. Let the exporter print.

    Returns:
        The path written, as a string.

    Example:
    >>> import tempfile
    >>> import onnxruntime
    >>> from keras_vmoe.models import VMoEBackbone, VMoEImageClassifier
    >>> backbone = VMoEBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=2,
    ...     hidden_dim=16, mlp_dim=32, num_heads=2, moe_layers=(1,), num_experts=4)
    >>> classifier = VMoEImageClassifier(backbone, num_classes=3)
    >>> path = export_model(classifier, tempfile.mkdtemp() + "/model.onnx", "onnx", batch_size=2)
    >>> session = onnxruntime.InferenceSession(path)
    >>> name = session.get_inputs()[0].name
    >>> session.run(None, {name: np.zeros((2, 16, 16, 3), "float32")})[0].shape
    (2, 3)

    From JAX or TensorFlow, `export_model(classifier, "served")` writes a
    SavedModel that `tf.saved_model.load("served").serve(images)` runs.
    """
    backend = keras.backend.backend()
    format = KERAS_FORMATS.get(format, format)
    check_export_supported(format, backend)
    if getattr(model, "input", None) is None:
        raise ExportError(f"{type(model).__name__} has no known inputs; build or call it first")
    for name, value in (("batch_size", batch_size), ("sequence_length", sequence_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ExportError(f"{name} must be a positive int or None, got {value!r}")
    reason = next(
        (
            why
            for (name, where, what), why in UNSUPPORTED_MODELS.items()
            if where == backend and what == format and name in _class_names(model)
        ),
        None,
    )
    if reason is not None:
        raise ExportError(f"{type(model).__name__}: {reason}")
    static = format == "onnx" and backend in ("jax", "torch")
    if static and batch_size is None:
        batch_size = 1
    signature = input_signature(model, batch_size, sequence_length)
    if backend != "tensorflow" and any(None in spec.shape[1:] for spec in keras.tree.flatten(signature)):
        raise ExportError(
            f"{type(model).__name__} takes inputs of open length "
            f"({[tuple(spec.shape) for spec in keras.tree.flatten(signature)]}), which only "
            f"the TensorFlow backend exports as such (on {backend}, shape polymorphism cannot "
            "trace keras-hub's decoder, or the exporter needs static shapes); pass "
            "sequence_length=N (keras-vmoe export --sequence-length N)"
        )
    path = pathlib.Path(path)
    if format == "onnx" and path.suffix != ".onnx":
        raise ExportError(f"an ONNX export is written to a .onnx file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = staging / path.name
    try:
        with moe_ops.portable():
            if format == "onnx" and backend == "torch":
                # PyTorch-only module: imported on that backend alone.
                from keras_vmoe.ops.tools.torch_onnx import export_onnx

                export_onnx(model, target, _zeros(signature))
            else:
                keras.Model.export(
                    model,
                    str(target),
                    format="tf_saved_model" if format == "saved_model" else "onnx",
                    verbose=verbose,
                    input_signature=[signature],
                )
        # Everything the exporter wrote (jax2onnx puts large weights in a
        # `.onnx.data` file beside the model, named in it).
        for written in staging.iterdir():
            destination = path.parent / written.name
            if destination.is_dir():
                shutil.rmtree(destination)
            elif destination.exists():
                destination.unlink()
            os.replace(written, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(path)


class ExportMixin:
    """`model.export(path, format="tf_saved_model" | "onnx")` through
    `export_model`, so that a MoE model exports from every backend."""

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        if KERAS_FORMATS.get(format) is None or input_signature is not None or kwargs:
            # Other formats (openvino, litert) and custom signatures: Keras' own.
            return super().export(
                filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
            )
        return export_model(self, filepath, format, verbose=bool(verbose))
