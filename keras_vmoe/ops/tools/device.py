"""The accelerator the active Keras backend computes on, in words."""

import os
import platform

import keras


def device_description():
    """E.g. "GPU NVIDIA H100 80GB HBM3", or "CPU x86_64, 2 cores"."""
    backend = keras.backend.backend()
    name = None
    # Each branch imports the backend in use only (the others may be absent).
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        name = f"{device.platform.upper()} {device.device_kind}" if device.platform != "cpu" else None
    elif backend == "torch":
        import torch

        name = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else None
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
        name = f"GPU {details.get('device_name', gpus[0].name)}" if gpus else None
    return name or f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
