"""The collectives of a Keras model's compiled train or predict step."""

from keras_vmoe.distribution.collectives import collective_report
from keras_vmoe.ops.tools import compiled_steps


def step_collectives(model, x, y=None, step="train"):
    """A `CollectiveReport` of `model`'s compiled `step` ("train" or "predict")
    on the batch `x` (and labels `y`), under the active distribution.

    JAX only. For "train", the model must be compiled and have run `fit` for
    at least one step. Every number is per device and per step.
    """
    if step == "train":
        if y is None:
            raise ValueError("step_collectives(step='train') needs the labels `y`.")
        return collective_report(compiled_steps.train_step_hlo(model, x, y))
    if step == "predict":
        return collective_report(compiled_steps.predict_step_hlo(model, x))
    raise ValueError(f"step_collectives: step must be 'train' or 'predict', got {step!r}.")
