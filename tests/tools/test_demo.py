"""tools/demo.py (`make demo`): the default preset on four public-domain photographs."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_vmoe.data.cifar10 import CIFAR10_CLASS_NAMES
from keras_vmoe.visualization.routing_map import draw_routing_map
from tests.helpers import ROOT
from tests.helpers import backend

PHOTOS = ("chelsea", "rocket", "coffee", "astronaut")
PREDICTION = re.compile(r"^  (\S+) +(\d\.\d{3})$")


@pytest.mark.skipif(backend() != "jax", reason="one process start is enough: on jax only")
def test_demo_classifies_four_photos_and_draws_their_routing(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [output / "photos" / f"{name}.jpg" for name in PHOTOS]
    for path in paths:
        with Image.open(path) as photo:
            assert photo.format == "JPEG" and min(photo.size) >= 256
    routing_map = output / "routing_map.png"

    lines = result.stdout.splitlines()
    assert lines[0].startswith("$ keras-vmoe classify --routing-map")
    for path in paths:
        assert str(path) in lines, f"{path} not in the output:\n{result.stdout}"
        rows = lines[lines.index(str(path)) + 1 :][:5]
        matches = [PREDICTION.match(row) for row in rows]
        assert all(matches), rows
        assert {m.group(1) for m in matches} <= set(CIFAR10_CLASS_NAMES)
        probabilities = [float(m.group(2)) for m in matches]
        assert probabilities == sorted(probabilities, reverse=True)
    assert lines[-1] == f"Routing map written to {routing_map}"

    # 4 image rows and 3 panels: the photo and the default preset's 2 MoE blocks.
    blank = [np.zeros((32, 32, 3), "uint8")] * 4
    assignment = np.zeros((4, 64), int)
    expected = draw_routing_map(
        blank, {"a": assignment, "b": assignment}, (8, 8), 8, captions=["x"] * 4, title="t"
    ).size
    with Image.open(routing_map) as picture:
        assert picture.format == "PNG" and picture.size == expected
