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
import tempfile
import urllib.parse

import keras
from keras_hub.src.utils.preset_utils import register_presets

VMOE_BUCKET = "gs://vmoe_checkpoints"
VMOE_BUCKET_URL = "https://storage.googleapis.com/vmoe_checkpoints"


class PresetError(ValueError):
    """A preset name is unknown or its weights cannot be fetched."""


@dataclasses.dataclass(frozen=True)
class VMoECheckpointPreset:
    """A released vmoe checkpoint and the vmoe model config that reads it.

    `model_config` is the `config.model` dict of vmoe's own config for the
    checkpoint; `image_size` the resolution it was trained or fine-tuned at.
    """

    name: str
    description: str
    model_config: dict
    image_size: int
    params: int

    @property
    def source(self):
        return f"{VMOE_BUCKET}/{self.name}"


def vmoe_paper_model_config(
    variant, patch_size, num_experts, num_selected_experts, moe_layers,
    num_classes, representation_size, capacity_factor,
):
    """vmoe's `configs/vmoe_paper/common.get_vmoe_config`, as a plain dict.

    One difference, for presets: `group_size` is None (each image is routed
    on its own), so that any batch size can be classified. vmoe routes groups
    of 8 images; with an evaluation capacity that drops no token (the S/32
    ILSVRC-2012 presets) both give the same outputs.
    """
    num_layers, hidden_size, mlp_dim, num_heads = {
        "S": (8, 512, 2048, 8), "B": (12, 768, 3072, 12),
    }[variant]
    router = dict(
        num_selected_experts=num_selected_experts,
        noise_std=1.0,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        dispatcher=dict(
            name="einsum", bfloat16=True, capacity_factor=capacity_factor,
            batch_priority=False,
        ),
    )
    return dict(
        name="VisionTransformerMoe",
        num_classes=num_classes,
        patch_size=(patch_size, patch_size),
        hidden_size=hidden_size,
        classifier="token",
        representation_size=representation_size,
        encoder=dict(
            num_layers=num_layers, mlp_dim=mlp_dim, num_heads=num_heads,
            moe=dict(layers=tuple(moe_layers), num_experts=num_experts, group_size=None,
                     router=router),
        ),
    )


# The checkpoints vmoe's README lists. Capacity factors are the ones vmoe
# evaluates these models with (4.0 for the S/32 pre-training runs, an
# evaluation override in their config; the fine-tuning configs' 1.5).
_S32_LAST2 = dict(variant="S", patch_size=32, num_experts=8, num_selected_experts=2,
                  moe_layers=(5, 7))
_B16_EVERY2 = dict(variant="B", patch_size=16, num_experts=8, num_selected_experts=2,
                   moe_layers=(1, 3, 5, 7, 9, 11))
VMOE_CHECKPOINT_PRESETS = {
    preset.name: preset
    for preset in (
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_light1",
            "V-MoE S/32, 8 experts on the last two odd blocks, K=2, trained on ILSVRC-2012 "
            "for 300 epochs (RandAugment light1); 224x224, 1000 classes.",
            vmoe_paper_model_config(**_S32_LAST2, num_classes=1000,
                                    representation_size=512, capacity_factor=4.0),
            224, 56_999_400,
        ),
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
            "vmoe_s32_last2_ilsvrc2012_randaug_light1 fine-tuned on ILSVRC-2012 at 384x384.",
            vmoe_paper_model_config(**_S32_LAST2, num_classes=1000,
                                    representation_size=None, capacity_factor=1.5),
            384, 56_785_384,
        ),
        VMoECheckpointPreset(
            "vmoe_s32_last2_ilsvrc2012_randaug_medium",
            "V-MoE S/32, 8 experts on the last two odd blocks, K=2, trained on ILSVRC-2012 "
            "for 1000 epochs (RandAugment medium); 224x224, 1000 classes.",
            vmoe_paper_model_config(**_S32_LAST2, num_classes=1000,
                                    representation_size=512, capacity_factor=4.0),
            224, 56_999_400,
        ),
        VMoECheckpointPreset(
            "vmoe_b16_imagenet21k_randaug_strong",
            "V-MoE B/16, 8 experts on every odd block, K=2, trained on ImageNet-21k "
            "(RandAugment strong); 224x224, 21843 classes.",
            vmoe_paper_model_config(**_B16_EVERY2, num_classes=21843,
                                    representation_size=None, capacity_factor=1.05),
            224, 300_974_931,
        ),
        VMoECheckpointPreset(
            "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
            "vmoe_b16_imagenet21k_randaug_strong fine-tuned on ILSVRC-2012 at 384x384.",
            vmoe_paper_model_config(**_B16_EVERY2, num_classes=1000,
                                    representation_size=None, capacity_factor=1.5),
            384, 285_238_504,
        ),
    )
}


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
    from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
    from keras_vmoe.models.soft_moe.soft_moe_backbone import SoftMoEBackbone
    from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone

    backbones = {cls.__name__: cls for cls in (VMoEBackbone, SoftMoEBackbone, LIMoEBackbone)}
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
    from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone

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
        PresetInfo(preset.name, preset.description, preset.params,
                   f"bundled in the package ({preset.folder})", True,
                   preset.test_top1, zero_shot=not preset.is_image_classifier)
        for preset in BUNDLED_PRESETS.values()
    ]
    infos += [
        PresetInfo(preset.name, preset.description, preset.params, preset.source,
                   (cache_folder(preset.name) / "config.json").exists())
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
    from keras_vmoe.convert.vmoe_checkpoint_reader import checkpoint_data_files

    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / preset.name
    _download(preset, f"{preset.name}.index", folder)
    for data_file in checkpoint_data_files(prefix):
        _download(preset, os.path.basename(data_file), folder)
    return prefix


def _convert_vmoe_checkpoint(preset):
    """Downloads, converts and caches a released checkpoint as a keras-hub preset."""
    from keras_vmoe.convert import load_vmoe_checkpoint
    from keras_vmoe.models import VMoEImageClassifierPreprocessor
    from keras_vmoe.models import VMoEImageConverter

    target = cache_folder(preset.name)
    downloads = home() / "downloads" / preset.name
    prefix = _download_checkpoint(preset, downloads)
    print(f"Converting {preset.source} to a keras-hub preset in {target}")
    preprocessor = VMoEImageClassifierPreprocessor(
        VMoEImageConverter(
            image_size=(preset.image_size, preset.image_size),
            scale=1 / 127.5,  # vmoe's value_range(-1, 1).
            offset=-1.0,
        )
    )
    classifier = load_vmoe_checkpoint(
        prefix, preset.model_config, preprocessor=preprocessor, verbose=True
    )
    # Write next to the target and rename, so a failure leaves no half preset.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
    try:
        classifier.save_to_preset(str(staging))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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


def _unreadable_weight_files(folder):
    import h5py

    unreadable = []
    for path in sorted(pathlib.Path(folder).glob("*.weights.h5")):
        try:
            h5py.File(path, "r").close()
        except OSError as error:
            unreadable.append(f"{path} ({error})")
    return unreadable


class BuiltinPresetMixin:
    """Lets `from_preset` take the built-in names of `keras_vmoe.presets`, and
    names the file when a local preset's weights are truncated or corrupt."""

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        path = resolve_preset(preset)
        try:
            return super().from_preset(path, *args, **kwargs)
        except OSError as error:
            unreadable = _unreadable_weight_files(path) if os.path.isdir(str(path)) else []
            if not unreadable:
                raise
            raise PresetError(
                f"Preset {preset!r}: unreadable weights file (truncated or corrupt): "
                f"{'; '.join(unreadable)}. Save or download the preset again."
            ) from error
