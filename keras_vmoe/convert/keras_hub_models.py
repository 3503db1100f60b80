"""One entry point for every keras-hub model this zoo converts.

`from_keras_hub(source)` picks the converter from the model's class, or from
the class a preset's `config.json` names, so the CLI and `upcycle` need not
know the families one by one.
"""

import os

from keras_vmoe.convert.keras_hub_dinov2 import from_keras_hub_dinov2
from keras_vmoe.convert.keras_hub_pali_gemma import from_keras_hub_pali_gemma
from keras_vmoe.convert.keras_hub_siglip import from_keras_hub_siglip
from keras_vmoe.convert.keras_hub_source import preset_class_name
from keras_vmoe.convert.keras_hub_vit import from_keras_hub_vit

# keras-hub class name -> converter.
KERAS_HUB_CONVERTERS = {
    "ViTBackbone": from_keras_hub_vit,
    "SigLIPBackbone": from_keras_hub_siglip,
    "SigLIPVisionEncoder": from_keras_hub_siglip,
    "DINOV2Backbone": from_keras_hub_dinov2,
    "PaliGemmaBackbone": from_keras_hub_pali_gemma,
    "PaliGemmaCausalLM": from_keras_hub_pali_gemma,
}


def keras_hub_converter(source):
    """The converter for a keras-hub model or preset, or None for a model
    that is not a keras-hub one (e.g. already ours)."""
    if isinstance(source, (str, os.PathLike)):
        name = preset_class_name(source)
        if name not in KERAS_HUB_CONVERTERS:
            raise ValueError(
                f"{os.fspath(source)} is a {name} preset; the keras-hub models that convert are "
                f"{', '.join(KERAS_HUB_CONVERTERS)}."
            )
        return KERAS_HUB_CONVERTERS[name]
    if type(source).__module__.startswith("keras_vmoe"):
        return None
    for cls in type(source).__mro__:  # keras-hub's classes and subclasses of them.
        if cls.__module__.startswith("keras_hub.") and cls.__name__ in KERAS_HUB_CONVERTERS:
            return KERAS_HUB_CONVERTERS[cls.__name__]
    if type(source).__module__.startswith("keras_hub."):
        raise ValueError(
            f"keras-hub {type(source).__name__} models do not convert; the ones that do are "
            f"{', '.join(KERAS_HUB_CONVERTERS)}."
        )
    return None


def from_keras_hub(source, **kwargs):
    """Converts any supported keras-hub model or preset into ours.

    Args:
        source: a keras-hub `ViTBackbone`, `SigLIPBackbone`,
            `SigLIPVisionEncoder`, `DINOV2Backbone`, `PaliGemmaBackbone` or
            `PaliGemmaCausalLM`, or a preset of one (a local folder or a
            handle keras-hub resolves).
        **kwargs: the chosen converter's options (`pooling`, `dtype`, ...).

    Returns:
        What the family's converter returns: a dense `VMoEBackbone` for the
        image towers, a `PaliGemmaMoECausalLM` / `PaliGemmaMoEBackbone` for
        PaliGemma.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    converter = keras_hub_converter(source)
    if converter is None:
        raise ValueError(f"from_keras_hub expects a keras-hub model or preset, got {type(source).__name__}.")
    return converter(source, **kwargs)
