"""Readers for the data sets the presets and guides are trained on."""

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.data.coco_captions import load_coco_captions
from keras_vmoe.data.fashion_mnist import FASHION_MNIST_CLASS_NAMES
from keras_vmoe.data.fashion_mnist import load_fashion_mnist
from keras_vmoe.data.images import ImageReadError
from keras_vmoe.data.images import load_image_folder
