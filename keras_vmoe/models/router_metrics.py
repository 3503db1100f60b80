"""Router metrics in `fit` / `evaluate` logs for tasks whose backbone has MoE layers.

Each MoE layer keeps the metrics of its latest call in `router_metrics`. A
task's `compute_loss` runs in the same trace as the forward pass on every
backend, so it can read them there and update `Mean` trackers, which Keras
then shows beside the loss: `moe_auxiliary_loss` (the summed auxiliary losses
of all MoE layers, the term added to the training loss) and
`moe_dropped_tokens` (the mean fraction of tokens no expert processed; only
when a layer can drop tokens, i.e. not for Soft MoE).

It also keeps a training step's state the same at the start of every step
(`zero_grad`, the layers' losses), so that on PyTorch Keras'
`jit_compile=True` step compiles once rather than at every step.
"""

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.models.vision_transformer import collect_moe_layers


class RouterMetricsMixin:
    """Mix into a `keras.Model` before it; call `track_router_metrics()` at
    the end of `__init__`."""

    def track_router_metrics(self):
        self._moe_layers = collect_moe_layers(self)
        if self._moe_layers:
            self.moe_auxiliary_loss_tracker = keras.metrics.Mean(name="moe_auxiliary_loss")
        if any(layer.drops_tokens for layer in self._moe_layers):
            self.moe_dropped_tokens_tracker = keras.metrics.Mean(name="moe_dropped_tokens")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        self.record_router_metrics()
        return loss

    def zero_grad(self, set_to_none=True):
        """What Keras' PyTorch train step calls to drop the last step's
        gradients: sets them to None (`keras_vmoe.ops.zero_grad`)."""
        moe_ops.zero_grad(self)

    def record_router_metrics(self):
        """Updates the trackers from the MoE layers' latest call and, the
        loss being computed, clears the layers' losses (a task with its own
        `compute_loss` calls this at its end)."""
        moe_ops.clear_losses(self)
        recorded = [layer.router_metrics for layer in getattr(self, "_moe_layers", ())]
        recorded = [metrics for metrics in recorded if metrics]
        if recorded:
            auxiliary = sum(ops.cast(m["auxiliary_loss"], "float32") for m in recorded)
            self.moe_auxiliary_loss_tracker.update_state(auxiliary)
            dropped = [m["dropped_tokens"] for m in recorded if "dropped_tokens" in m]
            if dropped:
                self.moe_dropped_tokens_tracker.update_state(
                    ops.mean(ops.stack([ops.cast(d, "float32") for d in dropped]))
                )
            for layer in self._moe_layers:
                layer.router_metrics = {}
