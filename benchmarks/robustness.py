"""The adversarial-robustness study in miniature: dense against MoE at equal compute.

"On the Adversarial Robustness of Mixture of Experts" (Puigcerver, Jenatton,
Riquelme, Awasthi, Bhojanapalli) finds MoE models at least as robust to PGD
as dense ones of equal compute, and their experts' choice largely stable
under attack. Here the three bundled CIFAR-10 presets, which cost the same
FLOPs per image within 3% (`vit_tiny_cifar10`, `vmoe_tiny_cifar10`,
`soft_moe_tiny_cifar10`), are attacked with PGD
(`keras_vmoe.evaluation.evaluate_robustness`: vmoe's steps of epsilon /
updates along sign(gradient), clipped to the valid pixels, each image's
highest-loss iterate kept) on the same CIFAR-10 test images, at several
radii. Radii are given in pixel levels of 255 (one level is 2/255 in the
presets' [-1, 1] input space, vmoe's 1/127.5).

    python benchmarks/robustness.py --output benchmarks/results/robustness-cpu2
    python benchmarks/robustness.py --quick --output /tmp/robustness   # smoke run

Writes OUTPUT.json, OUTPUT.md (the table) and OUTPUT.png (accuracy against
epsilon, one line per preset).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

PRESETS = ("vit_tiny_cifar10", "vmoe_tiny_cifar10", "soft_moe_tiny_cifar10")
LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0)


def hardware():
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def run(args):
    import keras

    from keras_vmoe.data import load_cifar10
    from keras_vmoe.evaluation import evaluate_robustness
    from keras_vmoe.models import VisionTransformerImageClassifier
    from keras_vmoe.models import count_flops

    images, labels = load_cifar10(args.cifar10, "test", limit=args.examples)
    results = []
    for preset in PRESETS:
        classifier = VisionTransformerImageClassifier.from_preset(preset)
        flops = count_flops(classifier)
        # The IoU before any attack: tokens a sparse block drops have no
        # expert, and vmoe counts their IoU as 0, so this is the ceiling.
        unattacked = evaluate_robustness(classifier, images, labels, 0.0, 1, args.batch_size).expert_iou
        rows = []
        for level in args.levels:
            start = time.time()
            result = evaluate_robustness(
                classifier,
                images,
                labels,
                level * 2 / 255,
                args.updates,
                args.batch_size,
                verbose=args.verbose,
            )
            row = result.as_dict() | {"pixel_levels": level, "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(
                f"{preset} eps {level} levels: accuracy {row['clean_accuracy']:.4f} -> "
                f"{row['adversarial_accuracy']:.4f}, IoU {row['expert_iou']}",
                flush=True,
            )
        results.append(
            dict(
                preset=preset,
                flops_per_image=int(flops["total"]),
                unattacked_expert_iou={str(b): v for b, v in unattacked.items()},
                rows=rows,
            )
        )
    return dict(
        examples=len(images),
        updates=args.updates,
        backend=keras.backend.backend(),
        hardware=hardware(),
        results=results,
    )


def report(record, output):
    lines = [
        "# PGD on the bundled CIFAR-10 presets (benchmarks/robustness.py)",
        "",
        f"{record['examples']} CIFAR-10 test images, {record['updates']} PGD updates, backend "
        f"{record['backend']}, {record['hardware']}. Epsilon in pixel levels of 255 (x 2/255 in the "
        "[-1, 1] input space); accuracy and loss before -> after; IoU of each MoE block's selected "
        "experts before and after the attack (Soft MoE: each token's main expert). vmoe counts a token "
        "with no expert (dropped by every choice) as IoU 0, so without any attack the IoU is the share "
        "of tokens kept: "
        + "; ".join(
            f"{r['preset']} "
            + ", ".join(f"block {b}: {v:.3f}" for b, v in r["unattacked_expert_iou"].items())
            for r in record["results"]
            if r["unattacked_expert_iou"]
        )
        + ".",
        "",
        "| preset | GFLOPs / image | epsilon (levels) | top-1 | loss | predictions changed | expert IoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in record["results"]:
        for row in result["rows"]:
            iou = ", ".join(f"block {b}: {v:.3f}" for b, v in row["expert_iou"].items()) or "-"
            cells = [
                result["preset"],
                f"{result['flops_per_image'] / 1e9:.3f}",
                f"{row['pixel_levels']:g}",
                f"{row['clean_accuracy']:.4f} -> {row['adversarial_accuracy']:.4f}",
                f"{row['clean_loss']:.3f} -> {row['adversarial_loss']:.3f}",
                f"{row['prediction_changes']:.3f}",
                iou,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    from keras_vmoe.visualization.line_chart import draw_line_chart

    series = {
        r["preset"]: [(0.0, r["rows"][0]["clean_accuracy"])]
        + [(row["pixel_levels"], row["adversarial_accuracy"]) for row in r["rows"]]
        for r in record["results"]
    }
    title = f"PGD ({record['updates']} updates) on {record['examples']} CIFAR-10 test images"
    chart = draw_line_chart(series, "epsilon (pixel levels of 255)", "top-1 accuracy", title)
    chart.save(output.with_suffix(".png"))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cifar10",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", "../shared")) / "data" / "cifar10_jpeg.npz",
    )
    parser.add_argument("--examples", type=int, default=1000, help="test images (default: 1000)")
    parser.add_argument("--updates", type=int, default=10, help="PGD steps (vmoe's configs: 40)")
    parser.add_argument("--levels", type=float, nargs="+", default=LEVELS, help="radii in pixel levels")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="16 images, 2 radii, 2 updates: a smoke run")
    parser.add_argument("--verbose", action="store_true", help="progress bars")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="OUTPUT path without suffix")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.levels, args.updates = 16, (0.5, 2.0), 2
    report(run(args), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
