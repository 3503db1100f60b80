import keras
from keras_hub.models import PaliGemmaCausalLM

from keras_vmoe.export import ExportMixin
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_causal_lm_preprocessor import (
    PaliGemmaMoECausalLMPreprocessor,
)
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.router_metrics import RouterMetricsMixin


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PaliGemmaMoECausalLM(ExportMixin, BuiltinPresetMixin, RouterMetricsMixin, PaliGemmaCausalLM):
    """A PaliGemma-style captioning / VQA model whose image tower may be a MoE.

    keras-hub's `PaliGemmaCausalLM` on a `PaliGemmaMoEBackbone`: the same
    outputs (next-token logits of the text positions), the same `generate()`
    with a key/value cache and keras-hub's samplers (`compile(sampler=...)`,
    greedy by default), the same loss (on response tokens only, through the
    preprocessor's sample weights). During `fit`, the image tower's MoE
    auxiliary losses are added to the language-model loss, and the logs show
    `moe_auxiliary_loss` (and `moe_dropped_tokens` for a V-MoE tower).

    Calling the model on preprocessed inputs
    (`{"images", "token_ids", "padding_mask", "response_mask"}`) applies no
    preprocessing; `fit`, `predict` and `generate` on
    `{"images", "prompts"[, "responses"]}` go through the preprocessor.

    Args:
        backbone: a `PaliGemmaMoEBackbone`.
        preprocessor: a `PaliGemmaMoECausalLMPreprocessor`, or None.

    Example:
    ```python
    causal_lm = PaliGemmaMoECausalLM(backbone, preprocessor)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    causal_lm.fit({"images": images, "prompts": prompts, "responses": captions},
                  epochs=3, batch_size=8)
    causal_lm.generate({"images": images[:2], "prompts": ["caption en\\n"] * 2})
    ```
    """

    backbone_cls = PaliGemmaMoEBackbone
    preprocessor_cls = PaliGemmaMoECausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        if not isinstance(backbone, PaliGemmaMoEBackbone):
            raise ValueError(
                f"{type(self).__name__} needs a PaliGemmaMoEBackbone, got "
                f"{type(backbone).__name__} (a keras-hub PaliGemma converts with "
                "keras_vmoe.convert.from_keras_hub_pali_gemma)."
            )
        super().__init__(preprocessor=preprocessor, backbone=backbone, **kwargs)
        self.track_router_metrics()
