"""ONNX export of a Keras model on the PyTorch backend (`keras_vmoe.export`).

Keras' own path (`Model.export(format="onnx")` on torch) falls back to the
TorchScript exporter when torch.export fails, and that one rejects Keras
variables ("Cannot insert a Tensor that requires grad as a constant"). Here
the model goes through torch.export / the dynamo ONNX exporter only, with
static shapes, and two things it lacks:

- a translation of `aten.sort.stable` (the routers' batch-priority order and
  the sort-based top-k): ONNX `TopK` with `k` = the axis length, which breaks
  ties by the lower index first, exactly a stable sort;
- dict or list inputs, flattened to positional tensors.
"""

import torch
from keras import tree


def _sort_stable(self, stable=None, dim=-1, descending=False):
    # Optional dependency (keras-vmoe[export]), needed while exporting only.
    from onnxscript import opset18 as op

    length = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, length, axis=dim, largest=descending, sorted=True)
    return values, indices


class _FlatInputs(torch.nn.Module):
    """Calls `model` on the structure `example` with flat positional tensors."""

    def __init__(self, model, example):
        super().__init__()
        self.model = model
        self.example = example

    def forward(self, *flat):
        return self.model(tree.pack_sequence_as(self.example, flat), training=False)


def export_onnx(model, path, example_inputs):
    """Writes `model` traced on `example_inputs` (numpy, any structure) to the
    ONNX file `path`; input names are the flattened structure's keys or
    positions."""
    flat = [torch.as_tensor(x) for x in tree.flatten(example_inputs)]
    names = sorted(example_inputs) if isinstance(example_inputs, dict) else None
    module = _FlatInputs(model, example_inputs)
    module.train(False)  # Inference mode.
    program = torch.onnx.export(
        module,
        tuple(flat),
        dynamo=True,
        verbose=False,
        input_names=names,
        custom_translation_table={torch.ops.aten.sort.stable: _sort_stable},
    )
    program.optimize()
    program.save(str(path))


def onnx_converter_missing():
    """The module the dynamo ONNX exporter needs and cannot import, or None."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "onnxscript"
    return None
