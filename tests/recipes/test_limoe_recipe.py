"""The LIMoE recipe's helpers: caption packing, the class caption table,
retrieval recall and loading a run's weights, against hand computations."""

import numpy as np
import pytest
import sentencepiece

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import train_limoe_vocabulary
from keras_vmoe.recipes.limoe_cifar10 import LIMoERecipe
from keras_vmoe.recipes.limoe_cifar10 import class_caption_table
from keras_vmoe.recipes.limoe_cifar10 import load_weights_file
from keras_vmoe.recipes.limoe_cifar10 import pack_captions
from keras_vmoe.recipes.limoe_cifar10 import retrieval_recall
from tests.helpers import to_numpy


def test_pack_captions_and_the_class_caption_table():
    recipe = LIMoERecipe(
        name="t", description="t", backbone={}, sequence_length=6, train_templates=("a photo of a {}.", "{}")
    )
    proto = train_limoe_vocabulary(
        [text for per_class in recipe.captions(recipe.train_templates) for text in per_class], 300
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    texts = ["a photo of a cat.", "cat", "a photo of a truck a photo of a ship."]
    ids, mask = pack_captions(proto, texts, 6)
    for row, text in enumerate(texts):
        pieces = processor.encode(text)
        # <s>, at most 4 pieces (truncated), </s>, then padding.
        expected = [processor.bos_id(), *pieces[:4], processor.eos_id()]
        expected += [processor.pad_id()] * (6 - len(expected))
        assert ids[row].tolist() == expected
        assert mask[row].tolist() == [token != processor.pad_id() for token in expected]
    assert mask[2].all()  # The long caption fills every position.
    table_ids, table_mask = class_caption_table(recipe, proto, recipe.train_templates)
    assert table_ids.shape == table_mask.shape == (10, 2, 6)
    dog = CIFAR10_CLASS_NAMES.index("dog")
    np.testing.assert_array_equal(table_ids[dog], pack_captions(proto, ["a photo of a dog.", "dog"], 6)[0])


def test_retrieval_recall_by_hand():
    # 3 images, 4 captions: caption j belongs to image text_image[j].
    image_vectors = np.eye(3)
    similarity = np.array(
        [
            [0.9, 0.1, 0.8, 0.0],  # image 0: its captions 0 and 1; best caption 0 -> hit@1.
            [0.2, 0.0, 0.5, 0.7],  # image 1: its caption 2; best caption 3 (image 2) -> miss@1, hit@2.
            [0.3, 0.2, 0.1, 0.6],  # image 2: its caption 3; best 3 -> hit@1.
        ]
    )
    text_image = [0, 0, 1, 2]
    recall = retrieval_recall(image_vectors, similarity.T, text_image, ks=(1, 2))
    assert recall["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert recall["image_to_text_recall@2"] == pytest.approx(1.0)
    # Caption 0 -> image 0 (0.9): hit. Caption 1 -> image 2 (0.2 vs 0.1, 0.0): tie-free miss,
    # image 0 is second -> hit@2. Caption 2 -> image 0 (0.8): miss; image 1 second -> hit@2.
    # Caption 3 -> image 1 (0.7): miss; image 2 second -> hit@2.
    assert recall["text_to_image_recall@1"] == pytest.approx(1 / 4)
    assert recall["text_to_image_recall@2"] == pytest.approx(1.0)


def test_load_weights_file_checks_every_shape(tmp_path):
    backbone = LIMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        vocabulary_size=20,
        max_text_length=4,
        num_layers=1,
        hidden_dim=8,
        mlp_dim=16,
        num_heads=2,
        embedding_dim=4,
        moe_layers=(0,),
        num_experts=2,
    )
    weights = [
        np.random.default_rng(i).normal(size=w.shape).astype("float16")
        for i, w in enumerate(backbone.get_weights())
    ]
    path = tmp_path / "run.weights.npz"
    np.savez(path, *weights)
    load_weights_file(backbone, path)
    for variable, array in zip(backbone.weights, weights):
        np.testing.assert_array_equal(to_numpy(variable), array.astype("float32"))
    swapped = list(weights)
    swapped[0] = np.zeros((3, 3), "float16")
    np.savez(path, *swapped)
    with pytest.raises(ValueError, match=r"arr_0 has shape \(3, 3\), but the model's weight"):
        load_weights_file(backbone, path)
    np.savez(path, *weights[:-1])
    with pytest.raises(ValueError, match=f"{len(weights) - 1} arrays, but the model has {len(weights)}"):
        load_weights_file(backbone, path)
