"""keras_vmoe.upcycle: experts copied from the dense MLP, everything else kept."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.layers.moe import SoftMoE
from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifierPreprocessor
from keras_vmoe.models import VMoEImageConverter
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

NUM_EXPERTS = 4


def dense_classifier(**overrides):
    keras.utils.set_random_seed(0)
    backbone = VMoEBackbone(**tiny_vit_arguments(num_layers=4, **overrides))
    preprocessor = VMoEImageClassifierPreprocessor(
        VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    )
    classifier = VMoEImageClassifier(backbone, num_classes=5, preprocessor=preprocessor)
    # Non-trivial biases, so that a wrong copy of them shows.
    for variable in classifier.weights:
        if variable.path.endswith("bias"):
            variable.assign(np.random.RandomState(1).normal(0, 0.1, variable.shape))
    return classifier


def mlp_params(dim, hidden):
    return 2 * dim * hidden + hidden + dim


def test_all_experts_selected_computes_the_dense_function():
    dense = dense_classifier()
    images = random_images(4)
    # K = E and capacity for every token: gates sum to 1 over identical experts.
    moe = keras_vmoe.upcycle(
        dense, NUM_EXPERTS, (1, 3), num_selected_experts=NUM_EXPERTS, capacity_factor=1.0
    )
    assert isinstance(moe, VMoEImageClassifier) and moe.backbone.moe_layers == (1, 3)
    np.testing.assert_allclose(to_numpy(moe(images)), to_numpy(dense(images)), atol=1e-5, rtol=0)
    dense_params, d, h = dense.count_params(), 32, 64
    router_params = d * NUM_EXPERTS
    assert moe.count_params() == dense_params + 2 * ((NUM_EXPERTS - 1) * mlp_params(d, h) + router_params)


@pytest.mark.parametrize("router", ["sinkhorn_token_choice", "sparse_token_choice", "sparse_top_k"])
def test_every_token_choice_router_with_all_experts_computes_the_dense_function(router):
    # Each token takes all E experts; the combine weights are its softmax
    # gates (or their relaxed top-E mask, all ones), summing to 1.
    dense = dense_classifier()
    images = random_images(4)
    moe = keras_vmoe.upcycle(dense, NUM_EXPERTS, (1,), router=router, num_selected_experts=NUM_EXPERTS)
    assert moe.backbone.router == router
    np.testing.assert_allclose(to_numpy(moe(images)), to_numpy(dense(images)), atol=1e-5, rtol=0)


def test_experts_are_copies_and_other_weights_are_kept():
    dense = dense_classifier()
    moe = keras_vmoe.upcycle(dense, NUM_EXPERTS, (2,), router="expert_choice")
    block = moe.backbone.get_layer("encoder_block_2").mlp
    source = dense.backbone.get_layer("encoder_block_2").mlp
    for bank, weight in ((block.kernel_0, source.dense_0.kernel), (block.bias_1, source.dense_1.bias)):
        for expert in range(NUM_EXPERTS):
            np.testing.assert_array_equal(to_numpy(bank)[expert], to_numpy(weight))
    for name in ("patch_embedding", "position_embedding", "encoder_norm", "encoder_block_0"):
        for ours, theirs in zip(moe.backbone.get_layer(name).weights, dense.backbone.get_layer(name).weights):
            np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    np.testing.assert_array_equal(to_numpy(moe.head.kernel), to_numpy(dense.head.kernel))
    assert moe.backbone.get_layer("encoder_block_2").mlp.router.__class__.__name__ == "ExpertChoiceRouter"
    # The preprocessor still scales uint8 pixels the same way.
    pixels = np.full((1, 32, 32, 3), 255, "uint8")
    np.testing.assert_allclose(
        to_numpy(moe.preprocessor(pixels)), 1.0, atol=1e-6
    )  # A fused multiply-add: 1 ulp.


def test_soft_upcycling_returns_a_soft_moe_classifier():
    dense = dense_classifier(pooling="gap")
    moe = keras_vmoe.upcycle(dense, NUM_EXPERTS, (3,), router="soft", slots_per_expert=4)
    assert isinstance(moe, SoftMoEImageClassifier)
    assert isinstance(moe.backbone, SoftMoEBackbone)
    assert isinstance(moe.backbone.get_layer("encoder_block_3").mlp, SoftMoE)
    assert moe.backbone.pooling == "gap" and not moe.backbone.attention_qk_norm
    assert moe(random_images(2)).shape == (2, 5)


def test_backbone_in_backbone_out_and_fit_reports_auxiliary_losses():
    dense = dense_classifier()
    backbone = keras_vmoe.upcycle(
        dense.backbone, NUM_EXPERTS, (1, 3), num_selected_experts=2, capacity_factor=1.25
    )
    assert isinstance(backbone, VMoEBackbone)
    assert all(isinstance(moe, SparseMoE) for moe in backbone.moe_blocks)
    classifier = keras_vmoe.upcycle(dense, NUM_EXPERTS, (1, 3), num_selected_experts=2, capacity_factor=1.25)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["sparse_categorical_accuracy"])
    images = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3)).astype("uint8")
    history = classifier.fit(images, np.arange(8) % 5, batch_size=4, epochs=2, verbose=0)
    assert history.history["moe_auxiliary_loss"][-1] > 0
    assert np.isfinite(history.history["loss"]).all()


def test_keras_hub_vit_backbone_is_converted_then_upcycled():
    vit = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
    )
    backbone = keras_vmoe.upcycle(vit, NUM_EXPERTS, (1,), num_selected_experts=NUM_EXPERTS)
    images = random_images(2)
    np.testing.assert_allclose(to_numpy(backbone(images)), to_numpy(vit(images)), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_experts=1, moe_layers=(1,)), "num_experts must be an int >= 2"),
        (dict(num_experts=4, moe_layers=(7,)), "block index 7, but the model has blocks 0 to 3"),
        (dict(num_experts=4, moe_layers=()), "distinct block indices"),
        (dict(num_experts=4, moe_layers=(1,), router="switch"), "router must be one of"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        keras_vmoe.upcycle(dense_classifier(), **arguments)


def test_a_block_that_is_already_moe_and_mixed_families():
    moe = keras_vmoe.upcycle(dense_classifier(), NUM_EXPERTS, (1,))
    with pytest.raises(ValueError, match="block 1 is already a MoE block"):
        keras_vmoe.upcycle(moe, NUM_EXPERTS, (1,))
    with pytest.raises(ValueError, match="not SoftMoE layers"):
        keras_vmoe.upcycle(moe, NUM_EXPERTS, (3,), router="soft")
    more = keras_vmoe.upcycle(moe, NUM_EXPERTS, (3,))
    assert more.backbone.moe_layers == (1, 3)


def test_a_dense_vmoe_checkpoint_upcycles(tmp_path):
    from keras_vmoe.convert import load_vmoe_checkpoint
    from keras_vmoe.convert import vmoe_name_table
    from tests.convert.test_vmoe_checkpoint import perturbed_model
    from tests.convert.vmoe_checkpoint_writer import write_vmoe_checkpoint

    # A vmoe config with no MoE layers: a dense ViT checkpoint.
    config = {
        "num_classes": 3,
        "patch_size": [8, 8],
        "hidden_size": 32,
        "classifier": "token",
        "encoder": {"num_layers": 2, "mlp_dim": 64, "num_heads": 2},
    }
    source = perturbed_model(config, (32, 32, 3))
    prefix = str(tmp_path / "dense")
    write_vmoe_checkpoint(prefix, {p: to_numpy(v) for p, v in vmoe_name_table(source).items()})
    dense = load_vmoe_checkpoint(prefix, config, image_shape=(32, 32, 3))
    assert dense.backbone.moe_layers == ()
    moe = keras_vmoe.upcycle(dense, NUM_EXPERTS, (1,), num_selected_experts=NUM_EXPERTS)
    images = random_images(2)
    np.testing.assert_allclose(to_numpy(moe(images)), to_numpy(dense(images)), atol=1e-5, rtol=0)
