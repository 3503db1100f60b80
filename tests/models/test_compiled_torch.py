"""PyTorch: Keras' `jit_compile=True` is `torch.compile`. The V-MoE, Soft MoE
and LIMoE backbones and PaliGemma-MoE's image tower compile in training
(routing noise included) with no graph break, so no device-to-host copy in
their MoE layers (`torch._dynamo.explain`); compiled outputs equal eager ones."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.helpers import to_numpy

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile")

TOWER = dict(image_shape=(16, 16, 3), patch_size=4, num_layers=2, hidden_dim=16, mlp_dim=32, num_heads=2)


def vmoe():
    return VMoEBackbone(**TOWER, moe_layers=(1,), num_experts=4, num_selected_experts=2)


def soft_moe():
    return SoftMoEBackbone(**TOWER, moe_layers=(1,), num_experts=4)


def limoe():
    return LIMoEBackbone(
        **TOWER, vocabulary_size=50, max_text_length=8, embedding_dim=8, moe_layers=(1,), num_experts=4
    )


def pali_gemma_moe():
    tower = VMoEBackbone(
        **{**TOWER, "hidden_dim": 32}, pooling=None, use_class_token=False, moe_layers=(1,), num_experts=4
    )
    return PaliGemmaMoEBackbone(
        vocabulary_size=50,
        image_encoder=tower,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
    )


def inputs(backbone):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype("float32")
    if isinstance(backbone, (VMoEBackbone, SoftMoEBackbone)):
        return images
    length = 8 if isinstance(backbone, LIMoEBackbone) else 20
    token_ids = rng.integers(1, 50, (2, length)).astype("int32")
    if isinstance(backbone, LIMoEBackbone):
        return {"images": images, "token_ids": token_ids, "padding_mask": np.ones((2, length), bool)}
    masks = {"padding_mask": np.ones((2, length), "int32"), "response_mask": np.zeros((2, length), "int32")}
    return {"images": images, "token_ids": token_ids, **masks}


@pytest.mark.parametrize("make", [vmoe, soft_moe, limoe, pali_gemma_moe])
def test_moe_backbones_compile_with_no_graph_break(make):
    import torch

    keras.utils.set_random_seed(0)
    backbone = make()
    x = keras.tree.map_structure(torch.tensor, inputs(backbone))
    backbone(x)
    if isinstance(backbone, PaliGemmaMoEBackbone):
        # Its MoE layers live in the image tower; keras-hub's Gemma decoder
        # breaks graphs of its own (a layer built in `call`, an ndarray cast).
        backbone, x = backbone.image_encoder, x["images"]
    explained = torch._dynamo.explain(lambda x: backbone(x, training=True))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    if make is vmoe:  # Inductor's compile is slow: one family checks the compiled values.
        compiled = torch.compile(lambda x: backbone(x, training=False))
        np.testing.assert_allclose(to_numpy(compiled(x)), to_numpy(backbone(x)), rtol=1e-5, atol=1e-5)


def test_a_classifier_trains_with_jit_compile():
    import torch

    keras.utils.set_random_seed(0)
    model = VMoEImageClassifier(vmoe(), num_classes=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 3
    history = model.fit(x, y, batch_size=8, epochs=5, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    # Compiled once (and once more for the optimizer's weight-decay cache):
    # later steps start from the state they were compiled for (no `p.grad`
    # left, no layer losses), so none recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    # The one break is Keras' own `loss.backward()` in its train step.
    explained = torch._dynamo.explain(model.train_step)((torch.tensor(x), torch.tensor(y)))
    assert explained.graph_break_count == 1
    assert "backward" in str(explained.break_reasons[0].reason)
