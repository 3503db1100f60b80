"""The router study in miniature: every router of "Routers in Vision Mixture of Experts" on CIFAR-10.

Run from the repository root:

    python benchmarks/router_study.py                  # the CPU budget: one seed, ~2 hours on 2 cores
    python benchmarks/router_study.py --seeds 2        # two seeds and their spread (~4 hours)
    python benchmarks/router_study.py --full           # the presets' recipe: 100 epochs, on an accelerator
    python benchmarks/router_study.py --quick          # a smoke test (seconds per arm)
    python benchmarks/router_study.py --report FILE.json   # table and chart again from a result
    python benchmarks/router_study.py --time-only FILE.json  # (re)measure step times into a record

What it trains
    A dense ViT and one V-MoE per router, all of the same encoder and the
    same per-token compute: every token passes through one expert MLP as wide
    as the dense one (token choice with K = 1 and capacity factor 1; expert
    choice with capacity factor 1, i.e. C = tokens / E; Soft MoE with as many
    slots as tokens), MoE layers in the last two odd blocks (V-MoE's
    "Last-2"), 8 experts, each image routed on its own. Routers: softmax token
    choice (V-MoE, with BPR), softmax expert choice, Soft MoE, Sinkhorn token
    choice (with BPR), Sinkhorn expert choice, sparsity-constrained expert
    choice (k-sparse), and sparse top-k token choice (with BPR): the six of the
    study plus the sparse top-k. Every arm uses the bundled presets' recipe
    (`keras_vmoe.recipes.cifar10`: DeiT-style augmentation, AdamW, warmup and
    cosine decay, label smoothing) from the same seed.

    The CPU budget (default) shrinks the encoder (4 blocks of width 128, MoE in
    blocks 1 and 3), the data (a random 10,000 of the training images) and
    the epochs (8); `--full` trains the presets' encoder (6 blocks of width
    192, MoE in blocks 3 and 5) on all 50,000 images for 100 epochs.

What it reports, per router
    Test top-1 on the 10,000 CIFAR-10 test images, for each seed, with the
    mean and the spread (min to max); the fraction of tokens no expert
    processed (eval mode, 1,000 test images); the training-step time relative
    to the dense ViT, measured after training with all models in the same
    process, round-robin (so a slow phase of the machine hits them all); a
    table on stdout, a JSON record and a bar chart. `--time-only` measures the
    step times alone on freshly built models of the record's budget (a step
    costs the same whatever the weights) and adds them to the record, for a
    run that was stopped before its timing or ran on a busy machine.
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

# name -> (family, backbone arguments beyond the encoder)
ROUTERS = {
    "dense": ("vmoe", dict(moe_layers=())),
    "token_choice": ("vmoe", dict(router="token_choice", num_selected_experts=1, batch_priority=True)),
    "expert_choice": ("vmoe", dict(router="expert_choice")),
    "soft_moe": ("soft_moe", dict()),
    "sinkhorn_token_choice": (
        "vmoe",
        dict(router="sinkhorn_token_choice", num_selected_experts=1, batch_priority=True),
    ),
    "sinkhorn_expert_choice": ("vmoe", dict(router="sinkhorn_expert_choice")),
    "sparse_expert_choice": ("vmoe", dict(router="sparse_expert_choice")),
    "sparse_top_k": ("vmoe", dict(router="sparse_top_k", num_selected_experts=1, batch_priority=True)),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    encoder: dict
    moe_layers: tuple
    epochs: int
    train_images: int | None
    batch_size: int
    warmup_epochs: int
    seeds: int
    timing_rounds: int


CPU = Budget(
    encoder=dict(
        image_shape=(32, 32, 3),
        patch_size=4,
        num_layers=4,
        hidden_dim=128,
        mlp_dim=512,
        num_heads=4,
        pooling="gap",
        attention_qk_norm=False,
        dropout_rate=0.0,
    ),
    moe_layers=(1, 3),
    epochs=8,
    train_images=10000,
    batch_size=128,
    warmup_epochs=1,
    seeds=1,
    timing_rounds=10,
)
FULL = Budget(
    encoder=None,
    moe_layers=(3, 5),
    epochs=100,
    train_images=None,
    batch_size=256,
    warmup_epochs=5,
    seeds=3,
    timing_rounds=20,
)
QUICK = dataclasses.replace(
    CPU,
    encoder=dict(CPU.encoder, num_layers=2, hidden_dim=32, mlp_dim=64, num_heads=2),
    moe_layers=(1,),
    epochs=1,
    train_images=512,
    batch_size=64,
    warmup_epochs=0,
    seeds=1,
    timing_rounds=2,
)


def recipe_for(router, budget, seed):
    from keras_vmoe.recipes.cifar10 import TINY_ENCODER
    from keras_vmoe.recipes.cifar10 import Cifar10Recipe

    family, options = ROUTERS[router]
    backbone = dict(budget.encoder or TINY_ENCODER)
    if router != "dense":
        backbone.update(moe_layers=budget.moe_layers, num_experts=8, group_size=None)
        if family == "soft_moe":
            tokens = (backbone["image_shape"][0] // backbone["patch_size"]) ** 2
            backbone["slots_per_expert"] = tokens // 8  # As many slots as tokens.
        else:
            backbone["capacity_factor"] = 1.0
    backbone.update(options)
    return Cifar10Recipe(
        name=router,
        description=f"router study: {router}",
        family=family,
        backbone=backbone,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        warmup_epochs=budget.warmup_epochs,
        seed=seed,
    )


def dropped_fraction(classifier, pixels):
    """Fraction of the MoE blocks' tokens no expert processed (eval mode)."""
    import numpy as np

    from keras_vmoe.models.routing_inspection import expert_assignments

    assignments = expert_assignments(classifier.backbone, pixels)
    if not assignments:
        return 0.0
    return float(np.mean([np.mean(a < 0) for a in assignments.values()]))


def step_times(classifiers, pixels, targets, rounds):
    """Median seconds of one training step per model, timed round-robin."""
    import keras

    times = {name: [] for name in classifiers}
    for classifier in classifiers.values():  # Compiled already by fit; warm up.
        keras.Model.train_on_batch(classifier, pixels, targets)
    for round_index in range(rounds):
        names = list(classifiers) if round_index % 2 == 0 else list(classifiers)[::-1]
        for name in names:
            start = time.perf_counter()
            keras.Model.train_on_batch(classifiers[name], pixels, targets)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(args, budget):
    import keras
    import numpy as np

    from keras_vmoe.data import load_cifar10
    from keras_vmoe.models import count_flops
    from keras_vmoe.recipes.cifar10 import fit_recipe
    from keras_vmoe.recipes.cifar10 import hardware
    from keras_vmoe.recipes.cifar10 import to_model_inputs
    from keras_vmoe.recipes.cifar10 import top1_accuracy

    images, labels = load_cifar10(args.cifar10, "train")
    order = np.random.default_rng(0).permutation(len(images))[: budget.train_images]
    images, labels = images[order], labels[order]  # The archive is sorted by class.
    test_images, test_labels = load_cifar10(args.cifar10, "test", limit=args.test_images)
    probe = to_model_inputs(test_images[:1000])
    results = {
        "budget": dataclasses.asdict(budget),
        "hardware": hardware(),
        "backend": keras.backend.backend(),
        "train_images": len(images),
        "test_images": len(test_images),
        "arms": {},
    }
    last_models = {}
    for seed in range(budget.seeds):
        for router in args.routers:
            recipe = recipe_for(router, budget, seed)
            keras.utils.set_random_seed(seed)
            classifier = recipe.build_classifier(preprocessor=False)
            start = time.perf_counter()
            fit_recipe(classifier, recipe, images, labels, np.random.default_rng(seed), verbose=0)
            seconds = time.perf_counter() - start
            top1 = top1_accuracy(classifier, test_images, test_labels)
            arm = results["arms"].setdefault(
                router,
                {
                    "parameters": classifier.count_params(),
                    "flops_per_image": count_flops(classifier)["total"],
                    "backbone": recipe.backbone,
                    "runs": [],
                },
            )
            arm["runs"].append(
                {
                    "seed": seed,
                    "test_top1": top1,
                    "training_time_s": seconds,
                    "dropped_tokens": dropped_fraction(classifier, probe),
                }
            )
            print(
                f"seed {seed} {router:>24}: test top-1 {top1:.4f}, {seconds:.0f} s, "
                f"dropped {arm['runs'][-1]['dropped_tokens']:.3f}",
                flush=True,
            )
            last_models[router] = classifier
            _write(results, args.output)
    add_step_times(results, last_models, images, labels, budget)
    return results


def add_step_times(results, classifiers, images, labels, budget):
    """Measures every arm's training step round-robin and stores it in `results`."""
    import numpy as np

    from keras_vmoe.recipes.cifar10 import to_model_inputs

    batch = to_model_inputs(images[: budget.batch_size])
    targets = np.eye(10, dtype="float32")[labels[: budget.batch_size]]
    times = step_times(classifiers, batch, targets, budget.timing_rounds)
    for router, seconds in times.items():
        results["arms"][router]["step_time_s"] = seconds
        results["arms"][router]["step_time_vs_dense"] = seconds / times.get("dense", seconds)


def time_only(results, budget, cifar10):
    """Step times of freshly built, compiled models of every arm in `results`."""
    import keras

    from keras_vmoe.data import load_cifar10
    from keras_vmoe.recipes.cifar10 import compile_classifier

    images, labels = load_cifar10(cifar10, "train", limit=budget.batch_size)
    classifiers = {}
    for router in results["arms"]:
        recipe = recipe_for(router, budget, seed=0)
        keras.utils.set_random_seed(0)
        classifiers[router] = recipe.build_classifier(preprocessor=False)
        compile_classifier(classifiers[router], recipe, steps_per_epoch=100)
    add_step_times(results, classifiers, images, labels, budget)
    results["step_times_measured"] = "separately (--time-only), on freshly built models"


def _write(results, output):
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")


def summarise(results):
    """Markdown table: per router, mean top-1 with spread, dropped tokens, step time."""
    lines = [
        "| router | test top-1 (mean) | runs (min to max) | dropped tokens | step time vs dense |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for router, arm in results["arms"].items():
        top1 = [run["test_top1"] for run in arm["runs"]]
        dropped = statistics.mean(run["dropped_tokens"] for run in arm["runs"])
        ratio = arm.get("step_time_vs_dense")
        spread = f"{min(top1):.4f} to {max(top1):.4f}" if len(top1) > 1 else "one run"
        rows.append(
            (
                statistics.mean(top1),
                f"| {router} | {statistics.mean(top1):.4f} | {spread} | "
                f"{dropped:.3f} | {'-' if ratio is None else f'{ratio:.2f}x'} |",
            )
        )
    lines += [row for _, row in sorted(rows, reverse=True)]
    budget = results["budget"]
    return "\n".join(
        [
            f"Router study: {results['train_images']:,} training images, {budget['epochs']} epochs, "
            f"{max(len(arm['runs']) for arm in results['arms'].values())} seed(s), "
            f"{results['test_images']:,} test images; {results['backend']} on "
            f"{results['hardware']}.",
            "",
            *lines,
        ]
    )


def draw_chart(results, path):
    """Bars of mean test top-1 per router with each run's value (Pillow only)."""
    from PIL import Image
    from PIL import ImageDraw

    from keras_vmoe.visualization.routing_map import PALETTE
    from keras_vmoe.visualization.routing_map import load_font

    arms = sorted(
        results["arms"].items(),
        key=lambda item: -statistics.mean(run["test_top1"] for run in item[1]["runs"]),
    )
    values = [[run["test_top1"] for run in arm["runs"]] for _, arm in arms]
    low = min(min(v) for v in values) - 0.02
    high = max(max(v) for v in values) + 0.01
    width, height, left, bottom, top = 760, 450, 60, 180, 40
    # The dense baseline in grey; the routers in the palette's other colours.
    colours = iter(c for c in PALETTE if len(set(c)) > 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = load_font(13)
    plot_height = height - top - bottom
    bar = (width - left - 20) / len(arms)

    def y_of(value):
        return height - bottom - plot_height * (value - low) / (high - low)

    draw.text((left, 10), "CIFAR-10 test top-1 per router (bars: mean; dots: seeds)", fill="black", font=font)
    draw.line((left, top, left, height - bottom), fill="black")
    draw.line((left, height - bottom, width - 20, height - bottom), fill="black")
    for k in range(5):
        value = low + (high - low) * k / 4
        draw.text((6, y_of(value) - 7), f"{value:.3f}", fill="black", font=font)
    for i, ((name, _), runs) in enumerate(zip(arms, values)):
        x0 = left + i * bar + 8
        colour = (150, 150, 150) if name == "dense" else next(colours)
        draw.rectangle((x0, y_of(statistics.mean(runs)), x0 + bar - 16, height - bottom), fill=colour)
        for value in runs:
            cx = x0 + (bar - 16) / 2
            draw.ellipse((cx - 3, y_of(value) - 3, cx + 3, y_of(value) + 3), fill="black")
        # Right-aligned and turned 60 degrees: each name ends under its bar.
        label = Image.new("RGBA", (200, 16), (255, 255, 255, 0))
        text_width = ImageDraw.Draw(label).textlength(name, font=font)
        ImageDraw.Draw(label).text((200 - text_width, 0), name, fill="black", font=font)
        label = label.rotate(60, expand=True)
        centre = x0 + (bar - 16) / 2
        canvas.paste(label, (int(centre - label.width + 10), height - bottom + 4), label)
    canvas.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar10", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"))
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    parser.add_argument("--full", action="store_true", help="the presets' recipe: 100 epochs, 50,000 images")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke test")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per router (default: the budget's)")
    parser.add_argument("--test-images", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=None,
        help="JSON record (default: benchmarks/results/router_study-<budget>.json)",
    )
    parser.add_argument("--report", type=pathlib.Path, help="only print and draw an existing record")
    parser.add_argument("--time-only", type=pathlib.Path, help="measure step times into an existing record")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL if args.full else CPU
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    name = "quick" if args.quick else "full" if args.full else "cpu2"
    args.output = args.output or RESULTS / f"router_study-{name}.json"
    if args.report or args.time_only:
        args.output = args.report or args.time_only
        results = json.loads(args.output.read_text())
        if args.time_only:
            budget = Budget(**{**results["budget"], "moe_layers": tuple(results["budget"]["moe_layers"])})
            time_only(results, budget, args.cifar10)
            _write(results, args.output)
    else:
        if "dense" not in args.routers:
            args.routers = ["dense", *args.routers]
        results = run(args, budget)
        _write(results, args.output)
    table = summarise(results)
    print("\n" + table)
    args.output.with_suffix(".md").write_text(table + "\n")
    draw_chart(results, args.output.with_suffix(".png"))
    print(f"\nwrote {args.output}, {args.output.with_suffix('.md')} and {args.output.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
