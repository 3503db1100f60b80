"""Small test helpers (keras-hub's own TestCase needs `grain`; we keep ours tiny)."""

import os
import pathlib

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "vmoe"
DATA = SHARED / "data"

requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"vmoe fixtures not found at {FIXTURES}"
)
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"data sets not found at {DATA}")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def backend():
    return keras.backend.backend()


def random_images(batch, shape=(32, 32, 3), seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, *shape)).astype("float32")


def tiny_vit_arguments(**overrides):
    """A 2-to-4 block ViT on 32x32 images with 8x8 patches (16 patches)."""
    arguments = dict(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        mlp_dim=64,
        num_heads=2,
    )
    arguments.update(overrides)
    return arguments
