"""The whole-model benchmark runs (tiny models) on the current backend, so it does not rot."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_compares_each_moe_model_with_its_dense_twin(tmp_path):
    backend = keras.backend.backend()
    out = tmp_path / "quick.json"
    command = [sys.executable, "benchmarks/whole_model.py", "--quick", "--huge-pages", "--backends", backend]
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
    # The workers ran with glibc's huge pages, and say so.
    worker_env = report["backends"][backend]["memory"]["memory_env"]
    assert "glibc.malloc.hugetlb=1" in worker_env["GLIBC_TUNABLES"].split(":")
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
                # Where the time goes: the dense twin plus one MoE layer's
                # (experts alone / whole layer) time over the twin's MLP.
                dense_ms = 1e3 * int(batch) / timing["dense_images_per_s"]
                layer_ms = timing["layers_ms"]
                for key, name in (("floor", "experts"), ("from_layers", "moe")):
                    predicted = (dense_ms + layer_ms[name] - layer_ms["mlp"]) / dense_ms
                    assert timing[key] == pytest.approx(predicted / record["flops_ratio"])
                assert timing["routing_ms"] == pytest.approx(layer_ms["moe"] - layer_ms["experts"])


@pytest.mark.parametrize("layer_name", ["sparse", "soft"])
def test_experts_of_runs_the_bank_on_the_routers_slots_only(layer_name):
    """`ExpertsOf`: the layer's own expert weights on E x capacity slots per
    routing group (the router's capacity), nothing else."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from moe_references import ExpertsOf

    from keras_vmoe.layers import SoftMoE
    from keras_vmoe.layers import SparseMoE

    if layer_name == "sparse":  # 2 x 9 choices at capacity factor 1.05 -> ceil(4.7) = 5 -> 8 (multiple of 4)
        moe, capacity = SparseMoE(num_experts=4, mlp_dim=6, num_selected_experts=2, capacity_factor=1.05), 8
    else:
        moe, capacity = SoftMoE(num_experts=4, mlp_dim=6, slots_per_expert=3), 3
    moe.build((None, 9, 5))
    assert moe.router.capacity(9) == capacity
    layer = ExpertsOf(moe)
    tokens = keras.random.normal((2, 9, 5), seed=0)
    outputs = layer(tokens)
    assert tuple(outputs.shape) == (2, 9, 5)
    # By hand: each image's tokens tiled into 4 x capacity slots, each
    # expert's MLP on its slots, the mean of all outputs added to every token.
    x = keras.ops.convert_to_numpy(tokens)
    expected = []
    for image in x:
        slots = np.tile(image, (-(-4 * capacity // 9), 1))[: 4 * capacity].reshape(4, capacity, 5)
        expert_outputs = keras.ops.convert_to_numpy(moe.run_experts(keras.ops.convert_to_tensor(slots)))
        expected.append(image + expert_outputs.mean(axis=(0, 1)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), np.stack(expected), rtol=1e-5, atol=1e-6)


def test_use_huge_pages_adds_the_tunable_once(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from moe_layer import memory_settings
    from moe_layer import use_huge_pages

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    use_huge_pages()
    use_huge_pages()
    expected = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert memory_settings()["memory_env"]["GLIBC_TUNABLES"] == expected
    monkeypatch.delenv("GLIBC_TUNABLES")
    use_huge_pages()
    assert memory_settings()["memory_env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_use_malloc_sets_the_named_setting_and_refuses_others(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from moe_layer import MEMORY_ENV
    from moe_layer import memory_settings
    from moe_layer import use_malloc

    # A private environment: what use_malloc sets must not reach the other tests' subprocesses.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in MEMORY_ENV})
    use_malloc("default")
    assert memory_settings()["memory_env"] == {}
    use_malloc("keep-freed")
    assert memory_settings()["memory_env"] == {
        "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
        "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
        "MALLOC_TOP_PAD_": str(256 << 20),
    }
    use_malloc("huge-pages")
    assert memory_settings()["memory_env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    with pytest.raises(
        ValueError, match="unknown malloc setting 'lots'; expected one of default, huge-pages"
    ):
        use_malloc("lots")
