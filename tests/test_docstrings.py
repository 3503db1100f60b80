"""Every `>>>` example in the package's docstrings runs, on every backend.

As keras-hub's `docstring_test.py`: each module's examples run with its own
namespace plus `np`, `keras` and `ops`; printed values must be what the
example says (examples print backend-independent values: `tuple(x.shape)`).
"""

import doctest
import importlib
import pathlib

import keras
import numpy as np
import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "keras_vmoe"


def module_names():
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(ROOT).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if ">>>" in path.read_text():
            names.append(".".join(parts))
    return names


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Examples that write files write them here.
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    globs = {**vars(module), "np": np, "keras": keras, "ops": keras.ops}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [test for test in finder.find(module, name, globs=globs) if test.examples]
    assert tests, f"{name} has '>>>' in its source but no example was found"
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}"


def test_the_examples_are_found():
    assert len(module_names()) >= 10
    assert pathlib.Path(PACKAGE / "layers" / "moe.py").read_text().count(">>>") >= 2
