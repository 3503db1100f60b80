"""The `keras-vmoe` command, run in-process through `keras_vmoe.cli.main`.

Each bundled preset is loaded once per module (the command itself loads it
on every call); one test runs the installed console script in a subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_vmoe import cli
from keras_vmoe import presets
from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.visualization.routing_map import draw_routing_map
from tests.helpers import CIFAR10
from tests.helpers import backend
from tests.helpers import f32_atol
from tests.helpers import requires_cifar10
from tests.helpers import to_numpy

ERROR_PREFIX = "keras-vmoe: error:"
BUNDLED = ("vmoe_tiny_cifar10", "soft_moe_tiny_cifar10", "vit_tiny_cifar10", "limoe_tiny_cifar10")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two CC0 photographs from scikit-image, saved as PNG files of different sizes."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "rocket"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def classifiers():
    """{preset: classifier}, filled as tests ask for presets."""
    return {}


@pytest.fixture(autouse=True)
def load_each_preset_once(classifiers, monkeypatch):
    load = cli.load_classifier

    def cached(preset):
        if preset not in classifiers:
            classifiers[preset] = load(preset)  # Errors propagate, uncached.
        return classifiers[preset]

    monkeypatch.setattr(cli, "load_classifier", cached)


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(status, err, needles):
    """Status 1 and one `keras-vmoe: error:` line holding every needle, no traceback."""
    assert status == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ERROR_PREFIX} "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def predictions(out):
    """{image path: [(class name, probability), ...]} from classify's output."""
    table, path = {}, None
    for line in out.splitlines():
        if line.startswith("Routing map written to"):
            continue
        if not line.startswith(" "):
            path = line
            table[path] = []
        else:
            name, probability = line.rsplit(maxsplit=1)
            table[path].append((name.strip(), float(probability)))
    return table


def reference_probabilities(classifier, paths):
    size = tuple(classifier.preprocessor.image_converter.image_size)
    images = np.stack([cli.load_photo(path, size)[0] for path in paths])
    logits = to_numpy(classifier.predict(images, verbose=0)).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_classify_prints_the_top_5_classes_of_each_image(capsys, photos, classifiers):
    status, out, err = run(capsys, "classify", *photos)
    assert status == 0 and ERROR_PREFIX not in err
    table = predictions(out)
    assert list(table) == photos
    expected = reference_probabilities(classifiers[cli.DEFAULT_PRESET], photos)
    for path, reference in zip(photos, expected):
        rows = table[path]
        assert len(rows) == 5
        names = [name for name, _ in rows]
        assert set(names) <= set(CIFAR10_CLASS_NAMES) and len(set(names)) == 5
        probabilities = [p for _, p in rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 5 * 0.0005  # Printed to 3 decimals.
        # The model's own top 5 of the same photo.
        order = np.argsort(-reference)[:5]
        assert names == [CIFAR10_CLASS_NAMES[i] for i in order]
        np.testing.assert_allclose(probabilities, reference[order], atol=0.0015)


def test_top_k_and_more_than_the_classes(capsys, photos):
    status, out, _ = run(capsys, "classify", "--top", "2", *photos)
    assert status == 0
    assert [len(rows) for rows in predictions(out).values()] == [2, 2]
    status, out, _ = run(capsys, "classify", "--top", "20", photos[0])
    assert status == 0
    (rows,) = predictions(out).values()
    assert sorted(name for name, _ in rows) == sorted(CIFAR10_CLASS_NAMES)  # All 10, once each.
    assert abs(sum(p for _, p in rows) - 1.0) <= 10 * 0.0005


def reference_size(title):
    """The size of a routing map of 2 images and 2 MoE blocks (3 panels) of 8 experts
    on a preset's 8x8 patch grid."""
    blank = [np.zeros((32, 32, 3), "uint8")] * 2
    assignment = np.zeros((2, 64), int)
    picture = draw_routing_map(
        blank,
        {"MoE block 3": assignment, "MoE block 5": assignment},
        (8, 8),
        num_experts=8,
        captions=["cat 50%", "dog 50%"],
        title=title,
    )
    return picture.size


@pytest.mark.parametrize("preset", ["vmoe_tiny_cifar10", "soft_moe_tiny_cifar10"])
def test_routing_map_png(capsys, photos, tmp_path, preset):
    path = tmp_path / "maps" / "routing.png"  # The folder is made too.
    status, out, err = run(capsys, "classify", "--preset", preset, "--routing-map", path, *photos)
    assert status == 0 and ERROR_PREFIX not in err
    assert out.splitlines()[-1] == f"Routing map written to {path}"
    assert list(predictions(out)) == photos
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.size == reference_size("a title")
        pixels = np.asarray(picture)
    # Not a blank canvas: the photos and their tinted copies are on it.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000


def test_presets_lists_every_builtin_preset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_VMOE_HOME", str(tmp_path))  # No converted checkpoint cached.
    status, out, err = run(capsys, "presets")
    assert status == 0 and err == ""
    blocks = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            name = line
            blocks[name] = []
        else:
            blocks[name].append(line)
    assert sorted(blocks) == sorted(presets.list_presets())
    for name, lines in blocks.items():
        text = "\n".join(lines)
        assert presets.list_presets()[name].split()[0] in text  # Its description.
        if name in BUNDLED:
            assert "loads offline" in text and "params unknown" not in text
            kind = "zero-shot top-1" if name == "limoe_tiny_cifar10" else "CIFAR-10 test top-1"
            assert kind in text
        else:
            assert "needs a download (or a local mirror)" in text
    assert set(BUNDLED) <= set(blocks)
    # Bundled presets come first.
    assert set(list(blocks)[: len(BUNDLED)]) == set(BUNDLED)


def png_header(path, width, height):
    """A PNG file that declares width x height RGB pixels and holds one tiny,
    undecodable data chunk: what Pillow reads at open, without the gigabytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def truncated_copy(source, path, fraction=0.5):
    data = pathlib.Path(source).read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.fixture
def bad_inputs(tmp_path, photos):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    huge = png_header(tmp_path / "huge.png", 20000, 20000)
    truncated_png = truncated_copy(photos[0], tmp_path / "half.png")
    jpeg = tmp_path / "photo.jpg"
    Image.open(photos[1]).save(jpeg, quality=90)
    truncated_jpeg = truncated_copy(jpeg, tmp_path / "half.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    not_a_preset = tmp_path / "empty_preset"
    not_a_preset.mkdir()
    missing = tmp_path / "missing.png"
    return {
        "missing image": (["classify", photos[0], missing], ["image not found", str(missing)]),
        "text file": (["classify", text], ["cannot read", str(text), "as an image"]),
        "directory": (["classify", tmp_path], ["not a file", str(tmp_path)]),
        "unknown preset": (
            ["classify", "--preset", "vmoe_nope", photos[0]],
            ["Unknown preset 'vmoe_nope'", "vmoe_tiny_cifar10", "soft_moe_tiny_cifar10"],
        ),
        "folder that is not a preset": (
            ["classify", "--preset", not_a_preset, photos[0]],
            ["cannot load the preset", str(not_a_preset), "config.json"],
        ),
        "dense preset routing map": (
            ["classify", "--preset", "vit_tiny_cifar10", "--routing-map", tmp_path / "m.png", photos[0]],
            ["'vit_tiny_cifar10' has no MoE layers", "vmoe_tiny_cifar10"],
        ),
        "routing map not a png": (
            ["classify", "--routing-map", tmp_path / "m.jpg", photos[0]],
            ["--routing-map must name a .png file", "m.jpg"],
        ),
        "image over the pixel limit": (
            ["classify", photos[0], huge],
            [
                str(huge),
                "20000x20000 = 400,000,000 pixels",
                "over the limit of 89,478,485 pixels",
                "--max-pixels 400000000",
            ],
        ),
        "image over a lower limit": (
            ["classify", "--max-pixels", "1000", photos[0]],
            [photos[0], "over the limit of 1,000 pixels"],
        ),
        "truncated png": (["classify", truncated_png], ["cannot read", str(truncated_png), "truncated"]),
        "truncated jpeg": (["classify", truncated_jpeg], ["cannot read", str(truncated_jpeg), "truncated"]),
        "empty file": (["classify", empty], ["cannot read", str(empty), "as an image"]),
        "huge image decodes to nothing": (
            ["classify", "--max-pixels", "400000000", huge],
            ["cannot read", str(huge)],
        ),
        "labels for fixed classes": (
            ["classify", "--labels", "cat,dog", photos[0]],
            ["--labels needs a zero-shot preset", "VMoEImageClassifier"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "text file",
        "directory",
        "unknown preset",
        "folder that is not a preset",
        "dense preset routing map",
        "routing map not a png",
        "image over the pixel limit",
        "image over a lower limit",
        "truncated png",
        "truncated jpeg",
        "empty file",
        "huge image decodes to nothing",
        "labels for fixed classes",
    ],
)
def test_bad_input_is_one_error_line_and_status_1(capsys, bad_inputs, case, tmp_path):
    argv, needles = bad_inputs[case]
    status, out, err = run(capsys, *argv)
    assert_one_error_line(status, err, needles)
    assert out == ""  # Nothing classified before the bad input was found.
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize(
    "argv",
    [[], ["classify"], ["classify", "--top", "two", "cat.png"], ["unknown-command"]],
)
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert "usage: keras-vmoe" in capsys.readouterr().err


@pytest.mark.parametrize("top", ["0", "-1"])
def test_top_must_be_positive(capsys, photos, top):
    try:
        status = cli.main(["classify", "--top", top, photos[0]])
    except SystemExit as exit:
        status = exit.code
    assert status in (1, 2)
    assert "--top" in capsys.readouterr().err


@pytest.mark.skipif(backend() != "jax", reason="one process start is enough: on jax only")
def test_console_script_reports_a_missing_image_in_one_line(tmp_path):
    script = pathlib.Path(sys.executable).parent / "keras-vmoe"
    assert script.is_file(), f"console script not installed at {script}"
    missing = tmp_path / "missing.jpg"
    result = subprocess.run(
        [str(script), "classify", str(missing)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"{ERROR_PREFIX} image not found: {missing}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_classify_and_routing_map_with_the_limoe_preset(capsys, photos, tmp_path, classifiers):
    path = tmp_path / "routing.png"
    status, out, err = run(
        capsys, "classify", "--preset", "limoe_tiny_cifar10", "--top", "3", "--routing-map", path, *photos
    )
    assert status == 0 and ERROR_PREFIX not in err
    table = predictions(out)
    classifier = classifiers["limoe_tiny_cifar10"]
    expected = reference_probabilities(classifier, photos)  # Softmax of the zero-shot logits.
    for photo, reference in zip(photos, expected):
        order = np.argsort(-reference)[:3]
        assert [name for name, _ in table[photo]] == [classifier.class_names[i] for i in order]
    with Image.open(path) as picture:
        assert picture.size == reference_size("a title")  # 2 images, MoE blocks 3 and 5.


def test_classify_with_your_own_labels(capsys, photos, classifiers):
    labels = ["cat", "rocket", "tractor"]
    status, out, err = run(
        capsys, "classify", "--preset", "limoe_tiny_cifar10", "--labels", " cat, rocket,tractor ", *photos
    )
    classifier = classifiers["limoe_tiny_cifar10"]
    try:
        assert status == 0 and ERROR_PREFIX not in err
        table = predictions(out)
        assert classifier.class_names == labels
        expected = reference_probabilities(classifier, photos)
        for photo, reference in zip(photos, expected):
            assert sorted(name for name, _ in table[photo]) == sorted(labels)
            assert [name for name, _ in table[photo]] == [labels[i] for i in np.argsort(-reference)]
    finally:
        classifier.set_classes(list(CIFAR10_CLASS_NAMES))  # Other tests share it.
    status, out, err = run(capsys, "classify", "--preset", "limoe_tiny_cifar10", "--labels", ",", photos[0])
    assert status == 1 and "--labels names no class" in err


@requires_cifar10
def test_expert_modality_writes_the_picture(capsys, tmp_path):
    path = tmp_path / "pictures" / "experts.png"
    status, out, err = run(capsys, "expert-modality", "--cifar10", CIFAR10, "--pairs", "16", "--output", path)
    assert status == 0 and ERROR_PREFIX not in err
    assert out.splitlines()[-1] == f"Expert-modality picture written to {path}"
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("MoE")] == [
        "MoE block 3",
        "MoE block 5",
    ]
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > picture.height
    # Not a classifier of images and text, or not a picture: one error line.
    for argv, needle in [
        (["--preset", "vmoe_tiny_cifar10", "--cifar10", CIFAR10], "needs a LIMoE preset"),
        (["--cifar10", CIFAR10, "--output", tmp_path / "e.jpg"], "--output must name a .png"),
        (["--coco", tmp_path / "missing.npz"], "data archive not found"),
    ]:
        if "--output" not in argv:
            argv = argv + ["--output", tmp_path / "e.png"]
        status, out, err = run(capsys, "expert-modality", *argv)
        assert status == 1 and err.startswith(ERROR_PREFIX) and needle in err, err
        assert not (tmp_path / "e.png").exists()


def test_export_writes_an_onnx_file_that_classifies_like_the_preset(capsys, tmp_path, photos, classifiers):
    import onnxruntime

    path = tmp_path / "served" / "vmoe.onnx"
    status, out, err = run(capsys, "export", "--format", "onnx", path)
    assert status == 0 and ERROR_PREFIX not in err, err
    assert out.splitlines()[0] == f"vmoe_tiny_cifar10 exported as onnx to {path}"
    assert "scale=" in out and "airplane, automobile" in out
    classifier = classifiers["vmoe_tiny_cifar10"]
    size = tuple(classifier.preprocessor.image_converter.image_size)
    pixels = to_numpy(classifier.preprocessor(np.stack([cli.load_photo(photos[0], size)[0]])))
    session = onnxruntime.InferenceSession(str(path))
    logits = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    expected = to_numpy(classifier(pixels))
    np.testing.assert_allclose(logits, expected, atol=f32_atol(expected))  # ONNX Runtime's own kernels.
    # An existing output is kept unless asked; a wrong suffix is refused.
    status, _, err = run(capsys, "export", "--format", "onnx", path)
    assert status == 1 and "exists; pass --overwrite" in err
    status, _, err = run(capsys, "export", "--format", "onnx", tmp_path / "model.bin")
    assert status == 1 and "writes a .onnx file" in err and not (tmp_path / "model.bin").exists()


@pytest.mark.skipif(backend() != "jax", reason="one process start is enough: on jax only")
def test_console_script_exports_a_saved_model(tmp_path):
    import tensorflow as tf

    script = pathlib.Path(sys.executable).parent / "keras-vmoe"
    path = tmp_path / "saved"
    result = subprocess.run(
        [str(script), "export", "--preset", "soft_moe_tiny_cifar10", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"soft_moe_tiny_cifar10 exported as saved_model to {path}")
    served = tf.saved_model.load(str(path))
    assert tuple(served.serve(np.zeros((3, 32, 32, 3), "float32")).shape) == (3, 10)


# === keras-vmoe evaluate ===


def make_folder(root, classes=("a", "b"), per_class=4, seed=0):
    rng = np.random.RandomState(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.skipif(
    backend() != "torch",
    reason="the command's flow is the same on every backend (its evaluations are tested on each in "
    "tests/evaluation); run once, in the fastest pass",
)
@requires_cifar10
def test_evaluate_attack_and_ensemble_on_cifar10(capsys, tmp_path, classifiers):
    from keras_vmoe.data.cifar10 import load_cifar10
    from keras_vmoe.evaluation import evaluate_robustness

    output = tmp_path / "out"
    presets_ = ["vit_tiny_cifar10", "vmoe_tiny_cifar10"]
    status, out, err = run(
        capsys, "evaluate", *[a for p in presets_ for a in ("--preset", p)], "--cifar10", CIFAR10,
        "--attack", "pgd", "--epsilon", "2/255", "--updates", "2", "--examples", "8", "--ensemble",
        "--output", output,
    )  # fmt: skip
    assert status == 0, err
    assert "PGD (2 updates) on 8 CIFAR-10 test images" in out and "Greedy ensemble" in out
    record = json.loads((output / "evaluation.json").read_text())
    assert record["presets"] == presets_ and record["data"] == "CIFAR-10"
    images, labels = load_cifar10(CIFAR10, "test", limit=8)
    for preset in presets_:
        direct = evaluate_robustness(classifiers[preset], images, labels, 2 / 255, 2).as_dict()
        assert record["attack"][preset] == [direct]  # The same computation, JSON round-trips floats.
    assert set(record["attack"]["vmoe_tiny_cifar10"][0]["expert_iou"]) == {"3", "5"}
    trace = record["ensemble"]["validation_cross_entropies"]
    assert all(b < a for a, b in zip(trace, trace[1:]))
    assert set(record["ensemble"]["test"]) == {*presets_, "ensemble"}
    with Image.open(output / "robustness.png") as picture:
        assert picture.size == (640, 420)


@pytest.mark.skipif(
    backend() != "torch",
    reason="the command's flow is the same on every backend (its evaluations are tested on each in "
    "tests/evaluation); run once, in the fastest pass",
)
def test_evaluate_fewshot_and_ranking_on_fashion_mnist_files(capsys, tmp_path, classifiers):
    from keras_vmoe.data import load_fashion_mnist
    from keras_vmoe.evaluation import fewshot_accuracy
    from keras_vmoe.evaluation import knn_accuracy
    from keras_vmoe.evaluation import pre_logits
    from tests.data.test_fashion_mnist_and_folders import fake_fashion_mnist

    data = fake_fashion_mnist(tmp_path, train=30, test=20)
    output = tmp_path / "out"
    status, out, err = run(
        capsys, "evaluate", "--preset", "vit_tiny_cifar10", "--preset", "soft_moe_tiny_cifar10",
        "--fashion-mnist", data, "--fewshot", "1,3", "--draws", "2", "--rank-presets", "--output", output,
    )  # fmt: skip
    assert status == 0, err
    assert "Few-shot linear accuracy on Fashion-MNIST (2 draws" in out and "ranked by 1-NN" in out
    record = json.loads((output / "evaluation.json").read_text())
    train, test = load_fashion_mnist(data, "train"), load_fashion_mnist(data, "test")
    features = [
        pre_logits(classifiers["vit_tiny_cifar10"], images, batch_size=64) for images, _ in (train, test)
    ]
    direct = fewshot_accuracy(features[0], train[1], features[1], test[1], shots=(1, 3), draws=2)
    assert record["fewshot"]["vit_tiny_cifar10"] == {
        str(k): v for k, v in direct.items()
    }  # Same computation.
    knn = {}
    for preset in ("vit_tiny_cifar10", "soft_moe_tiny_cifar10"):
        train_f, test_f = (
            pre_logits(classifiers[preset], images, batch_size=64) for images, _ in (train, test)
        )
        knn[preset] = knn_accuracy(train_f, train[1], test_f, test[1], k=1)
    expected = sorted(knn, key=lambda p: (-knn[p], p))
    assert record["knn_ranking"] == [dict(preset=p, knn_accuracy=knn[p]) for p in expected]
    assert (output / "fewshot.png").is_file() and not (output / "robustness.png").exists()


def test_evaluate_on_an_image_folder_splits_each_class(capsys, tmp_path):
    folder = make_folder(tmp_path / "images", per_class=4)
    status, out, err = run(
        capsys, "evaluate", "--preset", "vit_tiny_cifar10", "--folder", folder, "--fewshot", "2",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert status == 0, err
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["fewshot"]["vit_tiny_cifar10"]["2"]["per_draw"]  # 2 per class to train, 2 to test


@pytest.fixture
def evaluate_bad_inputs(tmp_path):
    from tests.data.test_fashion_mnist_and_folders import fake_fashion_mnist

    small = (
        fake_fashion_mnist(tmp_path / "fashion", train=30, test=10)
        if (tmp_path / "fashion").mkdir() is None
        else None
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = make_folder(tmp_path / "unreadable")
    (unreadable / "a" / "broken.png").write_bytes(b"not a png")
    two_classes = make_folder(tmp_path / "two")
    existing = tmp_path / "existing"
    existing.mkdir()
    base = ["evaluate", "--preset", "vit_tiny_cifar10"]
    return {
        "negative epsilon": (
            [*base, "--folder", two_classes, "--attack", "pgd", "--epsilon=-1/255"],
            ["--epsilon: radii must be >= 0"],
        ),
        "epsilon not a number": (
            [*base, "--folder", two_classes, "--attack", "pgd", "--epsilon", "x"],
            ["--epsilon"],
        ),
        "shots over the examples per class": (
            [*base, "--fashion-mnist", small, "--fewshot", "5"],
            ["5 shots need 5 training examples per class, but class 0 has 3"],
        ),
        "empty folder": ([*base, "--folder", empty, "--fewshot", "1"], ["no images under", str(empty)]),
        "unreadable image": (
            [*base, "--folder", unreadable, "--fewshot", "1"],
            ["cannot read", str(unreadable / "a" / "broken.png")],
        ),
        "nothing to evaluate": ([*base, "--folder", two_classes], ["nothing to evaluate"]),
        "preset without pre-logits": (
            ["evaluate", "--preset", "limoe_tiny_cifar10", "--folder", two_classes, "--fewshot", "1"],
            ["limoe_tiny_cifar10", "needs an image classifier of the zoo", "LIMoEZeroShotClassifier"],
        ),
        "classes that are not the preset's": (
            [*base, "--folder", two_classes, "--attack", "pgd"],
            ["--attack needs data labelled with the preset's classes", "has 10 classes", "has 2"],
        ),
        "output exists": (
            [*base, "--folder", two_classes, "--fewshot", "1", "--output", existing],
            [f"{existing} exists; pass --overwrite"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "negative epsilon",
        "epsilon not a number",
        "shots over the examples per class",
        "empty folder",
        "unreadable image",
        "nothing to evaluate",
        "preset without pre-logits",
        "classes that are not the preset's",
        "output exists",
    ],
)
def test_evaluate_bad_input_is_one_error_line_and_writes_nothing(capsys, evaluate_bad_inputs, case, tmp_path):
    argv, needles = evaluate_bad_inputs[case]
    if "--output" not in argv:
        argv = [*argv, "--output", tmp_path / "out"]
    status, out, err = run(capsys, *argv)
    assert_one_error_line(status, err, needles)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".evaluation-*"))


@pytest.mark.skipif(backend() != "jax", reason="one process start is enough: on jax only")
def test_console_script_evaluates_a_folder(tmp_path):
    script = pathlib.Path(sys.executable).parent / "keras-vmoe"
    folder = make_folder(tmp_path / "images", per_class=4)
    result = subprocess.run(
        [str(script), "evaluate", "--preset", "vit_tiny_cifar10", "--folder", str(folder), "--rank-presets",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Presets ranked by 1-NN accuracy" in result.stdout
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["knn_ranking"][0]["preset"] == "vit_tiny_cifar10"
