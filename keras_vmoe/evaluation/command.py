"""`keras-vmoe evaluate`: the papers' evaluations of presets on a data set.

    keras-vmoe evaluate --preset NAME [--preset NAME ...]
        (--cifar10 ARCHIVE | --fashion-mnist DIR | --folder DIR)
        [--attack pgd --epsilon 1/255,2/255 --updates 10]
        [--fewshot 1,5,10,25 --draws 3] [--rank-presets --knn-k 1] [--ensemble]
        [--examples N] [--train-examples N] [--output DIR]

- `--attack pgd`: PGD on the test images (`evaluate_robustness`); epsilons
  are in the models' input space (the presets' [-1, 1]: 2/255 there is one
  pixel level of 255) and may be written as fractions. Needs data labelled
  with the presets' classes.
- `--fewshot`: k-shot linear accuracy on frozen pre-logit features
  (`fewshot_accuracy`), shots drawn from the training split.
- `--rank-presets`: the presets ranked by kNN accuracy of their features
  (training split as neighbours, test images as queries).
- `--ensemble`: a greedy ensemble of the presets chosen on the first half of
  the test images (validation), reported on the second half.

A table per evaluation on stdout; `evaluation.json` and the plots
(`robustness.png`: accuracy against epsilon; `fewshot.png`: accuracy against
shots) in `--output`, written only once everything ran. A folder data set
holds one subfolder per class; with `train/` and `test/` inside it those are
the splits, otherwise each class is split in half (seeded).
"""

import json
import pathlib

import numpy as np

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.data.cifar10 import load_cifar10
from keras_vmoe.data.fashion_mnist import FASHION_MNIST_CLASS_NAMES
from keras_vmoe.data.fashion_mnist import FASHION_MNIST_DIR
from keras_vmoe.data.fashion_mnist import load_fashion_mnist
from keras_vmoe.data.images import ImageReadError
from keras_vmoe.data.images import load_image_folder
from keras_vmoe.errors import CommandError
from keras_vmoe.evaluation.adversarial import evaluate_robustness
from keras_vmoe.evaluation.fewshot import fewshot_accuracy
from keras_vmoe.evaluation.inputs import check_classifier
from keras_vmoe.evaluation.inputs import class_probabilities
from keras_vmoe.evaluation.inputs import feature_extractor
from keras_vmoe.evaluation.inputs import pre_logits
from keras_vmoe.evaluation.model_selection import greedy_ensemble
from keras_vmoe.evaluation.model_selection import mean_cross_entropy
from keras_vmoe.evaluation.model_selection import rank_by_knn
from keras_vmoe.staging import staged_folder
from keras_vmoe.visualization.line_chart import draw_line_chart


def parse_number(text):
    """A float, or a fraction such as `2/255`."""
    numerator, _, denominator = text.strip().partition("/")
    value = float(numerator) / float(denominator) if denominator else float(numerator)
    if not np.isfinite(value):
        raise ValueError(text)
    return value


def parse_list(text, parse, what):
    try:
        values = [parse(part) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise CommandError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise CommandError(f"{what}: no value in {text!r}")
    return values


def add_parser(commands, positive_int):
    parser = commands.add_parser(
        "evaluate",
        help="robustness to PGD, few-shot transfer, preset ranking and ensembles",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--preset", action="append", required=True, metavar="NAME", help="repeat for several")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--cifar10", metavar="ARCHIVE", help="cifar10_jpeg.npz")
    data.add_argument(
        "--fashion-mnist",
        metavar="DIR",
        nargs="?",
        const=str(FASHION_MNIST_DIR),
        help="the idx files' folder",
    )
    data.add_argument("--folder", metavar="DIR", help="one subfolder of images per class")
    parser.add_argument("--attack", choices=("pgd",), help="attack the test images with PGD")
    parser.add_argument("--epsilon", default="1/255,2/255,4/255", help="PGD radii, input-space units")
    parser.add_argument("--updates", type=positive_int, default=10, help="PGD steps (default: 10)")
    parser.add_argument("--fewshot", metavar="K,K,...", help="few-shot linear accuracy at these shots")
    parser.add_argument("--draws", type=positive_int, default=3, help="few-shot draws per k (default: 3)")
    parser.add_argument("--rank-presets", action="store_true", help="rank the presets by kNN accuracy")
    parser.add_argument(
        "--knn-k", type=positive_int, default=1, help="neighbours of the kNN proxy (default: 1)"
    )
    parser.add_argument("--ensemble", action="store_true", help="greedy ensemble of the presets")
    parser.add_argument("--examples", type=positive_int, default=500, help="test images (default: 500)")
    parser.add_argument(
        "--train-examples",
        type=positive_int,
        default=2500,
        help="training images to draw shots from (default: 2500)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--output", default="evaluation_output", metavar="DIR", help="JSON record and plots")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output")
    return parser


def split_per_class(labels, seed=0):
    """(train, test) indices: each class's examples shuffled and halved."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == c))
        train.append(indices[: len(indices) // 2])
        test.append(indices[len(indices) // 2 :])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_data(args, image_size, need_train):
    """{"name", "class_names", "test": (images, labels), "train": ... or None}."""
    try:
        if args.cifar10:
            load = lambda split, limit: load_cifar10(args.cifar10, split, limit=limit)  # noqa: E731
            name, class_names = "CIFAR-10", list(CIFAR10_CLASS_NAMES)
        elif args.fashion_mnist:
            load = lambda split, limit: load_fashion_mnist(args.fashion_mnist, split, limit=limit)  # noqa: E731
            name, class_names = "Fashion-MNIST", list(FASHION_MNIST_CLASS_NAMES)
        else:
            folder = pathlib.Path(args.folder)
            if (folder / "train").is_dir() and (folder / "test").is_dir():
                train = load_image_folder(folder / "train", image_size)
                test = load_image_folder(folder / "test", image_size)
                if train[2] != test[2]:
                    raise CommandError(
                        f"{folder}: train/ and test/ hold different classes: {train[2]} and {test[2]}"
                    )
                splits = {"train": train[:2], "test": test[:2]}
                class_names = test[2]
            else:
                images, labels, class_names = load_image_folder(folder, image_size)
                train, test = split_per_class(labels)
                splits = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
            name = str(folder)

            def load(split, limit):
                images, labels = splits[split]
                if limit is not None and limit < len(images):
                    chosen = np.sort(np.random.default_rng(0).choice(len(images), limit, replace=False))
                    images, labels = images[chosen], labels[chosen]
                return images, labels

        test = load("test", args.examples)
        train = load("train", args.train_examples) if need_train else None
    except (ImageReadError, FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    return dict(name=name, class_names=class_names, test=test, train=train)


def check_classes(classifiers, data, what):
    for preset, classifier in classifiers.items():
        if classifier.num_classes != len(data["class_names"]):
            raise CommandError(
                f"{what} needs data labelled with the preset's classes: {preset} has "
                f"{classifier.num_classes} classes, {data['name']} has {len(data['class_names'])}"
            )


def attack(classifiers, data, args, epsilons):
    images, labels = data["test"]
    results = {}
    for preset, classifier in classifiers.items():
        results[preset] = []
        for epsilon in epsilons:
            print(f"PGD on {preset}, epsilon {epsilon:.5g}, {args.updates} updates, {len(images)} images")
            result = evaluate_robustness(
                classifier, images, labels, epsilon, args.updates, args.batch_size, verbose=True
            )
            results[preset].append(result.as_dict())
    print(f"\nPGD ({args.updates} updates) on {len(images)} {data['name']} test images")
    print(
        f"{'preset':<24} {'epsilon':>9} {'accuracy':>9} {'loss':>8} {'changed':>8}  expert IoU per MoE block"
    )
    for preset, rows in results.items():
        clean = rows[0]
        print(f"{preset:<24} {0:>9.5f} {clean['clean_accuracy']:>9.4f} {clean['clean_loss']:>8.4f} {'':>8}")
        for row in rows:
            iou = ", ".join(f"{block}: {value:.3f}" for block, value in row["expert_iou"].items()) or "-"
            print(
                f"{'':<24} {row['epsilon']:>9.5f} {row['adversarial_accuracy']:>9.4f} "
                f"{row['adversarial_loss']:>8.4f} {row['prediction_changes']:>8.3f}  {iou}"
            )
    return results


def features(classifiers, data, args):
    """{preset: (train features, test features)}."""
    result = {}
    for preset, classifier in classifiers.items():
        print(f"features of {preset}")
        result[preset] = tuple(
            pre_logits(classifier, data[split][0], args.batch_size, verbose=True)
            for split in ("train", "test")
        )
    return result


def fewshot(features_by_preset, data, args, shots):
    results = {}
    for preset, (train, test) in features_by_preset.items():
        try:
            result = fewshot_accuracy(train, data["train"][1], test, data["test"][1], shots, args.draws)
        except ValueError as error:
            raise CommandError(f"few-shot on {data['name']}: {error}") from error
        results[preset] = {str(k): value for k, value in result.items()}
    print(f"\nFew-shot linear accuracy on {data['name']} ({args.draws} draws, mean ± std)")
    print(f"{'preset':<24} " + " ".join(f"{f'{k}-shot':>15}" for k in shots))
    for preset, result in results.items():
        cells = " ".join(f"{result[str(k)]['accuracy']:>8.4f} ± {result[str(k)]['std']:.3f}" for k in shots)
        print(f"{preset:<24} {cells}")
    return results


def rank(features_by_preset, data, args):
    try:
        ranking = rank_by_knn(features_by_preset, data["train"][1], data["test"][1], args.knn_k)
    except ValueError as error:
        raise CommandError(f"kNN ranking: {error}") from error
    print(f"\nPresets ranked by {args.knn_k}-NN accuracy on {data['name']}")
    for place, (preset, accuracy) in enumerate(ranking, 1):
        print(f"{place:>3}. {preset:<24} {accuracy:.4f}")
    return [dict(preset=preset, knn_accuracy=accuracy) for preset, accuracy in ranking]


def ensemble(classifiers, data, args):
    images, labels = data["test"]
    order = np.random.default_rng(0).permutation(len(images))
    validation, test = order[: len(order) // 2], order[len(order) // 2 :]
    probabilities = {
        preset: class_probabilities(c, images, args.batch_size) for preset, c in classifiers.items()
    }
    chosen = greedy_ensemble({p: q[validation] for p, q in probabilities.items()}, labels[validation])
    mixed = chosen.predict({p: q[test] for p, q in probabilities.items()})
    rows = {preset: q[test] for preset, q in probabilities.items()} | {"ensemble": mixed}
    report = {
        name: dict(
            accuracy=float(np.mean(q.argmax(1) == labels[test])),
            cross_entropy=mean_cross_entropy(q, labels[test]),
        )
        for name, q in rows.items()
    }
    print(f"\nGreedy ensemble chosen on {len(validation)} validation images: {chosen.weights()}")
    print(
        f"validation cross-entropy as members join: {', '.join(f'{ce:.4f}' for ce in chosen.cross_entropies)}"
    )
    print(f"{'on ' + str(len(test)) + ' test images':<24} {'accuracy':>9} {'cross-entropy':>14}")
    for name, row in report.items():
        print(f"{name:<24} {row['accuracy']:>9.4f} {row['cross_entropy']:>14.4f}")
    return dict(members=chosen.members, validation_cross_entropies=chosen.cross_entropies, test=report)


def write_outputs(output, record):
    """The JSON record and plots, into a temporary folder moved into place at the end."""
    with staged_folder(output) as staging:
        (staging / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
        if "attack" in record:
            series = {p: [(0.0, rows[0]["clean_accuracy"])] for p, rows in record["attack"].items()}
            for preset, rows in record["attack"].items():
                series[preset] += [(row["epsilon"], row["adversarial_accuracy"]) for row in rows]
            title = f"PGD ({record['arguments']['updates']} updates) on {record['data']}"
            draw_line_chart(series, "epsilon (input space)", "top-1 accuracy", title).save(
                staging / "robustness.png"
            )
        if "fewshot" in record:
            series = {
                p: [(int(k), row["accuracy"]) for k, row in result.items()]
                for p, result in record["fewshot"].items()
            }
            title = f"Few-shot linear accuracy on {record['data']}"
            draw_line_chart(series, "shots per class", "accuracy", title, x_log=True).save(
                staging / "fewshot.png"
            )


def run(args, load_classifier):
    """The command; `load_classifier(preset)` is the CLI's loader."""
    epsilons = parse_list(args.epsilon, parse_number, "--epsilon") if args.attack else []
    if any(epsilon < 0 for epsilon in epsilons):
        raise CommandError(f"--epsilon: radii must be >= 0, got {args.epsilon!r}")
    shots = parse_list(args.fewshot, int, "--fewshot") if args.fewshot else []
    if any(k < 1 for k in shots):
        raise CommandError(f"--fewshot: shots must be >= 1, got {args.fewshot!r}")
    if not (args.attack or shots or args.rank_presets or args.ensemble):
        raise CommandError(
            "nothing to evaluate: give --attack pgd, --fewshot K,..., --rank-presets or --ensemble"
        )
    output = pathlib.Path(args.output)
    if output.exists() and not args.overwrite:
        raise CommandError(f"{output} exists; pass --overwrite to replace it")
    classifiers = {}
    for preset in dict.fromkeys(args.preset):
        classifier = load_classifier(preset)
        try:
            check_classifier(classifier, "keras-vmoe evaluate")
        except ValueError as error:
            raise CommandError(f"{preset}: {error}") from error
        if shots or args.rank_presets:
            try:
                feature_extractor(classifier)
            except ValueError as error:
                raise CommandError(f"{preset}: {error}") from error
        classifiers[preset] = classifier
    image_size = max(tuple(c.preprocessor.image_converter.image_size) for c in classifiers.values())
    data = load_data(args, image_size, need_train=bool(shots or args.rank_presets))
    if args.attack:
        check_classes(classifiers, data, "--attack")
    if args.ensemble:
        check_classes(classifiers, data, "--ensemble")
    record = dict(presets=list(classifiers), data=data["name"], arguments=vars(args) | {"run": None})
    record["arguments"].pop("run")
    if args.attack:
        record["attack"] = attack(classifiers, data, args, epsilons)
    if shots or args.rank_presets:
        features_by_preset = features(classifiers, data, args)
        if shots:
            record["fewshot"] = fewshot(features_by_preset, data, args, shots)
        if args.rank_presets:
            record["knn_ranking"] = rank(features_by_preset, data, args)
    if args.ensemble:
        record["ensemble"] = ensemble(classifiers, data, args)
    write_outputs(output, record)
    print(f"\nRecord and plots written to {output}")
