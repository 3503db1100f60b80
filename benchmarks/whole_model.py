"""Whole models: images per second of MoE classifiers against their dense twins.

Run from the repository root:

    python benchmarks/whole_model.py                    # all three backends, about 2 hours here
    python benchmarks/whole_model.py --backends torch   # one backend
    python benchmarks/whole_model.py --quick            # tiny models, seconds: a smoke test
    python benchmarks/whole_model.py --huge-pages       # large buffers in huge pages (see below)
    python benchmarks/whole_model.py --malloc keep-freed   # freed memory kept for reuse (see below)

What it measures
    Three MoE classifiers (224 x 224 x 3 inputs, 1,000 classes), each with the
    same ViT without experts (every MoE block a dense MLP):
    - `vmoe_s32`: `VMoEBackbone.from_architecture("vmoe_s32_last2_e8_k2")`,
      vmoe's S/32 (8 blocks of width 512), MoE in blocks 5 and 7, E = 8,
      K = 2, capacity factor 1.05; dense twin `vit_s32`;
    - `soft_moe_s16`: `SoftMoEBackbone.from_architecture("soft_moe_s16")`
      (12 blocks of width 384, the last 6 Soft MoE with 128 experts of one
      slot); dense twin: the same with no MoE blocks;
    - `vmoe_b16_every2`: `vmoe_b16_every2_e8_k2` (12 blocks of width 768,
      every odd block MoE, E = 8, K = 2); dense twin `vit_b16`, where routing
      weighs more.
    Every image is its own routing group (`group_size=None`, as the presets),
    so batch 1 is serving one image. At batch 1 and batch 64, `predict`
    (`predict_on_batch`) and a training step (`train_on_batch`, plain SGD,
    so that the update, which grows with the parameters and not the FLOPs,
    weighs little; sparse categorical cross-entropy), the way Keras runs each backend on a
    CPU: `jit_compile="auto"` (JAX: jit; TensorFlow: a graph; PyTorch:
    eager). On PyTorch the S/32 pair also trains with `jit_compile=True`
    (`torch.compile`): compiled against eager.
    Reported: images per second, the MoE model's time over its twin's, its
    FLOPs over its twin's (`keras_vmoe.models.count_flops`, forward FLOPs per
    image: K experts per token, capacity-padded slots), and their quotient:
    1.0 means the experts cost exactly their FLOPs.
    Where the time goes: one MoE layer of the model, its experts alone
    (`moe_references.ExpertsOf`: the expert bank on the router's capacity
    slots, no router, no dispatch, no combine) and the twin's MLP, timed as
    layers at the model's shapes and batch in the same process (as
    `moe_layer.py` times layers, in the mode Keras uses; under
    `torch.compile` for the compiled models). The dense twin's
    time plus, per MoE layer, the experts' time over the MLP's predicts a
    `floor` for the ratio above (what the expert matmuls cost at these
    shapes: few rows per expert make them bound by reading the expert
    weights); with the whole MoE layer instead, `from_layers`; `routing_ms`
    is the MoE layer's time above its experts'. What the measured ratio
    has above `from_layers` is outside the MoE layers.

Memory and training steps
    A training step writes every weight's gradient into new buffers (the
    last step's are freed), and the operating system hands them out
    a 4 KiB page at a time at first touch. Soft MoE S/16 has 0.92 B
    parameters against its twin's 22 M: 3.7 GB of fresh gradients per step.
    Profiled on this machine (a virtual machine, where a first touch costs
    most: 6 GB in 11 s), an expert bank's weight-gradient `bmm` (128 x
    1536 x 384 outputs, 302 MB) takes 570 ms inside the whole model's step,
    140-170 ms in the layer's own step and 53 ms into a buffer already
    touched; the optimizer's update itself takes 0.15-0.26 s. `--huge-pages`
    runs the workers with glibc's malloc backing large blocks with
    transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc
    >= 2.35; JAX's and PyTorch's CPU buffers come from malloc here, and
    both stepped faster with it): one fault per 2 MiB. `--malloc keep-freed`
    instead keeps freed memory in the process (no block mmapped on its own,
    the heap never trimmed), so that a step's gradients land in pages the
    last step touched (`moe_layer.KEEP_FREED_ENV`). The report records the
    memory settings it ran with.

How it measures
    One process per backend, one thread (benchmarks/moe_layer.py's settings).
    A model pair and a batch size at a time: both models are called once
    (trace, compile), then timed in turn, each phase `rounds` times; the
    table shows medians.
"""

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARK_DIR))

from moe_layer import add_malloc_argument  # noqa: E402
from moe_layer import answer_task  # noqa: E402
from moe_layer import format_table  # noqa: E402
from moe_layer import limit_threads  # noqa: E402
from moe_layer import machine_info  # noqa: E402
from moe_layer import memory_settings  # noqa: E402
from moe_layer import run_script_worker  # noqa: E402
from moe_layer import use_malloc  # noqa: E402
from moe_layer import write_report  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
PAIRS = ("vmoe_s32", "soft_moe_s16", "vmoe_b16_every2")
PHASES = ("predict", "train")
# (forward rounds, training rounds) by pair and batch size.
ROUNDS = {
    "vmoe_s32": {1: (40, 20), 64: (7, 5)},
    "soft_moe_s16": {1: (20, 10), 64: (3, 2)},
    "vmoe_b16_every2": {1: (10, 5), 64: (2, 2)},
}
QUICK_ROUNDS = (2, 1)
# (forward rounds, training rounds) of the layer-level decomposition, by batch size.
LAYER_ROUNDS = {1: (40, 20), 64: (5, 3)}
QUICK_IMAGE = 32  # --quick: 32 x 32 images and 2 blocks of width 32.


def log(message):
    print(message, file=sys.stderr, flush=True)


def backbone_configs(pair, quick):
    """(MoE backbone class, its config, the dense twin's config)."""
    from keras_vmoe.models import SoftMoEBackbone
    from keras_vmoe.models import VMoEBackbone

    if pair == "soft_moe_s16":
        cls, config = SoftMoEBackbone, SoftMoEBackbone.architecture_config("soft_moe_s16")
        dense = dict(config, moe_layers=())
    else:
        name, dense_name = {
            "vmoe_s32": ("vmoe_s32_last2_e8_k2", "vit_s32"),
            "vmoe_b16_every2": ("vmoe_b16_every2_e8_k2", "vit_b16"),
        }[pair]
        cls, config = VMoEBackbone, VMoEBackbone.architecture_config(name)
        config["group_size"] = None  # Each image routes on its own, as the presets.
        dense = VMoEBackbone.architecture_config(dense_name)
    if quick:
        tiny = dict(image_shape=(QUICK_IMAGE, QUICK_IMAGE, 3), patch_size=8, hidden_dim=32, mlp_dim=64)
        tiny.update(num_heads=2, num_layers=2)
        moe = dict(moe_layers=(1,), num_experts=min(config["num_experts"], 8))
        config, dense = dict(config, **tiny, **moe), dict(dense, **tiny)
        if "representation_size" in dense:
            config["representation_size"] = dense["representation_size"] = 32
    return cls, config, dense


def build_classifier(cls, config, num_classes, jit_compile):
    import keras

    from keras_vmoe.models import SoftMoEBackbone
    from keras_vmoe.models import SoftMoEImageClassifier
    from keras_vmoe.models import VMoEImageClassifier

    keras.utils.set_random_seed(0)
    backbone = cls(**config)
    task = SoftMoEImageClassifier if cls is SoftMoEBackbone else VMoEImageClassifier
    classifier = task(backbone, num_classes=num_classes, preprocessor=None)
    classifier.compile(
        optimizer=keras.optimizers.SGD(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return classifier


def time_pair(models, images, labels, rounds):
    """{(model, phase): median seconds}: every model's phase once to warm up,
    then round-robin."""
    calls = {}
    for name, classifier in models.items():
        calls[(name, "predict")] = lambda c=classifier: c.predict_on_batch(images)
        calls[(name, "train")] = lambda c=classifier: c.train_on_batch(images, labels)
    for call in calls.values():
        call()
    times = {key: [] for key in calls}
    for phase, count in zip(PHASES, rounds):
        for _ in range(count):
            for key, call in calls.items():
                if key[1] == phase:
                    start = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def time_layers(models, batch, rounds, mode):
    """One MoE layer of the MoE model, the same layer's experts alone
    (`moe_references.ExpertsOf`: its capacity slots, no routing) and the
    twin's MLP, at the model's shapes and batch, forward and training step,
    as `moe_layer.py` times layers in the mode Keras uses here ("auto"), or
    under `torch.compile` ("compiled").
    Returns ({phase: {layer: median ms}}, number of MoE layers)."""
    import keras
    import numpy as np
    from moe_layer import MEMORY_MODES
    from moe_layer_worker import STEP_BUILDERS
    from moe_layer_worker import time_interleaved
    from moe_references import ExpertsOf

    from keras_vmoe.layers import Mlp
    from keras_vmoe.layers.moe import MoELayer

    moe_layers = [layer for layer in models["moe"]._flatten_layers() if isinstance(layer, MoELayer)]
    mlp = next(layer for layer in models["dense"]._flatten_layers() if isinstance(layer, Mlp))
    moe = moe_layers[0]
    shape = (batch,) + tuple(moe._build_shapes_dict["input_shape"][1:])
    experts = ExpertsOf(moe)
    experts.build(shape)
    layers = {"mlp": mlp, "moe": moe, "experts": experts}
    rng = np.random.default_rng(0)
    tokens, cotangent = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    step = STEP_BUILDERS["torch-compiled" if mode == "compiled" else MEMORY_MODES[keras.backend.backend()]]
    times = {}
    for phase, count in zip(PHASES, rounds):
        steps = {name: step(layer, tokens, cotangent, phase == "train") for name, layer in layers.items()}
        measured, errors = time_interleaved(steps, count, f"layers, batch {batch}, {phase}")
        if errors:
            raise RuntimeError(f"layer timing failed: {errors}")
        times[phase] = {name: m["median_ms"] for name, m in measured.items()}
    return times, len(moe_layers)


def decompose(record, layer_ms, num_moe_layers, dense_seconds, flops_ratio):
    """Adds to a phase's `record` what the layer timings predict: the dense
    twin plus, per MoE layer, the MoE layer's time over the MLP's
    (`from_layers`), or the experts' alone over the MLP's (`floor`), each over
    the FLOPs ratio like `time_over_flops`; and the ms per layer above the
    floor (`routing_ms`: router, dispatch, combine)."""
    dense_ms = 1e3 * dense_seconds
    for key, name in (("from_layers", "moe"), ("floor", "experts")):
        extra = num_moe_layers * (layer_ms[name] - layer_ms["mlp"])
        record[key] = (dense_ms + extra) / dense_ms / flops_ratio
    record["layers_ms"] = layer_ms
    record["routing_ms"] = layer_ms["moe"] - layer_ms["experts"]


def run_worker(task):
    import keras
    import numpy as np

    from keras_vmoe.models import count_flops

    backend = keras.backend.backend()
    limit_threads(backend)
    results = {}
    for pair in task["pairs"]:
        cls, config, dense_config = backbone_configs(pair, task["quick"])
        num_classes = 10 if task["quick"] else 1000
        modes = {"auto": "auto"}
        if backend == "torch" and pair == "vmoe_s32" and not task["quick"]:
            modes["compiled"] = True
        for mode, jit_compile in modes.items():
            models = {
                "moe": build_classifier(cls, config, num_classes, jit_compile),
                "dense": build_classifier(cls, dense_config, num_classes, jit_compile),
            }
            flops = {name: count_flops(model)["total"] for name, model in models.items()}
            for batch in task["batch_sizes"]:
                rng = np.random.default_rng(0)
                images = rng.standard_normal((batch, *config["image_shape"])).astype("float32")
                labels = rng.integers(0, num_classes, batch)
                rounds = QUICK_ROUNDS if task["quick"] else ROUNDS[pair][batch]
                seconds = time_pair(models, images, labels, rounds)
                record = {"flops_ratio": flops["moe"] / flops["dense"], "rounds": list(rounds)}
                # Where the time goes, at the layers.
                layer_rounds = QUICK_ROUNDS if task["quick"] else LAYER_ROUNDS[batch]
                layer_ms, num_moe_layers = time_layers(models, batch, layer_rounds, mode)
                for phase in PHASES:
                    moe, dense = seconds[("moe", phase)], seconds[("dense", phase)]
                    record[phase] = {
                        "moe_images_per_s": batch / moe,
                        "dense_images_per_s": batch / dense,
                        "time_ratio": moe / dense,
                        "time_over_flops": moe / dense / record["flops_ratio"],
                    }
                    decompose(record[phase], layer_ms[phase], num_moe_layers, dense, record["flops_ratio"])
                results.setdefault(pair, {}).setdefault(mode, {})[str(batch)] = record
                if task.get("progress"):  # What is measured survives a worker killed later (OOM).
                    Path(task["progress"]).write_text(json.dumps({"results": results}))
                log(
                    f"{backend} {pair} {mode} batch {batch}: "
                    + ", ".join(f"{p} {record[p]['time_over_flops']:.2f}" for p in PHASES)
                )
            del models
    return {"results": results, "memory": memory_settings()}  # As this worker ran.


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--quick", action="store_true", help="tiny models, few rounds (a smoke test)")
    add_malloc_argument(parser)
    parser.add_argument(
        "--huge-pages",
        dest="malloc",
        action="store_const",
        const="huge-pages",
        help="the same as --malloc huge-pages",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/results/whole_model-<date>.json; none with --quick)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not args.quick and not args.worker:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCHMARK_DIR / "results" / f"whole_model-{stamp}.json"
    return args


def table(report):
    rows = []
    for backend, answer in report["backends"].items():
        for pair, modes in answer["results"].items():
            for mode, batches in modes.items():
                for batch, record in batches.items():
                    row = [backend if mode == "auto" else f"{backend} (compiled)", pair, batch]
                    row.append(f"{record['flops_ratio']:.2f}")
                    for phase in PHASES:
                        r = record[phase]
                        row.append(
                            f"{r['moe_images_per_s']:.1f} / {r['dense_images_per_s']:.1f}"
                            f" = {r['time_ratio']:.2f}x -> {r['time_over_flops']:.2f}"
                        )
                        row.append(
                            f"{r['floor']:.2f} / {r['from_layers']:.2f} / {r['routing_ms']:.1f}"
                            if "floor" in r
                            else ""
                        )
                    rows.append(row)
    header = ["backend", "model", "batch", "FLOPs ratio", "predict: img/s MoE / dense", "floor / layers / ms"]
    header += ["train: img/s", "floor / layers / ms"]
    return format_table(header, rows)


def main(argv=None):
    args = parse_args(argv)
    task = {"quick": args.quick, "batch_sizes": [1, 2] if args.quick else [1, 64]}
    use_malloc(args.malloc)
    report = {"machine": machine_info(), "quick": args.quick, "backends": {}, "errors": []}
    for backend in args.backends:
        # A fresh process per pair: a process that held the other pairs' models
        # left too little of this 24 GB machine for B/16 at batch 64.
        for pair in args.pairs:
            with tempfile.TemporaryDirectory() as folder:
                progress = Path(folder) / "progress.json"
                answer = run_script_worker(
                    __file__, backend, dict(task, pairs=[pair], progress=str(progress))
                )
                if "error" in answer:
                    report["errors"].append(f"{backend} {pair}: {answer['error']}")
                    if progress.exists():  # The batch sizes measured before it failed.
                        answer = json.loads(progress.read_text())
                record = report["backends"].setdefault(backend, {"results": {}})
                record["results"].update(answer.get("results", {}))
                record.setdefault("memory", answer.get("memory"))
    report["table"] = table(report)
    print(
        "\n== images per second, MoE / dense, their time ratio -> time ratio over FLOPs ratio;"
        "\n   the same ratio predicted from the layers' times with the experts alone (floor) and with the"
        "\n   MoE layer (layers), and the ms per MoE layer above its experts (routing, dispatch, combine)"
    )
    print(report["table"])
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.worker:
        answer_task(run_worker, *arguments.worker)
    else:
        sys.exit(1 if main()["errors"] else 0)
