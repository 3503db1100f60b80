"""External reference: our dense backbone reproduces keras-hub's ViTBackbone."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.convert import from_keras_hub_vit
from tests.helpers import random_images
from tests.helpers import to_numpy


@pytest.mark.parametrize("use_class_token", [True, False])
def test_dense_backbone_matches_keras_hub_vit(use_class_token):
    keras.utils.set_random_seed(1)
    vit = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        use_class_token=use_class_token,
    )
    # Random initialisation leaves biases and LayerNorms at 0 / 1; perturb
    # every weight so a dropped or transposed one would show.
    rng = np.random.RandomState(0)
    for weight in vit.weights:
        weight.assign(to_numpy(weight) + 0.05 * rng.randn(*weight.shape).astype("float32"))
    ours = from_keras_hub_vit(vit)
    images = random_images(3)
    expected = to_numpy(vit(images))
    got = to_numpy(ours(images))
    assert got.shape == expected.shape
    # Two implementations (keras-hub's MultiHeadAttention, our einsums): 1e-5
    # of the tokens' scale.
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


def test_rejects_non_vit():
    with pytest.raises(ValueError, match="ViTBackbone"):
        from_keras_hub_vit(keras.Sequential([keras.layers.Dense(2)]))
