"""E^3 ("Sparse MoEs meet Efficient Ensembles", Allingham et al., 2022).

A V-MoE becomes an ensemble of M members almost for free: the batch is
repeated M times before the first MoE block (`EnsembleRepeat`), member m
routes only within its own pool of E / M experts (`SparseMoE(ensemble_size=M)`),
and the dense blocks and the head are shared. The model's raw output holds one
row per member, row b * M + m = member m of image b (vmoe's layout); the
ensemble predicts the log of the members' mean probability
(`ensemble_log_mean`, vmoe's `evaluate/ensemble.py`).
"""

import math

import keras
from keras import ops

from keras_vmoe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_vmoe")
class EnsembleRepeat(keras.layers.Layer):
    """Repeats every image M times along the batch: (B, ...) -> (B * M, ...),
    row b * M + m = member m of image b (vmoe's `jnp.repeat(x, M, axis=0)`).

    Example:
    >>> tuple(EnsembleRepeat(3)(keras.ops.ones((2, 5, 8))).shape)
    (6, 5, 8)
    """

    def __init__(self, ensemble_size, **kwargs):
        super().__init__(**kwargs)
        self.ensemble_size = check_int("ensemble_size", ensemble_size, minimum=1, owner="EnsembleRepeat")

    def call(self, inputs):
        return ops.repeat(inputs, self.ensemble_size, axis=0)

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        return (None if batch is None else batch * self.ensemble_size,) + tuple(input_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(ensemble_size=self.ensemble_size)
        return config


def check_ensemble_arguments(ensemble_size, num_experts, group_size, owner="SparseMoE"):
    """`ensemble_size`, checked against a MoE layer's experts and group size."""
    ensemble_size = check_int("ensemble_size", ensemble_size, minimum=1, owner=owner)
    if num_experts % ensemble_size:
        raise ValueError(
            f"{owner}: ensemble_size={ensemble_size} must divide num_experts={num_experts} "
            "(each ensemble member routes within its own num_experts / ensemble_size experts)."
        )
    if group_size is not None and group_size % ensemble_size:
        raise ValueError(
            f"{owner}: group_size={group_size} must be a multiple of ensemble_size={ensemble_size}: "
            "it counts every member's copy of the images it routes (images x tokens x members)."
        )
    return ensemble_size


def check_ensemble_router(router, ensemble_size, owner="SparseMoE"):
    """An E^3 layer's router must route within `ensemble_size` expert pools
    (a router with pools of its own, LIMoE's modality pools, serves M = 1)."""
    partitions = getattr(router, "expert_partitions", 1)
    if ensemble_size > 1 and partitions != ensemble_size:
        raise ValueError(
            f"{owner}: ensemble_size={ensemble_size} needs a token-choice router that routes within "
            f"expert pools (expert_partitions={ensemble_size}); got {type(router).__name__} with "
            f"expert_partitions={partitions}."
        )


def member_logits(logits, ensemble_size):
    """(B * M, C) raw outputs -> (B, M, C), member m of image b at [b, m]."""
    logits = ops.convert_to_tensor(logits)
    if logits.shape[0] is not None and logits.shape[0] % ensemble_size:
        raise ValueError(
            f"{logits.shape[0]} rows of logits do not split into ensembles of {ensemble_size} members; "
            "the rows must be the model's raw output, M consecutive rows per image."
        )
    return ops.reshape(logits, (-1, ensemble_size, ops.shape(logits)[-1]))


def ensemble_log_mean(logits, ensemble_size):
    """log(mean over the members of softmax(logits)): (B * M, C) -> (B, C).

    vmoe's `_ensemble_log_mean(logits, M, jax.nn.log_softmax)`: log-softmax
    per member, then logsumexp over the members minus log M.

    Example:
    >>> logits = keras.ops.convert_to_tensor([[0.0, 0.0], [0.0, 0.0]])
    >>> [round(float(v), 4) for v in ensemble_log_mean(logits, 2)[0]]
    [-0.6931, -0.6931]
    """
    log_probs = ops.log_softmax(member_logits(logits, ensemble_size), axis=-1)
    return ops.logsumexp(log_probs, axis=1) - math.log(ensemble_size)
