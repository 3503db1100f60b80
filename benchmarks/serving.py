"""Latency of one image: the exported model (ONNX Runtime, SavedModel) against `predict`.

Run from the repository root:

    python benchmarks/serving.py                   # all three backends, the bundled presets
    python benchmarks/serving.py --backends jax    # one backend
    python benchmarks/serving.py --quick           # few rounds: a smoke test

What it measures
    For each bundled image-classifier preset (dense ViT, V-MoE, Soft MoE; 32x32
    CIFAR-10 models), the time to get the logits of ONE preprocessed image:
    - `predict`: `classifier.predict(x)`, what a Keras user calls;
    - `predict_on_batch`: the same compiled step without Keras' data adapter;
    - `onnxruntime`: `keras_vmoe.export.export_model(..., "onnx")` from this
      backend, run by an ONNX Runtime session (one thread);
    - `saved_model`: the SavedModel exported from this backend (JAX and
      TensorFlow), loaded with `tf.saved_model.load` and called.
    `predict` and `predict_on_batch` take the raw uint8 image (the task
    preprocesses it), the exported models the preprocessed pixels. Ratios
    are to `predict` in the same process; every way's logits are checked
    against the model's forward pass on the pixels (max |difference| in the JSON).

How it measures
    One process per backend, one thread each (benchmarks/moe_layer.py's
    settings). Each way is called once to warm up (trace, compile), then the
    ways are timed in turn for `rounds` rounds; the table shows the medians.
"""

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARK_DIR))

from moe_layer import answer_task  # noqa: E402
from moe_layer import format_table  # noqa: E402
from moe_layer import limit_threads  # noqa: E402
from moe_layer import machine_info  # noqa: E402
from moe_layer import run_script_worker  # noqa: E402
from moe_layer import write_report  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
PRESETS = ("vit_tiny_cifar10", "vmoe_tiny_cifar10", "soft_moe_tiny_cifar10")
WAYS = ("predict", "predict_on_batch", "onnxruntime", "saved_model")


def log(message):
    print(message, file=sys.stderr, flush=True)


def ways_to_call(classifier, image, pixels, folder, backend):
    """{way: zero-argument function returning numpy logits}: the task's own
    ways on the raw uint8 `image` (they preprocess it), the exported model's on
    the preprocessed `pixels`."""
    import numpy as np
    import onnxruntime
    import tensorflow as tf

    from keras_vmoe.export import export_model

    ways = {
        "predict": lambda: classifier.predict(image, verbose=0),
        "predict_on_batch": lambda: np.asarray(classifier.predict_on_batch(image)),
    }
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        export_model(classifier, Path(folder) / "model.onnx", "onnx", batch_size=1), options
    )
    name = session.get_inputs()[0].name
    ways["onnxruntime"] = lambda: session.run(None, {name: pixels})[0]
    if backend != "torch":
        served = tf.saved_model.load(export_model(classifier, Path(folder) / "saved"))
        constant = tf.constant(pixels)
        ways["saved_model"] = lambda: served.serve(constant).numpy()
    return ways


def run_worker(task):
    import keras
    import numpy as np

    from keras_vmoe.models import VisionTransformerImageClassifier

    backend = keras.backend.backend()
    limit_threads(backend)
    results = {}
    for preset in task["presets"]:
        classifier = VisionTransformerImageClassifier.from_preset(preset)
        image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype("uint8")
        pixels = np.asarray(keras.ops.convert_to_numpy(classifier.preprocessor(image)), "float32")
        with tempfile.TemporaryDirectory() as folder:
            ways = ways_to_call(classifier, image, pixels, folder, backend)
            reference = np.asarray(keras.ops.convert_to_numpy(classifier(pixels, training=False)))
            differences = {way: float(np.abs(call() - reference).max()) for way, call in ways.items()}
            times = {way: [] for way in ways}
            for _ in range(task["rounds"]):
                for way, call in ways.items():
                    start = time.perf_counter()
                    call()
                    times[way].append(time.perf_counter() - start)
        medians = {way: 1e3 * statistics.median(values) for way, values in times.items()}
        results[preset] = {
            way: {
                "median_ms": medians[way],
                "ratio_to_predict": medians[way] / medians["predict"],
                "max_abs_difference": differences[way],
            }
            for way in ways
        }
        log(f"{backend} {preset}: " + ", ".join(f"{w} {m:.2f} ms" for w, m in medians.items()))
    return {"results": results}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/results/serving-<date>.json; none with --quick)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not args.quick and not args.worker:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCHMARK_DIR / "results" / f"serving-{stamp}.json"
    return args


def main(argv=None):
    args = parse_args(argv)
    task = {"presets": args.presets, "rounds": 5 if args.quick else 200}
    report = {
        "machine": machine_info(),
        "quick": args.quick,
        "rounds": task["rounds"],
        "backends": {},
        "errors": [],
    }
    for backend in args.backends:
        answer = run_script_worker(__file__, backend, task)
        if "error" in answer:
            report["errors"].append(f"{backend}: {answer['error']}")
        else:
            report["backends"][backend] = answer
    rows = []
    for backend, answer in report["backends"].items():
        for preset, result in answer["results"].items():
            rows.append(
                [backend, preset]
                + [
                    f"{result[way]['median_ms']:.2f} ms ({result[way]['ratio_to_predict']:.2f}x)"
                    if way in result
                    else "-"
                    for way in WAYS
                ]
            )
    print("\n== one 32x32 image, one thread: median latency (ratio to predict)")
    print(format_table(["backend", "preset", *WAYS], rows))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.worker:
        answer_task(run_worker, *arguments.worker)
    else:
        sys.exit(1 if main()["errors"] else 0)
