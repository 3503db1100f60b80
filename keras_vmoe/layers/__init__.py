"""Layers: the encoder pieces, the dense MLP, routers, MoE layers and the PatchMerger."""

from keras_vmoe.layers.encoder import ClassToken
from keras_vmoe.layers.encoder import EncoderBlock
from keras_vmoe.layers.encoder import MultiHeadAttentionPooling
from keras_vmoe.layers.encoder import MultiHeadDotProductAttention
from keras_vmoe.layers.encoder import PatchEmbedding
from keras_vmoe.layers.encoder import PositionEmbedding
from keras_vmoe.layers.encoder import SequencePooling
from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.layers.moe import MoELayer
from keras_vmoe.layers.moe import SoftMoE
from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.layers.patch_merger import PatchMerger
from keras_vmoe.layers.routing import ExpertChoiceRouter
from keras_vmoe.layers.routing import Router
from keras_vmoe.layers.routing import RoutingPlan
from keras_vmoe.layers.routing import SoftRouter
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.multimodal_routing import MultimodalTokenChoiceRouter
from keras_vmoe.layers.multimodal_routing import global_entropy_loss
from keras_vmoe.layers.multimodal_routing import local_entropy_loss
