"""The CIFAR-10 recipe: its augmentations, float16 preset weights and a smoke run of `main`."""

import dataclasses
import json

import h5py
import keras
import numpy as np
import pytest

from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops
from keras_vmoe.recipes import Cifar10Recipe
from keras_vmoe.recipes.cifar10 import hardware
from keras_vmoe.recipes.cifar10 import main
from keras_vmoe.recipes.cifar10 import mixup_and_cutmix
from keras_vmoe.recipes.cifar10 import random_crop_and_flip
from keras_vmoe.recipes.cifar10 import random_erasing
from keras_vmoe.recipes.cifar10 import save_preset
from keras_vmoe.recipes.cifar10 import store_weights_as_float16
from keras_vmoe.recipes.cifar10 import to_model_inputs
from tests.helpers import CIFAR10
from tests.helpers import backend
from tests.helpers import f32_atol
from tests.helpers import requires_cifar10
from tests.helpers import to_numpy

TINY_BACKBONE = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    hidden_dim=16,
    mlp_dim=32,
    num_heads=2,
    pooling="gap",
)
TINY_RECIPE = Cifar10Recipe(
    name="tiny_cifar10_smoke",
    description="A tiny V-MoE for smoke runs.",
    family="vmoe",
    backbone=dict(TINY_BACKBONE, moe_layers=(1,), num_experts=2),
    batch_size=32,
)
PRESET_FILES = {
    "config.json",
    "task.json",
    "metadata.json",
    "preprocessor.json",
    "image_converter.json",
    "model.weights.h5",
    "task.weights.h5",
}


def uint8_images(count, size=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3)).astype("uint8")


def h5_datasets(path):
    """{name: dataset dtype} of an h5 file."""
    found = {}
    with h5py.File(path, "r") as weights:
        weights.visititems(
            lambda name, item: found.__setitem__(name, item.dtype) if isinstance(item, h5py.Dataset) else None
        )
    return found


# === random_crop_and_flip ===


def test_crop_without_padding_is_the_image_or_its_mirror():
    images = uint8_images(64)
    out = random_crop_and_flip(images, np.random.default_rng(0), padding=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 0 < same.sum() < 64  # Both happen.


def test_crop_is_a_translated_window_of_the_reflect_padded_image():
    padding, count = 3, 200
    images = uint8_images(count, size=12)
    out = random_crop_and_flip(images, np.random.default_rng(1), padding)
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")
    offsets, flips = set(), 0
    for image, source in zip(out, padded):
        matches = [
            (top, left, flip)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            for flip in (False, True)
            if np.array_equal(
                image, (lambda w: w[:, ::-1] if flip else w)(source[top : top + 12, left : left + 12])
            )
        ]
        assert matches, "an output is no (flipped) window of its padded image"
        top, left, flip = matches[0]
        offsets.add((top, left))
        flips += flip
    # Every translation of the 7 x 7 is drawn; about half the images are mirrored.
    assert len(offsets) == (2 * padding + 1) ** 2
    assert 0.35 * count < flips < 0.65 * count


def test_crop_and_flip_is_deterministic_given_the_rng():
    images = uint8_images(16)
    first = random_crop_and_flip(images, np.random.default_rng(5), 4)
    np.testing.assert_array_equal(first, random_crop_and_flip(images, np.random.default_rng(5), 4))
    assert not np.array_equal(first, random_crop_and_flip(images, np.random.default_rng(6), 4))


# === random_erasing ===


def images_without_grey(count, seed=0):
    """uint8 images with no pixel of value 128, so an erased square stands out."""
    images = uint8_images(count, seed=seed)
    images[images == 128] = 127
    return images


def test_erasing_with_probability_zero_is_the_identity():
    images = uint8_images(32)
    out = random_erasing(images, np.random.default_rng(0), probability=0.0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_erasing_with_probability_one_greys_a_square_of_8_to_16_pixels():
    count = 300
    images = images_without_grey(count)
    out = random_erasing(images, np.random.default_rng(0), probability=1.0)
    assert out.shape == images.shape and out.dtype == np.uint8
    sizes = set()
    for image, erased in zip(images, out):
        changed = np.any(erased != image, axis=-1)
        rows, columns = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        height, width = rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1
        assert height == width and 8 <= height <= 16
        box = np.zeros_like(changed)
        box[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1] = True
        np.testing.assert_array_equal(changed, box)  # A filled square ...
        assert np.all(erased[box] == 128)  # ... of mid-grey in every channel ...
        np.testing.assert_array_equal(erased[~box], image[~box])  # ... and nothing else.
        sizes.add(int(height))
    assert sizes == set(range(8, 17))


def test_erasing_probability_is_per_image():
    images = images_without_grey(400, seed=1)
    out = random_erasing(images, np.random.default_rng(2), probability=0.25)
    erased = np.any(out != images, axis=(1, 2, 3)).mean()
    assert 0.18 < erased < 0.32


# === mixup_and_cutmix ===


def constant_images(count, seed=0):
    """Image i is the constant value[i] in [-1, 1], its target the one-hot of i:
    a mixed image's mean must then equal its target times the values."""
    values = np.random.RandomState(seed).uniform(-1, 1, count).astype("float32")
    pixels = np.broadcast_to(values[:, None, None, None], (count, 16, 16, 3)).astype("float32")
    return pixels, np.eye(count, dtype="float32"), values


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixed_targets_match_the_mixed_pixels(mixup_alpha, cutmix_alpha):
    pixels, targets, values = constant_images(200)
    mixed, mixed_targets = mixup_and_cutmix(
        pixels, targets, np.random.default_rng(0), mixup_alpha, cutmix_alpha
    )
    assert mixed.shape == pixels.shape and mixed.dtype == np.float32
    assert mixed_targets.shape == targets.shape
    assert np.all(mixed_targets >= 0) and np.all(mixed_targets <= 1)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, atol=1e-6)
    # At most two images per mix, and each image's share is what its target says.
    assert np.all((mixed_targets > 0).sum(-1) <= 2)
    np.testing.assert_allclose(mixed.mean(axis=(1, 2, 3)), mixed_targets @ values, atol=1e-5)
    # Pixels stay within the inputs' range.
    assert mixed.min() >= values.min() - 1e-6 and mixed.max() <= values.max() + 1e-6
    # Mixup images stay constant; CutMix images hold two values in a box.
    cut = np.array([len(np.unique(image)) > 1 for image in mixed])
    if not cutmix_alpha:
        assert not cut.any()
    elif not mixup_alpha:
        assert cut.mean() > 0.8  # Every image, but for empty boxes and self-partners.
    else:
        assert 0.3 < cut.mean() < 0.7  # About half and half.
    for image, target in zip(mixed[cut], mixed_targets[cut]):
        partner = np.nonzero(target > 0)[0]
        assert set(np.unique(image)) <= set(values[partner])


def test_mixing_uint8_range_pixels_stays_in_range():
    pixels = to_model_inputs(uint8_images(128))
    targets = np.eye(10, dtype="float32")[np.arange(128) % 10]
    mixed, mixed_targets = mixup_and_cutmix(pixels, targets, np.random.default_rng(3), 0.8, 1.0)
    assert mixed.min() >= -1.0 - 1e-6 and mixed.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, atol=1e-6)


def test_both_alphas_zero_is_the_identity():
    pixels, targets, _ = constant_images(8)
    rng = np.random.default_rng(0)
    mixed, mixed_targets = mixup_and_cutmix(pixels, targets, rng, 0.0, 0.0)
    np.testing.assert_array_equal(mixed, pixels)
    np.testing.assert_array_equal(mixed_targets, targets)
    # And it draws nothing from the rng.
    assert rng.random() == np.random.default_rng(0).random()


def test_mixing_is_deterministic_given_the_rng():
    pixels = to_model_inputs(uint8_images(32))
    targets = np.eye(10, dtype="float32")[np.arange(32) % 10]
    first = mixup_and_cutmix(pixels, targets, np.random.default_rng(7), 0.8, 1.0)
    again = mixup_and_cutmix(pixels, targets, np.random.default_rng(7), 0.8, 1.0)
    other = mixup_and_cutmix(pixels, targets, np.random.default_rng(8), 0.8, 1.0)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


# === float16 weights ===


def test_store_weights_as_float16_rounds_floats_and_keeps_the_rest(tmp_path):
    rng = np.random.RandomState(0)
    kernel = rng.normal(size=(64, 64)).astype("float32")
    with h5py.File(tmp_path / "model.weights.h5", "w") as weights:
        weights.attrs["note"] = "root attribute"
        group = weights.create_group("layers/dense/vars")
        group.attrs["layer"] = "dense"
        group.create_dataset("0", data=kernel)
        group.create_dataset("1", data=np.float64([0.1, 0.2]))
        weights.create_dataset("optimizer/iterations", data=np.int64(7))
    (tmp_path / "other.h5").write_bytes(b"not touched")
    size = (tmp_path / "model.weights.h5").stat().st_size

    store_weights_as_float16(tmp_path)

    with h5py.File(tmp_path / "model.weights.h5", "r") as weights:
        assert weights.attrs["note"] == "root attribute"
        assert weights["layers/dense/vars"].attrs["layer"] == "dense"
        stored = weights["layers/dense/vars/0"]
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored[()], kernel.astype("float16"))
        # Only float32 arrays are rewritten.
        assert weights["layers/dense/vars/1"].dtype == np.float64
        assert weights["optimizer/iterations"].dtype == np.int64 and weights["optimizer/iterations"][()] == 7
    # The file is compacted: the float32 kernel (16 KiB) no longer takes space.
    assert (tmp_path / "model.weights.h5").stat().st_size < size - 6000
    assert (tmp_path / "other.h5").read_bytes() == b"not touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.weights.h5", "other.h5"]


def test_saved_preset_stores_float16_and_loads_as_float32(tmp_path):
    keras.utils.set_random_seed(0)
    classifier = TINY_RECIPE.build_classifier(preprocessor=False)
    images = uint8_images(8)
    logits = classifier.predict(to_model_inputs(images), verbose=0)  # No preprocessor.
    save_preset(TINY_RECIPE, classifier, tmp_path / "preset")

    folder = tmp_path / "preset"
    assert {p.name for p in folder.iterdir()} == PRESET_FILES  # No staging folder left.
    for name in ("model.weights.h5", "task.weights.h5"):
        datasets = h5_datasets(folder / name)
        floats = {key: dtype for key, dtype in datasets.items() if dtype.kind == "f"}
        assert floats and set(floats.values()) == {np.dtype("float16")}, name
        # Anything else is an integer counter (the optimizer's iterations).
        assert all(dtype.kind in "iu" for dtype in datasets.values() if dtype.kind != "f")
    assert len(h5_datasets(folder / "model.weights.h5")) == len(classifier.backbone.weights)

    loaded = VMoEImageClassifier.from_preset(str(folder))
    assert {v.dtype for v in loaded.weights} == {"float32"}
    assert loaded.count_params() == classifier.count_params()
    # The loaded model is the original with float16-rounded weights ...
    for variable, original in zip(loaded.weights, classifier.weights):
        value = to_numpy(original)
        np.testing.assert_array_equal(to_numpy(variable), value.astype("float16").astype("float32"))
    # ... computing in float32 from raw uint8 pixels what the original computes
    # with its weights rounded to float16 (directly: a rounded router weight may
    # flip a routing decision, so a bound on the change would be arbitrary).
    loaded_logits = loaded.predict(images, verbose=0)
    assert loaded_logits.dtype == np.float32
    classifier.set_weights([w.astype("float16").astype("float32") for w in classifier.get_weights()])
    rounded = classifier.predict(to_model_inputs(images), verbose=0)
    np.testing.assert_allclose(loaded_logits, rounded, atol=f32_atol(rounded), rtol=0)
    assert np.abs(loaded_logits - logits).max() > 0  # The rounding did happen.


# === main ===


def test_recipe_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        dataclasses.replace(TINY_RECIPE, family="dense")


def test_main_without_an_archive_says_which_path_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(TINY_RECIPE, str(tmp_path / "recipe.py"), ["--cifar10", str(tmp_path / "none.npz")])
    assert stop.value.code == 2
    assert "--cifar10: no CIFAR-10 archive at" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@requires_cifar10
def test_main_trains_saves_and_measures_a_tiny_preset(tmp_path, capsys):
    output = tmp_path / "preset"
    recipe_file = tmp_path / "recipe.py"
    arguments = [
        "--cifar10",
        str(CIFAR10),
        "--epochs",
        "1",
        "--train-limit",
        "64",
        "--verbose",
        "0",
        "--output",
        str(output),
    ]
    assert main(TINY_RECIPE, str(recipe_file), arguments) == 0
    assert f"Saved the preset to {output}" in capsys.readouterr().out
    assert {p.name for p in output.iterdir()} == PRESET_FILES | {"metrics.json"}

    metrics = json.loads((output / "metrics.json").read_text())
    assert {"test_top1", "parameters", "flops_per_image", "training", "recipe"} <= set(metrics)
    assert metrics["preset"] == TINY_RECIPE.name
    # The recipe as written (the smoke run's overrides are in "training").
    # The recipe as run: with the --epochs override.
    as_run = dataclasses.replace(TINY_RECIPE, epochs=1)
    assert metrics["recipe"] == json.loads(json.dumps(dataclasses.asdict(as_run)))
    training = metrics["training"]
    assert training["hardware"] == hardware() and training["hardware"]
    assert isinstance(training["training_time_s"], float) and training["training_time_s"] >= 0
    assert (training["epochs"], training["training_examples"], training["backend"]) == (1, 64, backend())
    assert 0 <= training["test_top1_after_training"] <= 1

    # The evaluation measured the saved preset on 64 raw test images.
    classifier = VMoEImageClassifier.from_preset(str(output))
    assert metrics["test_images"] == 64 and 0 <= metrics["test_top1"] <= 1
    assert metrics["parameters"] == classifier.count_params()
    assert metrics["flops_per_image"] == int(count_flops(classifier)["total"])
    assert metrics["flops_per_patch_token"] == pytest.approx(count_flops(classifier)["per_token"], abs=0.1)

    # Evaluating the saved preset alone measures the same and keeps the training record.
    assert main(TINY_RECIPE, str(recipe_file), arguments + ["--skip-training"]) == 0
    assert "Saved the preset" not in capsys.readouterr().out
    again = json.loads((output / "metrics.json").read_text())
    assert again["training"] == training and again["recipe"] == metrics["recipe"]
    assert again["test_top1"] == metrics["test_top1"]
