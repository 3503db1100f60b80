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
"""

import functools
import importlib
import os

import keras

from keras_vmoe.ops import generic

OP_NAMES = (
    "dispatch",
    "combine",
    "sparse_moe",
    "expert_dense",
    "soft_dispatch",
    "soft_combine",
    "soft_moe",
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
dispatch = OVERRIDES.get("dispatch", generic.dispatch)
combine = OVERRIDES.get("combine", generic.combine)
sparse_moe = OVERRIDES.get(
    "sparse_moe", functools.partial(generic.sparse_moe, dispatch=dispatch, combine=combine)
)
expert_dense = OVERRIDES.get("expert_dense", generic.expert_dense)
soft_dispatch = OVERRIDES.get("soft_dispatch", generic.soft_dispatch)
soft_combine = OVERRIDES.get("soft_combine", generic.soft_combine)
soft_moe = OVERRIDES.get(
    "soft_moe", functools.partial(generic.soft_moe, dispatch=soft_dispatch, combine=soft_combine)
)
