"""Expert parallelism on 8 virtual CPU devices, measured against one device.

Run as a script (by tests/distribution/test_expert_parallelism.py, in its own
process: XLA's device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distribution/expert_parallel_checks.py results.json

It measures and writes to JSON; the test asserts. Every model is run twice
with the same variables: on one device without a distribution, then built
inside a `ModelParallel` over a (2, 4) ("batch", "expert") mesh.
"""

import json
import os
import sys
import tempfile
import traceback

import keras
import numpy as np

import keras_vmoe
from keras_vmoe.convert import backbone_from_vmoe_config
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.convert import vmoe_name_table
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.convert.vmoe_checkpoint_writer import write_vmoe_checkpoint

MESH_SHAPE = (2, 4)
BATCH = 8  # Images per step: one routing group (image) per device.
STEPS = 5
TINY = dict(image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=32, mlp_dim=48, num_heads=4)
BANKS = ("kernel_0", "bias_0", "kernel_1", "bias_1")


def images(count, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (count, 32, 32, 3)).astype("float32")


def labels(count, seed=1):
    return np.random.RandomState(seed).randint(0, 10, count).astype("int32")


def distribution(mesh_shape=MESH_SHAPE, axis_names=("batch", "expert"), **layout_options):
    mesh = keras.distribution.DeviceMesh(mesh_shape, axis_names)
    layout_map = keras_vmoe.distribution.get_layout_map(mesh, **layout_options)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"), layout_map


def moe_layers(model):
    return keras_vmoe.models.vision_transformer.collect_moe_layers(model)


def shard_shapes(model):
    """{bank path: sorted set of per-device shard shapes}, and devices per bank."""
    shapes = {}
    for layer in moe_layers(model):
        for name in BANKS:
            value = getattr(layer, name).value
            shapes[f"{layer.path}/{name}"] = dict(
                full=list(value.shape),
                shards=sorted({tuple(s.data.shape) for s in value.addressable_shards}),
                devices=len(value.addressable_shards),
            )
    return shapes


class WaitForEachStep(keras.callbacks.Callback):
    """Blocks until each step has finished: without it, XLA's CPU runtime
    deadlocked after some tens of steps on 8 virtual devices of a 2-core
    machine (steps overlapping), for a dense ViT as well."""

    def _wait(self, batch, logs=None):
        keras.tree.map_structure(keras.ops.convert_to_numpy, logs)

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _wait


WAIT = [WaitForEachStep()]


def compile_for_training(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def fit_losses(model, x, y):
    """The loss of each of the `STEPS` training steps."""
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))  # Also waits for the step.

    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    return losses


def max_difference(a, b):
    return float(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64")).max())


def cross_entropy(logits, y):
    """Mean sparse categorical cross-entropy of logits, in float64."""
    logits = np.asarray(logits, "float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probabilities[np.arange(len(y)), y].mean())


def run_both(build, x, y=None, train=None, layout_options=None, evaluate=False):
    """Runs `build()` on one device, then inside the distribution with the same
    variables (seed generator states included): predict on `x`, and with
    `train` = (x, y) fit (and `evaluate` on the first batch of x, y).
    Returns the distributed model, the distribution and the measurements."""
    keras.utils.set_random_seed(0)
    single = build()
    initial = [np.asarray(v.value) for v in single.variables]
    results = dict(single=dict(logits=single.predict(x, batch_size=BATCH, verbose=0, callbacks=WAIT)))
    if train is not None:
        compile_for_training(single)
        results["single"]["losses"] = fit_losses(single, *train)
    dist, layout_map = distribution(**(layout_options or {}))
    with dist.scope():
        model = build()
        for variable, value in zip(model.variables, initial):
            variable.assign(value)
        keras_vmoe.distribution.validate_layout_map(layout_map, model)
        logits = model.predict(x, batch_size=BATCH, verbose=0, callbacks=WAIT)
        results["distributed"] = dict(logits=logits)
        if train is not None:
            compile_for_training(model)
            if evaluate:  # Before training: the loss of the predicted logits.
                loss = model.evaluate(x[:BATCH], y[:BATCH], verbose=0, return_dict=True, callbacks=WAIT)[
                    "loss"
                ]
                results["evaluate_difference"] = abs(
                    loss - cross_entropy(results["single"]["logits"][:BATCH], y[:BATCH])
                )
            results["distributed"]["losses"] = fit_losses(model, *train)
    return model, dist, results


def summary(results):
    single, distributed = results["single"], results["distributed"]
    out = dict(logits_max_difference=max_difference(single["logits"], distributed["logits"]))
    out["logits_scale"] = float(np.abs(single["logits"]).max())
    if "losses" in single:
        out["single_losses"] = single["losses"]
        out["distributed_losses"] = distributed["losses"]
        out["losses_max_difference"] = max_difference(single["losses"], distributed["losses"])
    if "evaluate_difference" in results:
        out["evaluate_difference"] = results["evaluate_difference"]
    return out


def report_dict(report, bank_sizes):
    gathered = [list(shape) for c in report.of_kind("all-gather") for shape in c.shapes]
    return dict(
        counts=report.counts(),
        buffer_bytes=report.buffer_bytes(),
        sent_bytes=report.sent_bytes(),
        all_gather_shapes=gathered,
        all_gathers_of_a_bank_size=[s for s in gathered if int(np.prod(s)) in bank_sizes],
        all_to_all_group_sizes=sorted({c.group_size for c in report.of_kind("all-to-all")}),
        table=report.table(),
    )


def check_vmoe():
    """The acceptance model: V-MoE, E = 8, K = 2, BPR, routing noise on."""

    def build():
        backbone = VMoEBackbone(
            **TINY, moe_layers=(1,), num_experts=8, num_selected_experts=2, batch_priority=True
        )
        return VMoEImageClassifier(backbone, num_classes=10)

    # 12 images: a batch of 8 (one group per device: the exchange) and a last
    # batch of 4 (4 groups on 8 devices: the layer runs as on one device).
    x, y = images(12), labels(12)
    train = (images(STEPS * BATCH, seed=2), labels(STEPS * BATCH, seed=3))
    model, dist, results = run_both(build, x, y, train=train, evaluate=True)
    out = summary(results)
    out["shards"] = shard_shapes(model)
    bank_sizes = {int(np.prod(getattr(layer, name).shape)) for layer in moe_layers(model) for name in BANKS}
    with dist.scope():
        train = keras_vmoe.distribution.step_collectives(model, x[:BATCH], y[:BATCH])
        predict = keras_vmoe.distribution.step_collectives(model, x[:BATCH], step="predict")
    out["train_step"] = report_dict(train, bank_sizes)
    out["predict_step"] = report_dict(predict, bank_sizes)
    # The layer's tokens, (images per batch shard, tokens, hidden) float32.
    out["tokens_per_batch_shard_bytes"] = (BATCH // MESH_SHAPE[0]) * 17 * TINY["hidden_dim"] * 4
    return out


def check_model_axis():
    """Attention and dense MLPs also sharded, over the expert axis."""

    def build():
        backbone = VMoEBackbone(**TINY, moe_layers=(1,), num_experts=8, num_selected_experts=2)
        return VMoEImageClassifier(backbone, num_classes=10)

    model, _, results = run_both(build, images(BATCH), layout_options=dict(model_axis="expert"))
    out = summary(results)
    query = model.backbone.get_layer("encoder_block_0").attention.query.kernel.value
    out["query_kernel_shards"] = sorted({tuple(s.data.shape) for s in query.addressable_shards})
    dense = model.backbone.get_layer("encoder_block_0").mlp.dense_0.kernel.value
    out["dense_0_kernel_shards"] = sorted({tuple(s.data.shape) for s in dense.addressable_shards})
    return out


def check_one_axis():
    """vmoe's layout on a 1-D mesh: data and experts over the same 8 devices."""

    def build():
        backbone = VMoEBackbone(**TINY, moe_layers=(1,), num_experts=8, num_selected_experts=2)
        return VMoEImageClassifier(backbone, num_classes=10)

    options = dict(mesh_shape=(8,), axis_names=("batch",), expert_axis="batch", batch_axis="batch")
    model, dist, results = run_both(build, images(BATCH), layout_options=options)
    out = summary(results)
    out["shards"] = shard_shapes(model)
    with dist.scope():
        out["predict_step_counts"] = keras_vmoe.distribution.step_collectives(
            model, images(BATCH), step="predict"
        ).counts()
    return out


def check_soft_moe():
    def build():
        backbone = SoftMoEBackbone(**TINY, moe_layers=(1,), num_experts=8, slots_per_expert=2)
        return SoftMoEImageClassifier(backbone, num_classes=10)

    x = images(BATCH)
    train = (images(STEPS * BATCH, seed=2), labels(STEPS * BATCH, seed=3))
    model, dist, results = run_both(build, x, train=train)
    out = summary(results)
    out["shards"] = shard_shapes(model)
    with dist.scope():
        out["predict_step_counts"] = keras_vmoe.distribution.step_collectives(
            model, x[:BATCH], step="predict"
        ).counts()
    return out


def check_expert_choice():
    def build():
        backbone = VMoEBackbone(**TINY, moe_layers=(0, 1), num_experts=8, router="expert_choice")
        return VMoEImageClassifier(backbone, num_classes=10)

    return summary(run_both(build, images(BATCH))[2])


def check_from_preset():
    pixels = np.random.RandomState(5).randint(0, 256, (BATCH, 32, 32, 3)).astype("uint8")
    single = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    expected = single.predict(pixels, batch_size=BATCH, verbose=0, callbacks=WAIT)
    dist, layout_map = distribution()
    with dist.scope():
        model = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
        keras_vmoe.distribution.validate_layout_map(layout_map, model)
        got = model.predict(pixels, batch_size=BATCH, verbose=0, callbacks=WAIT)
    return dict(
        logits_max_difference=max_difference(expected, got),
        logits_scale=float(np.abs(expected).max()),
        shards=shard_shapes(model),
    )


VMOE_CONFIG = {
    "num_classes": 10, "patch_size": [8, 8], "hidden_size": 32, "classifier": "token",
    "encoder": {"num_layers": 2, "mlp_dim": 48, "num_heads": 2,
                "moe": {"layers": [1], "num_experts": 8, "group_size": 17,
                        "router": {"num_selected_experts": 2, "noise_std": 1.0,
                                   "dispatcher": {"name": "einsum", "capacity_factor": 1.0,
                                                  "batch_priority": True, "bfloat16": False}}}},
}  # fmt: skip


def check_vmoe_checkpoint():
    """A vmoe checkpoint (E = 8) loaded inside the distribution."""
    backbone = backbone_from_vmoe_config(VMOE_CONFIG, (32, 32, 3))
    source = VMoEImageClassifier(backbone, VMOE_CONFIG["num_classes"])
    rng = np.random.RandomState(0)
    params = {
        path: np.asarray(variable.value) + 0.1 * rng.randn(*variable.shape).astype("float32")
        for path, variable in vmoe_name_table(source).items()
    }
    x = images(BATCH)
    with tempfile.TemporaryDirectory() as folder:
        prefix = os.path.join(folder, "ckpt")
        write_vmoe_checkpoint(prefix, params, shard_count=2)
        single = load_vmoe_checkpoint(prefix, VMOE_CONFIG, image_shape=(32, 32, 3))
        expected = single.predict(x, batch_size=BATCH, verbose=0, callbacks=WAIT)
        dist, _ = distribution()
        with dist.scope():
            model = load_vmoe_checkpoint(prefix, VMOE_CONFIG, image_shape=(32, 32, 3))
            got = model.predict(x, batch_size=BATCH, verbose=0, callbacks=WAIT)
    return dict(
        logits_max_difference=max_difference(expected, got),
        logits_scale=float(np.abs(expected).max()),
        shards=shard_shapes(model),
    )


def error_message(function):
    try:
        function()
    except ValueError as error:
        return str(error)
    return None


def check_errors():
    def six_experts():
        dist, _ = distribution()
        with dist.scope():
            VMoEBackbone(**TINY, moe_layers=(1,), num_experts=6)

    def typo_key():
        mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "expert"))
        layout_map = keras_vmoe.distribution.get_layout_map(mesh)
        layout_map[".*mope.*/kernel_0"] = ("expert", None, None)
        model = VMoEBackbone(**TINY, moe_layers=(1,), num_experts=8)
        keras_vmoe.distribution.validate_layout_map(layout_map, model)

    def unknown_axis():
        mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "expert"))
        keras_vmoe.distribution.get_layout_map(mesh, expert_axis="experts")

    return dict(
        indivisible_experts=error_message(six_experts),
        unmatched_key=error_message(typo_key),
        unknown_axis=error_message(unknown_axis),
    )


CHECKS = dict(
    vmoe=check_vmoe,
    model_axis=check_model_axis,
    one_axis=check_one_axis,
    soft_moe=check_soft_moe,
    expert_choice=check_expert_choice,
    from_preset=check_from_preset,
    vmoe_checkpoint=check_vmoe_checkpoint,
    errors=check_errors,
)


def to_json(value):
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(path, names):
    import time

    results = dict(device_count=len(keras.distribution.list_devices()), backend=keras.backend.backend())
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = CHECKS[name]()
        except Exception:  # Reported, so that the other checks still run.
            results[name] = dict(failed=traceback.format_exc())
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {results[name]['seconds']} s", flush=True)
    with open(path, "w") as file:
        json.dump(to_json(results), file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(CHECKS))
