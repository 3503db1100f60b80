"""Each benchmark's smoke test runs in one backend's pass of the suite.

A benchmark script is the same on every backend; its workers run the layers
and exports that the rest of the suite tests on every backend. So each smoke
test runs its script on one backend, in that backend's pass (the suite's time
limit does not allow all three): `ON_BACKEND` says which. The suite runs the
JAX pass beside TensorFlow's and then PyTorch's (tools/run_suite.py), and
the JAX pass is the longer, so the scripts go to the other two.
KERAS_VMOE_BENCHMARKS_ON_EVERY_BACKEND=1 runs each on the backend of every pass.
"""

import os

import keras
import pytest

ON_BACKEND = {
    "test_moe_layer.py": "torch",
    "test_patch_merger.py": "torch",
    "test_navit.py": "tensorflow",
    "test_robustness.py": "torch",
    "test_serving.py": "tensorflow",  # SavedModel and ONNX (tf2onnx)
    "test_upcycling_cifar10.py": "torch",
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KERAS_VMOE_BENCHMARKS_ON_EVERY_BACKEND") == "1":
        return
    current = keras.backend.backend()
    for item in items:
        pinned = ON_BACKEND.get(item.path.name)
        if item.path.parent.name == "benchmarks" and pinned not in (None, current):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"benchmark smoke test: runs in the {pinned} pass "
                    "(KERAS_VMOE_BENCHMARKS_ON_EVERY_BACKEND=1 runs it in every pass)"
                )
            )
