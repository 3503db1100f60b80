"""vmoe's Orbax checkpoints (vmoe/train/trainer.py) load as the msgpack ones do."""

import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest

from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.convert import read_vmoe_checkpoint
from keras_vmoe.convert import read_vmoe_orbax_checkpoint
from keras_vmoe.convert import vmoe_name_table
from tests.convert.vmoe_checkpoint_writer import unflatten
from tests.helpers import FIXTURES
from tests.helpers import requires_fixtures
from tests.helpers import to_numpy

ocp = pytest.importorskip("orbax.checkpoint")

TOKEN_CHOICE = FIXTURES / "vmoe_tiny_token_choice"
STEP = 3


def map_tree(function, tree):
    if isinstance(tree, dict):
        return {key: map_tree(function, value) for key, value in tree.items()}
    return function(tree)


def save_like_vmoe(directory, steps):
    """Saves {step: train state} as vmoe's trainer does (items `state` and `dataset_iterator`)."""
    with ocp.CheckpointManager(directory, item_names=("state", "dataset_iterator")) as manager:
        for step, state in steps.items():
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    dataset_iterator=ocp.args.JsonSave({"last_seen_index": 16 * step}),
                ),
            )
        manager.wait_until_finished()


def train_state(step, params):
    return {
        "step": np.int32(step),
        "params": params,
        "opt_state": {"mu": map_tree(np.zeros_like, params), "nu": map_tree(np.ones_like, params)},
        "rngs": {"dropout": np.array([0, step], np.uint32), "gating": np.array([1, step], np.uint32)},
    }


@pytest.fixture(scope="module")
def fixture_params():
    return read_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fixture_params):
    """workdir/ckpt/{1,3}/{state,dataset_iterator}: step 3 holds the fixture's parameters."""
    workdir = tmp_path_factory.mktemp("vmoe_workdir")
    params = unflatten(fixture_params)
    earlier = map_tree(lambda x: x + np.ones_like(x), params)  # A step the latest one must win over.
    save_like_vmoe(workdir / "ckpt", {1: train_state(1, earlier), STEP: train_state(STEP, params)})
    return workdir


@pytest.fixture(scope="module")
def msgpack_model():
    config = json.loads((TOKEN_CHOICE / "config.json").read_text())
    return load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config), config, np.load(TOKEN_CHOICE / "io.npz")


def relative_error(got, expected):
    return np.abs(got - expected).max() / max(1.0, np.abs(expected).max())


def weights(model):
    return {name: to_numpy(variable) for name, variable in vmoe_name_table(model).items()}


@requires_fixtures
@pytest.mark.parametrize("form", ["ckpt", f"ckpt/{STEP}", f"ckpt/{STEP}/state"])
def test_orbax_checkpoint_loads_the_msgpack_model(workdir, msgpack_model, form):
    expected_model, config, io = msgpack_model
    model = load_vmoe_checkpoint(str(workdir / form), config)
    expected = weights(expected_model)
    got = weights(model)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    logits = to_numpy(model(io["images"], training=False))
    # The same weights and program on the same backend: the same logits, bit for bit.
    np.testing.assert_array_equal(logits, to_numpy(expected_model(io["images"], training=False)))
    assert relative_error(logits, io["logits"]) <= 1e-4


@requires_fixtures
def test_reader_gives_the_msgpack_dict_of_the_chosen_step(workdir, fixture_params, capsys):
    params = read_vmoe_orbax_checkpoint(workdir / "ckpt", verbose=True)  # The latest step: 3.
    assert f"{os.sep}{STEP}{os.sep}state" in capsys.readouterr().out
    assert sorted(params) == sorted(fixture_params)
    for name, value in fixture_params.items():
        assert isinstance(params[name], np.ndarray) and params[name].dtype == value.dtype
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    earlier = read_vmoe_orbax_checkpoint(str(workdir / "ckpt" / "1"))
    np.testing.assert_array_equal(earlier["cls"], fixture_params["cls"] + 1)


def test_bfloat16_parameters_stay_bfloat16(tmp_path):
    kernel = np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4).astype(ml_dtypes.bfloat16)
    save_like_vmoe(tmp_path / "ckpt", {5: train_state(5, {"head": {"kernel": kernel}})})
    params = read_vmoe_orbax_checkpoint(tmp_path / "ckpt" / "5" / "state")
    assert params["head/kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(params["head/kernel"], kernel)


def test_only_params_are_read_and_older_layouts_load(tmp_path):
    """A zarr folder per array (no OCDBT), as orbax wrote before; with `_METADATA`
    the optimizer state is not read at all, without it (orbax < 0.5) the
    `checkpoint` structure file says what the item holds."""
    kernel = np.arange(6, dtype="float32").reshape(2, 3)
    params = {"Dense_0": {"kernel": kernel, "bias": np.ones(3, "float32")}}
    state = train_state(7, params)
    for name in ("params_only", "legacy"):
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
            checkpointer.save(tmp_path / name / "ckpt" / "7" / "state", args=ocp.args.PyTreeSave(state))
    folder = tmp_path / "params_only" / "ckpt" / "7" / "state"
    optimizer_arrays = list(folder.glob("opt_state.*"))
    assert len(optimizer_arrays) == 4  # mu and nu of the kernel and the bias.
    for array in optimizer_arrays:
        shutil.rmtree(array)
    legacy = tmp_path / "legacy" / "ckpt" / "7" / "state"
    (legacy / "_METADATA").unlink()
    (legacy / "checkpoint").write_bytes(ocp.msgpack_utils.msgpack_serialize(placeholders(state)))
    for directory in (folder, legacy.parent.parent):
        got = read_vmoe_orbax_checkpoint(directory)
        assert sorted(got) == ["Dense_0/bias", "Dense_0/kernel"]
        np.testing.assert_array_equal(got["Dense_0/kernel"], kernel)


def placeholders(tree, name=""):
    """The tree older orbax versions wrote to `checkpoint`: each array's folder name."""
    if isinstance(tree, dict):
        return {key: placeholders(value, f"{name}.{key}" if name else key) for key, value in tree.items()}
    return "PLACEHOLDER://" + name


def remove(state, keep):
    """Deletes the files under `state` for which keep(folder name, file name) is False."""
    for folder, _, files in os.walk(state):
        for name in files:
            if not keep(os.path.basename(folder), name):
                os.remove(os.path.join(folder, name))


@requires_fixtures
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: os.remove(state / "_METADATA"), "is truncated: it has no _METADATA file"),
        (lambda state: remove(state, lambda _, name: name != "manifest.ocdbt"), "truncated or corrupt"),
        (lambda state: remove(state, lambda folder, _: folder != "d"), "truncated or corrupt"),
        (lambda state: shutil.rmtree(state), "has no state/ folder"),
    ],
    ids=["metadata", "manifests", "data_files", "state_folder"],
)
def test_truncated_checkpoint_is_reported(workdir, msgpack_model, tmp_path, damage, message):
    copy = tmp_path / "ckpt"
    shutil.copytree(workdir / "ckpt", copy)
    state = copy / str(STEP) / "state"
    damage(state)
    with pytest.raises(CheckpointError, match=message) as error:
        load_vmoe_checkpoint(str(copy), msgpack_model[1])
    text = str(error.value)
    assert "\n" not in text and "tensorstore_spec" not in text
    assert str(state if message != "has no state/ folder" else state.parent) in text


def test_state_without_params_is_reported(tmp_path):
    save_like_vmoe(tmp_path / "ckpt", {2: {"step": np.int32(2), "opt_state": {"count": np.zeros(3)}}})
    with pytest.raises(CheckpointError, match=r"has no 'params' tree \(found \['opt_state', 'step'\]\)"):
        read_vmoe_orbax_checkpoint(tmp_path / "ckpt")


def test_foreign_directory_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not an Orbax checkpoint: expected vmoe's Orbax layout"):
        load_vmoe_checkpoint(str(tmp_path), {})
    with pytest.raises(CheckpointError, match="not a directory"):
        read_vmoe_orbax_checkpoint(tmp_path / "notes.txt")


@pytest.fixture
def without_orbax(monkeypatch):
    """`import orbax.checkpoint` fails, as when it is not installed (even when already imported)."""
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)


def test_missing_orbax_names_the_extra(without_orbax, tmp_path):
    with pytest.raises(CheckpointError, match=r'pip install "keras-vmoe\[orbax\]"') as error:
        load_vmoe_checkpoint(str(tmp_path), {})
    assert "\n" not in str(error.value)


@requires_fixtures
def test_msgpack_checkpoints_need_no_orbax(without_orbax, msgpack_model):
    expected_model, config, io = msgpack_model
    model = load_vmoe_checkpoint(str(TOKEN_CHOICE / "ckpt"), config)
    logits = to_numpy(model(io["images"], training=False))
    assert relative_error(logits, io["logits"]) <= 1e-4
