"""MoE ops: dispatch tokens to expert slots, run the experts, combine.

The generic `keras.ops` implementation in `generic.py` is the reference. A
backend module (`tensorflow.py`, `torch.py`), when present, overrides the ops
it measured faster (`benchmarks/moe_layer.py`); the choice is made once, at
import. Set `KERAS_VMOE_GENERIC_OPS=1` to force the reference everywhere (for
debugging). The layers call `sparse_moe` / `soft_moe`, which compose the
others, so a backend can also replace the whole dispatch -> experts ->
combine (PyTorch and TensorFlow graphs skip the empty capacity slots).
JAX keeps the reference: under `jit` shapes are static, and on CPU
`jax.lax.ragged_dot` costs about E times a dense matmul.

On accelerators the sparse layer runs its experts as grouped matmuls
(`generic.grouped_sparse_moe`: `jax.lax.ragged_dot` on GPU and TPU,
`torch.nn.functional.grouped_mm` on CUDA in bfloat16), chosen at run time
from the tokens' device (each backend's `prefers_grouped_gemm`); on this
CPU the paths above measure faster. `KERAS_VMOE_GROUPED_GEMM=1` (or
`grouped_gemm(True)`) forces it anywhere, `=0` turns it off.
"""

import contextlib
import functools
import importlib
import os

import keras

from keras_vmoe.ops import generic
from keras_vmoe.ops import group_local

OP_NAMES = (
    "zero_grad",
    "clear_losses",
    "dot_product_attention",
    "amax",
    "amin",
    "normal",
    "grouped_dense",
    "prefers_grouped_gemm",
    "dispatch",
    "combine",
    "sparse_moe",
    "expert_dense",
    "soft_dispatch",
    "soft_combine",
    "soft_moe",
    "top_k_experts_plan",
)


def _backend_overrides():
    if os.environ.get("KERAS_VMOE_GENERIC_OPS", "0") not in ("", "0"):
        return {}
    name = f"keras_vmoe.ops.{keras.backend.backend()}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return {}
    return {op: getattr(module, op) for op in OP_NAMES if hasattr(module, op)}


OVERRIDES = _backend_overrides()
_portable_depth = 0  # See `portable()`.
dispatch = OVERRIDES.get("dispatch", generic.dispatch)
combine = OVERRIDES.get("combine", generic.combine)
_fast_sparse_moe = OVERRIDES.get(
    "sparse_moe", functools.partial(generic.sparse_moe, dispatch=dispatch, combine=combine)
)
expert_dense = OVERRIDES.get("expert_dense", generic.expert_dense)
grouped_dense = OVERRIDES.get("grouped_dense", generic.grouped_dense)
# `keras.ops.max` / `min`, `keras.random.normal` and `dot_product_attention`,
# as the layers use them; PyTorch's versions do not break a `torch.compile`
# graph.
amax = OVERRIDES.get("amax", keras.ops.max)
amin = OVERRIDES.get("amin", keras.ops.min)
normal = OVERRIDES.get("normal", keras.random.normal)
dot_product_attention = OVERRIDES.get("dot_product_attention", keras.ops.dot_product_attention)
# A training step's bookkeeping (PyTorch: `zero_grad`, which Keras' train step
# calls, and a model's losses after `compute_loss`); nothing elsewhere.
zero_grad = OVERRIDES.get("zero_grad", lambda model: None)
clear_losses = OVERRIDES.get("clear_losses", lambda model: None)
GroupedRows = generic.GroupedRows
_prefers_grouped_gemm = OVERRIDES.get("prefers_grouped_gemm", lambda tokens: False)
_grouped_gemm = {"0": False, "1": True}.get(os.environ.get("KERAS_VMOE_GROUPED_GEMM", ""), None)
soft_dispatch = OVERRIDES.get("soft_dispatch", generic.soft_dispatch)
soft_combine = OVERRIDES.get("soft_combine", generic.soft_combine)
_fast_soft_moe = OVERRIDES.get(
    "soft_moe", functools.partial(generic.soft_moe, dispatch=soft_dispatch, combine=soft_combine)
)


def sparse_moe(tokens, plan, experts):
    """`generic.sparse_moe` with the active backend's ops (the reference ones
    in a `portable()` context, where shapes must not depend on the routing),
    or `generic.grouped_sparse_moe` where grouped matmuls are chosen."""
    if _portable_depth:
        return generic.sparse_moe(tokens, plan, experts)
    if uses_grouped_gemm(tokens, plan):
        return generic.grouped_sparse_moe(tokens, plan, experts)
    return _fast_sparse_moe(tokens, plan, experts)


def uses_grouped_gemm(tokens, plan):
    """Whether `sparse_moe` runs `plan` through grouped matmuls: forced
    (`grouped_gemm`, `KERAS_VMOE_GROUPED_GEMM`) or, by default, on an
    accelerator that has them."""
    return _prefers_grouped_gemm(tokens) if _grouped_gemm is None else _grouped_gemm


@contextlib.contextmanager
def grouped_gemm(enabled):
    """Within this context `sparse_moe` uses grouped matmuls (True), never
    (False), or where the device has them (None, the default)."""
    global _grouped_gemm
    previous, _grouped_gemm = _grouped_gemm, enabled
    try:
        yield
    finally:
        _grouped_gemm = previous


def soft_moe(tokens, dispatch_weights, combine_weights, experts):
    """`generic.soft_moe` with the active backend's ops (the reference ones in
    a `portable()` context)."""
    if _portable_depth:
        return generic.soft_moe(tokens, dispatch_weights, combine_weights, experts)
    return _fast_soft_moe(tokens, dispatch_weights, combine_weights, experts)


def plan_builder(name):
    """The active backend's override of a routing-plan builder of
    `keras_vmoe.layers.routing_plans` (`"top_k_experts_plan"`), which returns
    the plan's tables and the builder's other outputs as one tuple; None where
    the backend has none, and in a `portable()` context or under a
    `keras.distribution`, where the reference's `keras.ops` build the plan."""
    if _portable_depth or keras.distribution.distribution() is not None:
        return None
    return OVERRIDES.get(name)


@contextlib.contextmanager
def portable():
    """Within this context the ops trace to what every exporter can serialise.

    Used by `keras_vmoe.export` while a model is traced for serving: on JAX,
    `jax.lax.top_k` lowers to a StableHLO composite (`vhlo.composite_v2`) that
    the TensorFlow of a SavedModel's reader may not deserialise, and ONNX has
    no stable sort; a sort-based top-k and the reference ops avoid both.
    """
    global _portable_depth
    _portable_depth += 1
    try:
        yield
    finally:
        _portable_depth -= 1


def is_portable():
    """Whether a `portable()` context is active."""
    return _portable_depth > 0


def top_k(x, k):
    """`keras.ops.top_k` along the last axis (ties: the lower index first).

    Under a `keras.distribution` or in a `portable()` context, a stable sort
    (`group_local.top_k`): XLA's TopK is not partitioned by GSPMD, and its JAX
    lowering does not survive every export.
    """
    if _portable_depth or keras.distribution.distribution() is not None:
        return group_local.top_k(x, k)
    return keras.ops.top_k(x, k)


def one_hot(indices, depth, dtype="float32"):
    """`keras.ops.one_hot`, written as a comparison with `arange(depth)`:
    the same values, and it converts to ONNX at any rank (tf2onnx converts
    TensorFlow's OneHot at rank 1 only)."""
    indices = keras.ops.convert_to_tensor(indices)
    return keras.ops.cast(
        keras.ops.equal(indices[..., None], keras.ops.arange(0, depth, dtype=indices.dtype)), dtype
    )
