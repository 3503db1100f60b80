from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_causal_lm import PaliGemmaMoECausalLM
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_causal_lm_preprocessor import (
    PaliGemmaMoECausalLMPreprocessor,
)
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_image_converter import (
    PaliGemmaMoEImageConverter,
)
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_tokenizer import PaliGemmaMoETokenizer
