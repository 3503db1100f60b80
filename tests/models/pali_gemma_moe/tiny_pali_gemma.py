"""Tiny PaliGemma-style models and a SentencePiece vocabulary made at test time."""

import keras
import numpy as np

from keras_vmoe.data import load_coco_captions
from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import PaliGemmaMoECausalLMPreprocessor
from keras_vmoe.models import PaliGemmaMoEImageConverter
from keras_vmoe.models import PaliGemmaMoETokenizer
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import train_pali_gemma_moe_vocabulary
from tests.helpers import COCO_CAPTIONS

PROMPT = "caption en"
IMAGE_SIZE = 32


def sentencepiece_proto(texts, vocab_size=64):
    """A word-level vocabulary with PaliGemma's special pieces, trained on
    `texts` in milliseconds."""
    return train_pali_gemma_moe_vocabulary(texts, vocab_size)


def coco_pairs(count):
    """`count` COCO images (uint8, IMAGE_SIZE x IMAGE_SIZE) with their first caption."""
    images, captions = load_coco_captions(COCO_CAPTIONS, IMAGE_SIZE, limit=count)
    return images, [caption.lower().strip(" .") for caption in captions[:, 0]]


def tiny_tower(kind, **overrides):
    """A 2-block image tower on 32x32 images, 8x8 patches: 16 image tokens.
    `kind`: "dense", "vmoe" (4 experts, top-2, in the last block) or "soft"
    (4 experts of 4 slots in the last block)."""
    arguments = dict(
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        mlp_dim=64,
        num_heads=2,
        pooling=None,
        use_class_token=False,
    )
    arguments.update(overrides)
    last = arguments["num_layers"] - 1
    if kind == "vmoe":
        arguments.update(moe_layers=(last,), num_experts=4, num_selected_experts=2)
    elif kind == "soft":
        arguments.update(moe_layers=(last,), num_experts=4, slots_per_expert=4)
    return (SoftMoEBackbone if kind == "soft" else VMoEBackbone)(**arguments)


def tiny_causal_lm(tower, proto, sequence_length=24, image_converter=True, num_layers=2, seed=0):
    keras.utils.set_random_seed(seed)
    tokenizer = PaliGemmaMoETokenizer(proto=proto)
    converter = None
    if image_converter:
        converter = PaliGemmaMoEImageConverter(image_size=tower.image_shape[:2], scale=1 / 127.5, offset=-1.0)
    preprocessor = PaliGemmaMoECausalLMPreprocessor(tokenizer, converter, sequence_length=sequence_length)
    backbone = PaliGemmaMoEBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_encoder=tower,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
    )
    return PaliGemmaMoECausalLM(backbone, preprocessor)


def random_uint8_images(count, size=IMAGE_SIZE, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, size, size, 3)).astype("uint8")
