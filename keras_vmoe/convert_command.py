"""`keras-vmoe convert`: any supported checkpoint into a preset of this zoo.

    keras-vmoe convert SOURCE OUTPUT_DIR [--model-config FILE.json|NAME] [--image-size N]
        [--pooling token|gap|map|none] [--num-classes N]
        [--upcycle NUM_EXPERTS --moe-layers I,J,... [--router NAME] [--num-selected-experts K]
         [--capacity-factor C] [--group-size G]] [--overwrite]

SOURCE is one of (the kind is told from the path):
- a google-research/vmoe checkpoint: a msgpack prefix (`PREFIX.index` and
  `PREFIX.data-*` beside it) or an Orbax folder of vmoe's trainer
  (`workdir/ckpt`, `ckpt/<step>`, `ckpt/<step>/state`; `keras-vmoe[orbax]`),
  with `--model-config`: vmoe's `config.model` as a JSON file, or the name of
  a built-in vmoe preset whose architecture it has;
- a keras-hub ViT, SigLIP / SigLIP 2, DINOv2 or PaliGemma preset: a local
  folder, or a handle keras-hub resolves (`kaggle://...`, `hf://...`, a
  keras-hub preset name);
- a DINOv2 exported to ONNX: a `.onnx` file (`keras-vmoe[onnx]`).

OUTPUT_DIR becomes a keras-hub preset folder that `from_preset` loads: an image
classifier (vmoe checkpoints with classes; towers with `--num-classes`, a new
zero-initialised head and the pixel scaling of the preset's image converter,
else the family's: ImageNet mean and std for DINOv2, [-1, 1] otherwise), a
backbone (towers without it), or a PaliGemma-style causal LM. `--upcycle` turns the MLPs of
`--moe-layers` into MoE layers of copied experts (`keras_vmoe.upcycle`). The
preset's `metadata.json` records the source, its kind and licence where
known, and the upcycling. The folder is written whole at the end, or not at
all.
"""

import argparse
import datetime
import json
import os
import pathlib

import keras
import keras_hub
import numpy as np

from keras_vmoe.convert import from_keras_hub
from keras_vmoe.convert import from_keras_hub_dinov2
from keras_vmoe.convert import from_keras_hub_pali_gemma
from keras_vmoe.convert import from_keras_hub_siglip
from keras_vmoe.convert import load_dinov2_onnx
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.convert.keras_hub_models import keras_hub_converter
from keras_vmoe.convert.keras_hub_source import looks_like_path
from keras_vmoe.convert.keras_hub_source import preset_class_name
from keras_vmoe.convert.vmoe_orbax_reader import orbax_state_directory
from keras_vmoe.errors import CheckpointError
from keras_vmoe.errors import CommandError
from keras_vmoe.keras_hub_internals import check_file_exists
from keras_vmoe.keras_hub_internals import load_json
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.presets import VMOE_CHECKPOINT_PRESETS
from keras_vmoe.presets import vmoe_checkpoint_preprocessor
from keras_vmoe.staging import staged_folder
from keras_vmoe.upcycling import upcycle
from keras_vmoe.version import __version__

POOLINGS = {"token": "token", "gap": "gap", "map": "map", "none": None}
# Licences of the published weights of keras-hub's built-in presets, by
# keras-hub family ("path" in its preset metadata), and of vmoe's releases.
PUBLISHED_LICENCES = {
    "vit": "Apache-2.0 (google-research/vision_transformer)",
    "siglip": "Apache-2.0 (google-research/big_vision)",
    "dinov2": "Apache-2.0 (facebookresearch/dinov2)",
    "pali_gemma": "Gemma Terms of Use (ai.google.dev/gemma/terms)",
    "vmoe": "Apache-2.0 (google-research/vmoe)",
}
# DINOv2's pixel normalisation (ImageNet mean and standard deviation) as
# (scale, offset) of uint8 pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SCALING = (
    [1 / (255 * s) for s in IMAGENET_STD],
    [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
)


def add_parser(commands, positive_int):
    parser = commands.add_parser(
        "convert",
        help="a vmoe, keras-hub or DINOv2 ONNX checkpoint into a preset, upcycled if asked",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint prefix or folder, preset, or .onnx file")
    parser.add_argument("output", metavar="OUTPUT_DIR", help="the preset folder to write")
    parser.add_argument(
        "--model-config",
        metavar="FILE.json|NAME",
        help="vmoe checkpoints: vmoe's config.model as JSON, or a built-in vmoe preset name",
    )
    parser.add_argument("--image-size", type=positive_int, metavar="N", help="square image side to build")
    parser.add_argument("--pooling", choices=tuple(POOLINGS), help="towers: how the backbone pools")
    parser.add_argument(
        "--num-classes", type=positive_int, metavar="N", help="towers: add a new head, write a classifier"
    )
    parser.add_argument("--upcycle", type=int, metavar="NUM_EXPERTS", help="experts per MoE layer (>= 2)")
    parser.add_argument("--moe-layers", metavar="I,J,...", help="blocks whose MLP becomes a MoE layer")
    parser.add_argument(
        "--router", default="token_choice", help="router name or 'soft' (default: token_choice)"
    )
    parser.add_argument("--num-selected-experts", type=positive_int, default=1, help="K (default: 1)")
    parser.add_argument("--capacity-factor", type=float, help="expert capacity factor")
    parser.add_argument("--group-size", type=positive_int, help="tokens routed together")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    return parser


SOURCE_KINDS = (
    "a vmoe checkpoint prefix (PREFIX.index beside it), a vmoe Orbax checkpoint folder, "
    "a keras-hub preset folder (with config.json) or name, or a DINOv2 .onnx file"
)


def source_kind(source):
    """ "vmoe", "vmoe-orbax", "keras-hub" or "onnx", from the path alone."""
    if source.endswith(".onnx"):
        if not os.path.isfile(source):
            raise CommandError(f"{source}: no such ONNX file")
        return "onnx"
    if os.path.isfile(source + ".index"):
        return "vmoe"
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return "keras-hub"
        try:
            orbax_state_directory(source)
        except CheckpointError as error:
            raise CommandError(f"unknown source kind: {error} Expected {SOURCE_KINDS}") from error
        return "vmoe-orbax"
    if os.path.exists(source):
        raise CommandError(f"unknown source kind: {source} is a file; expected {SOURCE_KINDS}")
    if looks_like_path(source):
        raise CommandError(f"{source}: no such file or folder; expected {SOURCE_KINDS}")
    return "keras-hub"  # A handle or a keras-hub preset name.


def parse_layers(text):
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise CommandError(f"--moe-layers takes block indices such as 1,3, got {text!r}")
    return layers


def vmoe_model_config(value):
    """vmoe's config.model dict from --model-config."""
    if value is None:
        raise CommandError(
            "a vmoe checkpoint needs --model-config: vmoe's config.model as a JSON file, or one of "
            f"the built-in vmoe presets {', '.join(sorted(VMOE_CHECKPOINT_PRESETS))}"
        )
    if value in VMOE_CHECKPOINT_PRESETS:
        # Its architecture; the image size is read from the checkpoint.
        return dict(VMOE_CHECKPOINT_PRESETS[value].model_config)
    try:
        config = json.loads(pathlib.Path(value).read_text())
    except OSError as error:
        raise CommandError(
            f"--model-config {value}: neither a built-in vmoe preset nor a readable file ({error})"
        ) from error
    except ValueError as error:
        raise CommandError(f"--model-config {value} is not JSON: {error}") from error
    if not isinstance(config, dict) or "encoder" not in config:
        raise CommandError(
            f"--model-config {value} is not a vmoe config.model (a JSON object with 'encoder')"
        )
    return config


def check_output(args):
    """OUTPUT_DIR must be new (or --overwrite), a folder, and not hold the
    working folder or the source, which replacing it would delete."""
    output = pathlib.Path(args.output).resolve()
    if output.exists() and not output.is_dir():
        raise CommandError(f"{args.output} is a file; OUTPUT_DIR must be a folder")
    if output.exists() and not args.overwrite:
        raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
    cwd = pathlib.Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        raise CommandError(f"{args.output} holds the working folder; choose another OUTPUT_DIR")
    source = pathlib.Path(args.source).resolve()
    if os.path.exists(args.source) and (output == source or output in source.parents):
        raise CommandError(f"{args.output} holds the source {args.source}; choose another OUTPUT_DIR")


def check_arguments(args):
    """Every argument checked before anything is read."""
    check_output(args)
    if (args.upcycle is None) != (args.moe_layers is None):
        raise CommandError("--upcycle NUM_EXPERTS and --moe-layers I,J,... go together")
    if args.upcycle is not None and args.upcycle < 2:
        raise CommandError(f"--upcycle takes a number of experts >= 2, got {args.upcycle}")
    kind = source_kind(args.source)
    config = None
    if kind.startswith("vmoe"):
        config = vmoe_model_config(args.model_config)
        for option in ("pooling", "num_classes"):
            if getattr(args, option) is not None:
                raise CommandError(
                    f"--{option.replace('_', '-')} is for towers; a vmoe checkpoint has its own"
                )
    elif args.model_config is not None:
        raise CommandError("--model-config is for vmoe checkpoints")
    layers = parse_layers(args.moe_layers) if args.moe_layers is not None else None
    return kind, config, layers


def preset_metadata(source):
    """The source preset's metadata.json (a local folder), or keras-hub's
    registry entry for a built-in name; {} when neither."""
    if os.path.isfile(os.path.join(source, "metadata.json")):
        try:
            return json.loads(pathlib.Path(source, "metadata.json").read_text())
        except ValueError:
            return {}
    entry = keras_hub.models.Backbone.presets.get(source)
    if entry:
        return {**entry["metadata"], "kaggle_handle": entry["kaggle_handle"]}
    return {}


def provenance(args, kind, model_class):
    record = dict(
        source=os.path.abspath(args.source) if looks_like_path(args.source) else args.source,
        source_kind=kind,
        source_class=model_class,
        converted_by=f"keras-vmoe {__version__}",
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    )
    licence = None
    if kind == "keras-hub":
        metadata = preset_metadata(args.source)
        licence = metadata.get("license") or metadata.get("licence")
        if licence is None and args.source in keras_hub.models.Backbone.presets:
            licence = PUBLISHED_LICENCES.get(metadata.get("path"))
        for key in ("description", "kaggle_handle", "model_card"):
            if key in metadata:
                record[f"source_{key}"] = metadata[key]
    elif kind.startswith("vmoe") and args.model_config in VMOE_CHECKPOINT_PRESETS:
        record["source_release"] = VMOE_CHECKPOINT_PRESETS[args.model_config].source
        licence = PUBLISHED_LICENCES["vmoe"]
    record["license"] = licence or "unknown: not recorded in the source; check where its weights came from"
    return record


def pixel_scaling(source, converter):
    """(scale, offset) for a new classifier on a keras-hub tower: the
    preset's own image converter when it has one, else the family's
    (DINOv2: ImageNet mean and standard deviation; the others: [-1, 1])."""
    try:
        if check_file_exists(source, "image_converter.json"):
            config = load_json(source, "image_converter.json").get("config", {})
            if config.get("scale") is not None or config.get("offset") is not None:
                return config.get("scale") or 1.0, config.get("offset") or 0.0
    except (OSError, ValueError, AttributeError):
        pass  # Unreadable or absent: the family's scaling below.
    if converter is from_keras_hub_dinov2:
        return IMAGENET_SCALING
    return (1 / 127.5, -1.0)


def tower_classifier(backbone, num_classes, scaling):
    """A new classifier (zero-initialised head) on a converted tower."""
    scale, offset = scaling
    preprocessor_cls = VMoEImageClassifier.preprocessor_cls
    converter = preprocessor_cls.image_converter_cls(
        image_size=tuple(backbone.image_shape[:2]), scale=scale, offset=offset
    )
    return VMoEImageClassifier(backbone, num_classes, preprocessor=preprocessor_cls(converter))


def read_source(args, kind, config):
    """The converted model (before upcycling), and the source's class name."""
    if kind.startswith("vmoe"):
        image_shape = None if args.image_size is None else (args.image_size, args.image_size, 3)
        model = load_vmoe_checkpoint(args.source, config, image_shape=image_shape, verbose=True)
        if isinstance(model, VisionTransformerImageClassifier):
            # The same classifier with vmoe's pixel scaling as its preprocessor.
            with_preprocessor = type(model)(
                model.backbone,
                model.num_classes,
                preprocessor=vmoe_checkpoint_preprocessor(model.backbone.image_shape[0]),
                head_bias_init=model.head_bias_init,
                head_kernel_zero_init=model.head_kernel_zero_init,
            )
            with_preprocessor.head.set_weights(model.head.get_weights())
            model = with_preprocessor
        return model, config.get("name", "VisionTransformerMoe")
    options = {} if args.pooling is None else {"pooling": POOLINGS[args.pooling]}
    if kind == "onnx":
        if args.num_classes and args.pooling is None:
            options["pooling"] = "token"
        model = load_dinov2_onnx(args.source, image_size=args.image_size, **options)
        scaling, model_class = IMAGENET_SCALING, "DINOv2 (ONNX)"
    else:
        converter = keras_hub_converter(args.source)
        model_class = preset_class_name(args.source)
        if converter is from_keras_hub_pali_gemma and (args.num_classes or args.pooling or args.image_size):
            raise CommandError(
                "--num-classes, --pooling and --image-size are for image towers; a PaliGemma converts whole"
            )
        if args.image_size is not None:
            if converter is not from_keras_hub_dinov2:
                raise CommandError("--image-size converts DINOv2 towers only (their position grid resizes)")
            options["image_shape"] = (args.image_size, args.image_size, 3)
        if args.num_classes and args.pooling is None and converter is not from_keras_hub_siglip:
            options["pooling"] = "token"  # The class token (SigLIP keeps its MAP head).
        model = from_keras_hub(args.source, **options)
        scaling = pixel_scaling(args.source, converter) if args.num_classes else None
    if args.num_classes:
        if model.pooling is None:
            raise CommandError("--num-classes needs a pooled tower; --pooling none keeps every token")
        model = tower_classifier(model, args.num_classes, scaling)
    return model, model_class


def run(args):
    kind, config, layers = check_arguments(args)
    steps = ["read and convert", "upcycle", "write"] if layers else ["read and convert", "write"]
    progress = keras.utils.Progbar(len(steps), unit_name="step")
    print(f"Converting {args.source} ({kind}) into a keras_vmoe preset at {args.output}")
    try:
        model, model_class = read_source(args, kind, config)
        progress.update(1)
        record = provenance(args, kind, model_class)
        if layers:
            options = dict(num_selected_experts=args.num_selected_experts, group_size=args.group_size)
            if args.capacity_factor is not None:
                options["capacity_factor"] = args.capacity_factor
            model = upcycle(model, args.upcycle, layers, router=args.router, **options)
            if args.router == "soft":
                options.pop("num_selected_experts")
            record["upcycled"] = dict(
                num_experts=args.upcycle, moe_layers=list(layers), router=args.router, **options
            )
            progress.update(2)
    except (CheckpointError, ValueError, OSError) as error:
        raise CommandError(f"cannot convert {args.source}: {error}") from error
    try:
        with staged_folder(args.output, replace=args.overwrite) as staging:
            model.save_to_preset(str(staging))
            metadata_path = staging / "metadata.json"
            metadata = json.loads(metadata_path.read_text())
            metadata["keras_vmoe_conversion"] = record
            metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    except OSError as error:
        raise CommandError(f"cannot write {args.output}: {error}") from error
    progress.update(len(steps))
    what = type(model).__name__
    params = int(np.sum([np.prod(w.shape) for w in model.weights]))
    print(f"Wrote a {what} preset ({params / 1e6:.2f}M parameters) to {args.output}")
    loader = (
        "keras_hub.models.ImageClassifier" if isinstance(model, VisionTransformerImageClassifier) else what
    )
    if isinstance(model, PaliGemmaMoECausalLM):
        loader = "keras_vmoe.models.PaliGemmaMoECausalLM"
    print(f"  load it with {loader}.from_preset({str(args.output)!r})")
