"""Mlp and its Dropout: the identity skips the layer call, a positive rate still drops."""

import keras
import numpy as np

from keras_vmoe.layers.mlp import Dropout
from keras_vmoe.layers.mlp import Mlp
from tests.helpers import to_numpy


def test_dropout_hands_back_its_inputs_where_it_is_the_identity():
    x = keras.ops.ones((4, 8))
    assert Dropout(0.0)(x, training=True) is x
    assert Dropout(0.5)(x, training=False) is x
    dropped = to_numpy(Dropout(0.5, seed=1)(x, training=True))
    assert set(np.unique(dropped)) == {0.0, 2.0}  # Kept values are scaled by 1 / (1 - rate).


def test_mlp_dropout_acts_in_training_only():
    mlp = Mlp(mlp_dim=32, dropout_rate=0.5)
    x = keras.random.normal((2, 5, 16), seed=0)
    inference = to_numpy(mlp(x, training=False))
    np.testing.assert_array_equal(to_numpy(mlp(x)), inference)
    assert not np.allclose(to_numpy(mlp(x, training=True)), inference)
