"""The MoE layer benchmark runs (tiny shapes) on the current backend, so it does not rot."""

import json
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_times_every_candidate(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    process = subprocess.run(
        [
            sys.executable,
            "benchmarks/moe_layer.py",
            "--quick",
            "--backends",
            backend,
            "--parts",
            "headline",
            "small_groups",
            "--malloc",
            "keep-freed",
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
    report = json.loads(out.read_text())
    assert report["errors"] == []
    # The workers' malloc kept freed memory (no block of its own, no trimming), and the report says so.
    keep_freed = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    assert keep_freed.items() <= report["machine"]["memory_env"].items()
    assert [b["benchmark"]["name"] for b in report["benchmarks"]] == ["headline", "small groups"]
    for benchmark in report["benchmarks"]:
        for mode, phases in benchmark["results"].items():
            for phase in ("forward", "train"):
                timings = phases[phase]
                assert set(timings) == set(benchmark["labels"]), (mode, phase)
                for label, timing in timings.items():
                    assert 0 < timing["min_ms"] <= timing["median_ms"], (mode, phase, label)
    assert "experts_only" in report["benchmarks"][1]["labels"]
