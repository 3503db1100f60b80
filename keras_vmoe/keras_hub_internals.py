"""The keras-hub internals keras_vmoe uses: the one module that imports `keras_hub.src`.

keras-hub's public API (as of 0.32) does not export these; each says what it
is and why we need it. `pyproject.toml` bounds keras-hub to the releases the
suite has run against (`>=0.32,<0.33`); when keras-hub moves one of these,
this file is the only one to change.
"""

# DINOv2's position-table resizing (bicubic through `keras.ops.image.resize`,
# whose kernel differs per backend, optionally antialiased), a static method
# of its embedding layer; the DINOv2 converter resizes exactly as keras-hub
# does on the running backend.
from keras_hub.src.models.dinov2.dinov2_layers import DINOV2Embedding  # noqa: F401

# keras-hub's Gemma RMSNorm, `x * (1 + scale)`: the PaliGemma decoder's. The
# public `keras_hub.layers.RMSNormalization` is another layer (`x * scale`).
from keras_hub.src.models.gemma.rms_normalization import RMSNormalization  # noqa: F401

# The decoder block of keras-hub's PaliGemma (prefix-LM attention, Gemma 2
# options), reused as is by our VLM; not exported.
from keras_hub.src.models.pali_gemma.pali_gemma_decoder_block import PaliGemmaDecoderBlock  # noqa: F401

# Reads one JSON file of a preset (a local folder or a handle, fetching only
# that file): the converters learn a preset's class before loading weights.
from keras_hub.src.utils.preset_utils import check_file_exists  # noqa: F401
from keras_hub.src.utils.preset_utils import load_json  # noqa: F401

# Registers built-in preset names for a class, as keras-hub's own families do
# from their `__init__`; not exported.
from keras_hub.src.utils.preset_utils import register_presets  # noqa: F401

# The decorator and helpers keras-hub's own preprocessors use to run eagerly
# or inside `tf.data` (tensor conversion and tf.function detection); not exported.
from keras_hub.src.utils.tensor_utils import convert_to_numpy  # noqa: F401
from keras_hub.src.utils.tensor_utils import in_tf_function  # noqa: F401
from keras_hub.src.utils.tensor_utils import preprocessing_function  # noqa: F401
