"""vmoe checkpoints: parity with the official implementation and checked loading."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.convert import read_vmoe_checkpoint
from keras_vmoe.convert import vmoe_name_table
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifier
from tests.convert.vmoe_checkpoint_writer import write_vmoe_checkpoint
from tests.helpers import FIXTURES
from tests.helpers import moe_block_tokens
from tests.helpers import random_images
from tests.helpers import requires_fixtures
from tests.helpers import to_numpy

TOKEN_CHOICE = FIXTURES / "vmoe_tiny_token_choice"
SOFT = FIXTURES / "soft_moe_tiny"


def load_fixture(folder, **kwargs):
    config = json.loads((folder / "config.json").read_text())
    io = np.load(folder / "io.npz")
    model = load_vmoe_checkpoint(str(folder / "ckpt"), config, **kwargs)
    return model, config, io


def relative_error(got, expected):
    return np.abs(got - expected).max() / max(1.0, np.abs(expected).max())


def moe_router_metrics(model, images, block_index):
    """Eval-mode per-group router metrics of one MoE block, from its real inputs."""
    moe = model.backbone.get_layer(f"encoder_block_{block_index}").mlp
    return moe.route(moe_block_tokens(model.backbone, images, block_index), training=False)[-1]


@requires_fixtures
def test_token_choice_fixture_logits_and_losses():
    model, config, io = load_fixture(TOKEN_CHOICE)
    assert isinstance(model, VMoEImageClassifier)
    logits = to_numpy(model(io["images"], training=False))
    assert relative_error(logits, io["logits"]) <= 1e-4
    for block in config["encoder"]["moe"]["layers"]:
        metrics = moe_router_metrics(model, io["images"], block)
        for name in ("importance_loss", "gshard_loss", "auxiliary_loss"):
            expected = io[f"metrics/encoderblock_{block}/{name}"]
            np.testing.assert_allclose(to_numpy(metrics[name]), expected, rtol=1e-4, atol=1e-6)


@requires_fixtures
def test_token_choice_fixture_capacity_follows_vmoe_rounding():
    model, _, _ = load_fixture(TOKEN_CHOICE)
    router = model.backbone.moe_blocks[0].router
    # ceil(34 * 2 * 1.05 / 4) = 18, rounded up to a multiple of 4.
    assert router.capacity(34) == 20


def bfloat16_flip_spread(model, images, trials=6, relative=2.0**-19, seed=0):
    """How far the logits move when the values rounded to bfloat16 move by float32 noise.

    vmoe rounds the Soft MoE tokens and expert outputs to bfloat16. A value near
    a bfloat16 rounding midpoint rounds either way depending on its last float32
    bits, which depend on the CPU's instructions and the summation order: one
    bfloat16 step (2^-8 relative) that the following layers carry to the logits.
    Across our three backends on one CPU the values before the casts differ by
    at most 9 float32 ulps of the tensor's largest value; here each is moved by
    up to `relative` (2^-19 = 32 ulps) of that value, `trials` times, and the
    largest relative move of the logits is returned: the size of the
    difference that different rounding decisions make, measured on this machine.
    """
    rng = np.random.RandomState(seed)
    clean = to_numpy(model(images, training=False))
    layers = [layer for layer in model.backbone._flatten_layers() if getattr(layer, "dispatch_dtype", None)]
    spread = 0.0
    for _ in range(trials):
        for layer in layers:

            def noisy_round(x, layer=layer):
                scale = relative * float(np.abs(to_numpy(x)).max())
                noise = rng.uniform(-scale, scale, tuple(x.shape)).astype("float32")
                return type(layer).round_to_dispatch_dtype(layer, x + keras.ops.convert_to_tensor(noise))

            layer.round_to_dispatch_dtype = noisy_round
        try:
            spread = max(spread, relative_error(to_numpy(model(images, training=False)), clean))
        finally:
            for layer in layers:
                del layer.round_to_dispatch_dtype
    return spread


@requires_fixtures
def test_soft_moe_fixture_logits_with_bfloat16_casts():
    model, config, io = load_fixture(SOFT)
    assert isinstance(model, SoftMoEImageClassifier)
    logits = to_numpy(model(io["images"], training=False))
    # Our rounding decisions and vmoe's may differ where a value sits at a
    # bfloat16 midpoint: allow twice the spread such decisions make here, plus
    # float32 noise. (Measured on an AVX-512 BF16 EPYC: spread 1.8e-4 on every
    # backend; error 1.6e-4 on JAX, 8.2e-5 on TensorFlow, 2.4e-7 on PyTorch.)
    tolerance = 2 * bfloat16_flip_spread(model, io["images"]) + 1e-5
    assert relative_error(logits, io["logits"]) <= tolerance
    # Leaving the casts out costs far more than any rounding decision (measured
    # 6.1e-4 on every backend, against at most 1.6e-4 with them): the casts
    # are what brings the model to vmoe's logits, and a model that does not
    # round fails the first assertion (its spread is 0).
    float32_model, _, _ = load_fixture(SOFT, bfloat16_dispatch=False)
    float32_error = relative_error(to_numpy(float32_model(io["images"], training=False)), io["logits"])
    assert 2e-4 < float32_error <= 3e-3
    assert float32_error > 2 * relative_error(logits, io["logits"])


@requires_fixtures
def test_soft_moe_fixture_router_metrics():
    model, config, io = load_fixture(SOFT)
    first, second = config["encoder"]["moe"]["layers"]
    # The first Soft MoE block routes float32 tokens that no cast has touched:
    # a strict float32 comparison. The second routes tokens downstream of the
    # first block's casts, whose rounding decisions may differ (see above);
    # its metrics are means over slots and move by far less than 1e-4.
    for block, rtol in ((first, 5e-5), (second, 1e-4)):
        metrics = moe_router_metrics(model, io["images"], block)
        for name in (
            "combine_weights_min_mean",
            "combine_weights_max_mean",
            "dispatch_weights_min_mean",
            "dispatch_weights_max_mean",
        ):
            expected = io[f"metrics/encoderblock_{block}/{name}"]
            # vmoe reports these over the batch, the router per group (all of one size).
            np.testing.assert_allclose(np.mean(to_numpy(metrics[name])), expected, rtol=rtol)


SINKHORN = FIXTURES / "sinkhorn_token_choice_tiny"
KSPARSE = FIXTURES / "ksparse_expert_choice_tiny"
# vmoe's metric names -> ours (the rest are the same).
VMOE_METRIC_NAMES = {
    "num_experts_per_item_min": "experts_per_token_min",
    "num_experts_per_item_max": "experts_per_token_max",
    "num_items_per_expert_min": "plan_nonzeros_per_expert_min",
    "num_items_per_expert_max": "plan_nonzeros_per_expert_max",
    "num_items_per_expert_avg": "plan_nonzeros_per_expert_avg",
}


def our_metric_name(vmoe_name):
    return VMOE_METRIC_NAMES.get(
        vmoe_name, vmoe_name.replace("ratio_processed_items_by_at_least_", "tokens_with_at_least_")
    )


@requires_fixtures
@pytest.mark.parametrize(
    "folder, router",
    [
        (SINKHORN, "SinkhornTokenChoiceRouter"),
        (KSPARSE, "SparseExpertChoiceRouter"),
    ],
)
def test_optimal_transport_fixture_logits_plans_and_metrics(folder, router):
    model, config, io = load_fixture(folder)
    assert isinstance(model, VMoEImageClassifier)
    logits = to_numpy(model(io["images"], training=False))
    assert relative_error(logits, io["logits"]) <= 1e-4
    for block in config["encoder"]["moe"]["layers"]:
        moe = model.backbone.get_layer(f"encoder_block_{block}").mlp
        assert type(moe.router).__name__ == router
        tokens = moe_block_tokens(model.backbone, io["images"], block)
        # The transport plan vmoe dispatched by (its debug output), to 1e-5.
        plan, _, _ = moe.router.route_gates(tokens, False, None)
        np.testing.assert_allclose(to_numpy(plan), io[f"debug/encoderblock_{block}/gates_plan"], atol=1e-5)
        # Which token sits in which slot: vmoe's dispatch tensor, exactly.
        routing, metrics = moe.router(tokens, training=False)
        dispatch = io[f"debug/encoderblock_{block}/dispatch_weights"]  # (G, S, E, C) 0/1
        ours = np.zeros(dispatch.shape, "uint8")
        index = to_numpy(routing.dispatch_index)  # (G, E, C)
        for g, e, c in zip(*np.nonzero(index < dispatch.shape[1])):
            ours[g, index[g, e, c], e, c] = 1
        np.testing.assert_array_equal(ours, dispatch)
        prefix = f"metrics/encoderblock_{block}/"
        for key in (key for key in io.files if key.startswith(prefix)):
            expected = io[key]
            np.testing.assert_allclose(
                to_numpy(metrics[our_metric_name(key[len(prefix) :])]),
                np.broadcast_to(expected, (2,)),
                rtol=1e-4,
                atol=1e-6,
                err_msg=key,
            )


@requires_fixtures
def test_optimal_transport_configs_convert_with_vmoe_defaults():
    config = json.loads((SINKHORN / "config.json").read_text())
    router = config["encoder"]["moe"]["router"]
    router.update(maxiter=35, use_softmax_combine_weights=False)
    model = load_vmoe_checkpoint(str(SINKHORN / "ckpt"), config)
    moe = model.backbone.moe_blocks[0]
    # ott runs its fixed loop in steps of 10: maxiter 35 -> 30 iterations.
    assert (moe.router.num_iterations, moe.router.combine_weights) == (30, "plan")
    # vmoe's defaults: no load loss for the Sinkhorn token router.
    assert (moe.router.importance_loss_weight, moe.router.load_loss_weight) == (0.005, 0.0)
    config = json.loads((KSPARSE / "config.json").read_text())
    config["encoder"]["moe"]["router"].update(
        name="vmoe.projects.sparsity_constrained_ot.sparse_projection_routing."
        "SparseProjectionTransportTopItemsPerExpertRouter",
        maxiter=7,
        adam_lr=0.05,
    )
    router = load_vmoe_checkpoint(str(KSPARSE / "ckpt"), config).backbone.moe_blocks[0].router
    assert (router.projection, router.max_steps, router.learning_rate) == ("dense", 7, 0.05)
    for update, needle in [
        ({"use_lbfgs": True}, "use_lbfgs=True"),
        ({"name": "vmoe.projects.sparsity_constrained_ot.foo.BregmanRouter"}, r"BregmanRouter.*knows"),
    ]:
        config = json.loads((SINKHORN / "config.json").read_text())
        config["encoder"]["moe"]["router"].update(update)
        with pytest.raises(ValueError, match=needle):
            load_vmoe_checkpoint(str(SINKHORN / "ckpt"), config)


@requires_fixtures
def test_reader_returns_every_parameter_once():
    params = read_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"))
    assert params["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"].shape == (4, 32, 64)
    assert params["Encoder/posembed_input/pos_embedding"].shape == (1, 17, 32)
    assert len(params) == 74  # 8 shared, 2 x 16 dense-block, 2 x 17 MoE-block


ROUND_TRIP_CONFIGS = {
    "bpr_k1_prelogits_map": {
        "num_classes": 5,
        "patch_size": [8, 8],
        "hidden_size": 32,
        "classifier": "map",
        "representation_size": 16,
        "encoder": {
            "num_layers": 2,
            "mlp_dim": 64,
            "num_heads": 2,
            "attention_qk_norm": True,
            "moe": {
                "layers": [1],
                "num_experts": 4,
                "group_size": 32,
                "router": {
                    "num_selected_experts": 1,
                    "noise_std": 1.0,
                    "dispatcher": {
                        "name": "einsum",
                        "capacity_factor": 0.5,
                        "batch_priority": True,
                        "bfloat16": False,
                    },
                },
            },
        },
    },
    "soft_map_one_slot_8_experts": {
        "num_classes": 3,
        "patch_size": [8, 8],
        "hidden_size": 32,
        "classifier": "map",
        "encoder": {
            "num_layers": 2,
            "mlp_dim": 64,
            "num_heads": 2,
            "attention_qk_norm": True,
            "moe": {
                "layers": [1],
                "num_experts": 8,
                "group_size": 16,
                "router": {
                    "name": "vmoe.projects.soft_moe.router.SoftRouter",
                    "num_slots": 1,
                    "capacity_factor": None,
                },
            },
        },
    },
    "expert_choice_sincos": {
        "num_classes": 3,
        "patch_size": [8, 8],
        "hidden_size": 32,
        "classifier": "gap",
        "encoder": {
            "num_layers": 2,
            "mlp_dim": 64,
            "num_heads": 2,
            "position_emb": {"name": "sincos2d"},
            "moe": {
                "layers": [0, 1],
                "num_experts": 4,
                "group_size": 16,
                "router": {
                    "name": "NoisyTopItemsPerExpertRouter",
                    "noise_std": 1.0,
                    "dispatcher": {"name": "einsum", "capacity_factor": 1.0},
                },
            },
        },
    },
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
@pytest.mark.parametrize("shard_count,split", [(1, False), (3, True)])
def test_checkpoint_round_trip_other_configs_and_shard_counts(tmp_path, name, shard_count, split):
    config = ROUND_TRIP_CONFIGS[name]
    image_shape = (32, 32, 3)
    source = perturbed_model(config, image_shape)
    params = {path: to_numpy(variable) for path, variable in vmoe_name_table(source).items()}
    prefix = str(tmp_path / "ckpt")
    write_vmoe_checkpoint(prefix, params, shard_count=shard_count, split_first_axis=split)
    loaded = load_vmoe_checkpoint(prefix, config, image_shape=image_shape)
    images = random_images(4)
    np.testing.assert_array_equal(to_numpy(loaded(images)), to_numpy(source(images)))


def perturbed_model(config, image_shape):
    """A model of `config` with random weights (built through the converter's own
    config mapping, then perturbed so that no parameter sits at its init value)."""
    from keras_vmoe.convert import backbone_from_vmoe_config

    backbone = backbone_from_vmoe_config(config, image_shape)
    task = SoftMoEImageClassifier if "Soft" in type(backbone).__name__ else VMoEImageClassifier
    model = task(backbone, config["num_classes"])
    rng = np.random.RandomState(0)
    for variable in vmoe_name_table(model).values():
        variable.assign(to_numpy(variable) + 0.1 * np.asarray(rng.randn(*variable.shape), "float32"))
    return model


@requires_fixtures
def test_missing_index_and_missing_shard_name_the_file(tmp_path):
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    with pytest.raises(CheckpointError, match="nothere.index"):
        load_vmoe_checkpoint(str(tmp_path / "nothere"), config)
    shutil.copy(TOKEN_CHOICE / "ckpt.index", tmp_path / "ckpt.index")
    shutil.copy(TOKEN_CHOICE / "ckpt.data-00000-of-00002", tmp_path / "ckpt.data-00000-of-00002")
    with pytest.raises(CheckpointError, match="ckpt.data-00001-of-00002"):
        load_vmoe_checkpoint(str(tmp_path / "ckpt"), config)


@requires_fixtures
def test_truncated_shard_is_reported(tmp_path):
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    for name in os.listdir(TOKEN_CHOICE):
        shutil.copy(TOKEN_CHOICE / name, tmp_path / name)
    data = (tmp_path / "ckpt.data-00001-of-00002").read_bytes()
    (tmp_path / "ckpt.data-00001-of-00002").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vmoe_checkpoint(str(tmp_path / "ckpt"), config)


@requires_fixtures
def test_config_that_does_not_fit_names_the_parameter():
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    config["encoder"]["moe"]["num_experts"] = 8
    with pytest.raises(CheckpointError, match="Moe/Mlp/Dense_0"):
        load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config)
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    config["encoder"]["moe"]["layers"] = [1]
    with pytest.raises(CheckpointError, match="encoderblock_3/Moe"):
        load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config)


@requires_fixtures
def test_unknown_config_key_and_router_are_rejected():
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    config["encoder"]["unexpected"] = 1
    with pytest.raises(ValueError, match="unexpected"):
        load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config)
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    config["encoder"]["moe"]["router"]["name"] = "MysteryRouter"
    with pytest.raises(ValueError, match="MysteryRouter"):
        load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config)


@requires_fixtures
def test_soft_moe_checkpoint_whose_mu_does_not_fit_names_it():
    config = json.loads((SOFT / "config.json").read_text())
    config["encoder"]["moe"]["router"]["num_slots"] = 1
    with pytest.raises(CheckpointError, match="Moe/Router/mu"):
        load_vmoe_checkpoint(str(SOFT / "ckpt"), config)
