"""Model families: backbones, tasks, image converters and preprocessors."""

from keras_vmoe.models.flops import count_flops
from keras_vmoe.models.routing_inspection import expert_assignments
from keras_vmoe.models.routing_inspection import router_inputs
from keras_vmoe.models.image_classifier import VisionTransformerImageClassifier
from keras_vmoe.models.limoe import LIMoEBackbone
from keras_vmoe.models.limoe import LIMoEContrastiveModel
from keras_vmoe.models.limoe import LIMoEImageConverter
from keras_vmoe.models.limoe import LIMoEPreprocessor
from keras_vmoe.models.limoe import LIMoETokenizer
from keras_vmoe.models.limoe import LIMoEZeroShotClassifier
from keras_vmoe.models.limoe import train_limoe_vocabulary
from keras_vmoe.models.pali_gemma_moe import PaliGemmaMoEBackbone
from keras_vmoe.models.pali_gemma_moe import PaliGemmaMoECausalLM
from keras_vmoe.models.pali_gemma_moe import PaliGemmaMoECausalLMPreprocessor
from keras_vmoe.models.pali_gemma_moe import PaliGemmaMoEImageConverter
from keras_vmoe.models.pali_gemma_moe import PaliGemmaMoETokenizer
from keras_vmoe.models.pali_gemma_moe import train_pali_gemma_moe_vocabulary
from keras_vmoe.models.soft_moe import SOFT_MOE_ARCHITECTURES
from keras_vmoe.models.soft_moe import SoftMoEBackbone
from keras_vmoe.models.soft_moe import SoftMoEImageClassifier
from keras_vmoe.models.soft_moe import SoftMoEImageClassifierPreprocessor
from keras_vmoe.models.soft_moe import SoftMoEImageConverter
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone
from keras_vmoe.models.vision_transformer import every_n
from keras_vmoe.models.vision_transformer import last_n
from keras_vmoe.models.vmoe import VMOE_ARCHITECTURES
from keras_vmoe.models.vmoe import VMoEBackbone
from keras_vmoe.models.vmoe import VMoEImageClassifier
from keras_vmoe.models.vmoe import VMoEImageClassifierPreprocessor
from keras_vmoe.models.vmoe import VMoEImageConverter
from keras_vmoe.presets import register_bundled_presets

register_bundled_presets()
