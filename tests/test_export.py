"""Export for serving: SavedModel (JAX, TensorFlow) and ONNX (every backend) round trips."""

import importlib

import keras
import numpy as np
import pytest

from keras_vmoe.export import UNSUPPORTED
from keras_vmoe.export import ExportError
from keras_vmoe.export import export_model
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEImageConverter
from keras_vmoe.models import LIMoEPreprocessor
from keras_vmoe.models import LIMoETokenizer
from keras_vmoe.models import LIMoEZeroShotClassifier
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import train_limoe_vocabulary
from tests.helpers import backend
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy
from tests.models.pali_gemma_moe.tiny_pali_gemma import sentencepiece_proto
from tests.models.pali_gemma_moe.tiny_pali_gemma import tiny_causal_lm
from tests.models.pali_gemma_moe.tiny_pali_gemma import tiny_tower

BATCH = 2
TEXT_LENGTH = 6


def perturbed(model, seed=0):
    """Every weight moved off its initialiser (zero biases included)."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        if variable.dtype in ("float32", "float16", "bfloat16"):
            noise = np.asarray(rng.randn(*variable.shape), "float32")
            variable.assign(to_numpy(variable) + 0.05 * noise)
    return model


def image_classifier(kind):
    keras.utils.set_random_seed(0)
    moe = dict(moe_layers=(1,), num_experts=4)
    if kind == "dense_vit":
        return VMoEImageClassifier(VMoEBackbone(**tiny_vit_arguments()), num_classes=5)
    if kind == "soft_moe":
        backbone = SoftMoEBackbone(
            **tiny_vit_arguments(**moe, slots_per_expert=2, pooling="gap", use_class_token=False)
        )
        return SoftMoEImageClassifier(backbone, num_classes=5)
    options = {
        "token_choice_bpr": dict(num_selected_experts=2, batch_priority=True, capacity_factor=1.0),
        "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
        "patch_merger_map": dict(
            num_selected_experts=2,
            pooling="map",
            use_class_token=False,
            patch_merger=dict(after_block=0, num_tokens=4),
        ),
    }[kind]
    return VMoEImageClassifier(VMoEBackbone(**tiny_vit_arguments(**moe, **options)), num_classes=5)


def zero_shot_classifier():
    keras.utils.set_random_seed(0)
    names = ["cat", "dog", "ship"]
    tokenizer = LIMoETokenizer(proto=train_limoe_vocabulary([f"a photo of a {n}." for n in names], 300))
    preprocessor = LIMoEPreprocessor(
        tokenizer,
        LIMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0),
        sequence_length=8,
    )
    backbone = LIMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        vocabulary_size=tokenizer.vocabulary_size(),
        max_text_length=8,
        num_layers=2,
        hidden_dim=16,
        mlp_dim=32,
        num_heads=2,
        embedding_dim=8,
        moe_layers=(1,),
        num_experts=4,
    )
    perturbed(backbone)
    return LIMoEZeroShotClassifier(backbone, preprocessor, names, ["a photo of a {}."], scale=10.0)


def vlm_backbone():
    proto = sentencepiece_proto(["caption en a cat on a mat", "a dog in the park"])
    return perturbed(tiny_causal_lm(tiny_tower("vmoe"), proto).backbone)


MODELS = [
    "dense_vit",
    "token_choice_bpr",
    "expert_choice",
    "soft_moe",
    "patch_merger_map",
    "limoe_zero_shot",
    "vlm_backbone",
]


@pytest.fixture(scope="module")
def models():
    """{kind: (model, inputs, outputs of model(inputs))}, built as tests ask."""
    return {}


def model_and_data(models, kind):
    if kind not in models:
        if kind == "limoe_zero_shot":
            model = zero_shot_classifier()
        elif kind == "vlm_backbone":
            model = vlm_backbone()
        else:
            model = perturbed(image_classifier(kind))
        images = random_images(BATCH)
        if kind == "vlm_backbone":
            rng = np.random.RandomState(1)
            inputs = {
                "images": images,
                "token_ids": rng.randint(1, model.vocabulary_size, (BATCH, TEXT_LENGTH)).astype("int32"),
                "padding_mask": np.ones((BATCH, TEXT_LENGTH), "int32"),
                "response_mask": np.zeros((BATCH, TEXT_LENGTH), "int32"),
            }
        else:
            inputs = images
        models[kind] = (model, inputs, to_numpy(model(inputs, training=False)))
    return models[kind]


def assert_close(got, expected):
    # Another runtime's kernels (TF SavedModel, ONNX Runtime) and batch sizes:
    # float32 sums in other orders, tens of ulps of the output's scale.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=f32_atol(expected))


@pytest.mark.skipif(backend() == "torch", reason="SavedModel export runs on JAX and TensorFlow")
@pytest.mark.parametrize("kind", MODELS)
def test_saved_model_round_trip(models, kind, tmp_path):
    import tensorflow as tf

    model, inputs, expected = model_and_data(models, kind)
    # JAX's shape polymorphism cannot trace keras-hub's decoder at an open length.
    sequence_length = TEXT_LENGTH if kind == "vlm_backbone" and backend() == "jax" else None
    path = export_model(model, tmp_path / "served", sequence_length=sequence_length)
    served = tf.saved_model.load(path)
    structure = keras.tree.map_structure(tf.constant, inputs)
    assert_close(served.serve(structure), expected)
    # Any batch size: one example.
    first = keras.tree.map_structure(lambda x: tf.constant(x[:1]), inputs)
    assert_close(served.serve(first), expected[:1])


@pytest.mark.parametrize("kind", MODELS)
def test_onnx_round_trip(models, kind, tmp_path):
    import onnxruntime

    model, inputs, expected = model_and_data(models, kind)
    if kind == "vlm_backbone" and backend() == "jax":  # jax2onnx cannot convert keras-hub's decoder.
        with pytest.raises(ExportError, match="jax2onnx.*jnp.arange.*KERAS_BACKEND=tensorflow or torch"):
            export_model(model, tmp_path / "served.onnx", "onnx", sequence_length=TEXT_LENGTH)
        assert list(tmp_path.iterdir()) == []
        return
    sequence_length = TEXT_LENGTH if kind == "vlm_backbone" else None
    path = tmp_path / "served.onnx"
    # Through the model's own export method, as a user calls it.
    if sequence_length is None:
        model.export(str(path), format="onnx")
    else:
        export_model(model, path, "onnx", batch_size=BATCH, sequence_length=sequence_length)
    session = onnxruntime.InferenceSession(str(path))
    feeds = keras.tree.flatten(inputs)  # Dict inputs: sorted by name, as exported.
    batch = session.get_inputs()[0].shape[0]
    if not isinstance(batch, int):  # Any batch size (TensorFlow's exporter).
        batch = BATCH
    names = [spec.name for spec in session.get_inputs()]
    outputs = session.run(None, {name: x[:batch] for name, x in zip(names, feeds)})[0]
    assert_close(outputs, expected[:batch])


def test_export_leaves_nothing_when_it_fails(models, tmp_path, monkeypatch):
    model, _, _ = model_and_data(models, "token_choice_bpr")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(keras.Model, "export", broken)
    if backend() == "torch":
        monkeypatch.setattr("keras_vmoe.ops.tools.torch_onnx.export_onnx", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model(model, tmp_path / "out.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_and_bad_requests_say_why(models, tmp_path, monkeypatch):
    model, _, _ = model_and_data(models, "dense_vit")
    if backend() == "torch":
        with pytest.raises(ExportError, match="cannot be exported from the PyTorch backend.*ONNX"):
            model.export(str(tmp_path / "served"))
        assert ("torch", "saved_model") in UNSUPPORTED
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'.*saved_model.*onnx"):
        export_model(model, tmp_path / "x", "tflite")
    with pytest.raises(ExportError, match=r"\.onnx file"):
        export_model(model, tmp_path / "model.bin", "onnx")
    with pytest.raises(ExportError, match="batch_size must be a positive int"):
        export_model(model, tmp_path / "x.onnx", "onnx", batch_size=0)
    # The converter missing: the error names the extra that installs it.
    real_import = importlib.import_module

    def without_converters(name, *args):
        if name in ("tf2onnx", "jax2onnx", "onnxscript"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_converters)
    with pytest.raises(ExportError, match=r"needs (tf2onnx|jax2onnx|onnxscript).*keras-vmoe\[export\]"):
        export_model(model, tmp_path / "x.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(backend() == "tensorflow", reason="TensorFlow exports open lengths")
def test_open_text_length_needs_a_sequence_length_off_tensorflow(models, tmp_path):
    model, _, _ = model_and_data(models, "vlm_backbone")
    with pytest.raises(ExportError, match="open length.*sequence_length=N"):
        export_model(model, tmp_path / "vlm.onnx", "onnx" if backend() == "torch" else "saved_model")
    assert list(tmp_path.iterdir()) == []
