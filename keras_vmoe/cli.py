"""The `keras-vmoe` command: classify images with a preset, draw its routing, list presets.

    keras-vmoe classify [--preset NAME] [--top K] [--labels A,B,...] [--routing-map FILE.png] IMAGE...
    keras-vmoe expert-modality [--preset NAME] (--cifar10 | --coco) ARCHIVE [--pairs N] --output FILE.png
    keras-vmoe export [--preset NAME] [--format saved_model|onnx] [--batch-size N] OUTPUT
    keras-vmoe evaluate --preset NAME ... (--cifar10 ARCHIVE | --fashion-mnist [DIR] | --folder DIR)
        [--attack pgd --epsilon E,...] [--fewshot K,...] [--rank-presets] [--ensemble]
    keras-vmoe convert SOURCE OUTPUT_DIR [--model-config FILE.json|NAME] [--num-classes N]
        [--upcycle NUM_EXPERTS --moe-layers I,J,... --router NAME]
    keras-vmoe presets

`classify` takes image classifiers and the LIMoE zero-shot classifier
(`limoe_tiny_cifar10`: its class names and prompt templates are in the
preset; `--labels` replaces them with yours). `expert-modality` draws, for a
LIMoE preset, the share of image and of text tokens each expert of each MoE
block takes
(`keras_vmoe.models.limoe.expert_modality`). `evaluate` runs the papers'
evaluations (`keras_vmoe.evaluation.command`). `convert` turns a vmoe, keras-hub
or DINOv2 ONNX checkpoint into a preset (`keras_vmoe.convert_command`).

Bad input (a missing or unreadable image, an unknown preset) ends with one
line on stderr, `keras-vmoe: error: ...`, and exit status 1.
"""

import argparse
import json
import pathlib
import sys

import keras
import numpy as np
from keras_hub.utils import imagenet_id_to_name

from keras_vmoe import convert_command
from keras_vmoe.data import images as images_data
from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.data.coco_captions import load_coco_captions
from keras_vmoe.data.images import square_image
from keras_vmoe.errors import CommandError
from keras_vmoe.evaluation import command as evaluate_command
from keras_vmoe.export import ExportError
from keras_vmoe.export import export_model
from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models import LIMoEZeroShotClassifier
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models.limoe.expert_modality import MODALITIES
from keras_vmoe.models.limoe.expert_modality import expert_modality_counts
from keras_vmoe.models.limoe.expert_modality import routed_experts
from keras_vmoe.models.routing_inspection import expert_assignments
from keras_vmoe.presets import BUNDLED_PRESETS
from keras_vmoe.presets import PresetError
from keras_vmoe.presets import preset_infos
from keras_vmoe.presets import resolve_preset
from keras_vmoe.visualization.expert_modality import draw_expert_modality
from keras_vmoe.visualization.routing_map import draw_routing_map

DEFAULT_PRESET = "vmoe_tiny_cifar10"


def open_image(path, max_pixels=None):
    """`keras_vmoe.data.images.open_image`, its errors as `CommandError`."""

    try:
        return images_data.open_image(path, max_pixels)
    except images_data.ImageReadError as error:
        raise CommandError(str(error)) from error


def load_photo(path, size, max_pixels=None):
    """A photo, centre-cropped to a square and downscaled to `size` (H, W)
    with antialiasing, and a >= 256 px version for drawing; uint8 (H, W, 3)."""

    image = open_image(path, max_pixels)
    # The preprocessor's resize does not antialias; downscaling a photo to
    # 32x32 without it aliases badly, so resize here first.
    return square_image(image, size), square_image(image, (max(size[0], 256), max(size[1], 256)))


def class_names(preset, num_classes):
    """Names of the classifier's classes, where known."""

    if preset in BUNDLED_PRESETS and num_classes == len(CIFAR10_CLASS_NAMES):
        return list(CIFAR10_CLASS_NAMES)
    if num_classes == 1000:
        return [imagenet_id_to_name(i) for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]


def preset_task_class(preset):
    """The class name in a preset's task.json (None when it has none)."""

    task = pathlib.Path(resolve_preset(preset)) / "task.json"
    try:
        return json.loads(task.read_text())["class_name"]
    except (OSError, ValueError, KeyError):
        return None


def load_classifier(preset):
    """Any keras_vmoe image classifier preset, or a LIMoE zero-shot
    classifier: a built-in name or a folder."""

    cls = VisionTransformerImageClassifier
    if preset_task_class(preset) == LIMoEZeroShotClassifier.__name__:
        cls = LIMoEZeroShotClassifier
    try:
        return cls.from_preset(preset)
    except PresetError:
        raise
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the preset {preset!r}: {error}") from error


def routing_panels(backbone, pixels):
    """{panel title: (images, patches) expert ids} of the MoE blocks that see patches."""

    if isinstance(backbone, LIMoEBackbone):  # Images routed on their own; top-1 choice.
        experts, _ = routed_experts(backbone, images=pixels)
        return {f"MoE block {index}": choices[..., 0] for index, choices in experts.items()}
    patch_merger = backbone.patch_merger
    panels = {}
    for index, assignment in expert_assignments(backbone, pixels).items():
        if patch_merger and index > patch_merger["after_block"]:
            continue  # Merged tokens are not patches: nothing to draw them on.
        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        kind = "Soft MoE" if not moe.drops_tokens else "MoE"
        panels[f"{kind} block {index}"] = assignment[:, backbone.num_prefix_tokens :]
    return panels


def classify(args):

    classifier = load_classifier(args.preset)
    backbone = classifier.backbone
    if args.routing_map and not backbone.moe_layers:
        raise CommandError(
            f"preset {args.preset!r} has no MoE layers, so it has no routing to draw; "
            f"use a MoE preset such as {DEFAULT_PRESET}, or drop --routing-map"
        )
    if args.routing_map and not str(args.routing_map).lower().endswith(".png"):
        raise CommandError(f"--routing-map must name a .png file, got {args.routing_map}")
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if not hasattr(classifier, "set_classes"):
            raise CommandError(
                f"--labels needs a zero-shot preset such as limoe_tiny_cifar10; {args.preset!r} "
                f"is a {type(classifier).__name__} with fixed classes"
            )
        if not labels:
            raise CommandError(f"--labels names no class: {args.labels!r}")
        classifier.set_classes(labels)
    size = tuple(classifier.preprocessor.image_converter.image_size)
    photos = [load_photo(path, size, args.max_pixels) for path in args.images]
    images = np.stack([model_input for model_input, _ in photos])
    logits = classifier.predict(images, batch_size=32, verbose=0)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    names = getattr(classifier, "class_names", None) or class_names(args.preset, probabilities.shape[-1])
    top = min(args.top, len(names))
    captions = []
    for path, row in zip(args.images, probabilities):
        order = np.argsort(-row)[:top]
        print(path)
        for index in order:
            print(f"  {names[index]:<24} {row[index]:.3f}")
        captions.append(f"{names[order[0]]} {row[order[0]]:.0%}")
    if args.routing_map:
        pixels = classifier.preprocessor(images)
        panels = routing_panels(backbone, pixels)
        if not panels:
            raise CommandError(
                f"preset {args.preset!r} routes merged tokens only (its MoE blocks follow a "
                "PatchMerger), which do not map onto image patches"
            )
        patch = backbone.patch_size if isinstance(backbone.patch_size, int) else backbone.patch_size[0]
        grid = (size[0] // patch, size[1] // patch)
        sparse = any(moe.drops_tokens for moe in backbone.moe_mlps)
        what = "goes to" if sparse else "takes most of its output from (Soft MoE)"
        picture = draw_routing_map(
            [display for _, display in photos],
            panels,
            grid,
            num_experts=max(moe.num_experts for moe in backbone.moe_mlps),
            captions=captions,
            title=f"{args.preset}: the expert each {patch}x{patch} patch {what}",
        )
        path = pathlib.Path(args.routing_map)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        print(f"Routing map written to {path}")


def expert_modality_data(args, classifier):
    """(uint8 images, captions) for the expert-modality picture."""
    size = tuple(classifier.preprocessor.image_converter.image_size)
    if args.cifar10 is not None:
        images, labels = load_cifar10(args.cifar10, "test", limit=args.pairs, verbose=False)
        # Each image's class, in the preset's templates in turn.
        templates, names = classifier.templates, classifier.class_names
        captions = [templates[i % len(templates)].format(names[label]) for i, label in enumerate(labels)]
        return images, captions

    images, captions = load_coco_captions(args.coco, image_size=size[0])
    images, captions = images[: args.pairs], captions[: args.pairs]
    return images, [caption for per_image in captions for caption in per_image]


def expert_modality(args):

    if not str(args.output).lower().endswith(".png"):
        raise CommandError(f"--output must name a .png file, got {args.output}")
    archive = args.cifar10 if args.cifar10 is not None else args.coco
    if not pathlib.Path(archive).is_file():
        raise CommandError(f"data archive not found: {archive}")
    classifier = load_classifier(args.preset)
    if not isinstance(classifier, LIMoEZeroShotClassifier):
        raise CommandError(
            f"preset {args.preset!r} is a {type(classifier).__name__}, which reads images only; "
            "expert-modality needs a LIMoE preset (images and text), such as limoe_tiny_cifar10"
        )
    images, captions = expert_modality_data(args, classifier)
    texts = classifier.preprocessor({"text": np.array(captions)})  # COCO: 5 per image.
    stats = expert_modality_counts(
        classifier.backbone, classifier.preprocessor(images), texts["token_ids"], texts["padding_mask"]
    )
    source = "CIFAR-10 test" if args.cifar10 is not None else "COCO"
    for index, block in stats.items():
        share = np.nan_to_num(block.balanced_share[0])
        print(
            f"MoE block {index}: image share per expert (modalities weighted equally): "
            + " ".join(f"{value:.2f}" for value in share)
        )
        specific = block.specific_experts(args.threshold)
        print(
            "  modality-specific experts: "
            + "; ".join(f"{modality} {specific[modality] or 'none'}" for modality in MODALITIES)
        )
    picture = draw_expert_modality(
        stats,
        threshold=args.threshold,
        title=f"{args.preset}: modalities per expert on {len(images)} {source} images and "
        f"{len(captions)} captions",
    )
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    print(f"Expert-modality picture written to {path}")


def export(args):

    classifier = load_classifier(args.preset)
    output = pathlib.Path(args.output)
    if args.format == "onnx" and output.suffix != ".onnx":
        raise CommandError(f"--format onnx writes a .onnx file, got {output}")
    if output.exists() and not args.overwrite:
        raise CommandError(f"{output} exists; pass --overwrite to replace it")
    try:
        export_model(classifier, output, args.format, batch_size=args.batch_size)
    except ExportError as error:
        raise CommandError(str(error)) from error
    converter = classifier.preprocessor.image_converter
    shape = (args.batch_size or ("1" if args.format == "onnx" else "any"), *classifier.backbone.image_shape)
    print(f"{args.preset} exported as {args.format} to {output}")
    print(f"  input: float32 pixels of shape ({', '.join(map(str, shape))}), already preprocessed:")
    print(
        f"    resized to {tuple(converter.image_size)}, then x * scale + offset with "
        f"scale={converter.scale!r}, offset={converter.offset!r} (the preset's image converter)"
    )
    logits = int(classifier.output.shape[-1])
    names = getattr(classifier, "class_names", None) or class_names(args.preset, logits)
    print(f"  output: (batch, {logits}) logits" + (f": {', '.join(names)}" if logits <= 20 else ""))


def list_presets(args):

    for info in preset_infos():
        params = f"{info.params / 1e6:.1f}M params" if info.params else "params unknown"
        kind = "zero-shot top-1" if info.zero_shot else "test top-1"
        accuracy = f", CIFAR-10 {kind} {info.test_top1:.4f}" if info.test_top1 else ""
        offline = "loads offline" if info.offline else "needs a download (or a local mirror)"
        print(f"{info.name}\n  {info.description}\n  {params}{accuracy}; {offline}\n  source: {info.source}")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-vmoe", description="Mixture-of-Experts vision models for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    classify_parser = commands.add_parser(
        "classify",
        help="top classes of images, and optionally a routing picture",
        description="Classify images with a preset: the top classes with their probabilities.",
    )
    classify_parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)"
    )
    classify_parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a built-in preset name or a preset folder (default: {DEFAULT_PRESET})",
    )
    classify_parser.add_argument(
        "--top", type=positive_int, default=5, help="classes to show per image (default: 5)"
    )
    classify_parser.add_argument(
        "--routing-map",
        metavar="FILE.png",
        help="write a picture of the expert each patch goes to in each MoE layer",
    )
    classify_parser.add_argument(
        "--labels",
        metavar="NAME,NAME,...",
        help="zero-shot presets: classify among these comma-separated labels instead of the preset's",
    )
    classify_parser.add_argument(
        "--max-pixels",
        type=positive_int,
        metavar="N",
        help="largest image to read, in pixels (default: Pillow's limit, about 89 million)",
    )
    classify_parser.set_defaults(run=classify)
    modality_parser = commands.add_parser(
        "expert-modality",
        help="picture of the image and text tokens each expert takes (LIMoE)",
        description="For a LIMoE preset: route CIFAR-10 test images with captions of their class "
        "(the preset's templates), or COCO images and captions, and draw the share of image and "
        "of text tokens each expert of each MoE block takes.",
    )
    modality_parser.add_argument(
        "--preset",
        default="limoe_tiny_cifar10",
        help="a LIMoE preset name or folder (default: limoe_tiny_cifar10)",
    )
    data = modality_parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--cifar10", metavar="ARCHIVE", help="cifar10_jpeg.npz")
    data.add_argument("--coco", metavar="ARCHIVE", help="coco_mini_captions.npz")
    modality_parser.add_argument(
        "--pairs",
        type=positive_int,
        default=1000,
        help="images to route (CIFAR-10: one caption each; COCO: five) (default: 1000)",
    )
    modality_parser.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="share that makes an expert modality-specific (default: 0.9)",
    )
    modality_parser.add_argument("--output", required=True, metavar="FILE.png", help="the picture")
    modality_parser.set_defaults(run=expert_modality)
    export_parser = commands.add_parser(
        "export",
        help="a preset as a TensorFlow SavedModel or an ONNX file, for serving",
        description="Export a preset's forward pass (preprocessed pixels -> logits) for serving: "
        "a TensorFlow SavedModel (from the JAX or TensorFlow backend) or an ONNX file (any "
        "backend). Needs `pip install keras-vmoe[export]` for ONNX.",
    )
    export_parser.add_argument("output", metavar="OUTPUT", help="SavedModel folder or .onnx file")
    export_parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a built-in preset name or a preset folder (default: {DEFAULT_PRESET})",
    )
    export_parser.add_argument(
        "--format",
        choices=("saved_model", "onnx"),
        default="saved_model",
        help="saved_model (default) or onnx",
    )
    export_parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="fixed batch size (default: any where the exporter allows it, else 1)",
    )
    export_parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    export_parser.set_defaults(run=export)
    evaluate_parser = evaluate_command.add_parser(commands, positive_int)
    evaluate_parser.set_defaults(run=lambda args: evaluate_command.run(args, load_classifier))
    convert_parser = convert_command.add_parser(commands, positive_int)
    convert_parser.set_defaults(run=convert_command.run)
    presets_parser = commands.add_parser("presets", help="every built-in preset")
    presets_parser.set_defaults(run=list_presets)
    return parser


def main(argv=None):

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, PresetError) as error:
        message = " ".join(str(error).split())
        print(f"keras-vmoe: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
