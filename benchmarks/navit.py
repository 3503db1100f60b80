"""NaViT in miniature: packing against padding, and one model for many resolutions.

Run from the repository root:

    python benchmarks/navit.py throughput                  # all three backends
    python benchmarks/navit.py throughput --quick          # a smoke test, seconds
    python benchmarks/navit.py resolution                  # trains two models (JAX), 1.5 hours here
    python benchmarks/navit.py resolution --epochs 30      # longer, on an accelerator

`throughput`
    The workload: CIFAR-10 test images resized to random sizes, each side
    drawn apart between 16 and 64 pixels (so random aspect ratios), patch
    size 8: 4 to 64 patches per image at its own resolution. A V-MoE (4
    blocks of width 128, MLP 512, MoE in blocks 1 and 3 with E = 8 and K = 2,
    capacity factor 1, GAP) runs the same `--images` images three ways:
    `padding` (each image zero-padded to 64 x 64 and fed to the square model
    of the same size: what one does without NaViT), `packing` (the images
    packed first-fit into sequences of 256 tokens with up to 10 images, one
    routing group of 64 tokens per image slot, the default) and
    `packing_sequence` (packed, one routing group per sequence). Phases
    `forward` and `train` (the gradients of sum(outputs x a fixed
    cotangent)), each backend in its own one-thread process, in the mode
    Keras runs it (`jax-jit`, `tf-graph`, `torch-eager`); candidates
    alternate within a round. Reported: images per second, and the ratio of
    packing over padding.

`resolution`
    The paper's "one model, many resolutions" claim, in miniature. Two
    native-resolution V-MoEs of the same size (patch 4, up to 12 x 12
    patches, 4 blocks of width 96, MoE in blocks 1 and 3, E = 4, K = 1) train
    from scratch on the 50,000 CIFAR-10 training images, every image once
    an epoch, in batches of the same packed sequences (8 x 256 tokens), so at
    the same cost per step: `mixed`, each image resized to a random size with
    sides between 16 and 48 pixels every epoch; `fixed`, every image at
    32 x 32 (64 tokens; the mixed images average slightly fewer, as sides
    round down to whole patches, so the fixed arm takes about 7% more
    steps). Both are then
    evaluated on the 10,000 test images resized to 16, 24, 32, 40 and 48
    pixels square; `benchmarks/results/navit-<machine>.png` plots top-1
    against resolution.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARK_DIR.parent
sys.path.insert(0, str(BENCHMARK_DIR))
sys.path.insert(0, str(REPO_ROOT))

from moe_layer import answer_task  # noqa: E402
from moe_layer import format_table  # noqa: E402
from moe_layer import limit_threads  # noqa: E402
from moe_layer import machine_info  # noqa: E402
from moe_layer import run_script_worker  # noqa: E402
from moe_layer import write_report  # noqa: E402
from patch_merger import STEPS  # noqa: E402
from patch_merger import time_phases  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
MODES = {"jax": "jax-jit", "tensorflow": "tf-graph", "torch": "torch-eager"}
PHASES = ("forward", "train")
CANDIDATES = ("padding", "packing", "packing_sequence")
SHARED = Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"

THROUGHPUT = dict(
    model=dict(num_layers=4, hidden_dim=128, mlp_dim=512, num_heads=4),
    images=64,
    sides=(16, 64),
    sequence_length=256,
    max_images_per_sequence=10,
    rounds={"forward": 7, "train": 3},
)
QUICK = dict(THROUGHPUT, model=dict(num_layers=2, hidden_dim=32, mlp_dim=64, num_heads=2), images=8)
QUICK["rounds"] = {"forward": 2, "train": 1}


def log(message):
    print(f"[{os.environ.get('KERAS_BACKEND', 'main')}] {message}", flush=True)


def resize(image, height, width):
    from PIL import Image

    return __import__("numpy").asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def mixed_size_images(count, sides, seed, split="test"):
    """`count` CIFAR-10 images (random pixels when the archive is absent),
    each resized to a random (height, width) with sides in `sides`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if CIFAR10.is_file():
        from keras_vmoe.data.cifar10 import load_cifar10

        images, labels = load_cifar10(CIFAR10, split, limit=count)
    else:
        images = rng.integers(0, 256, (count, 32, 32, 3)).astype("uint8")
        labels = rng.integers(0, 10, count)
    heights, widths = rng.integers(sides[0], sides[1] + 1, (2, count))
    return [resize(image, h, w) for image, h, w in zip(images, heights, widths)], labels


def vmoe_arguments(model, image_side, patch_size, **extra):
    return dict(
        image_shape=(image_side, image_side, 3),
        patch_size=patch_size,
        pooling="gap",
        moe_layers=(1, 3) if model["num_layers"] >= 4 else (1,),
        **model,
        **extra,
    )


# Throughput worker: one backend's process -----------------------------------


def throughput_inputs(scale):
    """{candidate: (backbone arguments, inputs)} over the same images."""
    import numpy as np

    from keras_vmoe.layers import ImagePatcher
    from keras_vmoe.layers import SequencePacker

    images, _ = mixed_size_images(scale["images"], scale["sides"], seed=0)
    side = scale["sides"][1]
    padded = np.zeros((len(images), side, side, 3), "float32")
    for index, image in enumerate(images):
        padded[index, : image.shape[0], : image.shape[1]] = image / 127.5 - 1.0
    patcher = ImagePatcher(8, (side // 8) ** 2, max_grid=(side // 8, side // 8), scale=1 / 127.5, offset=-1.0)
    packer = SequencePacker(scale["sequence_length"], scale["max_images_per_sequence"])
    packed, _ = packer.pack([patcher(image) for image in images])
    moe = dict(num_experts=8, num_selected_experts=2, capacity_factor=1.0)
    native = dict(
        native_resolution=True,
        position_embedding="factorized",
        max_images_per_sequence=scale["max_images_per_sequence"],
        **moe,
    )
    return {
        "padding": (vmoe_arguments(scale["model"], side, 8, **moe), padded),
        "packing": (vmoe_arguments(scale["model"], side, 8, **native), packed),
        "packing_sequence": (
            vmoe_arguments(scale["model"], side, 8, packed_routing="sequence", **native),
            packed,
        ),
    }


def run_worker(task):
    import keras
    import numpy as np

    from keras_vmoe.models import VMoEBackbone

    backend = keras.backend.backend()
    limit_threads(backend)
    scale = task["scale"]
    steps, shapes = {}, {}
    rng = np.random.default_rng(0)
    for candidate, (arguments, inputs) in throughput_inputs(scale).items():
        keras.utils.set_random_seed(0)
        model = VMoEBackbone(**arguments)
        outputs = model(inputs)
        cotangent = rng.standard_normal(tuple(outputs.shape)).astype("float32")
        steps[candidate] = STEPS[backend](model, inputs, cotangent)
        shapes[candidate] = {
            k: list(v.shape) for k, v in (inputs if isinstance(inputs, dict) else {"images": inputs}).items()
        }
        log(f"built {candidate}: inputs {shapes[candidate]}")
    results = time_phases(steps, CANDIDATES, task["rounds"], scale["images"])
    return {"mode": MODES[backend], "results": results, "inputs": shapes}


def throughput(args):
    scale = QUICK if args.quick else THROUGHPUT
    report = {"machine": machine_info(), "quick": args.quick, "scale": scale, "backends": {}, "errors": []}
    for backend in args.backends:
        answer = run_script_worker(__file__, backend, {"scale": scale, "rounds": scale["rounds"]})
        if "error" in answer:
            report["errors"].append(f"{backend}: {answer['error']}")
        else:
            report["backends"][backend] = answer
    rows = []
    for answer in report["backends"].values():
        for phase in PHASES:
            result = answer["results"][phase]
            speed = {c: result[c]["images_per_second"] for c in CANDIDATES}
            rows.append(
                [answer["mode"], phase]
                + [f"{speed[c]:.1f}" for c in CANDIDATES]
                + [
                    f"{speed['packing'] / speed['padding']:.2f}x",
                    f"{speed['packing_sequence'] / speed['padding']:.2f}x",
                ]
            )
    header = ["mode", "phase", *CANDIDATES, "packing/padding", "packing_sequence/padding"]
    print(f"\n== {scale['images']} mixed-size images, one thread: images per second (median)")
    print(format_table(header, rows))
    report["table"] = format_table(header, rows)
    write_report(report, args.out)
    return report


# Accuracy against resolution (in this process) -------------------------------

RESOLUTION = dict(
    model=dict(num_layers=4, hidden_dim=96, mlp_dim=384, num_heads=3),
    moe=dict(num_experts=4, num_selected_experts=1, capacity_factor=1.25),
    max_side=48,
    sides=(16, 48),
    fixed_side=32,
    sequence_length=256,
    max_images_per_sequence=16,
    sequences_per_batch=8,
    eval_sides=(16, 24, 32, 40, 48),
    learning_rate=1e-3,
)


def resolution_classifier(config):
    import keras

    from keras_vmoe.models import NativeResolutionImageClassifierPreprocessor
    from keras_vmoe.models import VMoEBackbone
    from keras_vmoe.models import VMoEImageClassifier

    keras.utils.set_random_seed(0)
    backbone = VMoEBackbone(
        **vmoe_arguments(
            config["model"],
            config["max_side"],
            4,
            native_resolution=True,
            position_embedding="factorized",
            max_images_per_sequence=config["max_images_per_sequence"],
            **config["moe"],
        )
    )
    preprocessor = NativeResolutionImageClassifierPreprocessor.for_backbone(
        backbone, (config["max_side"] // 4) ** 2, config["sequence_length"], scale=1 / 127.5, offset=-1.0
    )
    return VMoEImageClassifier(backbone, num_classes=10, preprocessor=preprocessor)


def train_arm(arm, config, train_images, train_labels, epochs, log_every):
    import keras
    import numpy as np

    classifier = resolution_classifier(config)
    rng = np.random.default_rng(1)
    batch = config["sequences_per_batch"]
    # Both arms see every image once an epoch in batches of the same packed
    # sequences, so each step costs the same; the step counts differ a little.
    steps_per_epoch = None
    schedule = None
    started = time.perf_counter()
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(train_images))
        flips = rng.random(len(order)) < 0.5
        if arm == "mixed":
            heights, widths = rng.integers(config["sides"][0], config["sides"][1] + 1, (2, len(order)))
        else:
            heights = widths = np.full(len(order), config["fixed_side"])
        images = []
        for index, flip, h, w in zip(order, flips, heights, widths):
            image = train_images[index][:, ::-1] if flip else train_images[index]
            images.append(resize(np.ascontiguousarray(image), h, w))
        x, y, weights, _ = classifier.preprocessor.pack(images, train_labels[order], training=True)
        if steps_per_epoch is None:
            steps_per_epoch = len(x["segment_ids"]) // batch
            schedule = keras.optimizers.schedules.CosineDecay(
                0.0,
                epochs * steps_per_epoch,
                warmup_target=config["learning_rate"],
                warmup_steps=steps_per_epoch // 2,
            )
            classifier.compile(
                optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, clipnorm=1.0),
                metrics=["accuracy"],
            )
        keep = steps_per_epoch * batch
        x = {key: value[:keep] for key, value in x.items()}
        result = classifier.fit(
            x, y[:keep], sample_weight=weights[:keep], batch_size=batch, epochs=1, verbose=0
        )
        images_seen = int(weights[:keep].sum())
        history.append({key: float(value[-1]) for key, value in result.history.items()})
        history[-1].update(images=images_seen, seconds=time.perf_counter() - started)
        log(f"{arm} epoch {epoch + 1}/{epochs}: {history[-1]}")
    return classifier, history, time.perf_counter() - started, steps_per_epoch


def evaluate_at(classifier, images, labels, side):
    import numpy as np

    resized = [resize(image, side, side) for image in images]
    logits = classifier.predict(resized, batch_size=32, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == labels))


def resolution(args):

    from keras_vmoe.data.cifar10 import load_cifar10
    from keras_vmoe.visualization.line_chart import draw_line_chart

    config = dict(RESOLUTION)
    limit = 512 if args.quick else None
    train_images, train_labels = load_cifar10(CIFAR10, "train", limit=limit, verbose=not args.quick)
    test_images, test_labels = load_cifar10(CIFAR10, "test", limit=256 if args.quick else None)
    epochs = 1 if args.quick else args.epochs
    report = {"machine": machine_info(), "config": config, "epochs": epochs, "arms": {}, "errors": []}
    for arm in ("mixed", "fixed"):
        classifier, history, seconds_taken, steps = train_arm(
            arm, config, train_images, train_labels, epochs, log_every=50
        )
        accuracy = {
            side: evaluate_at(classifier, test_images, test_labels, side) for side in config["eval_sides"]
        }
        report["arms"][arm] = dict(
            history=history, train_seconds=seconds_taken, steps_per_epoch=steps, top1=accuracy
        )
        log(f"{arm}: trained in {seconds_taken:.0f} s; top-1 by side {accuracy}")
    rows = [
        [f"{side} px"] + [f"{report['arms'][arm]['top1'][side]:.4f}" for arm in ("mixed", "fixed")]
        for side in config["eval_sides"]
    ]
    table = format_table(["test resolution", "mixed (NaViT)", f"fixed {config['fixed_side']} px"], rows)
    print(table)
    report["table"] = table
    if args.out:
        series = {
            ("NaViT-style, mixed 16-48 px" if arm == "mixed" else f"fixed {config['fixed_side']} px"): [
                (side, report["arms"][arm]["top1"][side]) for side in config["eval_sides"]
            ]
            for arm in ("mixed", "fixed")
        }
        image = draw_line_chart(
            series, "test resolution (pixels, square)", "CIFAR-10 top-1", "Accuracy against resolution"
        )
        image.save(args.out.with_suffix(".png"))
        (args.out.with_suffix(".md")).write_text(table + "\n")
    write_report(report, args.out.with_suffix(".json") if args.out else None)
    return report


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", choices=("throughput", "resolution"), default="throughput")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test")
    parser.add_argument("--epochs", type=int, default=4, help="resolution: training epochs per arm")
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (JSON; resolution adds .png, .md)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not args.quick and not args.worker:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCHMARK_DIR / "results" / f"navit-{args.part}-{stamp}.json"
    return args


def main(argv=None):
    args = parse_args(argv)
    return throughput(args) if args.part == "throughput" else resolution(args)


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.worker:
        answer_task(run_worker, *arguments.worker)
    else:
        sys.exit(1 if main()["errors"] else 0)
