"""get_layout_map / validate_layout_map, and the layers under a one-device distribution.

The 8-device measurements are in test_expert_parallelism.py; these run in the
test process (one CPU device, so a (1, 1) mesh).
"""

import keras
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.distribution import get_layout_map
from keras_vmoe.distribution import validate_layout_map
from keras_vmoe.layers import SoftMoE
from keras_vmoe.layers import SparseMoE
from keras_vmoe.layers.routing import ExpertChoiceRouter
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.models import VMoEBackbone
from tests.helpers import backend
from tests.helpers import f32_atol
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

jax_only = pytest.mark.skipif(backend() != "jax", reason="keras.distribution shards only on JAX")


def mesh(shape=(1, 1), axis_names=("batch", "expert")):
    return keras.distribution.DeviceMesh(shape, axis_names, devices=keras.distribution.list_devices()[:1])


@pytest.mark.skipif(backend() == "jax", reason="the error is for the other backends")
def test_other_backends_get_a_clear_error():
    with pytest.raises(ValueError, match="only on the JAX backend.*KERAS_BACKEND=jax"):
        get_layout_map(None)


@jax_only
def test_layouts_of_expert_banks_slots_and_model_axis():
    layout_map = get_layout_map(mesh())
    assert layout_map["encoder_block_3/moe/kernel_0"].axes == ("expert", None, None)
    assert layout_map["encoder_block_3/moe/bias_1"].axes == ("expert", None)
    assert layout_map["sparse_mo_e/kernel_1"].axes == ("expert", None, None)  # A bare SparseMoE.
    assert layout_map["soft_mo_e_2/bias_0"].axes == ("expert", None)
    assert layout_map["encoder_block_3/moe/dispatched"].axes == ("expert", "batch", None)
    assert layout_map["encoder_block_3/moe/router/kernel"] is None  # Replicated.
    assert layout_map["encoder_block_0/attention/query/kernel"] is None
    with_model = get_layout_map(mesh(), model_axis="expert")
    assert with_model["encoder_block_0/attention/query/kernel"].axes == (None, "expert", None)
    assert with_model["encoder_block_0/attention/out/kernel"].axes == ("expert", None, None)
    assert with_model["encoder_block_0/mlp/dense_1/kernel"].axes == ("expert", None)
    # vmoe's layout on a 1-D mesh: the slots are split over the one axis only.
    one_axis = get_layout_map(mesh((1,), ("batch",)), expert_axis="batch", batch_axis="batch")
    assert one_axis["encoder_block_3/moe/dispatched"].axes == ("batch", None, None)


@jax_only
def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"model_axis='model' is not an axis.*\('batch', 'expert'\)"):
        get_layout_map(mesh(), model_axis="model")
    with pytest.raises(ValueError, match="batch_axis='data' is not an axis"):
        get_layout_map(mesh(), batch_axis="data")
    with pytest.raises(ValueError, match="must be a keras.distribution.DeviceMesh"):
        get_layout_map((2, 4))


@jax_only
def test_validate_layout_map_against_models():
    layout_map = get_layout_map(mesh())
    model = VMoEBackbone(**tiny_vit_arguments(), moe_layers=(1,), num_experts=4)
    sharded = validate_layout_map(layout_map, model)
    assert sharded == {
        f"encoder_block_1/moe/{name}": ("expert",) + (None,) * (rank - 1)
        for name, rank in (("kernel_0", 3), ("bias_0", 2), ("kernel_1", 3), ("bias_1", 2))
    }
    # The same map on a dense ViT: its expert keys match nothing.
    dense = VMoEBackbone(**tiny_vit_arguments(), moe_layers=())
    with pytest.raises(ValueError, match=r"key '\.\*mo_\?e\[\^/\]\*/kernel_0' matches no variable"):
        validate_layout_map(layout_map, dense)
    # A layer-output key is a valid target.
    layout_map["encoder_block_0/output"] = ("batch", None, None)
    validate_layout_map(layout_map, model)


@jax_only
def test_routers_under_a_distribution_make_the_same_plans():
    """Under a distribution the routers use sort-based top-k and per-group
    scatters (which a sharding compiler splits by group): same plans."""
    tokens = np.random.RandomState(0).randn(3, 16, 8).astype("float32")
    routers = [
        TokenChoiceRouter(4, num_selected_experts=2, batch_priority=True, capacity_factor=0.75, seed=1),
        ExpertChoiceRouter(4, capacity_factor=1.0, seed=1),
    ]
    for router in routers:
        expected, _ = router(tokens, training=False)
        with keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]).scope():
            got, _ = router(tokens, training=False)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(to_numpy(g), to_numpy(e))


@jax_only
@pytest.mark.parametrize("layer_class", [SparseMoE, SoftMoE])
def test_layers_through_the_exchange_equal_the_single_device_path(layer_class):
    """On a (1, 1) mesh the exchange's reshapes, transposes and constraints
    run (nothing moves); outputs and gradients equal the plain path."""
    import jax

    options = dict(num_selected_experts=2) if layer_class is SparseMoE else dict(slots_per_expert=2)
    inputs = np.random.RandomState(1).randn(4, 16, 8).astype("float32")
    layer = layer_class(num_experts=4, mlp_dim=12, **options)
    layer.build(inputs.shape)
    values = [v.value for v in layer.trainable_variables]

    def loss(trainable, x):
        outputs, _ = layer.stateless_call(trainable, [v.value for v in layer.non_trainable_variables], x)
        return (outputs**2).sum(), outputs

    expected = jax.jit(jax.value_and_grad(loss, has_aux=True))(values, inputs)
    distribution = keras.distribution.ModelParallel(layout_map=get_layout_map(mesh()), batch_dim_name="batch")
    with distribution.scope():
        assert keras_vmoe.distribution.ExpertExchange.for_layer(layer, 4) is not None
        got = jax.jit(jax.value_and_grad(loss, has_aux=True))(values, inputs)
    # Another program (sharded dots, other shapes): float32 noise of each array's scale.
    np.testing.assert_allclose(got[0][1], expected[0][1], rtol=0, atol=f32_atol(expected[0][1]))
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(g, e, rtol=0, atol=f32_atol(e))
