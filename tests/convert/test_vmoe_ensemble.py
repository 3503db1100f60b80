"""E^3 checkpoints of google-research/vmoe: parity on the `eee_tiny` fixture and checked loading."""

import json

import numpy as np
import pytest

from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.models import VMoEImageClassifier
from tests.convert.test_vmoe_checkpoint import relative_error
from tests.helpers import FIXTURES
from tests.helpers import moe_block_tokens
from tests.helpers import requires_fixtures
from tests.helpers import to_numpy

EEE = FIXTURES / "eee_tiny"


def eee_config():
    return json.loads((EEE / "config.json").read_text())


@pytest.fixture(scope="module")
def eee():
    io = np.load(EEE / "io.npz")
    return load_vmoe_checkpoint(str(EEE / "ckpt"), eee_config()), io


@requires_fixtures
def test_raw_logits_ensemble_prediction_and_members(eee):
    model, io = eee
    assert isinstance(model, VMoEImageClassifier) and model.ensemble_size == 2
    # Raw output: row b * M + m = member m of image b, as vmoe returns it.
    logits = to_numpy(model(io["images"], training=False))
    assert logits.shape == (8, 10)
    assert relative_error(logits, io["logits"]) <= 1e-4
    ensemble = model.predict(io["images"], verbose=0)
    assert relative_error(ensemble, io["ensemble_log_probs"]) <= 1e-4
    np.testing.assert_array_equal(ensemble.argmax(-1), io["ensemble_pred"])
    members = model.predict_members(io["images"], verbose=0)
    assert members.shape == (4, 2, 10)
    np.testing.assert_allclose(members.reshape(8, 10), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict_on_batch(io["images"]), ensemble, rtol=1e-5, atol=1e-6)


@requires_fixtures
def test_dispatch_and_metrics_per_group_and_member(eee):
    model, io = eee
    for block in (2, 3):
        moe = model.backbone.get_layer(f"encoder_block_{block}").mlp
        tokens = moe_block_tokens(model.backbone, io["images"], block)
        np.testing.assert_allclose(
            to_numpy(tokens), io[f"debug/encoderblock_{block}/router_inputs"], rtol=1e-4, atol=1e-5
        )
        plan, metrics = moe.route(tokens)
        # Which token sits in which slot: vmoe's dispatch tensor, exactly
        # (capacity 28; block 3 drops one token of its full expert 3).
        dispatch = io[f"debug/encoderblock_{block}/dispatch_weights"]  # (G, S, E, C)
        assert moe.router.capacity(tokens.shape[1]) == dispatch.shape[-1] == 28
        ours = np.zeros(dispatch.shape, "uint8")
        index = to_numpy(plan.dispatch_index)
        for g, e, c in zip(*np.nonzero(index < dispatch.shape[1])):
            ours[g, index[g, e, c], e, c] = 1
        np.testing.assert_array_equal(ours, dispatch)
        # Combine weight of a kept choice: its member's softmax gate, not renormalised.
        slots, weights = to_numpy(plan.combine_index), to_numpy(plan.combine_weights)  # (G, S, K)
        combine = np.zeros(dispatch.shape[:3], "float32")
        for g, s, k in zip(*np.nonzero(slots < 4 * 28)):
            combine[g, s, slots[g, s, k] // 28] = weights[g, s, k]
        expected = io[f"debug/encoderblock_{block}/combine_weights"].sum(-1)
        np.testing.assert_allclose(combine, expected, rtol=1e-4, atol=1e-6)
        for name in ("importance_loss", "gshard_loss", "auxiliary_loss"):
            expected = io[f"metrics/encoderblock_{block}/{name}"]  # (G, M)
            np.testing.assert_allclose(to_numpy(metrics[name]), expected, rtol=1e-4, atol=1e-7, err_msg=name)


@requires_fixtures
def test_e3_configs_that_do_not_fit_raise():
    config = eee_config()
    config["encoder"]["moe"]["router"]["name"] = "NoisyTopExpertsPerItemRouter"
    with pytest.raises(ValueError, match="takes no router 'name'"):
        load_vmoe_checkpoint(str(EEE / "ckpt"), config)
    config = eee_config()
    config["encoder"]["moe"]["ensemble_size"] = 4  # 4 members of 1 expert: the kernel is (32, 2, 2).
    with pytest.raises(CheckpointError, match=r"E\^3 router kernel .* \(32, 2, 2\).* expects \(32, 4, 1\)"):
        load_vmoe_checkpoint(str(EEE / "ckpt"), config)
    config = eee_config()
    config["encoder"]["moe"]["ensemble_size"] = 3
    with pytest.raises(ValueError, match="ensemble_size=3 must divide num_experts=4"):
        load_vmoe_checkpoint(str(EEE / "ckpt"), config)
    config = eee_config()
    config["encoder"]["moe"]["router"]["num_selected_experts"] = 3
    with pytest.raises(ValueError, match=r"K=3\) cannot exceed the 2 experts of each of the 2 pools"):
        load_vmoe_checkpoint(str(EEE / "ckpt"), config)
    config = eee_config()
    config["encoder"]["moe"]["group_size"] = 67
    with pytest.raises(ValueError, match="group_size=67 must be a multiple of ensemble_size=2"):
        load_vmoe_checkpoint(str(EEE / "ckpt"), config)
