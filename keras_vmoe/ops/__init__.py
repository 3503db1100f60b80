"""MoE ops: dispatch tokens to expert slots, run the experts, combine.

The generic `keras.ops` implementation in `generic.py` is the reference. A
backend module (`jax.py`, `tensorflow.py`, `torch.py`), when present, overrides
the ops it measured faster; the choice is made once, at import. Set
`KERAS_VMOE_GENERIC_OPS=1` to force the reference everywhere (for debugging).
"""

import importlib
import os

import keras

from keras_vmoe.ops import generic

OP_NAMES = (
    "dispatch",
    "combine",
    "expert_dense",
    "soft_dispatch",
    "soft_combine",
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
expert_dense = OVERRIDES.get("expert_dense", generic.expert_dense)
soft_dispatch = OVERRIDES.get("soft_dispatch", generic.soft_dispatch)
soft_combine = OVERRIDES.get("soft_combine", generic.soft_combine)
