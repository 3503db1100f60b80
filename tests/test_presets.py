"""Built-in presets: released vmoe checkpoints fetched from a local mirror, never the network."""

import json
import shutil

import keras_hub
import numpy as np
import pytest

from keras_vmoe import presets
from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import backbone_from_vmoe_config
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.helpers import FIXTURES
from tests.helpers import f32_atol
from tests.helpers import requires_fixtures
from tests.helpers import to_numpy

TOKEN_CHOICE = FIXTURES / "vmoe_tiny_token_choice"
NAME = "vmoe_tiny_token_choice_test"


def mirror_fixture(folder, fixture=TOKEN_CHOICE, name=NAME):
    """A mirror folder laid out like gs://vmoe_checkpoints, holding the fixture as `name`."""
    folder.mkdir()
    for path in fixture.glob("ckpt.*"):
        shutil.copy(path, folder / path.name.replace("ckpt", name, 1))
    return folder


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_VMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_VMOE_CHECKPOINT_MIRROR", str(mirror_fixture(tmp_path / "mirror")))
    preset = presets.VMoECheckpointPreset(
        NAME,
        "The token-choice fixture, served as a released checkpoint.",
        json.loads((TOKEN_CHOICE / "config.json").read_text()),
        image_size=32,
        params=0,
    )
    presets.register_vmoe_checkpoint_preset(preset)
    yield preset
    presets.VMOE_CHECKPOINT_PRESETS.pop(NAME)


@requires_fixtures
def test_checkpoint_preset_downloads_converts_and_caches(tiny_preset, tmp_path, monkeypatch, capsys):
    io = np.load(TOKEN_CHOICE / "io.npz")
    classifier = VMoEImageClassifier.from_preset(NAME)
    assert "Downloading data from file://" in capsys.readouterr().out
    logits = to_numpy(classifier(io["images"], training=False))
    assert np.abs(logits - io["logits"]).max() <= 1e-4 * max(1.0, np.abs(io["logits"]).max())
    cached = tmp_path / "home" / "presets" / NAME
    assert (cached / "config.json").exists() and (cached / "task.weights.h5").exists()
    assert not (tmp_path / "home" / "downloads" / NAME).exists()

    # The second load reads the cache: no mirror needed.
    monkeypatch.setenv("KERAS_VMOE_CHECKPOINT_MIRROR", str(tmp_path / "empty"))
    again = VMoEImageClassifier.from_preset(NAME)
    assert "Downloading" not in capsys.readouterr().out
    np.testing.assert_allclose(to_numpy(again(io["images"], training=False)), logits, atol=1e-6)
    # keras-hub's own loader finds the built-in name too.
    generic = keras_hub.models.ImageClassifier.from_preset(NAME)
    assert isinstance(generic, VMoEImageClassifier)
    # Its preprocessor scales uint8 pixels to vmoe's [-1, 1].
    pixels = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype("uint8")
    expected = to_numpy(again(pixels / 127.5 - 1.0, training=False))
    # x * (1 / 127.5) - 1 in the converter, x / 127.5 - 1 here: 1-ulp pixel differences.
    np.testing.assert_allclose(again.predict(pixels, verbose=0), expected, atol=f32_atol(expected))


@pytest.mark.parametrize("name", ["vmoe_s32_last2_ilsvrc2012_randaug_light1", "eee_s32_last2_ilsvrc2012"])
def test_offline_error_says_what_to_download_and_how_to_load(tmp_path, monkeypatch, name):
    monkeypatch.setenv("KERAS_VMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_VMOE_CHECKPOINT_MIRROR", str(tmp_path / "empty"))
    with pytest.raises(presets.PresetError) as error:
        VMoEImageClassifier.from_preset(name)
    message = str(error.value)
    for needle in (
        f"gs://vmoe_checkpoints/{name}.index",
        "KERAS_VMOE_CHECKPOINT_MIRROR",
        "load_vmoe_checkpoint",
        f"VMOE_CHECKPOINT_PRESETS['{name}'].model_config",
    ):
        assert needle in message
    assert not (tmp_path / "home" / "presets" / name).exists()


@requires_fixtures
def test_truncated_download_leaves_no_preset(tiny_preset, tmp_path):
    data_file = sorted((tmp_path / "mirror").glob(f"{NAME}.data-*"))[0]
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        VMoEImageClassifier.from_preset(NAME)
    assert not list((tmp_path / "home" / "presets").glob(f"*{NAME}*"))


def test_unknown_name_lists_the_builtin_presets():
    with pytest.raises(presets.PresetError, match="vmoe_s32_last2_ilsvrc2012_randaug_light1") as error:
        VMoEImageClassifier.from_preset("vmoe_nonexistent")
    assert "Unknown preset 'vmoe_nonexistent'" in str(error.value)


def test_builtin_presets_are_listed_by_keras_hub():
    assert set(presets.VMOE_CHECKPOINT_PRESETS) <= set(VMoEImageClassifier.presets)
    assert set(presets.list_presets()) == set(presets.VMOE_CHECKPOINT_PRESETS) | set(presets.BUNDLED_PRESETS)


@pytest.mark.parametrize(
    "name, moe_layers, group_size, capacity_factor",
    [
        ("vmoe_s32_last2_ilsvrc2012_randaug_light1", (5, 7), None, 4.0),
        ("vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012", (5, 7), None, 1.5),
    ],
)
def test_released_configs_build_the_paper_architectures(name, moe_layers, group_size, capacity_factor):
    preset = presets.VMOE_CHECKPOINT_PRESETS[name]
    size = preset.image_size
    backbone = backbone_from_vmoe_config(preset.model_config, (size, size, 3))
    assert isinstance(backbone, VMoEBackbone)
    assert (backbone.num_layers, backbone.hidden_dim, backbone.mlp_dim) == (8, 512, 2048)
    assert tuple(backbone.moe_layers) == moe_layers
    moe = backbone.get_layer("encoder_block_7").mlp
    assert (moe.num_experts, moe.router.num_selected_experts, moe.group_size) == (8, 2, group_size)
    assert moe.router.capacity_factor == capacity_factor
    classifier = VMoEImageClassifier(backbone, preset.model_config["num_classes"])
    assert classifier.count_params() == preset.params


@pytest.mark.parametrize(
    "name, image_size, num_classes",
    [("eee_s32_last2_ilsvrc2012", 224, 1000), ("eee_s32_last2_ilsvrc2012_ft_cifar100", 128, 100)],
)
def test_released_e3_configs_build_the_paper_ensembles(name, image_size, num_classes):
    preset = presets.VMOE_CHECKPOINT_PRESETS[name]
    assert name in VMoEImageClassifier.presets and preset.image_size == image_size
    backbone = backbone_from_vmoe_config(preset.model_config, (image_size, image_size, 3))
    assert (backbone.ensemble_size, tuple(backbone.moe_layers)) == (2, (5, 7))
    moe = backbone.get_layer("encoder_block_7").mlp
    assert (moe.num_experts, moe.ensemble_size, moe.router.expert_partitions) == (8, 2, 2)
    assert (moe.router.num_selected_experts, moe.router.capacity_factor, moe.dispatch_dtype) == (
        1,
        1.5,
        "bfloat16",
    )
    classifier = VMoEImageClassifier(backbone, num_classes)
    assert classifier.count_params() == preset.params


EEE = FIXTURES / "eee_tiny"
EEE_NAME = "eee_tiny_test"


@requires_fixtures
def test_e3_checkpoint_preset_converts_caches_and_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_VMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(
        "KERAS_VMOE_CHECKPOINT_MIRROR", str(mirror_fixture(tmp_path / "mirror", EEE, EEE_NAME))
    )
    preset = presets.VMoECheckpointPreset(
        EEE_NAME, "The E^3 fixture.", json.loads((EEE / "config.json").read_text()), image_size=32, params=0
    )
    presets.register_vmoe_checkpoint_preset(preset)
    try:
        classifier = VMoEImageClassifier.from_preset(EEE_NAME)
    finally:
        presets.VMOE_CHECKPOINT_PRESETS.pop(EEE_NAME)
    io = np.load(EEE / "io.npz")
    assert classifier.ensemble_size == 2
    logits = to_numpy(classifier(io["images"], training=False))
    assert np.abs(logits - io["logits"]).max() <= 1e-4 * max(1.0, np.abs(io["logits"]).max())
    # A .keras file keeps the ensemble: raw outputs and the ensemble prediction.
    path = str(tmp_path / "eee.keras")
    classifier.save(path)
    import keras

    loaded = keras.saving.load_model(path)
    assert loaded.ensemble_size == 2 and loaded.backbone.moe_mlps[0].router.expert_partitions == 2
    np.testing.assert_array_equal(to_numpy(loaded(io["images"], training=False)), logits)
    np.testing.assert_array_equal(
        loaded.predict_on_batch(io["images"]), classifier.predict_on_batch(io["images"])
    )
