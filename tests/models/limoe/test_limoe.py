"""LIMoE: backbone, contrastive fit, zero-shot classifier, preprocessor, presets."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEContrastiveModel
from keras_vmoe.models import LIMoEImageConverter
from keras_vmoe.models import LIMoEPreprocessor
from keras_vmoe.models import LIMoETokenizer
from keras_vmoe.models import LIMoEZeroShotClassifier
from keras_vmoe.models import train_limoe_vocabulary
from keras_vmoe.models.limoe import sigmoid_contrastive_loss
from keras_vmoe.models.limoe import softmax_contrastive_loss
from tests.helpers import to_numpy

CLASSES = ["cat", "dog", "ship", "truck"]


@pytest.fixture()
def preprocessor():
    texts = [f"a photo of a {name}." for name in CLASSES] + ["a blurry picture of the dog."]
    tokenizer = LIMoETokenizer(proto=train_limoe_vocabulary(texts, 300))
    # After the tokenizer on purpose: it survives TensorFlow's reseeding.
    keras.utils.set_random_seed(0)
    converter = LIMoEImageConverter(image_size=(16, 16), scale=1 / 127.5, offset=-1.0)
    return LIMoEPreprocessor(tokenizer, converter, sequence_length=8)


def tiny_backbone(preprocessor):
    return LIMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        vocabulary_size=preprocessor.tokenizer.vocabulary_size(),
        max_text_length=8,
        num_layers=2,
        hidden_dim=16,
        mlp_dim=32,
        num_heads=2,
        embedding_dim=8,
        moe_layers=(1,),
        num_experts=4,
        router_options=dict(noise_std=0.0),
    )


def test_contrastive_losses_against_hand_computation():
    logits = np.array([[2.0, 0.0], [1.0, 3.0]], "float32")
    exact = logits.astype(np.float64)  # The reference in float64; ours in float32.
    log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
    expected = -(np.mean(np.diag(log_softmax(exact))) + np.mean(np.diag(log_softmax(exact.T)))) / 2
    assert float(to_numpy(softmax_contrastive_loss(logits))) == pytest.approx(expected, rel=1e-5)
    signs = 2 * np.eye(2) - 1
    expected = np.mean(np.sum(np.log1p(np.exp(-signs * logits)), -1))
    assert float(to_numpy(sigmoid_contrastive_loss(logits))) == pytest.approx(expected, rel=1e-5)


def test_pairs_are_routed_per_modality_and_fit_lowers_the_loss(preprocessor):
    backbone = tiny_backbone(preprocessor)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3)).astype("uint8")
    texts = np.array([f"a photo of a {CLASSES[i % 4]}." for i in range(8)])
    model = LIMoEContrastiveModel(backbone, preprocessor, loss="softmax")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))  # No weight decay: only gradients move weights.
    routers = [moe.router.kernel for moe in backbone.moe_blocks]
    before = [to_numpy(kernel).copy() for kernel in routers]
    history = model.fit({"images": images, "text": texts}, batch_size=8, epochs=6, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["moe_auxiliary_loss"][0] > 0
    # Gradients reach the routers (through the combine weights and the auxiliary losses).
    for kernel, start in zip(routers, before):
        assert np.abs(to_numpy(kernel) - start).max() > 1e-4, kernel.path
    x = preprocessor({"images": images, "text": texts})
    joint = backbone(x)
    # No pairing leaks through routing: a pair embeds as its parts do alone.
    np.testing.assert_allclose(
        to_numpy(joint["image_embeddings"]), to_numpy(backbone.embed_images(x["images"])), atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(joint["text_embeddings"]),
        to_numpy(backbone.embed_text(x["token_ids"], x["padding_mask"])),
        atol=1e-5,
    )
    # The sigmoid loss, on preprocessed inputs.
    model = LIMoEContrastiveModel(backbone, loss="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = keras.Model.fit(model, x, batch_size=8, epochs=6, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]


def test_zero_shot_classifier_predicts_and_round_trips(preprocessor, tmp_path):
    backbone = tiny_backbone(preprocessor)
    classifier = LIMoEZeroShotClassifier(backbone, preprocessor, CLASSES, ["a photo of a {}."], scale=10.0)
    images = np.random.default_rng(1).integers(0, 255, (3, 20, 20, 3)).astype("uint8")
    logits = classifier.predict(images, verbose=0)
    assert logits.shape == (3, 4)
    assert np.abs(logits).max() <= 10.0 + 1e-4  # 10 x cosine similarities.
    classifier.save_to_preset(str(tmp_path))
    restored = LIMoEZeroShotClassifier.from_preset(str(tmp_path))
    np.testing.assert_allclose(restored.predict(images, verbose=0), logits, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        LIMoEZeroShotClassifier(backbone, preprocessor, CLASSES, ["no slot"])


@pytest.mark.parametrize("names", [["ship"], ["cat", "dog", "truck"], [f"thing {i}" for i in range(25)]])
def test_set_classes_takes_any_number_of_labels(preprocessor, names, tmp_path):
    backbone = tiny_backbone(preprocessor)
    templates = ["a photo of a {}.", "a picture of the {}."]
    classifier = LIMoEZeroShotClassifier(backbone, preprocessor, CLASSES, templates, scale=10.0)
    images = np.random.default_rng(2).integers(0, 255, (3, 16, 16, 3)).astype("uint8")
    assert classifier.predict(images, verbose=0).shape == (3, 4)  # Compiled for 4 classes first.
    classifier.set_classes(names)
    assert classifier.templates == templates and classifier.class_names == names
    fresh = LIMoEZeroShotClassifier(backbone, preprocessor, names, templates, scale=10.0)
    logits = classifier.predict(images, verbose=0)
    assert logits.shape == (3, len(names))
    np.testing.assert_allclose(logits, fresh.predict(images, verbose=0), atol=1e-5)
    # One weight of the new shape, no leftover of the old one.
    weights = [v for v in classifier.non_trainable_variables if "class_embeddings" in v.path]
    assert [tuple(v.shape) for v in weights] == [(len(names), 8)]
    # The preset keeps the user's labels.
    classifier.save_to_preset(str(tmp_path))
    restored = LIMoEZeroShotClassifier.from_preset(str(tmp_path))
    assert restored.class_names == names
    np.testing.assert_allclose(restored.predict(images, verbose=0), logits, atol=1e-5)
    if len(names) != 3:
        return
    # Labels and templates straight from the preset (once).
    other = LIMoEZeroShotClassifier.from_preset(
        str(tmp_path), class_names=["truck", "cat"], templates=["a photo of a {}."]
    )
    expected = LIMoEZeroShotClassifier(
        backbone, preprocessor, ["truck", "cat"], ["a photo of a {}."], scale=10.0
    )
    np.testing.assert_allclose(
        other.predict(images, verbose=0), expected.predict(images, verbose=0), atol=1e-5
    )


def test_set_classes_bad_input(preprocessor):
    classifier = LIMoEZeroShotClassifier(tiny_backbone(preprocessor), preprocessor, CLASSES)
    with pytest.raises(ValueError, match="`class_names` is empty"):
        classifier.set_classes([])
    with pytest.raises(ValueError, match="exactly one '{}'"):
        classifier.set_classes(["cat"], ["a photo of a cat."])
    assert classifier.class_names == CLASSES  # Nothing half-changed.


def test_preprocessor_bad_input(preprocessor):
    images = np.zeros((2, 16, 16, 3), "uint8")
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        preprocessor({"images": images, "text": np.array(["a cat.", "a dog.", "a ship."])})
    with pytest.raises(ValueError, match="caption is empty"):
        preprocessor({"text": np.array(["a cat.", ""])})
    # Longer captions are truncated: <s>, the first 6 pieces, </s>.
    long = preprocessor({"text": np.array(["a photo of a cat a photo of a dog a photo of a ship"])})
    ids = to_numpy(long["token_ids"])[0]
    assert ids.shape == (8,) and ids[0] == preprocessor.tokenizer.start_token_id
    assert ids[-1] == preprocessor.tokenizer.end_token_id and to_numpy(long["padding_mask"]).all()
    backbone = tiny_backbone(preprocessor)
    with pytest.raises(ValueError, match="max_text_length=8"):
        backbone.embed_text(np.ones((1, 9), "int32"))


def test_the_tokenizer_survives_reseeding_in_a_tf_data_pipeline():
    """`keras.utils.set_random_seed` clears TensorFlow's eager kernel cache,
    which holds tf-text's SentencePiece resource: a tokenizer built before it
    must still tokenize raw text inside `tf.data` (raw-text `fit`)."""
    import tensorflow as tf
    from keras_hub.tokenizers import SentencePieceTokenizer

    texts = ["a photo of a cat.", "a photo of a dog."]
    proto = train_limoe_vocabulary(texts, 300)
    plain, ours = SentencePieceTokenizer(proto=proto), LIMoETokenizer(proto=proto)
    expected = [to_numpy(ours.tokenize(text)).tolist() for text in texts]
    keras.utils.set_random_seed(1)

    def tokenized(tokenizer):
        dataset = tf.data.Dataset.from_tensor_slices(texts).map(tokenizer.tokenize)
        return [row.numpy().tolist() for row in dataset]

    # The trap is real: keras-hub's own tokenizer lost its resource.
    with pytest.raises(tf.errors.NotFoundError, match="does not exist"):
        tokenized(plain)
    assert tokenized(ours) == expected
