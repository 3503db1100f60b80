"""Resolving the `source` argument of the keras-hub converters.

A source is a keras-hub model object, a local preset folder (as written by
`save_to_preset`), or a handle keras-hub resolves (`kaggle://...`,
`hf://...`, a built-in preset name). A local folder's `config.json` names its
backbone class, so a preset of the wrong family is refused before any weight
is read.
"""

import json
import os

import keras_hub

from keras_vmoe.errors import CheckpointError
from keras_vmoe.keras_hub_internals import load_json

_HANDLE_PREFIXES = ("kaggle://", "hf://", "gs://", "modelscope://")


def looks_like_path(source):
    """True for a string that names a file or folder rather than a handle."""
    return not source.startswith(_HANDLE_PREFIXES) and (
        os.path.exists(source) or os.sep in source or source.startswith(".")
    )


# Hugging Face Transformers `model_type`s that keras-hub 0.32 loads, and the
# keras-hub class it builds for each (`keras_hub/src/utils/transformers`).
TRANSFORMERS_MODEL_TYPES = {
    "vit": "ViTBackbone",
    "dinov2": "DINOV2Backbone",
    "dinov2_with_registers": "DINOV2Backbone",
    "paligemma": "PaliGemmaBackbone",
}


def _class_from_config(config, where):
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is not a keras-hub or Hugging Face config (not a JSON object).")
    if "registered_name" in config:
        return str(config["registered_name"]).rsplit(">", 1)[-1]
    if "model_type" in config:  # A Hugging Face Transformers checkpoint.
        model_type = str(config["model_type"])
        return TRANSFORMERS_MODEL_TYPES.get(model_type, f"Hugging Face '{model_type}' model")
    raise CheckpointError(f"{where} names no model class ('registered_name' or 'model_type').")


def preset_class_name(preset):
    """The class a keras-hub preset's `config.json` names (e.g.
    `"SigLIPBackbone"`; for a Hugging Face Transformers checkpoint, the class
    keras-hub builds from it): read from a local folder, or fetched alone
    (without the weights) for a handle."""
    preset = os.fspath(preset)
    if not looks_like_path(preset):
        return _class_from_config(load_json(preset), f"The config.json of {preset}")
    config_path = os.path.join(preset, "config.json")
    if not os.path.isdir(preset):
        raise CheckpointError(f"{preset} is not a folder; expected a keras-hub preset folder.")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{preset} has no config.json; expected a keras-hub preset folder.")
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path} is not readable JSON: {error}.") from error
    return _class_from_config(config, config_path)


def load_keras_hub_backbone(source, classes, converter, **kwargs):
    """A keras-hub backbone of one of `classes` from a model or a preset.

    Args:
        source: a keras-hub model, a local preset folder or a preset handle.
        classes: the accepted keras-hub classes.
        converter: the converter's name, for errors.
        **kwargs: passed to `from_preset` (e.g. `image_shape`, `dtype`).
    """
    names = " or ".join(cls.__name__ for cls in classes)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if looks_like_path(source):
            found = preset_class_name(source)
            if found not in {cls.__name__ for cls in classes}:
                raise ValueError(f"{converter}: {source} is a {found} preset; expected a {names} preset.")
        source = keras_hub.models.Backbone.from_preset(source, **kwargs)
    if isinstance(source, keras_hub.models.Task):
        source = source.backbone
    if not isinstance(source, classes):
        raise ValueError(
            f"{converter}: expected a keras-hub {names} or a preset of one, got {type(source).__name__}."
        )
    return source
