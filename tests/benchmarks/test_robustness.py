"""The robustness benchmark runs end to end in its quick mode."""

import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import DATA

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "cifar10_jpeg.npz").is_file(), reason=f"no CIFAR-10 archive under {DATA}")
def test_quick_run_attacks_every_preset_and_draws_the_chart(tmp_path):
    output = tmp_path / "robustness"
    process = subprocess.run(
        [sys.executable, "benchmarks/robustness.py", "--quick", "--cifar10", str(DATA / "cifar10_jpeg.npz"),
         "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    record = json.loads(output.with_suffix(".json").read_text())
    assert [r["preset"] for r in record["results"]] == [
        "vit_tiny_cifar10",
        "vmoe_tiny_cifar10",
        "soft_moe_tiny_cifar10",
    ]
    for result in record["results"]:
        assert [row["pixel_levels"] for row in result["rows"]] == [0.5, 2.0]
        for row in result["rows"]:
            assert row["num_images"] == 16 and row["adversarial_loss"] >= row["clean_loss"]
            assert len(row["expert_iou"]) == (0 if result["preset"] == "vit_tiny_cifar10" else 2)
    assert "| vmoe_tiny_cifar10 |" in output.with_suffix(".md").read_text()
    with Image.open(output.with_suffix(".png")) as chart:
        assert chart.size == (640, 420)
