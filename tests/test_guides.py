"""Runs every guide in guides/ top to bottom, in fast mode, on the current backend."""

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


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "data").is_dir() or not (SHARED / "fixtures").is_dir(),
    reason=f"the guides read data/ and fixtures/ from {SHARED}, which is absent "
    "(set KERAS_VMOE_SHARED to the folder that contains them)",
)
@pytest.mark.parametrize("guide", GUIDES, ids=[guide.name for guide in GUIDES])
def test_guide_runs_in_fast_mode(guide):
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


def test_guides_are_found():
    assert GUIDES, f"no guides found under {ROOT / 'guides'}"
