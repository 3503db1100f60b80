"""The serving benchmark runs (few rounds, one preset) on the current backend, so it does not rot."""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_times_every_way_and_checks_the_exports(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    process = subprocess.run(
        [
            sys.executable,
            "benchmarks/serving.py",
            "--quick",
            "--backends",
            backend,
            "--presets",
            "vmoe_tiny_cifar10",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    result = report["backends"][backend]["results"]["vmoe_tiny_cifar10"]
    expected = {"predict", "predict_on_batch", "onnxruntime"} | (
        {"saved_model"} if backend != "torch" else set()
    )
    assert set(result) == expected
    for way, timing in result.items():
        assert timing["median_ms"] > 0, way
        assert timing["max_abs_difference"] <= 1e-4, way  # The exported model gives predict's logits.
