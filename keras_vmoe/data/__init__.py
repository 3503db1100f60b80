"""Readers for the data sets the presets and guides are trained on."""

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.data.coco_captions import load_coco_captions
