"""The whole-model benchmark runs (tiny models) on the current backend, so it does not rot."""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_compares_each_moe_model_with_its_dense_twin(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    command = [sys.executable, "benchmarks/whole_model.py", "--quick", "--backends", backend]
    process = subprocess.run(
        command + ["--pairs", "vmoe_s32", "soft_moe_s16", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and list(report["backends"]) == [backend]
    results = report["backends"][backend]["results"]
    assert set(results) == {"vmoe_s32", "soft_moe_s16"}
    # K = 2 experts in one of two blocks: more FLOPs than the twin; Soft MoE
    # with 8 one-slot experts on 16 tokens: fewer.
    assert (
        results["vmoe_s32"]["auto"]["1"]["flops_ratio"]
        > 1
        > results["soft_moe_s16"]["auto"]["1"]["flops_ratio"]
    )
    for pair in results.values():
        for batch in ("1", "2"):
            record = pair["auto"][batch]
            for phase in ("predict", "train"):
                timing = record[phase]
                assert timing["moe_images_per_s"] > 0 and timing["dense_images_per_s"] > 0
                ratio = timing["dense_images_per_s"] / timing["moe_images_per_s"]
                assert timing["time_over_flops"] == pytest.approx(ratio / record["flops_ratio"])
