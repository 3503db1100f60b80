"""Images per second of ViT-B/16 at 224x224 with and without a PatchMerger.

Run from the repository root:

    python benchmarks/patch_merger.py                     # all three backends
    python benchmarks/patch_merger.py --backends jax      # one backend
    python benchmarks/patch_merger.py --quick             # a tiny model: a smoke test, seconds

What it measures
    Two `VMoEBackbone`s of the named architectures `vit_b16` (ViT-B/16, 197
    tokens in all 12 blocks, class token, tanh pre-logits) and `vit_b16_pm8`
    (the same, with a PatchMerger of 8 tokens after block 5, the paper's
    placement: blocks 6 to 11 run on the class token and 8 merged tokens),
    float32, random weights, a batch of 8 images (the 2-core CPU it was
    written for; `--batch-size`). Phases: `forward` (inference,
    training=False) and `train` (the loss sum(outputs x a fixed cotangent)
    and the gradients of every weight). Each backend runs the model the way
    Keras runs it: `jax-jit` (`jax.jit` of `stateless_call`), `tf-graph`
    (`tf.function(jit_compile=False)`, what Keras picks on a CPU-only
    machine), `torch-eager` (Keras does not compile on torch).

How it measures
    One process per backend, one thread each (as benchmarks/moe_layer.py).
    Both models live in the same process; the first call (trace, compile and
    run) is timed apart, then the two are timed in alternating order for
    `rounds` rounds, so a slow phase of the machine hits both. The table
    shows images per second from the median time, and the speed-up: images
    per second with the PatchMerger over without. The analytic ratio of the
    two models' multiply-adds is printed beside it as the ceiling a perfect
    implementation would reach.

How to read it
    The paper reports its speed-ups on TPUs for training and inference; this
    is a CPU measurement. Compare the ratios, not the milliseconds, and only
    within one run. The JSON (benchmarks/results/patch_merger-<date>.json)
    keeps every round's time and the machine.
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARK_DIR.parent
sys.path.insert(0, str(BENCHMARK_DIR))

from moe_layer import answer_task  # noqa: E402
from moe_layer import format_table  # noqa: E402
from moe_layer import limit_threads  # noqa: E402
from moe_layer import machine_info  # noqa: E402
from moe_layer import run_script_worker  # noqa: E402
from moe_layer import write_report  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
MODES = {"jax": "jax-jit", "tensorflow": "tf-graph", "torch": "torch-eager"}
PHASES = ("forward", "train")
CANDIDATES = ("vit", "vit_patch_merger")

FULL = dict(
    architectures={"vit": "vit_b16", "vit_patch_merger": "vit_b16_pm8"},
    image_shape=(224, 224, 3),
    overrides={},
    batch_size=8,
    rounds={"forward": 7, "train": 3},
)
# A 4-block ViT of width 64 on 32x32 images with 4x4 patches (64 tokens),
# merged to 4 tokens after block 1.
QUICK = dict(
    architectures={"vit": "vit_b16", "vit_patch_merger": "vit_b16_pm8"},
    image_shape=(32, 32, 3),
    overrides=dict(
        patch_size=4, num_layers=4, hidden_dim=64, mlp_dim=128, num_heads=4, representation_size=64
    ),
    merger_override=dict(after_block=1, num_tokens=4),
    batch_size=4,
    rounds={"forward": 3, "train": 2},
)


def model_config(scale, candidate):
    """VMoEBackbone.from_architecture arguments of `candidate`."""
    overrides = dict(scale["overrides"])
    if candidate == "vit_patch_merger" and "merger_override" in scale:
        overrides["patch_merger"] = scale["merger_override"]
    return dict(name=scale["architectures"][candidate], image_shape=scale["image_shape"], **overrides)


def multiply_adds(config):
    """Multiply-adds of one image's forward pass through the encoder (patch
    embedding, attention, MLPs, PatchMerger), from the backbone config."""
    height, width, channels = config["image_shape"]
    patch = config["patch_size"]
    patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    dim, mlp_dim = config["hidden_dim"], config["mlp_dim"]
    num_patches = (height // patch[0]) * (width // patch[1])
    prefix = int(bool(config["use_class_token"]))
    merger = config.get("patch_merger")
    total = num_patches * patch[0] * patch[1] * channels * dim
    tokens = prefix + num_patches
    for index in range(config["num_layers"]):
        # q, k, v and output projections; scores and weighted values; MLP.
        total += 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp_dim
        if merger and index == merger["after_block"]:
            total += 2 * num_patches * merger["num_tokens"] * dim  # scores and weighted sum
            tokens = prefix + merger["num_tokens"]
    return total


# Worker: one backend's process ---------------------------------------------------


def log(message):
    print(f"[{os.environ.get('KERAS_BACKEND')}] {message}", flush=True)


def jax_steps(model, images, cotangent):
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    images = jax.tree.map(jax.numpy.asarray, images)  # An array or a dict of arrays.

    def forward(trainable, non_trainable, images):
        return model.stateless_call(trainable, non_trainable, images, training=False)[0]

    def loss(trainable, non_trainable, images):
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=True)
        return (outputs * cotangent).sum()

    forward, train = jax.jit(forward), jax.jit(jax.grad(loss))
    return {
        "forward": lambda: jax.block_until_ready(forward(trainable, non_trainable, images)),
        "train": lambda: jax.block_until_ready(train(trainable, non_trainable, images)),
    }


def tensorflow_steps(model, images, cotangent):
    import tensorflow as tf

    images = tf.nest.map_structure(tf.constant, images)

    @tf.function(jit_compile=False)
    def forward(images):
        return model(images, training=False)

    @tf.function(jit_compile=False)
    def train(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True) * cotangent)
        return tape.gradient(loss, model.trainable_variables)

    # TensorFlow runs synchronously on the CPU; fetching one output makes sure.
    return {
        "forward": lambda: forward(images).numpy(),
        "train": lambda: train(images)[0].numpy(),
    }


def torch_steps(model, images, cotangent):
    import torch

    images, cotangent = torch.utils._pytree.tree_map(torch.from_numpy, images), torch.from_numpy(cotangent)
    variables = [v.value for v in model.trainable_variables]

    def forward():
        with torch.no_grad():  # As Keras' predict_step on torch.
            model(images, training=False)

    def train():
        for variable in variables:
            variable.grad = None
        (model(images, training=True) * cotangent).sum().backward()

    return {"forward": forward, "train": train}


STEPS = {"jax": jax_steps, "tensorflow": tensorflow_steps, "torch": torch_steps}


def seconds(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_phases(steps, candidates, rounds, images):
    """Times every candidate's steps ({candidate: {phase: step}}) in one
    process: the first call (trace, compile and run) apart, then `rounds[phase]`
    rounds in alternating order, so a slow phase of the machine hits all.
    Returns {phase: {candidate: timings}}, with images per second for
    `images` images per step."""
    results = {}
    for phase, count in rounds.items():
        first_call = {}
        for candidate in candidates:
            first_call[candidate] = seconds(steps[candidate][phase])
            log(f"{phase} {candidate}: first call {first_call[candidate]:.2f} s")
        times = {candidate: [] for candidate in candidates}
        for round_index in range(count):
            order = candidates if round_index % 2 == 0 else candidates[::-1]
            for candidate in order:
                times[candidate].append(seconds(steps[candidate][phase]))
            log(
                f"{phase} round {round_index + 1}/{count}: "
                + ", ".join(f"{c} {1e3 * times[c][-1]:.0f} ms" for c in candidates)
            )
        results[phase] = {
            candidate: {
                "median_ms": 1e3 * statistics.median(times[candidate]),
                "min_ms": 1e3 * min(times[candidate]),
                "images_per_second": images / statistics.median(times[candidate]),
                "first_call_s": first_call[candidate],
                "times_ms": [round(1e3 * t, 3) for t in times[candidate]],
            }
            for candidate in candidates
        }
    return results


def run_worker(task):
    """Times both candidates in this process; returns the measurements."""
    import keras
    import numpy as np

    from keras_vmoe.models import VMoEBackbone

    backend = keras.backend.backend()
    limit_threads(backend)
    scale, batch_size = task["scale"], task["batch_size"]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch_size, *scale["image_shape"])).astype("float32")
    steps, configs = {}, {}
    for candidate in CANDIDATES:
        keras.utils.set_random_seed(0)
        arguments = model_config(scale, candidate)
        model = VMoEBackbone.from_architecture(arguments.pop("name"), **arguments)
        configs[candidate] = model.get_config()
        cotangent = rng.standard_normal((batch_size, model.output_dim)).astype("float32")
        steps[candidate] = STEPS[backend](model, images, cotangent)
        log(f"built {candidate}: {model.count_params():,} parameters")
    results = time_phases(steps, CANDIDATES, task["rounds"], batch_size)
    for phase in PHASES:
        dense, merged = (results[phase][c]["images_per_second"] for c in CANDIDATES)
        results[phase]["speedup"] = merged / dense
    return {"mode": MODES[backend], "results": results, "configs": configs}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--quick", action="store_true", help="a tiny model and few rounds (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results file (default: benchmarks/results/patch_merger-<date>.json; none with --quick)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not args.quick and not args.worker:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCHMARK_DIR / "results" / f"patch_merger-{stamp}.json"
    return args


def main(argv=None):
    """Runs the benchmark; returns the report that --out receives."""
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    batch_size = args.batch_size or scale["batch_size"]
    task = {"scale": scale, "batch_size": batch_size, "rounds": scale["rounds"]}
    report = {
        "machine": machine_info(),
        "quick": args.quick,
        "batch_size": batch_size,
        "scale": scale,
        "backends": {},
        "errors": [],
    }
    for backend in args.backends:
        answer = run_script_worker(__file__, backend, task)
        if "error" in answer:
            report["errors"].append(f"{backend}: {answer['error']}")
        else:
            report["backends"][backend] = answer
    configs = next(iter(report["backends"].values()), {}).get("configs")
    if configs:
        macs = {candidate: multiply_adds(configs[candidate]) for candidate in CANDIDATES}
        report["multiply_adds_per_image"] = macs
        report["flops_ratio"] = macs["vit"] / macs["vit_patch_merger"]
    rows = []
    for answer in report["backends"].values():
        for phase in PHASES:
            result = answer["results"][phase]
            rows.append(
                [
                    answer["mode"],
                    phase,
                    f"{result['vit']['images_per_second']:.2f}",
                    f"{result['vit_patch_merger']['images_per_second']:.2f}",
                    f"{result['speedup']:.2f}x",
                ]
            )
    title = "tiny ViT (quick)" if args.quick else "ViT-B/16, 224x224"
    print(f"\n== {title}, batch {batch_size}, one thread: images per second (median)")
    print(format_table(["mode", "phase", "without", "with PatchMerger", "speed-up"], rows))
    if "flops_ratio" in report:
        macs = report["multiply_adds_per_image"]
        print(
            f"multiply-adds per image: {macs['vit'] / 1e6:,.1f} M without, "
            f"{macs['vit_patch_merger'] / 1e6:,.1f} M with (ratio {report['flops_ratio']:.2f}x)"
        )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.worker:
        answer_task(run_worker, *arguments.worker)
    else:
        sys.exit(1 if main()["errors"] else 0)
