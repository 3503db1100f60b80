"""Models saved by keras_vmoe 0.1 (main at 094a630, before the routing contract and
the house-keeping refactors) load and give the outputs they gave then.

`tests/fixtures/saved_by_0.1/` holds, for a V-MoE with token choice and BPR, a
V-MoE with expert choice and MAP pooling, a Soft MoE and a dense ViT: the
`.keras` file, the keras-hub preset folder, and their outputs on two images
(`outputs.npz`, computed on JAX when they were saved).
"""

import pathlib

import keras
import numpy as np
import pytest

from keras_vmoe.models import VisionTransformerImageClassifier
from tests.helpers import to_numpy

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "saved_by_0.1"
NAMES = ["vmoe_token_choice_bpr", "vmoe_expert_choice", "soft_moe", "dense_vit"]


@pytest.fixture(scope="module")
def saved():
    return np.load(FOLDER / "outputs.npz")


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_and_preset_load_and_compute_what_they_did(saved, name):
    images = saved["images"]
    model = keras.saving.load_model(FOLDER / f"{name}.keras", safe_mode=True)
    # Float32 on another CPU or backend: 1e-5 of the logits' scale.
    tolerance = 1e-5 * max(1.0, float(np.abs(saved[name]).max()))
    np.testing.assert_allclose(to_numpy(model(images, training=False)), saved[name], atol=tolerance)
    preset = VisionTransformerImageClassifier.from_preset(str(FOLDER / f"{name}_preset"))
    assert type(preset) is type(model)
    np.testing.assert_allclose(to_numpy(preset(images, training=False)), saved[name], atol=tolerance)


def test_code_written_for_0_1_loads_the_dense_preset_with_the_vmoe_classes():
    # vit_tiny_cifar10 is saved with the dense ViT's own classes since 0.2;
    # 0.1's `VMoEImageClassifier.from_preset("vit_tiny_cifar10")` still works.
    from keras_vmoe.models import VisionTransformerBackbone
    from keras_vmoe.models import VMoEBackbone
    from keras_vmoe.models import VMoEImageClassifier

    images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype("uint8")
    dense = VisionTransformerImageClassifier.from_preset("vit_tiny_cifar10")
    as_vmoe = VMoEImageClassifier.from_preset("vit_tiny_cifar10")
    assert type(as_vmoe) is VMoEImageClassifier and as_vmoe.backbone.moe_layers == ()
    np.testing.assert_array_equal(as_vmoe.predict(images, verbose=0), dense.predict(images, verbose=0))
    backbone = VMoEBackbone.from_preset("vit_tiny_cifar10")
    assert type(backbone) is VMoEBackbone
    pixels = dense.preprocessor(images)
    np.testing.assert_array_equal(
        to_numpy(backbone(pixels)),
        to_numpy(VisionTransformerBackbone.from_preset("vit_tiny_cifar10")(pixels)),
    )
