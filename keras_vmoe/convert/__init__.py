"""Converters from foreign checkpoints to keras_vmoe models."""

from keras_vmoe.convert.dinov2_onnx import load_dinov2_onnx
from keras_vmoe.convert.keras_hub_dinov2 import from_keras_hub_dinov2
from keras_vmoe.convert.keras_hub_models import from_keras_hub
from keras_vmoe.convert.keras_hub_pali_gemma import from_keras_hub_pali_gemma
from keras_vmoe.convert.keras_hub_siglip import from_keras_hub_siglip
from keras_vmoe.convert.keras_hub_vit import from_keras_hub_vit
from keras_vmoe.convert.vmoe_checkpoint import backbone_from_vmoe_config
from keras_vmoe.convert.vmoe_checkpoint import load_vmoe_checkpoint
from keras_vmoe.convert.vmoe_checkpoint import vmoe_name_table
from keras_vmoe.convert.vmoe_checkpoint_reader import read_vmoe_checkpoint
from keras_vmoe.errors import CheckpointError
