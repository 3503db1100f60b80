"""The PatchMerger benchmark runs (a tiny model) on the current backend, so it does not rot."""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_times_both_models(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    process = subprocess.run(
        [sys.executable, "benchmarks/patch_merger.py", "--quick", "--backends", backend, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    assert "speed-up" in process.stdout
    report = json.loads(out.read_text())
    assert report["errors"] == [] and list(report["backends"]) == [backend]
    answer = report["backends"][backend]
    merger = answer["configs"]["vit_patch_merger"]["patch_merger"]
    assert merger == {"after_block": 1, "num_tokens": 4}
    assert answer["configs"]["vit"]["patch_merger"] is None
    for phase in ("forward", "train"):
        result = answer["results"][phase]
        for candidate in ("vit", "vit_patch_merger"):
            timing = result[candidate]
            assert 0 < timing["min_ms"] <= timing["median_ms"], (phase, candidate)
            assert len(timing["times_ms"]) == report["scale"]["rounds"][phase]
        assert result["speedup"] > 0
    # 64 tokens in all 4 blocks against 64 in 2 and 1 + 4 in the other 2.
    assert report["flops_ratio"] > 1.5
