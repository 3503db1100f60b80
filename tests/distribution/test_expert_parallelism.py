"""Expert parallelism on 8 virtual CPU devices, against the same models on one device.

One subprocess (expert_parallel_checks.py) measures everything: XLA fixes its
device count when JAX starts, so the 8 devices need a process of their own.
keras.distribution shards only on JAX, so this runs once per suite, in the
JAX pass; the other backends skip it.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import ROOT
from tests.helpers import f32_atol

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution shards only on JAX; run once, in the JAX pass",
)

TIMEOUT_S = 400


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("expert_parallelism") / "results.json"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        KERAS_BACKEND="jax",
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    script = ROOT / "tests" / "distribution" / "expert_parallel_checks.py"
    process = subprocess.run(
        [sys.executable, str(script), str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    results = json.loads(path.read_text())
    assert results["device_count"] == 8, results
    return results


def check(results, name):
    """The measurements of one check; fails with its traceback if it raised."""
    measured = results[name]
    assert "failed" not in measured, measured.get("failed")
    return measured


def assert_banks_split(shards, num_experts, expert_shards):
    """Each device holds num_experts / expert_shards experts of every bank."""
    assert shards, "no expert banks found"
    for path, bank in shards.items():
        assert bank["full"][0] == num_experts, path
        assert bank["devices"] == 8, path
        assert bank["shards"] == [[num_experts // expert_shards, *bank["full"][1:]]], (path, bank)


def test_vmoe_e8_on_a_2x4_mesh_matches_one_device(results):
    vmoe = check(results, "vmoe")
    # E / 4 = 2 experts of every bank on each of the 8 devices.
    assert_banks_split(vmoe["shards"], num_experts=8, expert_shards=4)
    # predict (a batch of 8 through the exchange, a last batch of 4 without).
    assert vmoe["logits_max_difference"] <= f32_atol(vmoe["logits_scale"]), vmoe
    assert vmoe["evaluate_difference"] <= f32_atol(3.0), vmoe  # Losses about 2.5.
    # Five fit steps, routing noise on, the same losses.
    assert len(vmoe["single_losses"]) == len(vmoe["distributed_losses"]) == 5
    assert vmoe["losses_max_difference"] <= 1e-4, vmoe


def test_dispatch_and_combine_are_all_to_alls_and_no_expert_weight_is_gathered(results):
    vmoe = check(results, "vmoe")
    train, predict = vmoe["train_step"], vmoe["predict_step"]
    # Forward dispatch and combine, and their transposes in the backward pass,
    # each one all-to-all among the 4 devices of the expert axis.
    assert train["counts"]["all-to-all"] == 4, train["table"]
    assert predict["counts"]["all-to-all"] == 2, predict["table"]
    assert train["all_to_all_group_sizes"] == predict["all_to_all_group_sizes"] == [4]
    # No all-gather of anything the size of an expert bank.
    assert train["all_gathers_of_a_bank_size"] == predict["all_gathers_of_a_bank_size"] == []
    # What is gathered: the layer's output tokens back onto the expert axis
    # (and their gradient in the backward pass), one batch shard's tokens each.
    tokens = vmoe["tokens_per_batch_shard_bytes"]
    assert predict["buffer_bytes"]["all-gather"] == tokens, predict["all_gather_shapes"]
    assert train["buffer_bytes"]["all-gather"] == 2 * tokens, train["all_gather_shapes"]
    assert train["counts"]["reduce-scatter"] == train["counts"]["collective-permute"] == 0


def test_vmoe_layout_on_one_axis_needs_no_all_gather(results):
    one_axis = check(results, "one_axis")
    assert_banks_split(one_axis["shards"], num_experts=8, expert_shards=8)
    assert one_axis["logits_max_difference"] <= f32_atol(one_axis["logits_scale"])
    assert one_axis["predict_step_counts"]["all-to-all"] == 2
    assert one_axis["predict_step_counts"]["all-gather"] == 0


def test_model_axis_shards_attention_and_dense_mlps(results):
    model_axis = check(results, "model_axis")
    assert model_axis["logits_max_difference"] <= f32_atol(model_axis["logits_scale"])
    # query (D=32, heads=4, 8) over 4 devices: one head each; dense_0 (32, 48): 12 units each.
    assert model_axis["query_kernel_shards"] == [[32, 1, 8]]
    assert model_axis["dense_0_kernel_shards"] == [[32, 12]]


def test_soft_moe_and_expert_choice_match_one_device(results):
    soft = check(results, "soft_moe")
    assert_banks_split(soft["shards"], num_experts=8, expert_shards=4)
    assert soft["logits_max_difference"] <= f32_atol(soft["logits_scale"])
    assert soft["losses_max_difference"] <= 1e-4
    assert soft["predict_step_counts"]["all-to-all"] == 2
    expert_choice = check(results, "expert_choice")
    assert expert_choice["logits_max_difference"] <= f32_atol(expert_choice["logits_scale"])


@pytest.mark.parametrize("name", ["from_preset", "vmoe_checkpoint"])
def test_models_loaded_inside_the_scope_match_one_device(results, name):
    loaded = check(results, name)
    assert_banks_split(loaded["shards"], num_experts=8, expert_shards=4)
    assert loaded["logits_max_difference"] <= f32_atol(loaded["logits_scale"])


def test_clear_errors(results):
    errors = check(results, "errors")
    message = errors["indivisible_experts"]
    assert message and "num_experts=6" in message and "'expert' has 4 devices" in message
    message = errors["unmatched_key"]
    assert message and "'.*mope.*/kernel_0' matches no variable" in message
    message = errors["unknown_axis"]
    assert message and "expert_axis='experts' is not an axis" in message and "('batch', 'expert')" in message
