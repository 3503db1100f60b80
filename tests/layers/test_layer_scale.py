"""LayerScale (CaiT, DINOv2): `EncoderBlock(layer_scale_init=...)` and the
backbones, presets and upcycling that carry it; without it, nothing changes."""

import h5py
import keras
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.layers.encoder import EncoderBlock
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import router_inputs
from tests.helpers import ROOT
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

DIM = 32
# An EncoderBlock's weights before LayerScale existed (and still without it).
BLOCK_WEIGHTS = [
    "attention_norm/gamma",
    "attention_norm/beta",
    "attention/query/kernel",
    "attention/query/bias",
    "attention/key/kernel",
    "attention/key/bias",
    "attention/value/kernel",
    "attention/value/bias",
    "attention/out/kernel",
    "attention/out/bias",
    "mlp_norm/gamma",
    "mlp_norm/beta",
    "mlp/dense_0/kernel",
    "mlp/dense_0/bias",
    "mlp/dense_1/kernel",
    "mlp/dense_1/bias",
]


def block(layer_scale_init=None, seed=0, build=True):
    keras.utils.set_random_seed(seed)
    layer = EncoderBlock(
        num_heads=2, mlp=Mlp(64, name="mlp"), layer_scale_init=layer_scale_init, name="block"
    )
    if not build:
        return layer
    layer.build((None, 5, DIM))
    # Non-trivial norms and biases, so that each branch matters.
    rng = np.random.RandomState(seed)
    for variable in layer.weights:
        if not variable.path.endswith(("kernel", "_scale")):
            variable.assign(to_numpy(variable) + rng.normal(0, 0.2, variable.shape).astype("float32"))
    return layer


def tokens(seed=0):
    return np.random.RandomState(seed).normal(size=(2, 5, DIM)).astype("float32")


def random_scales(model, seed=1):
    """Scales far from their initial value and from 1, different per channel."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        if variable.path.endswith(("attention_scale", "mlp_scale")):
            variable.assign(rng.uniform(0.1, 2.0, variable.shape).astype("float32"))


def test_layer_scale_multiplies_the_attention_and_mlp_branches():
    layer = block(layer_scale_init=0.5)
    np.testing.assert_array_equal(to_numpy(layer.attention_scale), np.full(DIM, 0.5, "float32"))
    np.testing.assert_array_equal(to_numpy(layer.mlp_scale), np.full(DIM, 0.5, "float32"))
    random_scales(layer)
    x = tokens()
    attention_scale, mlp_scale = to_numpy(layer.attention_scale), to_numpy(layer.mlp_scale)
    # x + s1 * attention(norm1(x)), then + s2 * mlp(norm2(.)), from the block's own sublayers.
    h = x + attention_scale * to_numpy(layer.attention(layer.attention_norm(x)))
    expected = h + mlp_scale * to_numpy(layer.mlp(layer.mlp_norm(h)))
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5, rtol=0)
    # Scales of 0 leave the residual stream alone; scales of 1 are the plain block.
    layer.attention_scale.assign(np.zeros(DIM, "float32"))
    layer.mlp_scale.assign(np.zeros(DIM, "float32"))
    np.testing.assert_array_equal(to_numpy(layer(x)), x)
    plain = block()
    for ours, theirs in zip(plain.weights, [w for w in layer.weights if not w.path.endswith("_scale")]):
        ours.assign(theirs)
    layer.attention_scale.assign(np.ones(DIM, "float32"))
    layer.mlp_scale.assign(np.ones(DIM, "float32"))
    np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(plain(x)), atol=1e-6, rtol=0)


def test_scale_weights_exist_only_when_asked_for():
    plain = block()
    assert [w.path for w in plain.weights] == [f"block/{name}" for name in BLOCK_WEIGHTS]
    assert not hasattr(plain, "attention_scale") and not hasattr(plain, "mlp_scale")
    scaled = block(layer_scale_init=1e-5)
    extra = [w for w in scaled.weights if w.path not in {v.path for v in plain.weights}]
    assert sorted(w.path for w in extra) == ["block/attention_scale", "block/mlp_scale"]
    assert all(tuple(w.shape) == (DIM,) and w.trainable for w in extra)
    assert len(scaled.trainable_weights) == len(plain.trainable_weights) + 2


def test_block_config_round_trip():
    layer = block(layer_scale_init=1)
    random_scales(layer)
    config = layer.get_config()
    assert config["layer_scale_init"] == 1.0 and isinstance(config["layer_scale_init"], float)
    assert block().get_config()["layer_scale_init"] is None
    # The config of the block before it was built (see the test below for why).
    clone = EncoderBlock.from_config(block(layer_scale_init=1, build=False).get_config())
    clone.build((None, 5, DIM))
    assert clone.get_config() == config
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(tokens())), to_numpy(layer(tokens())), atol=1e-6, rtol=0)


def test_built_block_config_round_trip():
    layer = block(layer_scale_init=0.5)
    clone = EncoderBlock.from_config(layer.get_config())
    clone.build((None, 5, DIM))
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(tokens())), to_numpy(layer(tokens())), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def scaled():
    """A dense tiny backbone with LayerScale (0.1 at first, then random scales)."""
    keras.utils.set_random_seed(0)
    backbone = VMoEBackbone(**tiny_vit_arguments(layer_scale_init=0.1, pooling=None))
    random_scales(backbone)
    return backbone


def test_backbone_with_layer_scale_round_trips_through_config_and_preset(tmp_path, scaled):
    backbone = scaled
    assert all(b.layer_scale_init == 0.1 for b in backbone.encoder_blocks)
    config = backbone.get_config()
    assert config["layer_scale_init"] == 0.1
    images = random_images(2)
    expected = to_numpy(backbone(images))
    backbone.save_to_preset(str(tmp_path / "preset"))
    loaded = VMoEBackbone.from_preset(str(tmp_path / "preset"))
    assert loaded.get_config() == config
    for ours, theirs in zip(loaded.encoder_blocks, backbone.encoder_blocks):
        np.testing.assert_array_equal(to_numpy(ours.attention_scale), to_numpy(theirs.attention_scale))
        np.testing.assert_array_equal(to_numpy(ours.mlp_scale), to_numpy(theirs.mlp_scale))
    np.testing.assert_allclose(to_numpy(loaded(images)), expected, atol=1e-6, rtol=0)


def test_without_layer_scale_presets_saved_before_it_still_load(scaled):
    # A ViT preset as saved before LayerScale existed (the bundled
    # vit_tiny_cifar10 was, until it was saved again as the dense ViT class):
    # its config has no `layer_scale_init` and its weights file no scales.
    folder = ROOT / "tests" / "fixtures" / "saved_before_layer_scale"
    assert "layer_scale_init" not in (folder / "config.json").read_text()
    backbone = VMoEBackbone.from_preset(str(folder))
    assert backbone.layer_scale_init is None
    assert not any(w.path.endswith("_scale") for w in backbone.weights)
    with h5py.File(folder / "model.weights.h5") as file:
        arrays = []
        file.visititems(lambda name, item: arrays.append(name) if isinstance(item, h5py.Dataset) else None)
    assert len(arrays) == len(backbone.weights)
    # A new backbone without LayerScale has the same weights as before; with it, two more per block.
    plain = VMoEBackbone(**tiny_vit_arguments(pooling=None))
    for index, block_ in enumerate(plain.encoder_blocks):
        assert [w.path for w in block_.weights] == [f"encoder_block_{index}/{n}" for n in BLOCK_WEIGHTS]
    assert len(scaled.weights) == len(plain.weights) + 2 * plain.num_layers


@pytest.fixture(scope="module")
def upcycled(scaled):
    """(`scaled`, its upcycled copy with K = E and room for every token)."""
    return scaled, keras_vmoe.upcycle(scaled, 4, (1,), num_selected_experts=4, capacity_factor=1.0)


def test_upcycling_copies_the_scales(upcycled):
    dense, moe = upcycled
    assert moe.layer_scale_init == 0.1 and moe.moe_layers == (1,)
    for ours, theirs in zip(moe.encoder_blocks, dense.encoder_blocks):
        np.testing.assert_array_equal(to_numpy(ours.attention_scale), to_numpy(theirs.attention_scale))
        np.testing.assert_array_equal(to_numpy(ours.mlp_scale), to_numpy(theirs.mlp_scale))
    # Gates summing to 1 over identical experts: the dense function. (`predict`
    # compiles the MoE model once, where JAX's eager ops would each compile.)
    images = random_images(2)
    expected = to_numpy(dense(images))
    # Compiled predict against the eager dense model: float32 noise of the output's scale.
    np.testing.assert_allclose(moe.predict(images, verbose=0), expected, atol=f32_atol(expected), rtol=0)


def test_running_the_upcycled_model_leaves_the_dense_one_intact(upcycled):
    dense, moe = upcycled
    images = random_images(2)
    expected = to_numpy(dense(images))
    moe.predict(images, verbose=0)
    np.testing.assert_array_equal(to_numpy(dense(images)), expected)


def test_router_inputs_see_the_scaled_attention_branch(upcycled):
    _, backbone = upcycled
    images = random_images(2)
    block = backbone.get_layer("encoder_block_1")
    x = to_numpy(keras.Model(backbone.input, block.input)(images))
    h = x + to_numpy(block.attention_scale) * to_numpy(block.attention(block.attention_norm(x)))
    routed = to_numpy(block.mlp_norm(h))  # What the MoE layer gets (the first test's formula).
    np.testing.assert_allclose(
        to_numpy(router_inputs(backbone, images)[1]).reshape(routed.shape), routed, atol=1e-5, rtol=0
    )
