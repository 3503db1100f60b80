"""`keras-vmoe convert`, run as the installed console script for each kind of
source, and its bad-input errors (in-process).

The command's flow is the same on every backend and each converter is tested
on every backend in tests/convert, so the process starts run on torch alone
(the lightest pass of the suite).
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe import cli
from keras_vmoe.convert import load_dinov2_onnx
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from tests.convert.test_dinov2_onnx import synthetic_weights
from tests.convert.test_dinov2_onnx import write_export
from tests.convert.test_keras_hub_pali_gemma import tiny_keras_hub_pali_gemma
from tests.convert.test_keras_hub_towers import dinov2
from tests.convert.test_keras_hub_towers import perturbed
from tests.convert.test_keras_hub_towers import siglip_vision
from tests.convert.test_keras_hub_towers import text_backbone
from tests.helpers import FIXTURES
from tests.helpers import backend
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import requires_fixtures
from tests.helpers import to_numpy

TOKEN_CHOICE = FIXTURES / "vmoe_tiny_token_choice"
ERROR_PREFIX = "keras-vmoe: error:"
# K = E and capacity for every token: the upcycled tower computes the dense one.
EVERY_EXPERT = (
    "--upcycle",
    "4",
    "--moe-layers",
    "1",
    "--num-selected-experts",
    "4",
    "--capacity-factor",
    "1",
)
console = pytest.mark.skipif(backend() != "torch", reason="process starts: on torch only (see the docstring)")


def convert(*argv):
    """Runs the console script; returns its completed process."""
    script = pathlib.Path(sys.executable).parent / "keras-vmoe"
    assert script.is_file(), f"console script not installed at {script}"
    return subprocess.run(
        [str(script), "convert", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": backend(), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def converted(*argv):
    result = convert(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote a " in result.stdout
    return json.loads((pathlib.Path(str(argv[1])) / "metadata.json").read_text())["keras_vmoe_conversion"]


def assert_close(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=f32_atol(expected), rtol=0)


def saved(model, folder):
    model.save_to_preset(str(folder))
    return folder


@console
def test_siglip_preset_upcycled_to_a_soft_moe_classifier(tmp_path):
    keras.utils.set_random_seed(0)
    vision = perturbed(siglip_vision(), 1)
    source = saved(vision, tmp_path / "siglip")
    output = tmp_path / "soft_moe"
    record = converted(
        source, output, "--num-classes", "10", "--upcycle", "4", "--moe-layers", "1", "--router", "soft"
    )
    assert record["source_kind"] == "keras-hub" and record["source_class"] == "SigLIPVisionEncoder"
    assert record["upcycled"] == dict(num_experts=4, moe_layers=[1], router="soft", group_size=None)
    classifier = keras_hub.models.ImageClassifier.from_preset(str(output))
    assert isinstance(classifier, SoftMoEImageClassifier) and classifier.backbone.moe_layers == (1,)
    pixels = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype("uint8")
    assert classifier.predict(pixels, verbose=0).shape == (2, 10)
    # No source preprocessor: pixels scaled to [-1, 1].
    converter = classifier.preprocessor.image_converter
    assert (converter.scale, converter.offset) == (1 / 127.5, -1.0)


@console
@pytest.mark.parametrize("kind", ["siglip", "dinov2", "vit"])
def test_keras_hub_tower_upcycled_with_every_expert_computes_the_tower(kind, tmp_path):
    keras.utils.set_random_seed(0)
    if kind == "siglip":
        tower = perturbed(siglip_vision(), 1)
    elif kind == "dinov2":
        tower = perturbed(dinov2(num_register_tokens=2), 2)
    else:
        tower = perturbed(
            keras_hub.models.ViTBackbone(
                image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
            ),
            3,
        )
    source = saved(tower, tmp_path / kind)
    reference = keras_hub.models.Backbone.from_preset(str(source))  # As saved (DINOv2 back-resizes).
    record = converted(source, tmp_path / "out", *EVERY_EXPERT)
    assert record["source"] == str(source) and record["license"].startswith("unknown")
    backbone = VMoEBackbone.from_preset(str(tmp_path / "out"))
    assert backbone.moe_layers == (1,)
    images = random_images(2)
    assert_close(
        to_numpy(backbone(images)), to_numpy(reference({"images": images} if kind != "vit" else images))
    )


@console
def test_dinov2_onnx_file(tmp_path):
    path = write_export(tmp_path / "dinov2.onnx", synthetic_weights())
    record = converted(path, tmp_path / "out", "--image-size", "32", *EVERY_EXPERT)
    assert record["source_kind"] == "onnx"
    backbone = VMoEBackbone.from_preset(str(tmp_path / "out"))
    pixels = np.random.RandomState(0).normal(size=(2, 32, 32, 3)).astype("float32")
    expected = to_numpy(load_dinov2_onnx(path, image_size=32)(pixels))
    assert_close(to_numpy(backbone(pixels)), expected)


@console
def test_pali_gemma_preset_with_an_upcycled_image_tower(tmp_path):
    source = saved(tiny_keras_hub_pali_gemma(), tmp_path / "pali_gemma")
    record = converted(source, tmp_path / "out", "--upcycle", "4", "--moe-layers", "0", "--router", "soft")
    assert record["source_class"] == "PaliGemmaBackbone"
    causal_lm = PaliGemmaMoECausalLM.from_preset(str(tmp_path / "out"))
    assert causal_lm.backbone.image_encoder.moe_layers == (0,)


def mlp_kernel(classifier, block):
    """The first MLP kernel of a block: (E, D, F) for a MoE block, (D, F) for a dense one."""
    mlp = classifier.backbone.get_layer(f"encoder_block_{block}").mlp
    return to_numpy(mlp.kernel_0 if hasattr(mlp, "kernel_0") else mlp.dense_0.kernel)


@pytest.fixture(scope="module")
def orbax_workdir(tmp_path_factory):
    """The token-choice fixture's parameters as an Orbax checkpoint of vmoe's trainer."""
    pytest.importorskip("orbax.checkpoint")
    from keras_vmoe.convert import read_vmoe_checkpoint
    from tests.convert.test_vmoe_orbax import save_like_vmoe
    from tests.convert.test_vmoe_orbax import train_state
    from tests.convert.vmoe_checkpoint_writer import unflatten

    workdir = tmp_path_factory.mktemp("workdir")
    params = unflatten(read_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt")))
    save_like_vmoe(workdir / "ckpt", {1: train_state(1, params)})
    return workdir


@console
@requires_fixtures
@pytest.mark.parametrize("kind", ["vmoe", "vmoe-orbax"])
def test_vmoe_checkpoint_upcycled(kind, tmp_path, request):
    source = TOKEN_CHOICE / "ckpt" if kind == "vmoe" else request.getfixturevalue("orbax_workdir") / "ckpt"
    config = TOKEN_CHOICE / "config.json"
    # The checkpoint's own routing (K = 2, capacity factor 1.05, groups of 34
    # tokens) for every MoE block, the new ones 0 and 2 included.
    routing = ("--num-selected-experts", "2", "--capacity-factor", "1.05", "--group-size", "34")
    record = converted(
        source, tmp_path / "out", "--model-config", config, "--upcycle", "4", "--moe-layers", "0,2", *routing
    )
    assert record["source_kind"] == kind and record["upcycled"]["moe_layers"] == [0, 2]
    classifier = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "out"))
    assert isinstance(classifier, VMoEImageClassifier) and classifier.backbone.moe_layers == (0, 1, 2, 3)
    assert classifier.preprocessor.image_converter.scale == 1 / 127.5  # vmoe's [-1, 1] inputs.
    dense = load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), json.loads(config.read_text()))
    # The checkpoint's experts are kept; the dense MLPs of 0 and 2 are copied into every expert.
    np.testing.assert_array_equal(mlp_kernel(classifier, 1), mlp_kernel(dense, 1))
    np.testing.assert_array_equal(mlp_kernel(classifier, 2), np.stack([mlp_kernel(dense, 2)] * 4))
    # The same upcycling in this process, given the written preset's new
    # routers, computes the same logits.
    reference = keras_vmoe.upcycle(
        dense, 4, (0, 2), num_selected_experts=2, capacity_factor=1.05, group_size=34
    )
    for block in (0, 2):
        name = f"encoder_block_{block}"
        kernel = classifier.backbone.get_layer(name).mlp.router.kernel
        reference.backbone.get_layer(name).mlp.router.kernel.assign(to_numpy(kernel))
    images = np.load(TOKEN_CHOICE / "io.npz")["images"]
    expected = to_numpy(reference(images, training=False))
    assert_close(to_numpy(classifier(images, training=False)), expected)


def run(capsys, *argv):
    status = cli.main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_error(capsys, output, argv, needles):
    """One `keras-vmoe: error:` line holding every needle, and no output folder."""
    status, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not output.exists()


@pytest.fixture(scope="module")
def text_preset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    text_backbone().save_to_preset(str(folder))
    return folder


@pytest.mark.skipif(backend() != "torch", reason="the command's checks do not depend on the backend")
def test_bad_sources_give_one_line_and_no_output(capsys, tmp_path, text_preset):
    output = tmp_path / "out"
    assert_error(capsys, output, [text_preset, output], ["is a BertBackbone preset", "SigLIPBackbone"])
    assert_error(capsys, output, [tmp_path / "missing.onnx", output], ["no such ONNX file"])
    assert_error(
        capsys, output, [tmp_path / "missing", output], ["no such file or folder", "expected a vmoe"]
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    assert_error(
        capsys, output, [tmp_path / "foreign", output], ["unknown source kind", "not an Orbax checkpoint"]
    )
    assert_error(
        capsys, output, [tmp_path / "foreign" / "notes.txt", output], ["unknown source kind", "is a file"]
    )


@requires_fixtures
@pytest.mark.skipif(backend() != "torch", reason="the command's checks do not depend on the backend")
def test_bad_configs_and_options_give_one_line_and_no_output(capsys, tmp_path):
    output = tmp_path / "out"
    prefix = TOKEN_CHOICE / "ckpt"
    assert_error(capsys, output, [prefix, output], ["needs --model-config"])
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    config["hidden_size"] = 48
    (tmp_path / "wrong.json").write_text(json.dumps(config))
    assert_error(
        capsys,
        output,
        [prefix, output, "--model-config", tmp_path / "wrong.json"],
        ["has shape (8, 8, 3, 32) but the model built from the config expects (8, 8, 3, 48)"],
    )
    assert_error(
        capsys, output, [prefix, output, "--model-config", "nope"], ["neither a built-in vmoe preset"]
    )
    assert_error(
        capsys,
        output,
        [prefix, output, "--model-config", TOKEN_CHOICE / "config.json", "--upcycle", "4"],
        ["--upcycle NUM_EXPERTS and --moe-layers I,J,... go together"],
    )
    output.mkdir()
    status, _, err = run(capsys, prefix, output, "--model-config", TOKEN_CHOICE / "config.json")
    assert status == 1 and "exists; pass --overwrite" in err and not any(output.iterdir())


@pytest.mark.skipif(backend() != "torch", reason="the command's checks do not depend on the backend")
def test_bad_outputs_and_options_for_the_kind_give_one_line(capsys, tmp_path, monkeypatch):
    pali_gemma = tmp_path / "pali_gemma"
    pali_gemma.mkdir()  # Its config alone: the check comes before any weight is read.
    (pali_gemma / "config.json").write_text(json.dumps({"registered_name": "keras_hub>PaliGemmaBackbone"}))
    output = tmp_path / "out"
    assert_error(capsys, output, [pali_gemma, output, "--num-classes", "3"], ["a PaliGemma converts whole"])
    (tmp_path / "file").write_text("keep")
    status, _, err = run(capsys, pali_gemma, tmp_path / "file", "--overwrite")
    assert status == 1 and "is a file; OUTPUT_DIR must be a folder" in err
    status, _, err = run(capsys, pali_gemma, tmp_path, "--overwrite")
    assert status == 1 and "holds the source" in err
    monkeypatch.chdir(pali_gemma)
    status, _, err = run(capsys, pali_gemma, ".", "--overwrite")
    assert status == 1 and "holds the working folder" in err
    assert (tmp_path / "file").read_text() == "keep" and (pali_gemma / "config.json").is_file()


@pytest.mark.skipif(backend() != "torch", reason="the command's flow does not depend on the backend")
def test_a_new_head_takes_the_preset_scaling_or_the_family_one(capsys, tmp_path):
    """DINOv2 without an image converter: ImageNet mean and std; a SigLIP
    preset with its image converter: that converter's scale and offset."""
    keras.utils.set_random_seed(0)
    saved(dinov2(), tmp_path / "dinov2")
    vision = siglip_vision()
    saved(vision, tmp_path / "siglip")
    keras_hub.layers.ImageConverter(image_size=(32, 32), scale=1 / 255.0, offset=0.0).save_to_preset(
        str(tmp_path / "siglip")
    )
    for name, scale, offset in (
        (
            "dinov2",
            [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
            [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        ),
        ("siglip", 1 / 255.0, 0.0),
    ):
        status, _, err = run(capsys, tmp_path / name, tmp_path / f"{name}_out", "--num-classes", "3")
        assert status == 0, err
        classifier = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / f"{name}_out"))
        converter = classifier.preprocessor.image_converter
        np.testing.assert_allclose(converter.scale, scale, rtol=1e-6)
        np.testing.assert_allclose(converter.offset, offset, rtol=1e-6)
        assert classifier.backbone.pooling == ("map" if name == "siglip" else "token")
