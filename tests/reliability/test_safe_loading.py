"""Loading never runs code: no pickle anywhere in the package, `.keras` files in safe mode."""

import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "keras_vmoe"
UNSAFE = {
    r"\bpickle\b": "pickle",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"safe_mode\s*=\s*False": "safe_mode=False",
    r"\beval\(|\bexec\(": "eval / exec",
}


@pytest.mark.parametrize("pattern", sorted(UNSAFE))
def test_no_unsafe_loading_in_the_package(pattern):
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert not offenders, f"{UNSAFE[pattern]} in {offenders}"


def saved_preset(tmp_path):
    from keras_vmoe.models import VMoEBackbone
    from keras_vmoe.models import VMoEImageClassifier
    from tests.helpers import tiny_vit_arguments

    backbone = VMoEBackbone(**tiny_vit_arguments(moe_layers=(1,), num_experts=4))
    VMoEImageClassifier(backbone, num_classes=3).save_to_preset(str(tmp_path / "preset"))
    return tmp_path / "preset"


def test_truncated_preset_weights_are_named(tmp_path):
    from keras_vmoe.models import VMoEImageClassifier
    from keras_vmoe.presets import PresetError

    weights = saved_preset(tmp_path) / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(PresetError, match=r"model\.weights\.h5.*truncated"):
        VMoEImageClassifier.from_preset(str(tmp_path / "preset"))


def test_a_config_that_does_not_fit_the_weights_is_an_error_not_a_half_load(tmp_path):
    import json

    from keras_vmoe.models import VMoEBackbone

    preset = saved_preset(tmp_path)
    config = json.loads((preset / "config.json").read_text())
    config["config"]["num_layers"] = 3  # one block more than the weights hold
    (preset / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="could not be loaded"):
        VMoEBackbone.from_preset(str(preset))
    (preset / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match="model.weights"):
        VMoEBackbone.from_preset(str(preset))
