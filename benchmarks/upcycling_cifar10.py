"""Sparse upcycling in miniature: test accuracy against extra training compute.

From the bundled dense preset `vit_tiny_cifar10` (100 epochs on CIFAR-10),
three arms continue training for the same extra compute:

- `dense`: the dense ViT itself;
- `vmoe`: upcycled to a V-MoE (blocks 3 and 5, 8 experts copied from the
  MLP, expert-choice routing with capacity factor 1.0, the paper's router
  for vision, so 64 slots per image as the MLP has 64 tokens);
- `soft`: upcycled to a Soft MoE (blocks 3 and 5, 8 experts of 8 slots).

All three then cost the same FLOPs per image within 3% (routers, dispatch
and combine), so equal epochs are equal extra compute. Each arm trains with
the presets' recipe (keras_vmoe.recipes.cifar10: same augmentation) with a
fresh AdamW, peak learning rate 3e-4 after 1 warm-up epoch and a cosine
decay to zero over `--epochs`, seed 0, and is evaluated on the 10,000 test
images before training and after each of `--eval-every` epochs. An
evaluation mid-schedule is not the result of a shorter run with its own
schedule; the last point is the one each arm was scheduled for.

Run one arm per process (the three can share one GPU), then merge:

    python benchmarks/upcycling_cifar10.py --arm dense --output results/dense.json
    python benchmarks/upcycling_cifar10.py --arm vmoe  --output results/vmoe.json
    python benchmarks/upcycling_cifar10.py --arm soft  --output results/soft.json
    python benchmarks/upcycling_cifar10.py --report results/dense.json results/vmoe.json \\
        results/soft.json --output benchmarks/results/upcycling_cifar10
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ARMS = ("dense", "vmoe", "soft")


def upcycled_arm(arm, dense):
    import keras_vmoe

    if arm == "dense":
        return dense
    if arm == "vmoe":
        return keras_vmoe.upcycle(
            dense, num_experts=8, moe_layers=(3, 5), router="expert_choice", capacity_factor=1.0
        )
    return keras_vmoe.upcycle(dense, num_experts=8, moe_layers=(3, 5), router="soft", slots_per_expert=8)


def run_arm(args):
    import keras
    import numpy as np

    from keras_vmoe.data import load_cifar10
    from keras_vmoe.models import VMoEImageClassifier
    from keras_vmoe.models import count_flops
    from keras_vmoe.recipes.cifar10 import Cifar10Recipe
    from keras_vmoe.recipes.cifar10 import fit_recipe
    from keras_vmoe.recipes.cifar10 import hardware
    from keras_vmoe.recipes.cifar10 import top1_accuracy

    recipe = Cifar10Recipe(
        name=f"upcycling_{args.arm}",
        description="continued training",
        family="vmoe",
        backbone={},
        epochs=args.epochs,
        learning_rate=3e-4,
        warmup_epochs=1,
        seed=0,
    )
    keras.utils.set_random_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    images, labels = load_cifar10(args.cifar10, "train", limit=args.train_limit)
    test_images, test_labels = load_cifar10(args.cifar10, "test", limit=args.train_limit)
    classifier = upcycled_arm(args.arm, VMoEImageClassifier.from_preset("vit_tiny_cifar10"))
    flops = count_flops(classifier)["total"]
    points = [dict(epochs=0, test_top1=top1_accuracy(classifier, test_images, test_labels))]
    print(
        f"{args.arm}: {classifier.count_params():,} parameters, {flops / 1e6:.1f} MFLOPs per image, "
        f"top-1 before training {points[0]['test_top1']:.4f}",
        flush=True,
    )
    start = time.perf_counter()

    def evaluate(epoch):
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == recipe.epochs:
            points.append(
                dict(
                    epochs=epoch + 1,
                    test_top1=top1_accuracy(classifier, test_images, test_labels),
                    seconds=round(time.perf_counter() - start, 1),
                )
            )
            print(f"{args.arm}: epoch {epoch + 1}, top-1 {points[-1]['test_top1']:.4f}", flush=True)

    fit_recipe(classifier, recipe, images, labels, rng, verbose=args.verbose, after_epoch=evaluate)
    steps_per_epoch = len(images) // recipe.batch_size
    for point in points:
        # Training FLOPs ~ 3x forward (forward, and gradients of inputs and weights).
        point["extra_training_flops"] = 3 * flops * point["epochs"] * steps_per_epoch * recipe.batch_size
    result = dict(
        arm=args.arm,
        parameters=int(classifier.count_params()),
        flops_per_image=int(flops),
        points=points,
        recipe=dataclasses.asdict(recipe),
        hardware=hardware(),
        backend=keras.backend.backend(),
        training_images=int(len(images)),
    )
    pathlib.Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


def report(args):
    results = [json.loads(pathlib.Path(path).read_text()) for path in args.report]
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    epochs = sorted({p["epochs"] for r in results for p in r["points"]})
    lines = [
        "| extra epochs | extra training PFLOPs (dense) | "
        + " | ".join(f"{r['arm']} top-1" for r in results)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in results) + " |",
    ]
    dense = next((r for r in results if r["arm"] == "dense"), results[0])
    for epoch in epochs:
        cells = []
        for r in results:
            point = next((p for p in r["points"] if p["epochs"] == epoch), None)
            cells.append(f"{point['test_top1']:.4f}" if point else "")
        extra = next(p for p in dense["points"] if p["epochs"] == epoch)["extra_training_flops"]
        lines.append(f"| {epoch} | {extra / 1e15:.2f} | " + " | ".join(cells) + " |")
    summary = "\n".join(
        [
            f"- {r['arm']}: {r['parameters']:,} parameters, {r['flops_per_image'] / 1e6:.1f} MFLOPs per image"
            for r in results
        ]
        + [f"- hardware: {results[0]['hardware']}, backend {results[0]['backend']}"]
    )
    output.with_suffix(".md").write_text(
        "# Sparse upcycling of vit_tiny_cifar10 (benchmarks/upcycling_cifar10.py)\n\n"
        + summary
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    draw_plot(results, output.with_suffix(".png"))
    print(output.with_suffix(".md").read_text())


def draw_plot(results, path):
    """Test top-1 against extra training compute, one line per arm (Pillow only)."""
    from keras_vmoe.visualization.line_chart import draw_line_chart

    series = {
        r["arm"]: [(p["extra_training_flops"] / 1e15, p["test_top1"]) for p in r["points"]] for r in results
    }
    title = "CIFAR-10 test top-1 after upcycling vit_tiny_cifar10"
    draw_line_chart(series, "extra training compute (PFLOPs)", "test top-1", title).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument(
        "--cifar10",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", "../shared")) / "data" / "cifar10_jpeg.npz",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=None, help="smoke runs")
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
