"""E^3 in miniature: a V-MoE against an efficient ensemble of experts upcycled from it.

"Sparse MoEs meet Efficient Ensembles" (Allingham et al., 2022) reports E^3
more accurate and better calibrated than the V-MoE it is built like. Here,
from the bundled `vmoe_tiny_cifar10` (8 top-1 experts in blocks 3 and 5, 100
epochs on CIFAR-10), two arms continue training for the same number of steps:

- `vmoe`: the preset itself;
- `e3`: the preset turned into an E^3 ensemble of M = 2 members
  (`keras_vmoe.upcycle(..., moe_layers=(), ensemble_size=2)`): the same
  weights, member m routing (top-1) within experts 4m ... 4m + 3 with the
  preset's router columns (vmoe's C-order reshape), blocks 3 to 5 and the
  head run twice per image, and the loss is vmoe's ensemble cross-entropy.

Both train with the presets' recipe (`keras_vmoe.recipes.cifar10`: the same
augmentation and AdamW; no warm-up, a cosine decay from `--learning-rate` to
zero), seed 0, on the 50,000 training
images, and are evaluated on the 10,000 test images before and after: top-1,
negative log-likelihood, expected calibration error (15 bins) and Brier
score of the prediction (the E^3 ensemble's mean member probability), with
forward FLOPs per image from `count_flops`.

The default run (one epoch, 195 steps of 256 images per arm) took 16
minutes of training for the V-MoE and about 25 for E^3 on this project's
2-core CPU (JAX); on an accelerator pass more `--epochs`. Run one arm per
process, then merge:

    python benchmarks/efficient_ensembles.py --arm vmoe --output results/vmoe.json
    python benchmarks/efficient_ensembles.py --arm e3 --output results/e3.json
    python benchmarks/efficient_ensembles.py --report results/vmoe.json results/e3.json \\
        --output benchmarks/results/efficient_ensembles-cpu2
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ARMS = ("vmoe", "e3")


def arm_model(arm):
    import keras_vmoe
    from keras_vmoe.models import VMoEImageClassifier

    vmoe = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    if arm == "vmoe":
        return vmoe
    return keras_vmoe.upcycle(
        vmoe, num_experts=8, moe_layers=(), num_selected_experts=1, batch_priority=True, ensemble_size=2
    )


def evaluate(classifier, images, labels):
    """Test metrics of the prediction (an ensemble's log mean probability)."""
    import keras
    import numpy as np

    from keras_vmoe.evaluation import brier_score
    from keras_vmoe.evaluation import expected_calibration_error
    from keras_vmoe.evaluation import negative_log_likelihood
    from keras_vmoe.layers import ensemble_log_mean
    from keras_vmoe.recipes.cifar10 import to_model_inputs

    # Keras' own predict: the pixels are already scaled, as the recipe feeds them.
    logits = keras.Model.predict(classifier, to_model_inputs(images), batch_size=250, verbose=0)
    if classifier.ensemble_size > 1:
        logits = keras.ops.convert_to_numpy(ensemble_log_mean(logits, classifier.ensemble_size))
    return dict(
        test_top1=float(np.mean(np.argmax(logits, -1) == labels)),
        nll=negative_log_likelihood(labels, logits),
        ece=expected_calibration_error(labels, logits),
        brier=brier_score(labels, logits),
    ), logits


def run_arm(args):
    import keras
    import numpy as np

    from keras_vmoe.data import load_cifar10
    from keras_vmoe.models import count_flops
    from keras_vmoe.recipes.cifar10 import Cifar10Recipe
    from keras_vmoe.recipes.cifar10 import fit_recipe
    from keras_vmoe.recipes.cifar10 import hardware

    recipe = Cifar10Recipe(
        name=f"efficient_ensembles_{args.arm}",
        description="continued training",
        family="vmoe",
        backbone={},
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_epochs=0,
        seed=0,
    )
    keras.utils.set_random_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    images, labels = load_cifar10(args.cifar10, "train", limit=args.train_limit)
    test_images, test_labels = load_cifar10(args.cifar10, "test", limit=args.test_limit)
    classifier = arm_model(args.arm)
    flops = count_flops(classifier)["total"]
    before, _ = evaluate(classifier, test_images, test_labels)
    print(
        f"{args.arm}: {classifier.count_params():,} parameters, {flops / 1e6:.1f} MFLOPs per image",
        flush=True,
    )
    print(f"{args.arm}: before {before}", flush=True)
    start = time.perf_counter()
    fit_recipe(classifier, recipe, images, labels, rng, verbose=args.verbose)
    seconds = time.perf_counter() - start
    after, logits = evaluate(classifier, test_images, test_labels)
    print(f"{args.arm}: after {after} ({seconds:.0f} s of training)", flush=True)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output.with_suffix(".npz"), logits=logits, labels=test_labels)
    result = dict(
        arm=args.arm,
        parameters=int(classifier.count_params()),
        flops_per_image=int(flops),
        before=before,
        after=after,
        training_seconds=round(seconds, 1),
        training_steps=int(args.epochs * (len(images) // recipe.batch_size)),
        recipe=dataclasses.asdict(recipe),
        hardware=hardware(),
        backend=keras.backend.backend(),
        training_images=int(len(images)),
        test_images=int(len(test_images)),
    )
    output.write_text(json.dumps(result, indent=2) + "\n")


def report(args):
    import numpy as np

    from keras_vmoe.evaluation import calibration_bins
    from keras_vmoe.visualization import draw_reliability_diagram

    results = [json.loads(pathlib.Path(path).read_text()) for path in args.report]
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "| arm | MFLOPs per image | parameters | top-1 | NLL | ECE (15 bins) | Brier | top-1 before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        a = r["after"]
        lines.append(
            f"| {r['arm']} | {r['flops_per_image'] / 1e6:.1f} | {r['parameters']:,} | {a['test_top1']:.4f} | "
            f"{a['nll']:.4f} | {a['ece']:.4f} | {a['brier']:.4f} | {r['before']['test_top1']:.4f} |"
        )
    first = results[0]
    summary = (
        f"{first['training_steps']} training steps of batch {first['recipe']['batch_size']} "
        f"({first['recipe']['epochs']} epochs of {first['training_images']:,} images) per arm, peak learning "
        f"rate {first['recipe']['learning_rate']}; {first['test_images']:,} test images; "
        f"{first['hardware']}, backend {first['backend']}; training time "
        + ", ".join(f"{r['arm']} {r['training_seconds']:.0f} s" for r in results)
        + "."
    )
    output.with_suffix(".md").write_text(
        "# E^3 against V-MoE from vmoe_tiny_cifar10 (benchmarks/efficient_ensembles.py)\n\n"
        + summary
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    for path, r in zip(args.report, results):
        saved = np.load(pathlib.Path(path).with_suffix(".npz"))
        bins = calibration_bins(saved["labels"], saved["logits"])
        picture = draw_reliability_diagram(*bins, title=f"{r['arm']}: CIFAR-10 test")
        picture.save(f"{output}-{r['arm']}-reliability.png")
    print(output.with_suffix(".md").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument(
        "--cifar10",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", "../shared")) / "data" / "cifar10_jpeg.npz",
    )
    parser.add_argument("--epochs", type=int, default=1, help="more on an accelerator")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--train-limit", type=int, default=None, help="smoke runs")
    parser.add_argument("--test-limit", type=int, default=None, help="smoke runs")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--report", nargs="+", metavar="ARM_JSON")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.report:
        report(args)
    elif args.arm:
        run_arm(args)
    else:
        parser.error("give --arm (train one arm) or --report (merge arm results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
