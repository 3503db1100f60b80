"""keras_vmoe: Mixture-of-Experts vision models for Keras 3.

V-MoE, Soft MoE and dense ViTs as keras-hub backbones and tasks, running
unchanged on JAX, TensorFlow and PyTorch (pick one with `KERAS_BACKEND`).
"""

from keras_vmoe import convert
from keras_vmoe import data
from keras_vmoe import distribution
from keras_vmoe import evaluation
from keras_vmoe import layers
from keras_vmoe import models
from keras_vmoe import ops
from keras_vmoe import presets
from keras_vmoe.upcycling import upcycle
from keras_vmoe.version import __version__
