"""Built-in preset names and where their weights come from.

A built-in name resolves to a local keras-hub preset folder:

- a bundled preset ships inside the package (`keras_vmoe.bundled_presets`,
  the repository's `presets/` folder): the image classifiers
  `vit_tiny_cifar10`, `vmoe_tiny_cifar10` and `soft_moe_tiny_cifar10` and
  the LIMoE zero-shot classifier `limoe_tiny_cifar10`, trained here on
  CIFAR-10 by the `recipe.py` beside them; they load offline;
- a released google-research/vmoe checkpoint (`gs://vmoe_checkpoints/<name>`)
  is downloaded from its https form on storage.googleapis.com on the first
  `from_preset`, with a progress bar, converted by `load_vmoe_checkpoint` and
  cached as a keras-hub preset under `$KERAS_VMOE_HOME/presets/<name>`
  (default `~/.keras/keras_vmoe`); later calls load the cached folder.

Set `KERAS_VMOE_CHECKPOINT_MIRROR` to a folder (or URL) that holds
`<name>.index` and `<name>.data-*` to convert from a copy instead of the
bucket, e.g. on a machine without network.

Example:
```python
classifier = keras_vmoe.models.VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
classifier.predict(images)  # uint8 images of any size; resized to 32x32.
keras_vmoe.models.VMoEImageClassifier.from_preset(
    "vmoe_s32_last2_ilsvrc2012_randaug_light1"
)  # downloads and converts on first use; resized to 224x224.
keras_vmoe.presets.list_presets()  # every built-in name with its description.
```
"""

import dataclasses
import importlib.resources
import json
import os
import pathlib
import shutil
import urllib.parse

import keras

from keras_vmoe.convert.vmoe_checkpoint import load_vmoe_checkpoint
from keras_vmoe.convert.vmoe_checkpoint_reader import checkpoint_data_files
from keras_vmoe.errors import PresetError  # noqa: F401 (raised here; importable from here, as before)
from keras_vmoe.keras_hub_internals import register_presets
from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin  # noqa: F401 (importable from here, as before)
from keras_vmoe.models.preset_mixin import set_preset_resolver
from keras_vmoe.models.soft_moe.soft_moe_backbone import SoftMoEBackbone
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone
from keras_vmoe.models.vmoe.vmoe_image_classifier_preprocessor import VMoEImageClassifierPreprocessor
from keras_vmoe.models.vmoe.vmoe_image_converter import VMoEImageConverter
from keras_vmoe.models.vmoe.vmoe_presets import VMOE_CHECKPOINT_PRESETS
from keras_vmoe.models.vmoe.vmoe_presets import VMoECheckpointPreset  # noqa: F401 (as before)
from keras_vmoe.models.vmoe.vmoe_presets import vmoe_paper_model_config  # noqa: F401 (as before)
from keras_vmoe.staging import staged_folder

VMOE_BUCKET_URL = "https://storage.googleapis.com/vmoe_checkpoints"


@dataclasses.dataclass(frozen=True)
class BundledPreset:
    """A keras-hub preset folder shipped inside the package, with what its
    recipe measured (`metrics.json`)."""

    name: str
    folder: pathlib.Path
    backbone_class: str
    metrics: dict
    task_class: str = None

    @property
    def is_image_classifier(self):
        """Whether the task is one of our keras-hub `ImageClassifier`s; the
        LIMoE zero-shot classifier (`LIMoEZeroShotClassifier`) is not."""
        return self.task_class is not None and self.task_class.endswith("ImageClassifier")

    @property
    def test_top1(self):
        """CIFAR-10 test top-1 as measured: supervised, or zero-shot for LIMoE."""
        return self.metrics.get("test_top1", self.metrics.get("zero_shot_test_top1"))

    @property
    def description(self):
        return self.metrics["recipe"]["description"]

    @property
    def params(self):
        return self.metrics.get("parameters")


BUNDLED_PRESETS_PACKAGE = "keras_vmoe.bundled_presets"


def _find_bundled_presets():
    """Every folder of `keras_vmoe.bundled_presets` holding a saved preset."""
    try:
        root = pathlib.Path(str(importlib.resources.files(BUNDLED_PRESETS_PACKAGE)))
    except ModuleNotFoundError:  # Installed without its presets.
        return {}
    presets = {}
    for folder in sorted(root.iterdir()):
        config, metrics = folder / "config.json", folder / "metrics.json"
        if config.is_file() and metrics.is_file():
            task = folder / "task.json"
            presets[folder.name] = BundledPreset(
                name=folder.name,
                folder=folder,
                backbone_class=json.loads(config.read_text())["class_name"],
                metrics=json.loads(metrics.read_text()),
                task_class=json.loads(task.read_text())["class_name"] if task.is_file() else None,
            )
    return presets


BUNDLED_PRESETS = _find_bundled_presets()


def register_bundled_presets():
    """Makes the bundled names known to keras-hub's own `from_preset` loaders."""
    backbones = {
        cls.__name__: cls for cls in (VisionTransformerBackbone, VMoEBackbone, SoftMoEBackbone, LIMoEBackbone)
    }
    for preset in BUNDLED_PRESETS.values():
        register_presets(
            {
                preset.name: {
                    "metadata": {
                        "description": preset.description,
                        "params": preset.params,
                        "path": str(preset.folder),
                    },
                    "kaggle_handle": str(preset.folder),
                }
            },
            backbones[preset.backbone_class],
        )


def register_vmoe_checkpoint_preset(preset):
    """Adds a `VMoECheckpointPreset` to the built-in names (e.g. your own
    checkpoints on a mirror)."""
    VMOE_CHECKPOINT_PRESETS[preset.name] = preset
    register_presets(
        {
            preset.name: {
                "metadata": {
                    "description": preset.description,
                    "params": preset.params,
                    "path": preset.source,
                },
                # keras-hub resolves built-in names through this handle; our
                # `from_preset` fills the folder before keras-hub reads it.
                "kaggle_handle": str(cache_folder(preset.name)),
            }
        },
        VMoEBackbone,
    )


def home():
    """Where converted presets are cached: `$KERAS_VMOE_HOME` or ~/.keras/keras_vmoe."""
    default = pathlib.Path(os.environ.get("KERAS_HOME", "~/.keras")) / "keras_vmoe"
    return pathlib.Path(os.environ.get("KERAS_VMOE_HOME", default)).expanduser()


def cache_folder(name):
    return home() / "presets" / name


def builtin_preset_names():
    return sorted(set(BUNDLED_PRESETS) | set(VMOE_CHECKPOINT_PRESETS))


def list_presets():
    """{name: description} of every built-in preset."""
    return {
        name: (BUNDLED_PRESETS.get(name) or VMOE_CHECKPOINT_PRESETS[name]).description
        for name in builtin_preset_names()
    }


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """What `keras-vmoe presets` shows of a built-in preset."""

    name: str
    description: str
    params: int
    source: str
    offline: bool
    test_top1: float = None
    zero_shot: bool = False  # test_top1 is zero-shot (LIMoE), not supervised.


def preset_infos():
    """A `PresetInfo` for every built-in preset, bundled ones first."""
    infos = [
        PresetInfo(
            preset.name,
            preset.description,
            preset.params,
            f"bundled in the package ({preset.folder})",
            True,
            preset.test_top1,
            zero_shot=not preset.is_image_classifier,
        )
        for preset in BUNDLED_PRESETS.values()
    ]
    infos += [
        PresetInfo(
            preset.name,
            preset.description,
            preset.params,
            preset.source,
            (cache_folder(preset.name) / "config.json").exists(),
        )
        for name, preset in sorted(VMOE_CHECKPOINT_PRESETS.items())
    ]
    return infos


def _checkpoint_base_url():
    mirror = os.environ.get("KERAS_VMOE_CHECKPOINT_MIRROR")
    if not mirror:
        return VMOE_BUCKET_URL
    if "://" in mirror:
        return mirror.rstrip("/")
    return pathlib.Path(mirror).expanduser().resolve().as_uri()


def _offline_help(preset, reason):
    return (
        f"Could not download the vmoe checkpoint {preset.source} ({reason}). "
        f"Without network: copy `{preset.source}.index` and `{preset.source}.data-*` "
        f"(e.g. `gsutil -m cp '{preset.source}.*' DIR/`, or from {VMOE_BUCKET_URL}/{preset.name}.index "
        "and the data files it names) to a folder DIR on this machine, then either set "
        "KERAS_VMOE_CHECKPOINT_MIRROR=DIR and call from_preset again, or load it directly with "
        f"`keras_vmoe.convert.load_vmoe_checkpoint('DIR/{preset.name}', "
        f"keras_vmoe.presets.VMOE_CHECKPOINT_PRESETS['{preset.name}'].model_config)`."
    )


def _download(preset, filename, folder):
    origin = f"{_checkpoint_base_url()}/{urllib.parse.quote(filename)}"
    try:
        return keras.utils.get_file(
            fname=filename, origin=origin, cache_dir=str(folder.parent), cache_subdir=folder.name
        )
    except Exception as error:  # keras wraps every URL error in a bare Exception.
        raise PresetError(_offline_help(preset, str(error))) from error


def _download_checkpoint(preset, folder):
    """Downloads `<name>.index`, then the data files it names; returns the prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / preset.name
    _download(preset, f"{preset.name}.index", folder)
    for data_file in checkpoint_data_files(prefix):
        _download(preset, os.path.basename(data_file), folder)
    return prefix


def vmoe_checkpoint_preprocessor(image_size):
    """The preprocessor of a converted vmoe classifier: uint8 images resized to
    `image_size` (an int) and scaled to [-1, 1], vmoe's `value_range(-1, 1)`."""
    return VMoEImageClassifierPreprocessor(
        VMoEImageConverter(image_size=(image_size, image_size), scale=1 / 127.5, offset=-1.0)
    )


def _convert_vmoe_checkpoint(preset):
    """Downloads, converts and caches a released checkpoint as a keras-hub preset."""
    target = cache_folder(preset.name)
    downloads = home() / "downloads" / preset.name
    prefix = _download_checkpoint(preset, downloads)
    print(f"Converting {preset.source} to a keras-hub preset in {target}")
    preprocessor = vmoe_checkpoint_preprocessor(preset.image_size)
    classifier = load_vmoe_checkpoint(prefix, preset.model_config, preprocessor=preprocessor, verbose=True)
    with staged_folder(target, replace=False) as staging:  # A failure leaves no half preset.
        classifier.save_to_preset(str(staging))
    shutil.rmtree(downloads, ignore_errors=True)


def resolve_preset(preset):
    """Local folder (or hub handle) for `preset`, fetching a built-in one if needed.

    Paths, `kaggle://` and `hf://` handles pass through unchanged.

    Raises:
        PresetError: an unknown name (listing the built-in ones), or a
            checkpoint that cannot be downloaded (saying what to fetch).
    """
    if not isinstance(preset, str):
        return preset
    if preset in BUNDLED_PRESETS:
        return str(BUNDLED_PRESETS[preset].folder)
    if preset in VMOE_CHECKPOINT_PRESETS:
        target = cache_folder(preset)
        if not (target / "config.json").exists():
            _convert_vmoe_checkpoint(VMOE_CHECKPOINT_PRESETS[preset])
        return str(target)
    if "://" in preset or os.path.exists(preset) or os.sep in preset:
        return preset
    raise PresetError(
        f"Unknown preset {preset!r}: not a built-in name nor an existing folder. "
        f"Built-in presets: {', '.join(builtin_preset_names())}. "
        "A local preset folder, `kaggle://` or `hf://` handle also works."
    )


# Registered once, when keras_vmoe imports this module: keras-hub's loaders
# and our `from_preset` then know every built-in name.
register_bundled_presets()
for _preset in list(VMOE_CHECKPOINT_PRESETS.values()):
    register_vmoe_checkpoint_preset(_preset)
set_preset_resolver(resolve_preset)
