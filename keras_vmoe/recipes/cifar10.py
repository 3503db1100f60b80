"""The CIFAR-10 recipe the bundled `*_tiny_cifar10` presets were trained with.

One recipe, three backbones: a dense ViT, a V-MoE and a Soft MoE of the same
per-token FLOPs. Each preset folder holds a `recipe.py` that fills in a
`Cifar10Recipe` and calls `main`:

```shell
python presets/vmoe_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz
```

trains from scratch, writes the keras-hub preset files (weights stored in
float16) next to the recipe (or to `--output DIR`), evaluates the saved
preset by loading it and calling `predict` on the 10,000 raw uint8 test
images, and writes `metrics.json` with what it measured.

Training (DeiT's recipe, scaled down): random 32x32 crops of the 4-pixel
reflect-padded images, random horizontal flips, random erasing, and every
image mixed with another by mixup or CutMix, redrawn every epoch; AdamW with a linear warmup and a
cosine decay to zero, global-norm clipping at 1, weight decay on kernels
only; label-smoothed cross-entropy. The same seed fixes the initial weights,
the data order and the augmentation.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import h5py
import keras
import numpy as np

from keras_vmoe import models
from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.models.flops import count_flops
from keras_vmoe.ops.tools.device import device_description
from keras_vmoe.presets import BUNDLED_PRESETS
from keras_vmoe.recipes.augmentation import mixup_and_cutmix
from keras_vmoe.recipes.augmentation import random_crop_and_flip
from keras_vmoe.recipes.augmentation import random_erasing

FAMILIES = ("vit", "vmoe", "soft_moe")
# The encoder the three presets share: 32x32 images in 4x4 patches (64
# tokens), 6 blocks of width 192 with 3 heads and MLPs of width 768, global
# average pooling. MoE presets replace the MLPs of blocks 3 and 5 (V-MoE's
# "Last-2") by 8 experts of the same width, routed so that the experts
# process 64 slots per image, as many as the dense MLP processes tokens.
TINY_ENCODER = dict(
    image_shape=(32, 32, 3),
    patch_size=4,
    num_layers=6,
    hidden_dim=192,
    mlp_dim=768,
    num_heads=3,
    pooling="gap",
    attention_qk_norm=False,
    dropout_rate=0.0,
)
IMAGE_SIZE = 32
# Images in [-1, 1], as vmoe's models are trained: x / 127.5 - 1.
PIXEL_SCALE, PIXEL_OFFSET = 1 / 127.5, -1.0


@dataclasses.dataclass(frozen=True)
class Cifar10Recipe:
    """Everything that decides a CIFAR-10 preset.

    Attributes:
        name: the preset name.
        description: one sentence for preset listings.
        family: `"vit"` (the dense `VisionTransformerImageClassifier`),
            `"vmoe"` (a `VMoEImageClassifier`) or `"soft_moe"`.
        backbone: the backbone's keyword arguments.
        epochs, batch_size: training length; the last partial batch of every
            epoch is dropped (a new random one each epoch).
        learning_rate: peak AdamW learning rate, after `warmup_epochs`.
        weight_decay: AdamW's decoupled weight decay, on kernels only.
        label_smoothing: of the cross-entropy.
        crop_padding: reflect padding before the random 32x32 crop.
        erasing_probability: chance that an image gets a random square
            (8 to 16 pixels) set to mid-grey (random erasing).
        mixup_alpha, cutmix_alpha: every training image is mixed with
            another, half of them by mixup (weight ~ Beta(mixup_alpha,
            mixup_alpha)), half by CutMix (a box of area ~ Beta(cutmix_alpha,
            cutmix_alpha)); labels mix in the same proportion (DeiT's recipe).
            0 turns either off.
        seed: initial weights, data order and augmentation.
    """

    name: str
    description: str
    family: str
    backbone: dict
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 1e-3
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    crop_padding: int = 4
    erasing_probability: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Cifar10Recipe: family must be one of {FAMILIES}, got {self.family!r}.")

    def classifier_class(self):
        """The task class; its keras-hub class attributes name the backbone,
        preprocessor and image converter classes."""
        return {
            "vit": models.VisionTransformerImageClassifier,
            "vmoe": models.VMoEImageClassifier,
            "soft_moe": models.SoftMoEImageClassifier,
        }[self.family]

    def build_classifier(self, preprocessor=True):
        """The untrained classifier (with its preprocessor unless told not to)."""
        classifier_cls = self.classifier_class()
        backbone = classifier_cls.backbone_cls(**self.backbone)
        return classifier_cls(
            backbone,
            num_classes=len(CIFAR10_CLASS_NAMES),
            preprocessor=self.build_preprocessor() if preprocessor else None,
        )

    def build_preprocessor(self):
        preprocessor_cls = self.classifier_class().preprocessor_cls
        return preprocessor_cls(
            preprocessor_cls.image_converter_cls(
                image_size=(IMAGE_SIZE, IMAGE_SIZE), scale=PIXEL_SCALE, offset=PIXEL_OFFSET
            )
        )


def to_model_inputs(images):
    """uint8 images -> the float32 pixels the preprocessor would produce."""
    return images.astype("float32") * np.float32(PIXEL_SCALE) + np.float32(PIXEL_OFFSET)


def make_optimizer(learning_rate, weight_decay, warmup_steps, total_steps):
    """AdamW with a linear warm-up to `learning_rate`, a cosine decay to 0,
    global-norm clipping at 1, and weight decay on kernels only."""
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=0.0,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay, global_clipnorm=1.0)
    # Decay kernels (and expert kernel banks) only: not biases, norms,
    # embeddings, the router's scale, a temperature.
    optimizer.exclude_from_weight_decay(
        var_names=[
            "bias",
            "gamma",
            "beta",
            "scale",
            "position_embedding",
            "class_token",
            "register_tokens",
            "probe",
            "embeddings",
            "log_temperature",
        ]
    )
    return optimizer


def compile_classifier(classifier, recipe, steps_per_epoch):
    """Compiles `classifier` with the recipe's optimizer, schedule, loss and metric."""
    optimizer = make_optimizer(
        recipe.learning_rate,
        recipe.weight_decay,
        recipe.warmup_epochs * steps_per_epoch,
        recipe.epochs * steps_per_epoch,
    )
    classifier.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def hardware():
    """The device Keras trains on, in words."""
    return device_description()


def fit_recipe(classifier, recipe, images, labels, rng, verbose="auto", after_epoch=None):
    """Trains `classifier` (from scratch or further) on uint8 `images` with the
    recipe's optimiser, schedule and augmentation; compiles it first.

    `after_epoch(epoch)` runs after every epoch (e.g. to evaluate).
    """
    one_hot = np.eye(len(CIFAR10_CLASS_NAMES), dtype="float32")
    steps_per_epoch = max(len(images) // recipe.batch_size, 1)
    examples_per_epoch = min(steps_per_epoch * recipe.batch_size, len(images))
    compile_classifier(classifier, recipe, steps_per_epoch)

    def augmented_epoch():
        order = rng.permutation(len(images))[:examples_per_epoch]
        augmented = random_crop_and_flip(images[order], rng, recipe.crop_padding)
        augmented = random_erasing(augmented, rng, recipe.erasing_probability)
        return mixup_and_cutmix(
            to_model_inputs(augmented),
            one_hot[labels[order]],
            rng,
            recipe.mixup_alpha,
            recipe.cutmix_alpha,
        )

    # One thread prepares the next epoch while the accelerator trains on
    # this one; epochs are drawn in order, so the run stays deterministic.
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        upcoming = executor.submit(augmented_epoch)
        for epoch in range(recipe.epochs):
            pixels, targets = upcoming.result()
            if epoch + 1 < recipe.epochs:
                upcoming = executor.submit(augmented_epoch)
            # The recipe augments and scales on the host, so it runs Keras'
            # own fit: the task's fit would run its preprocessor again.
            keras.Model.fit(
                classifier,
                pixels,
                targets,
                batch_size=recipe.batch_size,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                verbose=verbose,
            )
            if after_epoch is not None:
                after_epoch(epoch)


def top1_accuracy(classifier, images, labels):
    """Top-1 of `classifier` on uint8 `images`, scaled as the recipe scales them."""
    logits = keras.Model.predict(classifier, to_model_inputs(images), batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == labels))


def train(recipe, cifar10_path, epochs=None, train_limit=None, verbose="auto"):
    """Trains `recipe` from scratch; returns (classifier without preprocessor, record).

    `epochs` and `train_limit` shorten a run (smoke tests); a preset is
    trained with the recipe's own values.
    """
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    keras.utils.set_random_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    print(f"Decoding CIFAR-10 from {cifar10_path}")
    images, labels = load_cifar10(cifar10_path, "train", limit=train_limit, verbose=verbose != 0)
    test_images, test_labels = load_cifar10(cifar10_path, "test", limit=train_limit, verbose=verbose != 0)
    classifier = recipe.build_classifier(preprocessor=False)
    print(
        f"{recipe.name}: {classifier.count_params():,} parameters, "
        f"{count_flops(classifier)['total'] / 1e6:,.1f} MFLOPs per image; "
        f"{recipe.epochs} epochs on {hardware()}"
    )
    start = time.perf_counter()
    fit_recipe(classifier, recipe, images, labels, rng, verbose=verbose)
    training_time = time.perf_counter() - start
    test_accuracy = top1_accuracy(classifier, test_images, test_labels)
    print(f"{recipe.name}: trained in {training_time:.0f} s; test top-1 {test_accuracy:.4f}")
    record = training_record(
        recipe.epochs, len(images), training_time, test_top1_after_training=test_accuracy
    )
    return classifier, record


def training_record(epochs, examples, seconds, **measured):
    """What a recipe run records about its training, plus `measured` values."""
    return dict(
        epochs=epochs,
        training_examples=int(examples),
        training_time_s=round(seconds, 1),
        hardware=hardware(),
        backend=keras.backend.backend(),
        keras_version=keras.__version__,
        date=datetime.date.today().isoformat(),
        **measured,
    )


def store_weights_as_float16(folder):
    """Rewrites the float32 arrays of a preset's `.weights.h5` files as float16.

    Loading casts them back to the variables' dtype (float32), so a model
    loaded from the preset computes in float32 with float16-rounded weights.
    """
    for path in sorted(pathlib.Path(folder).glob("*.weights.h5")):
        with h5py.File(path, "a") as weights:
            arrays = []

            def collect(name, item, arrays=arrays):
                if isinstance(item, h5py.Dataset) and item.dtype == np.float32:
                    arrays.append(name)

            weights.visititems(collect)
            for name in arrays:
                value = weights[name][()]
                del weights[name]
                weights.create_dataset(name, data=value.astype("float16"))
        # h5py leaves the freed space in the file; copy to compact it.
        compacted = path.with_suffix(".compact")
        with h5py.File(path, "r") as source, h5py.File(compacted, "w") as target:
            for key in source:
                source.copy(source[key], target, name=key)
            for key, value in source.attrs.items():
                target.attrs[key] = value
        compacted.replace(path)


def save_preset(recipe, classifier, folder):
    """Saves `classifier` with the recipe's preprocessor as a keras-hub preset,
    weights in float16; writes to a staging folder first."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with_preprocessor = type(classifier)(
        classifier.backbone,
        num_classes=classifier.num_classes,
        preprocessor=recipe.build_preprocessor(),
        dropout=classifier.dropout,
        head_bias_init=classifier.head_bias_init,
        head_kernel_zero_init=classifier.head_kernel_zero_init,
    )
    with_preprocessor.head.set_weights(classifier.head.get_weights())
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".preset-", dir=folder))
    try:
        with_preprocessor.save_to_preset(str(staging))
        store_weights_as_float16(staging)
        for path in staging.iterdir():
            path.replace(folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def evaluate_preset(recipe, preset, cifar10_path, limit=None):
    """Top-1 of a preset (a name or a folder) on the raw uint8 test images,
    through `predict`."""
    classifier = recipe.classifier_class().from_preset(str(preset))
    images, labels = load_cifar10(cifar10_path, "test", limit=limit)
    start = time.perf_counter()
    logits = classifier.predict(images, batch_size=500, verbose=0)
    flops = count_flops(classifier)
    return dict(
        test_top1=float(np.mean(np.argmax(logits, -1) == labels)),
        test_images=int(len(labels)),
        evaluation_backend=keras.backend.backend(),
        evaluation_time_s=round(time.perf_counter() - start, 1),
        evaluation_hardware=hardware(),
        parameters=int(classifier.count_params()),
        flops_per_image=int(flops["total"]),
        flops_per_patch_token=round(flops["per_token"], 1),
    )


def update_metrics(folder, values):
    path = pathlib.Path(folder) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update(values)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def default_cifar10_path():
    shared = os.environ.get("KERAS_VMOE_SHARED")
    return pathlib.Path(shared) / "data" / "cifar10_jpeg.npz" if shared else None


def recipe_parser(recipe, recipe_file, trains):
    """The command line every preset's `recipe.py` shares; `trains` says
    what it trains, for the description. Recipes add their own options."""
    parser = argparse.ArgumentParser(
        prog=f"python {recipe_file}",
        description=f"Train the {recipe.name} preset {trains} and measure it. {recipe.description}",
    )
    parser.add_argument(
        "--cifar10",
        type=pathlib.Path,
        default=default_cifar10_path(),
        help="cifar10_jpeg.npz (default: $KERAS_VMOE_SHARED/data/cifar10_jpeg.npz)",
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=pathlib.Path(recipe_file).parent,
        help="preset folder to write (default: next to this recipe)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"override the recipe's {recipe.epochs} epochs (smoke runs)"
    )
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train and evaluate on N randomly drawn images of each split (smoke runs)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="Keras fit verbosity (default: progress bars on a terminal, a line per epoch otherwise)",
    )
    parser.add_argument(
        "--skip-training", action="store_true", help="only evaluate the preset already in --output"
    )
    parser.add_argument(
        "--skip-evaluation",
        action="store_true",
        help="train and save only (evaluate later, e.g. on another machine)",
    )
    return parser


def parse_recipe_arguments(parser, argv):
    """`parser.parse_args(argv)`, with the CIFAR-10 archive checked."""
    args = parser.parse_args(argv)
    if args.cifar10 is None or not args.cifar10.is_file():
        parser.error(f"--cifar10: no CIFAR-10 archive at {args.cifar10}; pass the path of cifar10_jpeg.npz")
    return args


def main(recipe, recipe_file, argv=None):
    """Command line of a preset's `recipe.py`."""
    args = parse_recipe_arguments(recipe_parser(recipe, recipe_file, "on CIFAR-10"), argv)
    if args.epochs is not None:  # metrics.json records the recipe as run.
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    if not args.skip_training:
        classifier, record = train(
            recipe,
            args.cifar10,
            train_limit=args.train_limit,
            verbose=args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
        save_preset(recipe, classifier, args.output)
        update_metrics(
            args.output, dict(training=record, preset=recipe.name, recipe=dataclasses.asdict(recipe))
        )
        print(f"Saved the preset to {args.output}")
    if not args.skip_evaluation:
        # A preset written to its bundled folder is measured as users load
        # it: by name.
        bundled = BUNDLED_PRESETS.get(recipe.name)
        shipped = bundled is not None and bundled.folder.resolve() == args.output.resolve()
        evaluation = evaluate_preset(
            recipe, recipe.name if shipped else args.output, args.cifar10, limit=args.train_limit
        )
        metrics = update_metrics(args.output, evaluation)
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit("Run a preset's recipe: python presets/<name>/recipe.py --cifar10 PATH")
