"""The recipe of the bundled `limoe_tiny_cifar10` preset: LIMoE trained
contrastively on CIFAR-10 images with captions written from class names.

Every training image gets, each epoch, a caption drawn from
`TRAIN_TEMPLATES` ("a photo of a {}.", ...); zero-shot evaluation embeds the
class names with `EVAL_TEMPLATES`, worded differently and never seen in
training (nor by the vocabulary). The SentencePiece vocabulary is trained on
the training captions only; byte fallback spells the evaluation words it
never saw.

```shell
python presets/limoe_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz \
    --coco PATH/coco_mini_captions.npz
```

trains from scratch, saves the preset (a `LIMoEZeroShotClassifier` over the
CIFAR-10 classes with the evaluation templates; weights in float16), then
loads it and measures zero-shot top-1 on the 10,000 test images through
`predict`, and image-text retrieval on the COCO pairs. With `--weights
RUN.weights.npz --vocabulary RUN.spm [--record RUN.record.json]` it saves the
preset from a finished run (e.g. one trained on a GPU elsewhere) instead of
training, then measures it the same way.
"""

import concurrent.futures
import dataclasses
import json
import math
import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
import sentencepiece

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.data.coco_captions import load_coco_captions
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEContrastiveModel
from keras_vmoe.models import LIMoEImageConverter
from keras_vmoe.models import LIMoEPreprocessor
from keras_vmoe.models import LIMoETokenizer
from keras_vmoe.models import LIMoEZeroShotClassifier
from keras_vmoe.models.limoe.limoe_tokenizer import train_limoe_vocabulary
from keras_vmoe.recipes.cifar10 import IMAGE_SIZE
from keras_vmoe.recipes.cifar10 import PIXEL_OFFSET
from keras_vmoe.recipes.cifar10 import PIXEL_SCALE
from keras_vmoe.recipes.cifar10 import TINY_ENCODER
from keras_vmoe.recipes.cifar10 import hardware
from keras_vmoe.recipes.cifar10 import make_optimizer
from keras_vmoe.recipes.cifar10 import parse_recipe_arguments
from keras_vmoe.recipes.cifar10 import random_crop_and_flip
from keras_vmoe.recipes.cifar10 import recipe_parser
from keras_vmoe.recipes.cifar10 import store_weights_as_float16
from keras_vmoe.recipes.cifar10 import to_model_inputs
from keras_vmoe.recipes.cifar10 import training_record
from keras_vmoe.recipes.cifar10 import update_metrics

TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a small photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of my {}.",
    "a good photo of a {}.",
    "this is a {}.",
    "there is a {} in this image.",
    "{}",
    "a pixelated photo of the {}.",
)
# Worded differently from every training template: zero-shot evaluation.
EVAL_TEMPLATES = (
    "an image showing a {}.",
    "a snapshot of one {}.",
    "look, a {}!",
    "a tiny rendition of the {}.",
    "my favourite {}.",
    "an example of a {}.",
)
# The encoder of the other CIFAR-10 presets (6 blocks of width 192, 8
# experts in blocks 3 and 5), now shared by 64 image patches and up to 16
# text tokens; experts chosen as in the paper (token choice, K = 1, BPR).
TINY_LIMOE = dict(
    image_shape=TINY_ENCODER["image_shape"],
    patch_size=TINY_ENCODER["patch_size"],
    num_layers=TINY_ENCODER["num_layers"],
    hidden_dim=TINY_ENCODER["hidden_dim"],
    mlp_dim=TINY_ENCODER["mlp_dim"],
    num_heads=TINY_ENCODER["num_heads"],
    embedding_dim=128,
    moe_layers=(3, 5),
    num_experts=8,
    num_selected_experts=1,
    capacity_factor=1.0,
    batch_priority=True,
    # Images must keep all 8 experts busy (tau = log 8: the global entropy
    # loss acts until their average routing is uniform), or at capacity
    # factor 1.0 the full experts drop tokens; text may settle on about 4.
    router_options=dict(global_entropy_thresholds=dict(image=math.log(8), text=math.log(4))),
)


@dataclasses.dataclass(frozen=True)
class LIMoERecipe:
    """Everything that decides the LIMoE CIFAR-10 preset.

    Attributes:
        name, description: of the preset.
        backbone: `LIMoEBackbone` arguments except the vocabulary and text
            length, which come from `vocabulary_size` and `sequence_length`.
        vocabulary_size: upper bound of the SentencePiece vocabulary.
        sequence_length: text tokens, `<s>` and `</s>` included.
        loss: `"softmax"` (CLIP) or `"sigmoid"` (SigLIP).
        epochs, batch_size, learning_rate, warmup_epochs, weight_decay,
        crop_padding, seed: as `Cifar10Recipe` (AdamW, linear warm-up, cosine
            decay, random crops and flips).
    """

    name: str
    description: str
    backbone: dict
    vocabulary_size: int = 1000
    sequence_length: int = 16
    loss: str = "softmax"
    train_templates: tuple = TRAIN_TEMPLATES
    eval_templates: tuple = EVAL_TEMPLATES
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 5e-4
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    crop_padding: int = 4
    seed: int = 0

    def captions(self, templates):
        """{class index: [caption per template]}."""
        return [[template.format(name) for template in templates] for name in CIFAR10_CLASS_NAMES]

    def build_vocabulary(self):

        texts = [text for per_class in self.captions(self.train_templates) for text in per_class]
        return train_limoe_vocabulary(texts, self.vocabulary_size)

    def build_model(self, vocabulary_size):

        backbone = LIMoEBackbone(
            vocabulary_size=vocabulary_size, max_text_length=self.sequence_length, **self.backbone
        )
        return LIMoEContrastiveModel(backbone, loss=self.loss)

    def build_preprocessor(self, proto):

        converter = LIMoEImageConverter(
            image_size=(IMAGE_SIZE, IMAGE_SIZE), scale=PIXEL_SCALE, offset=PIXEL_OFFSET
        )
        return LIMoEPreprocessor(LIMoETokenizer(proto=proto), converter, self.sequence_length)


def pack_captions(proto, texts, sequence_length):
    """Token ids and padding masks of `texts`, packed as `LIMoEPreprocessor`
    packs them (`<s>`, the first `sequence_length - 2` pieces, `</s>`,
    padding), with the `sentencepiece` library alone (no TensorFlow), so that
    training can run where keras-hub's tokenizer cannot."""

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    ids = np.full((len(texts), sequence_length), processor.pad_id(), "int32")
    for row, pieces in enumerate(processor.encode(list(texts))):
        packed = [processor.bos_id(), *pieces[: sequence_length - 2], processor.eos_id()]
        ids[row, : len(packed)] = packed
    return ids, ids != processor.pad_id()


def class_caption_table(recipe, proto, templates):
    """(classes, templates, length) ids and masks of every class caption."""
    texts = [text for per_class in recipe.captions(templates) for text in per_class]
    ids, mask = pack_captions(proto, texts, recipe.sequence_length)
    shape = (len(CIFAR10_CLASS_NAMES), len(templates), recipe.sequence_length)
    return ids.reshape(shape), mask.reshape(shape)


def class_embeddings(backbone, ids, mask):
    """(classes, templates, L) captions -> (classes, P) unit vectors (prompt ensembling)."""
    classes, templates, length = ids.shape
    embeddings = backbone.embed_text(ids.reshape(-1, length), mask.reshape(-1, length))
    embeddings = np.asarray(keras.ops.convert_to_numpy(embeddings)).reshape(classes, templates, -1)
    mean = embeddings.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def image_embeddings(backbone, images, batch_size=500):
    """uint8 images -> (N, P) unit vectors, in batches, compiled."""
    encoder = keras.Model(backbone.input["images"], backbone.embed_images(backbone.input["images"]))
    return np.asarray(encoder.predict(to_model_inputs(images), batch_size=batch_size, verbose=0))


def zero_shot_top1(backbone, recipe, proto, images, labels):
    ids, mask = class_caption_table(recipe, proto, recipe.eval_templates)
    similarity = image_embeddings(backbone, images) @ class_embeddings(backbone, ids, mask).T
    return float(np.mean(np.argmax(similarity, -1) == labels))


def fit_limoe(
    model, recipe, images, labels, caption_ids, caption_mask, rng, verbose="auto", after_epoch=None
):
    """Contrastive training on uint8 `images`: every image gets a caption of
    its class from a random training template, redrawn every epoch."""
    steps_per_epoch = max(len(images) // recipe.batch_size, 1)
    examples_per_epoch = min(steps_per_epoch * recipe.batch_size, len(images))
    model.compile(
        optimizer=make_optimizer(
            recipe.learning_rate,
            recipe.weight_decay,
            recipe.warmup_epochs * steps_per_epoch,
            recipe.epochs * steps_per_epoch,
        )
    )
    num_templates = caption_ids.shape[1]

    def epoch_inputs():
        order = rng.permutation(len(images))[:examples_per_epoch]
        template = rng.integers(0, num_templates, len(order))
        return {
            "images": to_model_inputs(random_crop_and_flip(images[order], rng, recipe.crop_padding)),
            "token_ids": caption_ids[labels[order], template],
            "padding_mask": caption_mask[labels[order], template],
        }

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        upcoming = executor.submit(epoch_inputs)
        for epoch in range(recipe.epochs):
            inputs = upcoming.result()
            if epoch + 1 < recipe.epochs:
                upcoming = executor.submit(epoch_inputs)
            keras.Model.fit(
                model,
                inputs,
                batch_size=recipe.batch_size,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                verbose=verbose,
            )
            if after_epoch is not None:
                after_epoch(epoch)


def train(recipe, cifar10_path, epochs=None, train_limit=None, verbose="auto"):
    """Trains from scratch; returns (contrastive model, vocabulary proto, record)."""
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    keras.utils.set_random_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    proto = recipe.build_vocabulary()
    caption_ids, caption_mask = class_caption_table(recipe, proto, recipe.train_templates)
    images, labels = load_cifar10(cifar10_path, "train", limit=train_limit, verbose=verbose != 0)
    test_images, test_labels = load_cifar10(cifar10_path, "test", limit=train_limit, verbose=verbose != 0)
    model = recipe.build_model(vocabulary_size=_vocabulary_size(proto))
    print(
        f"{recipe.name}: {model.backbone.count_params():,} backbone parameters; "
        f"{recipe.epochs} epochs on {hardware()}",
        flush=True,
    )
    start = time.perf_counter()
    fit_limoe(model, recipe, images, labels, caption_ids, caption_mask, rng, verbose=verbose)
    training_time = time.perf_counter() - start
    top1 = zero_shot_top1(model.backbone, recipe, proto, test_images, test_labels)
    print(
        f"{recipe.name}: trained in {training_time:.0f} s; zero-shot test top-1 {top1:.4f} "
        f"(temperature {model.temperature:.1f})",
        flush=True,
    )
    record = training_record(
        recipe.epochs,
        len(images),
        training_time,
        zero_shot_top1_after_training=top1,
        learned_temperature=model.temperature,
    )
    return model, proto, record


def load_weights_file(model, path):
    """Sets `model`'s weights from an `.npz` of arrays `arr_0, arr_1, ...` in
    the order of `model.get_weights()` (as a training run saves them, e.g.
    in float16; they are cast to each variable's dtype).

    Raises:
        ValueError: naming the first variable whose shape differs, or the
            counts when the file holds more or fewer arrays than the model.
    """
    with np.load(path) as stored:
        arrays = [stored[f"arr_{index}"] for index in range(len(stored.files))]
    variables = model.weights
    if len(arrays) != len(variables):
        raise ValueError(
            f"{path}: {len(arrays)} arrays, but the model has {len(variables)} weights; "
            "the file was saved from another architecture."
        )
    for index, (variable, array) in enumerate(zip(variables, arrays)):
        if tuple(variable.shape) != array.shape:
            raise ValueError(
                f"{path}: array arr_{index} has shape {array.shape}, but the model's weight "
                f"{variable.path!r} has shape {tuple(variable.shape)}."
            )
    model.set_weights([array.astype(variable.dtype) for variable, array in zip(variables, arrays)])


def rebuild(recipe, weights_path, proto):
    """The contrastive model of `recipe` with the weights of a finished run."""
    model = recipe.build_model(vocabulary_size=_vocabulary_size(proto))
    load_weights_file(model, weights_path)
    return model


def _vocabulary_size(proto):

    return sentencepiece.SentencePieceProcessor(model_proto=proto).get_piece_size()


def save_preset(recipe, model, proto, folder):
    """Saves the trained backbone as a `LIMoEZeroShotClassifier` over the
    CIFAR-10 classes with the evaluation templates (weights in float16)."""

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classifier = LIMoEZeroShotClassifier(
        model.backbone,
        recipe.build_preprocessor(proto),
        list(CIFAR10_CLASS_NAMES),
        list(recipe.eval_templates),
        scale=model.temperature,
    )
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".preset-", dir=folder))
    try:
        classifier.save_to_preset(str(staging))
        store_weights_as_float16(staging)
        for path in staging.iterdir():
            if path.is_dir():
                shutil.rmtree(folder / path.name, ignore_errors=True)
            path.replace(folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def retrieval_recall(image_vectors, text_vectors, text_image, ks=(1, 5)):
    """Recall@k both ways; `text_image[j]` is the image of caption j."""
    similarity = image_vectors @ text_vectors.T  # (images, texts)
    text_image = np.asarray(text_image)
    ranked_texts = np.argsort(-similarity, axis=1)
    ranked_images = np.argsort(-similarity.T, axis=1)
    recall = {}
    for k in ks:
        hits = text_image[ranked_texts[:, :k]] == np.arange(len(image_vectors))[:, None]
        recall[f"image_to_text_recall@{k}"] = float(np.mean(hits.any(axis=1)))
        recall[f"text_to_image_recall@{k}"] = float(
            np.mean((ranked_images[:, :k] == text_image[:, None]).any(axis=1))
        )
    return recall


def coco_retrieval(classifier, coco_path):
    """Recall@1/5 on the COCO caption pairs (images resized to the model's size)."""

    images, captions = load_coco_captions(coco_path, image_size=IMAGE_SIZE)
    texts = [caption for per_image in captions for caption in per_image]
    text_image = np.repeat(np.arange(len(images)), captions.shape[1])
    inputs = classifier.preprocessor({"text": texts})
    text_vectors = np.asarray(
        keras.ops.convert_to_numpy(
            classifier.backbone.embed_text(inputs["token_ids"], inputs["padding_mask"])
        )
    )
    image_vectors = image_embeddings(classifier.backbone, images)
    recall = retrieval_recall(image_vectors, text_vectors, text_image)
    recall.update(coco_images=int(len(images)), coco_captions=len(texts))
    return recall


def evaluate_preset(preset, cifar10_path, coco_path=None, limit=None):
    """Zero-shot top-1 of a preset on the raw uint8 test images through
    `predict`, and COCO retrieval when `coco_path` is given."""

    classifier = LIMoEZeroShotClassifier.from_preset(str(preset))
    images, labels = load_cifar10(cifar10_path, "test", limit=limit)
    start = time.perf_counter()
    logits = classifier.predict(images, batch_size=500, verbose=0)
    metrics = dict(
        zero_shot_test_top1=float(np.mean(np.argmax(logits, -1) == labels)),
        test_images=int(len(labels)),
        evaluation_backend=keras.backend.backend(),
        evaluation_time_s=round(time.perf_counter() - start, 1),
        evaluation_hardware=hardware(),
        parameters=int(classifier.backbone.count_params()),
    )
    if coco_path is not None:
        metrics["coco_retrieval"] = coco_retrieval(classifier, coco_path)
    return metrics


def main(recipe, recipe_file, argv=None):
    """Command line of the preset's `recipe.py`."""
    parser = recipe_parser(recipe, recipe_file, "on captioned CIFAR-10")
    parser.add_argument(
        "--coco", type=pathlib.Path, default=None, help="coco_mini_captions.npz, for the retrieval check"
    )
    parser.add_argument(
        "--weights",
        type=pathlib.Path,
        default=None,
        help="save the preset from a finished run instead of training: an .npz "
        "of the contrastive model's weights in get_weights() order",
    )
    parser.add_argument(
        "--vocabulary",
        type=pathlib.Path,
        default=None,
        help="with --weights: the run's SentencePiece model (vocabulary.spm)",
    )
    parser.add_argument(
        "--record",
        type=pathlib.Path,
        default=None,
        help="with --weights: the run's training record (JSON), kept in metrics.json",
    )
    args = parse_recipe_arguments(parser, argv)
    verbose = "auto" if args.verbose is None else args.verbose
    if args.weights is not None:
        if args.vocabulary is None or not args.vocabulary.is_file():
            parser.error(f"--weights needs the run's vocabulary: --vocabulary {args.vocabulary}")
        proto = args.vocabulary.read_bytes()
        model = rebuild(recipe, args.weights, proto)
        save_preset(recipe, model, proto, args.output)
        description = dict(dataclasses.asdict(recipe), description=recipe.description)
        record = json.loads(args.record.read_text()) if args.record is not None else None
        if record is not None:
            description["epochs"] = record.get("epochs", recipe.epochs)
        update_metrics(args.output, dict(recipe=description, training=record))
    elif not args.skip_training:
        model, proto, record = train(recipe, args.cifar10, args.epochs, args.train_limit, verbose)
        save_preset(recipe, model, proto, args.output)
        description = dict(dataclasses.asdict(recipe), description=recipe.description)
        if args.epochs is not None:
            description["epochs"] = args.epochs
        update_metrics(args.output, dict(recipe=description, training=record))
    if not args.skip_evaluation:
        metrics = evaluate_preset(args.output, args.cifar10, args.coco, args.train_limit)
        print(json.dumps(metrics, indent=2))
        update_metrics(args.output, metrics)
