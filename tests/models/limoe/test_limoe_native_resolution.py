"""LIMoE on packed native-resolution images (NaViT): per-slot image and
caption embeddings, the masked contrastive loss, fit, save and load."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import ImagePatcher
from keras_vmoe.layers import SequencePacker
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEContrastiveModel
from keras_vmoe.models import LIMoEPreprocessor
from keras_vmoe.models import LIMoETokenizer
from keras_vmoe.models import NativeResolutionImageClassifierPreprocessor
from keras_vmoe.models import train_limoe_vocabulary
from keras_vmoe.models.limoe import sigmoid_contrastive_loss
from keras_vmoe.models.limoe import softmax_contrastive_loss
from tests.helpers import to_numpy

CLASSES = ["cat", "dog", "ship", "truck"]
SIZES = [(16, 8), (12, 16), (8, 8), (16, 16), (4, 12), (8, 16)]


def native_limoe(vocabulary_size=60, image_pooling="gap", **overrides):
    keras.utils.set_random_seed(0)
    arguments = dict(
        image_shape=(16, 16, 3),
        patch_size=4,
        vocabulary_size=vocabulary_size,
        max_text_length=8,
        num_layers=2,
        hidden_dim=16,
        mlp_dim=32,
        num_heads=2,
        embedding_dim=8,
        moe_layers=(1,),
        num_experts=4,
        # K = E: every token reaches every expert, so a last-bit difference
        # cannot flip a routing choice; C = S drops nothing.
        num_selected_experts=4,
        router_options=dict(noise_std=0.0),
        image_pooling=image_pooling,
        native_resolution=True,
        max_images_per_sequence=3,
    )
    return LIMoEBackbone(**{**arguments, **overrides})


def mixed_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3)).astype("uint8") for h, w in SIZES]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_masked_contrastive_loss_is_the_loss_of_the_present_pairs(kind):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 7)).astype("float32") * 3
    mask = np.array([1, 0, 1, 1, 0, 1, 0], bool)
    loss = softmax_contrastive_loss if kind == "softmax" else sigmoid_contrastive_loss
    expected = to_numpy(loss(logits[mask][:, mask]))
    np.testing.assert_allclose(to_numpy(loss(logits, mask)), expected, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(loss(logits, np.ones(7, bool))), to_numpy(loss(logits)), rtol=1e-6)


@pytest.mark.parametrize("image_pooling", ["gap", "map"])
def test_an_image_and_its_caption_embed_alone_as_when_packed(image_pooling):
    backbone = native_limoe(image_pooling=image_pooling)
    patcher = ImagePatcher(4, 16, (4, 4), scale=1 / 127.5, offset=-1.0)
    packer = SequencePacker(40, 3)
    patches = [patcher(image) for image in mixed_images()]
    x, index = packer.pack(patches)
    assert len(x["segment_ids"]) > 1 and max(np.bincount(index[:, 0])) > 1  # Images share sequences.
    rng = np.random.default_rng(1)
    shape = x["segment_ids"].shape[:1] + (3,)
    token_ids = rng.integers(1, 60, shape + (8,)).astype("int32")
    padding_mask = np.zeros(shape + (8,), bool)
    for (sequence, slot), length in zip(index, [3, 8, 5, 2, 6, 4]):
        padding_mask[sequence, slot, :length] = True
    packed = backbone({**x, "token_ids": token_ids, "padding_mask": padding_mask})
    images, texts = (to_numpy(packed[key]) for key in ("image_embeddings", "text_embeddings"))
    for number, (sequence, slot) in enumerate(index):
        alone, _ = packer.pack([patches[number]])
        image = to_numpy(backbone.encode_packed_images(alone))[0, 0]
        np.testing.assert_allclose(images[sequence, slot], image, atol=1e-5)
        caption_ids, caption_mask = np.zeros((1, 3, 8), "int32"), np.zeros((1, 3, 8), bool)
        caption_ids[0, 0], caption_mask[0, 0] = token_ids[sequence, slot], padding_mask[sequence, slot]
        text = to_numpy(backbone.encode_slot_text(caption_ids, caption_mask))[0, 0]
        np.testing.assert_allclose(texts[sequence, slot], text, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(image), 1.0, atol=1e-5)
    empty = np.ones(shape, bool)
    empty[index[:, 0], index[:, 1]] = False
    assert np.all(images[empty] == 0) and np.all(texts[empty] == 0)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"a photo of a {name}." for name in CLASSES]
    return LIMoETokenizer(proto=train_limoe_vocabulary(texts, 300))


def test_fit_on_mixed_sizes_lowers_the_loss_and_round_trips(tokenizer, tmp_path):
    backbone = native_limoe(
        tokenizer.vocabulary_size(), parallel_block=True, use_bias=False, num_selected_experts=1
    )
    packer = NativeResolutionImageClassifierPreprocessor.for_backbone(
        backbone, (4, 16), 40, scale=1 / 127.5, offset=-1.0, token_drop_rate=(0.0, 0.3), seed=0
    )
    limoe_preprocessor = LIMoEPreprocessor(tokenizer, sequence_length=8, image_packer=packer)
    model = LIMoEContrastiveModel(backbone, limoe_preprocessor, loss="softmax")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images = mixed_images(1) * 2
    captions = [f"a photo of a {CLASSES[i % 4]}." for i in range(len(images))]
    history = model.fit({"images": images, "text": captions}, batch_size=2, epochs=6, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    # The loss counts the filled slots only: it is the loss of their pairs.
    x = limoe_preprocessor.pack({"images": images, "text": captions})
    _, _, _, index = packer.pack(images)
    logits = to_numpy(model(x))
    slots = index[:, 0] * 3 + index[:, 1]
    expected = to_numpy(softmax_contrastive_loss(logits[slots][:, slots]))
    np.testing.assert_allclose(
        to_numpy(model.compute_loss(x, None, logits, training=False)), expected, rtol=1e-5
    )
    # ViT-22B options: no bias in the block projections.
    biases = [v.path for v in backbone.weights if v.path.split("/")[-1] in ("bias", "bias_0", "bias_1")]
    assert not [path for path in biases if "block" in path and "norm" not in path], biases
    path = str(tmp_path / "limoe.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    config = restored.backbone.get_config()
    assert config["native_resolution"] and config["parallel_block"] and config["use_bias"] is False
    assert restored.preprocessor.image_packer.get_config() == packer.get_config()
    np.testing.assert_allclose(to_numpy(restored(x)), logits, atol=1e-5)


def test_bad_native_options_and_inputs(tokenizer):
    with pytest.raises(ValueError, match="route_pairs_together must be False"):
        native_limoe(route_pairs_together=True)
    with pytest.raises(ValueError, match="max_images_per_sequence"):
        native_limoe(max_images_per_sequence=None)
    limoe_preprocessor = LIMoEPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError, match="needs an image_packer"):
        limoe_preprocessor.pack({"images": mixed_images(), "text": ["a cat."] * 6})
    limoe_preprocessor.image_packer = NativeResolutionImageClassifierPreprocessor(4, 16, 40, 3)
    with pytest.raises(ValueError, match="6 images but 2 captions"):
        limoe_preprocessor.pack({"images": mixed_images(), "text": ["a cat.", "a dog."]})
