"""JAX overrides: the grouped matmul of accelerators.

The capacity-padded reference (`generic`) stays the default on CPU, where
`jax.lax.ragged_dot` costs about E times a dense matmul; on GPU and TPU the
sparse layer runs its experts through `ragged_dot`
(`generic.grouped_sparse_moe`).
"""

import jax
from keras import ops

from keras_vmoe.ops import generic


def prefers_grouped_gemm(tokens):
    """Grouped matmuls on GPU and TPU."""
    return jax.default_backend() in ("gpu", "tpu")


def grouped_dense(rows, kernel, group_sizes, bias=None):
    rows, kernel = ops.convert_to_tensor(rows), ops.convert_to_tensor(kernel)
    outputs = jax.lax.ragged_dot(rows, kernel.astype(rows.dtype), group_sizes.astype("int32"))
    if bias is not None:
        bias = ops.cast(bias, rows.dtype)
        outputs = outputs + ops.take(bias, generic.row_experts(group_sizes, rows.shape[0]), axis=0)
    return outputs
