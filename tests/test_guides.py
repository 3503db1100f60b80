"""Runs every guide in guides/ top to bottom, in fast mode.

Each guide runs in one backend's pass of the suite, the guides taking turns
over the three backends (the suite's time limit does not allow each on all
three; the models and layers they use are tested on every backend). Set
KERAS_VMOE_GUIDES_ON_EVERY_BACKEND=1 to run every guide in every pass.
"""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "guides").glob("*.py"))
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", ROOT.parent / "shared"))
TIMEOUT_S = 300
# The order of the turns: PyTorch's pass first, as the JAX pass, which the
# suite runs beside the other two (tools/run_suite.py), is the longer.
BACKENDS = ("torch", "tensorflow", "jax")
# keras.distribution shards only on JAX; the evaluation guide jit-compiles a
# gradient per model on JAX and runs fastest on PyTorch. The E^3 guide runs in
# PyTorch's pass, pinned so that adding it left the other guides' turns as they were.
PINNED = {
    "expert_parallelism.py": "jax",
    "evaluation.py": "torch",
    "from_dense_towers.py": "torch",
    "efficient_ensembles.py": "torch",
    "native_resolution.py": "torch",
}


def backend_of(guide):
    """The backend whose pass runs `guide`: pinned, or the next in turn."""
    if guide.name in PINNED:
        return PINNED[guide.name]
    rotating = [path.name for path in GUIDES if path.name not in PINNED]
    return BACKENDS[rotating.index(guide.name) % len(BACKENDS)]


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "data").is_dir() or not (SHARED / "fixtures").is_dir(),
    reason=f"the guides read data/ and fixtures/ from {SHARED}, which is absent "
    "(set KERAS_VMOE_SHARED to the folder that contains them)",
)
@pytest.mark.parametrize("guide", GUIDES, ids=[guide.name for guide in GUIDES])
def test_guide_runs_in_fast_mode(guide):
    every_backend = os.environ.get("KERAS_VMOE_GUIDES_ON_EVERY_BACKEND") == "1"
    if not every_backend and backend_of(guide) != keras.backend.backend():
        pytest.skip(f"{guide.name} runs in the {backend_of(guide)} pass")
    env = dict(
        os.environ,
        KERAS_VMOE_GUIDE_FAST="1",
        KERAS_BACKEND=keras.backend.backend(),
        KERAS_VMOE_SHARED=str(SHARED),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    try:
        process = subprocess.run(
            [sys.executable, str(guide)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        output = error.output or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        pytest.fail(
            f"{guide.name} did not finish within {TIMEOUT_S} s on "
            f"{keras.backend.backend()}. Last output:\n{output[-3000:]}"
        )
    assert process.returncode == 0, (
        f"{guide.name} exited with code {process.returncode} on "
        f"{keras.backend.backend()}. Last output:\n{process.stdout[-3000:]}"
    )


def test_guides_are_found_and_each_runs_in_some_pass():
    assert GUIDES, f"no guides found under {ROOT / 'guides'}"
    assert set(PINNED) <= {guide.name for guide in GUIDES}, "a pinned guide was renamed"
    assert {backend_of(guide) for guide in GUIDES} <= set(BACKENDS)
