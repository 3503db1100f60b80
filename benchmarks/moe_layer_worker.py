"""One backend's process for `benchmarks/moe_layer.py`; not meant to be run by hand.

    python benchmarks/moe_layer_worker.py TASK.json RESULT.json

The parent sets KERAS_BACKEND and the one-thread limits in the environment
before this process imports Keras. TASK.json holds either a timing task
(benchmarks to time in every mode of this backend) or a memory task (one
candidate, one mode); the answer is written to RESULT.json. Progress goes to
stdout, one line per step.
"""

import functools
import gc
import json
import resource
import statistics
import sys
import time
import traceback

import keras
import numpy as np
from keras import ops
from moe_layer import MEMORY_CANDIDATES
from moe_layer import MODES
from moe_layer import Benchmark
from moe_layer import Case
from moe_layer import limit_threads

BACKEND = keras.backend.backend()

limit_threads(BACKEND)  # before anything runs an op
if BACKEND == "torch":
    import torch
elif BACKEND == "tensorflow":
    import tensorflow as tf
elif BACKEND == "jax":
    import jax

from moe_references import DenseMaskedMoE  # noqa: E402
from moe_references import ExpertsOnly  # noqa: E402
from moe_references import OneHotEinsumMoE  # noqa: E402

from keras_vmoe import ops as moe_ops  # noqa: E402
from keras_vmoe.layers import Mlp  # noqa: E402
from keras_vmoe.layers import SoftMoE  # noqa: E402
from keras_vmoe.layers import SparseMoE  # noqa: E402


def log(message):
    print(f"[{BACKEND}] {message}", flush=True)


def ops_overrides():
    """{op: function} of the keras_vmoe ops this backend overrides (the
    others run the generic keras.ops reference)."""
    return {op: f"{fn.__module__}.{fn.__qualname__}" for op, fn in moe_ops.OVERRIDES.items()}


# Candidates -----------------------------------------------------------------


def build_layer(benchmark, case):
    """The built layer that `case` names, for `benchmark`'s inputs."""
    num_experts, k, mlp_dim = benchmark.num_experts, benchmark.num_selected_experts, benchmark.mlp_dim
    dtype = benchmark.dtype
    if case.candidate == "dense":
        layer = Mlp(mlp_dim=benchmark.dense_mlp_dim, dtype=dtype)
    elif case.candidate == "sparse_moe":
        layer = SparseMoE(
            num_experts=num_experts,
            mlp_dim=mlp_dim,
            router=getattr(case, "router", "token_choice"),
            num_selected_experts=k,
            capacity_factor=case.capacity_factor,
            group_size=case.group_size,
            dtype=dtype,
        )
    elif case.candidate == "soft_moe":
        slots = benchmark.slots_per_expert
        layer = SoftMoE(num_experts=num_experts, mlp_dim=mlp_dim, slots_per_expert=slots, dtype=dtype)
    elif case.candidate == "vmoe_einsum":
        layer = OneHotEinsumMoE(num_experts, mlp_dim, k, case.capacity_factor, case.group_size)
    elif case.candidate == "dense_masked":
        layer = DenseMaskedMoE(num_experts, mlp_dim, k)
    elif case.candidate == "experts_only":
        layer = ExpertsOnly(num_experts, mlp_dim, k)
    else:
        raise ValueError(f"unknown candidate {case.candidate!r}")
    layer.build(benchmark.input_shape)
    return layer


def make_inputs(benchmark):
    """Fixed random tokens and the cotangent that turns outputs into a loss."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal(benchmark.input_shape, dtype=np.float32)
    cotangent = rng.standard_normal(benchmark.input_shape, dtype=np.float32)
    return tokens, cotangent


# One step per mode: a callable that runs the forward pass (training=False)
# or a training step (loss, gradients of the weights and the inputs) once
# and returns when the result is computed. `prepare=True` traces and compiles
# before returning, where the mode allows it (used by the memory probe).


def scalar_loss(outputs, cotangent, losses):
    """sum(outputs * cotangent) plus the layer's auxiliary losses."""
    return ops.sum(outputs * cotangent) + sum(losses, ops.zeros(()))


def jax_step(layer, tokens, cotangent, training, prepare=False):
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    tokens, cotangent = jax.numpy.asarray(tokens), jax.numpy.asarray(cotangent)

    def forward(trainable, non_trainable, tokens):
        return layer.stateless_call(trainable, non_trainable, tokens, training=False)[0]

    def loss(trainable, non_trainable, tokens):
        outputs, _, losses = layer.stateless_call(
            trainable, non_trainable, tokens, training=True, return_losses=True
        )
        return scalar_loss(outputs, cotangent, losses)

    function = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)) if training else forward)
    if prepare:
        function = function.lower(trainable, non_trainable, tokens).compile()
    return lambda: jax.block_until_ready(function(trainable, non_trainable, tokens))


def tensorflow_step(layer, tokens, cotangent, training, jit_compile, prepare=False):
    tokens, cotangent = tf.constant(tokens), tf.constant(cotangent)

    @tf.function(jit_compile=jit_compile)
    def forward(tokens):
        return layer(tokens, training=False)

    @tf.function(jit_compile=jit_compile)
    def train(tokens):
        with tf.GradientTape() as tape:
            tape.watch(tokens)
            loss = scalar_loss(layer(tokens, training=True), cotangent, layer.losses)
        return loss, tape.gradient(loss, layer.trainable_variables + [tokens])

    function = train if training else forward
    if prepare:
        # Traces the graph; under XLA the compilation would still happen at
        # the first call, which is why the memory probe uses tf-graph.
        function = function.get_concrete_function(tokens)
    # TensorFlow runs a function synchronously on the CPU; fetching one
    # output to numpy makes sure it is there.
    return lambda: tf.nest.flatten(function(tokens))[0].numpy()


def torch_step(layer, tokens, cotangent, training, prepare=False):
    # On Keras' device (a GPU if there is one), once, not at every call.
    tokens, cotangent = ops.convert_to_tensor(tokens), ops.convert_to_tensor(cotangent)
    differentiated = [v.value for v in layer.trainable_variables] + [tokens]
    # CUDA runs asynchronously: a step returns once its kernels are done.
    synchronize = torch.cuda.synchronize if tokens.is_cuda else lambda: None

    def forward():
        with torch.no_grad():  # As Keras' predict_step on torch.
            layer(tokens, training=False)
        synchronize()

    def train():
        for tensor in differentiated:
            tensor.grad = None
        tokens.requires_grad_(True)
        loss = scalar_loss(layer(tokens, training=True), cotangent, layer.losses)
        loss.backward()
        synchronize()

    return train if training else forward


def torch_compiled_step(layer, tokens, cotangent, training, prepare=False):
    """`torch_step` under `torch.compile`, as Keras' `jit_compile=True` runs
    on PyTorch: the forward pass, or the loss (whose backward AOTAutograd
    compiles with it) with `backward()` outside, as Keras' train step breaks
    its graph there. The first call compiles."""
    tokens, cotangent = ops.convert_to_tensor(tokens), ops.convert_to_tensor(cotangent)
    synchronize = torch.cuda.synchronize if tokens.is_cuda else lambda: None
    forward_graph = torch.compile(lambda tokens: layer(tokens, training=False))
    loss_graph = torch.compile(
        lambda tokens: scalar_loss(layer(tokens, training=True), cotangent, layer.losses)
    )

    # Each call starts with no losses left on the layer (dynamo guards on
    # them) and without gradients, as Keras' compiled train step does.
    def forward():
        moe_ops.clear_losses(layer)
        with torch.no_grad():
            forward_graph(tokens)
        synchronize()

    def train():
        moe_ops.clear_losses(layer)
        moe_ops.zero_grad(layer)
        tokens.grad = None
        tokens.requires_grad_(True)
        loss_graph(tokens).backward()
        synchronize()

    return train if training else forward


STEP_BUILDERS = {
    "jax-jit": jax_step,
    "tf-xla": functools.partial(tensorflow_step, jit_compile=True),
    "tf-graph": functools.partial(tensorflow_step, jit_compile=False),
    "torch-eager": torch_step,
    "torch-compiled": torch_compiled_step,
}


def with_grouped_gemm(enabled, step):
    """`step` run with grouped matmuls forced on or off (None: as it is);
    the choice is made when a layer is called (traced, under jit)."""
    if enabled is None:
        return step

    def run():
        with moe_ops.grouped_gemm(enabled):
            return step()

    return run


# Timing -------------------------------------------------------------------


def seconds(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_interleaved(steps, rounds, label):
    """Times every step `rounds` times, round-robin (each round starts one
    step later), after a first call timed on its own (trace + compile + run).

    Returns ({name: measurement}, {name: error}) for the steps that ran and
    those whose first call raised.
    """
    first_call, errors = {}, {}
    for name, step in steps.items():
        try:
            first_call[name] = seconds(step)
        except Exception as error:  # Reported, and the other candidates go on.
            errors[name] = f"{type(error).__name__}: {error}"
            log(f"{label}: {name} failed:\n{traceback.format_exc()}")
    names = list(first_call)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(steps[name]))
        log(f"{label}: round {round_index + 1}/{rounds}")
    measured = {
        name: {
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "first_call_s": first_call[name],
            "times_ms": [round(1e3 * t, 3) for t in times[name]],
        }
        for name in names
    }
    return measured, errors


def run_timing(task):
    """{benchmark: {mode: {phase: {case label: measurement}}}} for this backend."""
    results, errors = {}, []
    modes = MODES[BACKEND]
    for spec in task["benchmarks"]:
        benchmark = Benchmark.from_dict(spec)
        keras.utils.set_random_seed(0)
        tokens, cotangent = make_inputs(benchmark)
        layers, cases = {}, {benchmark.label(case): case for case in benchmark.cases}
        for case in benchmark.cases:
            try:
                layers[benchmark.label(case)] = build_layer(benchmark, case)
            except Exception as error:
                errors.append(f"{benchmark.name} / {benchmark.label(case)}: {type(error).__name__}: {error}")
        results[benchmark.name] = {mode: {} for mode in modes}
        for phase, rounds in (("forward", benchmark.forward_rounds), ("train", benchmark.train_rounds)):
            training = phase == "train"
            steps = {
                (mode, label): with_grouped_gemm(
                    cases[label].grouped_gemm, STEP_BUILDERS[mode](layer, tokens, cotangent, training)
                )
                for mode in modes
                for label, layer in layers.items()
            }
            measured, failed = time_interleaved(steps, rounds, f"{benchmark.name} {phase}")
            for (mode, label), measurement in measured.items():
                results[benchmark.name][mode].setdefault(phase, {})[label] = measurement
            for (mode, label), error in failed.items():
                errors.append(f"{benchmark.name} / {mode} / {phase} / {label}: {error}")
        del layers, steps
        gc.collect()
    return {"results": results, "errors": errors, "ops_overrides": ops_overrides()}


# Memory ---------------------------------------------------------------------


def reset_peak_rss():
    """Makes the peak RSS (ru_maxrss) restart from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def analytic_dispatch_mb(benchmark, case, capacity):
    """Bytes the dispatch materialises: routing tables and expert inputs."""
    num_groups = benchmark.num_tokens // case.group_size
    group_size, num_experts, k = case.group_size, benchmark.num_experts, benchmark.num_selected_experts
    if case.candidate == "sparse_moe":
        # dispatch_index (G, E, C) + combine_index and combine_weights (G, S, K), 4 bytes each.
        table_entries = num_groups * (num_experts * capacity + 2 * group_size * k)
    else:
        # One-hot dispatch and combine tensors (G, S, E, C), float32.
        table_entries = 2 * num_groups * group_size * num_experts * capacity
    expert_inputs = num_experts * num_groups * capacity * benchmark.hidden_dim
    return {"routing_tables_mb": 4 * table_entries / 2**20, "expert_inputs_mb": 4 * expert_inputs / 2**20}


def run_memory(task):
    """Peak RSS increase over one forward call (or, with `training`, one
    forward and backward call) of one candidate in one mode."""
    benchmark, case, mode = Benchmark.from_dict(task["benchmark"]), Case(**task["case"]), task["mode"]
    if case.candidate not in MEMORY_CANDIDATES:
        raise ValueError(f"no memory probe for {case.candidate!r}")
    # Warm up the library (kernels, thread pools, allocator) on a tiny copy.
    tiny_benchmark, tiny_case = benchmark.tiny(), case.tiny()
    tiny_tokens, tiny_cotangent = make_inputs(tiny_benchmark)
    tiny_layer = build_layer(tiny_benchmark, tiny_case)
    training = task.get("training", False)  # Forward and backward.
    STEP_BUILDERS[mode](tiny_layer, tiny_tokens, tiny_cotangent, training=training)()

    layer = build_layer(benchmark, case)
    tokens, cotangent = make_inputs(benchmark)
    step = STEP_BUILDERS[mode](layer, tokens, cotangent, training=training, prepare=True)
    gc.collect()
    reset_peak_rss()
    before = peak_rss_mb()
    step()
    result = {"peak_rss_increase_mb": peak_rss_mb() - before, "ops_overrides": ops_overrides()}
    if case.candidate != "dense":
        if case.candidate == "vmoe_einsum":
            capacity = layer.capacity
        else:
            capacity = layer.router.capacity(case.group_size)
        result.update(capacity=capacity, **analytic_dispatch_mb(benchmark, case, capacity))
    phase = "forward and backward" if training else "forward"
    log(f"memory {mode} {phase} {benchmark.label(case)}: +{result['peak_rss_increase_mb']:.1f} MB")
    return result


def main(task_path, result_path):
    with open(task_path) as file:
        task = json.load(file)
    result = run_timing(task) if task["task"] == "timing" else run_memory(task)
    with open(result_path, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
