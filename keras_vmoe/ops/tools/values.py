"""Reading a tensor's values where that is possible: eagerly, not while tracing.

Routers check their gates for NaN and infinity when they are called eagerly
outside training, to fail with a message instead of routing arbitrarily;
inside a traced graph (`jax.jit`, `tf.function`, `torch.compile`) there is no
value to read, and the check is skipped.
"""

import keras
import numpy as np


def is_concrete(x):
    """Whether `x` holds values now (not a tracer or a symbolic tensor)."""
    backend = keras.backend.backend()
    # Each branch imports the backend in use only (the others may be absent).
    if isinstance(x, keras.KerasTensor):
        return False
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() and not isinstance(x, tf.__internal__.SymbolicTensor)
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return True


def all_finite(x):
    """True or False for a concrete `x`; None when its values are unknown."""
    if not is_concrete(x):
        return None
    return bool(np.all(np.isfinite(keras.ops.convert_to_numpy(x))))
