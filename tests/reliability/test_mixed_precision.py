"""Under `mixed_bfloat16`, routing runs in float32 and training stays finite."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.helpers import tiny_vit_arguments

MOE = dict(moe_layers=(0, 1), num_experts=4)


def build(family):
    keras.utils.set_random_seed(0)
    if family == "vmoe":
        backbone = VMoEBackbone(**tiny_vit_arguments(num_selected_experts=2, **MOE))
        return VMoEImageClassifier(backbone, num_classes=10)
    backbone = SoftMoEBackbone(**tiny_vit_arguments(slots_per_expert=2, **MOE))
    return SoftMoEImageClassifier(backbone, num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vmoe", "soft_moe"])
def test_100_bfloat16_training_steps_stay_finite_with_float32_routing(family):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build(family)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))  # keras-hub: cross-entropy on logits
    rng = np.random.RandomState(0)
    # Large pixel values and a high learning rate push the gates hard.
    images = rng.uniform(-4, 4, (16, 32, 32, 3)).astype("float32")
    labels = rng.randint(0, 10, 16)
    history = model.fit(images, labels, batch_size=8, epochs=50, verbose=0).history  # 100 steps
    assert len(history["loss"]) == 50
    assert np.all(np.isfinite(history["loss"])), history["loss"]
    assert np.all(np.isfinite(history["moe_auxiliary_loss"]))
    assert history["loss"][-1] < history["loss"][0]
    for moe in model.backbone.moe_blocks:
        assert moe.compute_dtype == "bfloat16"
        assert moe.router.compute_dtype == "float32"
        assert all(v.dtype == "float32" for v in moe.weights)
        tokens = keras.ops.cast(keras.ops.ones((2, 17, 32)), "bfloat16")
        if family == "vmoe":
            logits = moe.router.gate_logits(tokens)
            assert keras.backend.standardize_dtype(logits.dtype) == "float32"
            plan, metrics = moe.router(tokens)
            assert keras.backend.standardize_dtype(plan.combine_weights.dtype) == "float32"
        else:
            (dispatch_weights, combine_weights), metrics = moe.router(tokens)
            for weights in (dispatch_weights, combine_weights):
                assert keras.backend.standardize_dtype(weights.dtype) == "float32"
        for value in metrics.values():
            assert keras.backend.standardize_dtype(value.dtype) == "float32"
    logits = model.predict(images, verbose=0)
    assert np.all(np.isfinite(logits))
