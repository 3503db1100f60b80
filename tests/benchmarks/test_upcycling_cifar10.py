"""The upcycling benchmark runs an arm end to end (a few images, one epoch) and merges reports."""

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import DATA

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = "benchmarks/upcycling_cifar10.py"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "cifar10_jpeg.npz").is_file(), reason=f"no CIFAR-10 archive under {DATA}")
def test_an_arm_trains_and_the_report_merges_arms(tmp_path):
    arm = tmp_path / "vmoe.json"
    process = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--arm",
            "vmoe",
            "--cifar10",
            str(DATA / "cifar10_jpeg.npz"),
            "--epochs",
            "1",
            "--eval-every",
            "1",
            "--train-limit",
            "256",
            "--verbose",
            "0",
            "--output",
            str(arm),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    result = json.loads(arm.read_text())
    assert result["arm"] == "vmoe" and result["training_images"] == 256
    assert [p["epochs"] for p in result["points"]] == [0, 1]
    assert result["points"][1]["extra_training_flops"] == 3 * result["flops_per_image"] * 256
    # A second arm, made up, to check the merged table and the plot.
    dense = dict(result, arm="dense", points=[dict(p, test_top1=0.5) for p in result["points"]])
    (tmp_path / "dense.json").write_text(json.dumps(dense))
    report = tmp_path / "report"
    process = subprocess.run(
        [sys.executable, SCRIPT, "--report", str(tmp_path / "dense.json"), str(arm), "--output", str(report)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    table = report.with_suffix(".md").read_text()
    assert "| extra epochs | extra training PFLOPs (dense) | dense top-1 | vmoe top-1 |" in table
    assert "| 1 | 0.00 | 0.5000 |" in table
    assert Image.open(report.with_suffix(".png")).size == (640, 420)
