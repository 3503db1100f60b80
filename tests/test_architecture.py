"""The package's layers (docs/architecture.md): imports point down, backend code stays in ops/,
modules stay short, and nothing imports `keras_hub.src` but its one door."""

import ast

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "keras_vmoe"
LEVELS = {
    "version": 0,
    "validation": 0,
    "errors": 0,
    "staging": 0,
    "keras_hub_internals": 0,
    "ops": 1,
    "distribution": 2,
    "layers": 3,
    "data": 4,
    "visualization": 4,
    "export": 4,
    "models": 5,
    "convert": 6,
    "upcycling": 6,
    "presets": 7,
    "recipes": 7,
    "evaluation": 7,
    "cli": 8,
    "convert_command": 8,
    "__init__": 8,
}
BACKENDS = ("jax", "jaxlib", "tensorflow", "torch")
# Preprocessing that runs TensorFlow (tf.data, tf.strings) on every backend, as
# keras-hub's own preprocessors and tokenizers do: not backend code.
TF_PREPROCESSING = {"limoe_preprocessor.py", "limoe_tokenizer.py", "native_resolution_preprocessing.py"}
MAX_LINES = 500


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def part_of(path):
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0]


def imports(path):
    """(line, imported module) of every import of a file, function-level ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "keras_vmoe":
                yield from ((node.lineno, f"keras_vmoe.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)


def test_every_part_has_a_level():
    parts = {part_of(path) for path in modules()}
    assert parts <= set(LEVELS), sorted(parts - set(LEVELS))


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_down_and_backends_stay_in_ops(path):
    part = part_of(path)
    for line, module in imports(path):
        names = module.split(".")
        if names[0] == "keras_vmoe" and len(names) > 1:
            target = names[1]
            assert LEVELS[target] <= LEVELS[part], (
                f"{path.relative_to(ROOT)}:{line} imports {module} (level {LEVELS[target]}) from "
                f"{part} (level {LEVELS[part]}): an arrow that runs back up (docs/architecture.md)"
            )
        if names[0] in BACKENDS and not (names[0] == "tensorflow" and path.name in TF_PREPROCESSING):
            assert part == "ops", f"{path.relative_to(ROOT)}:{line} imports {module} outside keras_vmoe/ops/"
        if module.startswith("keras_hub.src"):
            assert path.name == "keras_hub_internals.py", f"{path.relative_to(ROOT)}:{line} imports {module}"


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by idea"
