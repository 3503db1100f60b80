"""The CIFAR-10 presets bundled in the package: listed, loadable by name from
anywhere, accurate, as measured in their metrics.json, and shipped in the wheel.

Three image classifiers and one LIMoE zero-shot classifier (images and text)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import tomllib

import h5py
import keras_hub
import numpy as np
import pytest

from keras_vmoe import presets
from keras_vmoe.data import CIFAR10_CLASS_NAMES
from keras_vmoe.data import load_cifar10
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEZeroShotClassifier
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops
from tests.helpers import CIFAR10
from tests.helpers import ROOT
from tests.helpers import backend
from tests.helpers import requires_cifar10

CLASSES = {
    "vit_tiny_cifar10": VisionTransformerImageClassifier,  # The dense ViT's own class since 0.2.
    "vmoe_tiny_cifar10": VMoEImageClassifier,
    "soft_moe_tiny_cifar10": SoftMoEImageClassifier,
}
ZERO_SHOT = "limoe_tiny_cifar10"
ACCURACY_IMAGES = 500


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Each bundled preset, loaded by name from a folder outside the repository."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        return {name: cls.from_preset(name) for name, cls in CLASSES.items()}


def metrics(name):
    return json.loads((presets.BUNDLED_PRESETS[name].folder / "metrics.json").read_text())


def test_the_four_presets_are_bundled_and_listed():
    assert set(presets.BUNDLED_PRESETS) == set(CLASSES) | {ZERO_SHOT}
    listed = presets.list_presets()
    infos = {info.name: info for info in presets.preset_infos()}
    # Bundled ones come first in preset_infos.
    assert [info.name for info in presets.preset_infos()][:4] == sorted(presets.BUNDLED_PRESETS)
    # Told apart by their task class.
    zero_shot = presets.BUNDLED_PRESETS[ZERO_SHOT]
    assert zero_shot.task_class == "LIMoEZeroShotClassifier" and not zero_shot.is_image_classifier
    assert (
        infos[ZERO_SHOT].zero_shot and infos[ZERO_SHOT].test_top1 == metrics(ZERO_SHOT)["zero_shot_test_top1"]
    )
    assert infos[ZERO_SHOT].params == metrics(ZERO_SHOT)["parameters"] > 0
    assert listed[ZERO_SHOT] == zero_shot.description and infos[ZERO_SHOT].offline
    assert ZERO_SHOT in LIMoEBackbone.presets  # Registered with keras-hub.
    for name in CLASSES:
        assert presets.BUNDLED_PRESETS[name].is_image_classifier and not infos[name].zero_shot
        bundled = presets.BUNDLED_PRESETS[name]
        assert bundled.folder.is_dir() and (bundled.folder / "config.json").is_file()
        assert listed[name] == bundled.description == metrics(name)["recipe"]["description"]
        info = infos[name]
        assert info.offline and info.description == listed[name]
        assert info.params == metrics(name)["parameters"] > 0
        assert info.test_top1 == metrics(name)["test_top1"]
        assert "bundled" in info.source
        assert presets.resolve_preset(name) == str(bundled.folder)
        assert name in CLASSES[name].presets  # Registered with keras-hub.
    # The released checkpoints are still listed beside them.
    assert set(presets.VMOE_CHECKPOINT_PRESETS) <= set(listed)


def test_each_loads_by_name_from_another_folder_with_its_class(classifiers, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "presets").exists()
    for name, cls in CLASSES.items():
        assert type(classifiers[name]) is cls
        # keras-hub's own generic loader resolves the name too.
        generic = keras_hub.models.ImageClassifier.from_preset(name)
        assert type(generic) is cls
        assert generic.count_params() == classifiers[name].count_params()
    assert list(tmp_path.iterdir()) == []  # Loading writes nothing to the working folder.


def test_architectures_are_the_recipe_ones(classifiers):
    vit, vmoe, soft = (
        classifiers[n].backbone for n in ("vit_tiny_cifar10", "vmoe_tiny_cifar10", "soft_moe_tiny_cifar10")
    )
    for backbone in (vit, vmoe, soft):
        assert (backbone.num_layers, backbone.hidden_dim, backbone.mlp_dim) == (6, 192, 768)
        assert backbone.image_shape == (32, 32, 3) and tuple(backbone.patch_size) == (4, 4)
    assert vit.moe_layers == () and vmoe.moe_layers == (3, 5) and soft.moe_layers == (3, 5)
    for name, classifier in classifiers.items():
        assert classifier.num_classes == 10
        assert metrics(name)["recipe"]["name"] == name


def test_float16_files_load_as_float32_variables(classifiers):
    for name, classifier in classifiers.items():
        folder = presets.BUNDLED_PRESETS[name].folder
        for path in folder.glob("*.weights.h5"):
            with h5py.File(path, "r") as weights:
                dtypes = []
                weights.visititems(
                    lambda _, item: dtypes.append(item.dtype) if isinstance(item, h5py.Dataset) else None
                )
            assert {d for d in dtypes if d.kind == "f"} == {np.dtype("float16")}, path
        assert {v.dtype for v in classifier.weights} == {"float32"}, name


def test_metrics_match_the_loaded_models(classifiers):
    for name, classifier in classifiers.items():
        measured = metrics(name)
        # The full 10,000-image measurement of the recipe.
        assert measured["test_images"] == 10000 and measured["test_top1"] >= 0.75
        assert measured["parameters"] == classifier.count_params()
        flops = count_flops(classifier)
        assert measured["flops_per_image"] == int(flops["total"])
        assert measured["flops_per_patch_token"] == pytest.approx(flops["per_token"], abs=0.1)


def test_the_three_compute_the_same_flops_per_token(classifiers):
    per_token = {name: count_flops(classifier)["per_token"] for name, classifier in classifiers.items()}
    dense = per_token["vit_tiny_cifar10"]
    for name, value in per_token.items():
        assert abs(value / dense - 1) <= 0.03, (name, value, dense)
    # The MoEs add their routing: V-MoE a router, Soft MoE dispatch and combine too.
    assert dense < per_token["vmoe_tiny_cifar10"] < per_token["soft_moe_tiny_cifar10"]


@requires_cifar10
def test_accuracy_on_raw_test_images(classifiers):
    images, labels = load_cifar10(CIFAR10, "test", limit=ACCURACY_IMAGES)
    assert len(set(labels)) == 10
    for name, classifier in classifiers.items():
        predictions = np.argmax(classifier.predict(images, batch_size=250, verbose=0), -1)
        accuracy = float(np.mean(predictions == labels))
        # A 500-image estimate of a ~0.82 accuracy has a standard error of
        # 0.017; 0.75 is four of them below.
        assert accuracy >= 0.75, (name, accuracy)


@pytest.fixture(scope="module")
def zero_shot_classifier(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        return LIMoEZeroShotClassifier.from_preset(ZERO_SHOT)


def test_the_limoe_preset_loads_by_name_and_matches_its_metrics(zero_shot_classifier, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    classifier = zero_shot_classifier
    assert type(classifier) is LIMoEZeroShotClassifier
    assert type(keras_hub.models.Backbone.from_preset(ZERO_SHOT)) is LIMoEBackbone
    assert list(tmp_path.iterdir()) == []
    backbone = classifier.backbone
    assert (backbone.num_layers, backbone.hidden_dim, backbone.moe_layers) == (6, 192, (3, 5))
    assert not backbone.route_pairs_together  # Each modality routed on its own.
    measured = metrics(ZERO_SHOT)
    assert classifier.class_names == list(CIFAR10_CLASS_NAMES)
    # Zero-shot on held-out templates, never seen in training.
    assert classifier.templates == measured["recipe"]["eval_templates"]
    assert not set(classifier.templates) & set(measured["recipe"]["train_templates"])
    assert measured["test_images"] == 10000 and measured["zero_shot_test_top1"] >= 0.6
    assert measured["parameters"] == backbone.count_params()
    assert measured["training"]["epochs"] == 100 and "H100" in measured["training"]["hardware"]
    retrieval = measured["coco_retrieval"]
    assert (retrieval["coco_images"], retrieval["coco_captions"]) == (159, 795)
    for k in (1, 5):
        for direction in ("image_to_text", "text_to_image"):
            assert 0 <= retrieval[f"{direction}_recall@{k}"] <= 1
    for path in presets.BUNDLED_PRESETS[ZERO_SHOT].folder.glob("*.weights.h5"):
        with h5py.File(path, "r") as weights:
            dtypes = []
            weights.visititems(
                lambda _, item: dtypes.append(item.dtype) if isinstance(item, h5py.Dataset) else None
            )
        assert {d for d in dtypes if d.kind == "f"} == {np.dtype("float16")}, path


@requires_cifar10
def test_the_limoe_preset_zero_shot_accuracy_on_raw_test_images(zero_shot_classifier):
    images, labels = load_cifar10(CIFAR10, "test", limit=ACCURACY_IMAGES)
    logits = zero_shot_classifier.predict(images, batch_size=250, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    # metrics.json: 0.7283 on all 10,000; a 500-image estimate has a standard
    # error of 0.02, and 0.08 is four of them.
    assert abs(accuracy - metrics(ZERO_SHOT)["zero_shot_test_top1"]) <= 0.08, accuracy


def package_dirs():
    return sorted(
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "keras_vmoe").rglob("__init__.py")
        if "__pycache__" not in path.parts
    )


def test_every_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    missing = set(package_dirs()) - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    # And nothing listed is gone; the bundled presets map onto presets/.
    package_dir = setuptools.get("package-dir", {})
    for package in listed:
        folder = ROOT / package_dir.get(package, package.replace(".", "/"))
        assert (folder / "__init__.py").is_file(), package
    assert package_dir["keras_vmoe.bundled_presets"] == "presets"
    patterns = setuptools["package-data"]["keras_vmoe.bundled_presets"]
    for name in presets.BUNDLED_PRESETS:
        for path in (ROOT / "presets" / name).rglob("*"):
            relative = path.relative_to(ROOT / "presets")
            if path.is_file() and "__pycache__" not in path.parts:
                assert any(relative.match(pattern) for pattern in patterns), (
                    f"{path} is left out of the wheel"
                )


WHEEL_CHECK = textwrap.dedent(
    """
    import importlib, json, pathlib, sys
    # The development venv holds an editable install of the repository, whose
    # import hook would serve any module the wheel lacks: drop it.
    sys.meta_path[:] = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    import numpy as np
    import keras_vmoe
    # Every module of the source tree imports from the wheel (none left out).
    unimportable = {}
    for module in sys.argv[1:]:
        try:
            importlib.import_module(module)
        except ImportError as error:
            unimportable[module] = str(error)
    from keras_vmoe.models import VMoEImageClassifier
    classifier = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    logits = classifier.predict(np.full((1, 32, 32, 3), 128, "uint8"), verbose=0)
    print(json.dumps(dict(file=keras_vmoe.__file__, shape=list(logits.shape), unimportable=unimportable,
                          finite=bool(np.isfinite(logits).all()),
                          folder=str(keras_vmoe.presets.BUNDLED_PRESETS["vmoe_tiny_cifar10"].folder))))
    """
)


@pytest.mark.skipif(backend() != "jax", reason="the wheel is backend independent: built once, under jax")
def test_the_wheel_ships_the_presets(tmp_path):
    start = time.perf_counter()
    # Build from a copy of the working tree: an in-tree build would write
    # build/ and *.egg-info into the repository (and reuse a stale build/lib).
    source = tmp_path / "source"
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file() and not name.startswith(("tests/", "guides/", "benchmarks/")):
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("keras_vmoe-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    for name in presets.BUNDLED_PRESETS:
        shipped = site / "keras_vmoe" / "bundled_presets" / name
        source_folder = ROOT / "presets" / name
        # Every file of the preset folder, the LIMoE vocabulary under assets/
        # too (pip adds the __pycache__ of recipe.py).
        assert {
            p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        } == {
            p.relative_to(source_folder)
            for p in source_folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    env = dict(os.environ, PYTHONPATH=str(site), KERAS_BACKEND="jax")
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "keras_vmoe").rglob("*.py")
    )
    result = subprocess.run(
        [sys.executable, "-c", WHEEL_CHECK, *modules], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert pathlib.Path(checked["file"]).is_relative_to(site)
    assert pathlib.Path(checked["folder"]).is_relative_to(site)
    assert checked["shape"] == [1, 10] and checked["finite"]
    assert checked["unimportable"] == {}, "modules missing from the wheel"
    # About 20 s on 2 CPU cores; the bound only catches a runaway build.
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"the wheel test took {elapsed:.0f} s"
