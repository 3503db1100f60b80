"""The NaViT benchmark's throughput part runs (a tiny model) on the current backend, so it does not rot."""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_throughput_times_padding_and_packing(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    process = subprocess.run(
        [
            sys.executable,
            "benchmarks/navit.py",
            "throughput",
            "--quick",
            "--backends",
            backend,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    assert "packing/padding" in process.stdout
    report = json.loads(out.read_text())
    assert report["errors"] == [] and list(report["backends"]) == [backend]
    answer = report["backends"][backend]
    # The same images: padded to 64 x 64 squares, and packed into fewer tokens.
    padded = answer["inputs"]["padding"]["images"]
    packed = answer["inputs"]["packing"]["segment_ids"]
    assert padded == [report["scale"]["images"], 64, 64, 3]
    assert packed[0] * packed[1] < padded[0] * 64
    for phase in ("forward", "train"):
        for candidate in ("padding", "packing", "packing_sequence"):
            timing = answer["results"][phase][candidate]
            assert (
                timing["images_per_second"] > 0
                and len(timing["times_ms"]) == report["scale"]["rounds"][phase]
            )
