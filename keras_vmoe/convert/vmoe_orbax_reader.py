"""Reads the Orbax checkpoints of google-research/vmoe's trainer.

vmoe's trainer (`vmoe/train/trainer.py`) saves through an Orbax
`CheckpointManager` at `workdir/ckpt`, one folder per step:

    workdir/ckpt/<step>/state/             the train state (a PyTree item)
    workdir/ckpt/<step>/dataset_iterator/  {"last_seen_index": N} (JSON)

The state is `{"step", "params", "opt_state", "rngs"}`; `params` is the flax
parameter tree, with the names of vmoe's msgpack checkpoints. Only `params` is
read (a partial restore: the optimizer state stays on disk), as numpy arrays;
bfloat16 parameters stay `ml_dtypes.bfloat16`.

Orbax (`orbax-checkpoint`, which needs JAX, and `tensorstore`) is imported
only here, when such a checkpoint is read: `pip install "keras-vmoe[orbax]"`.
"""

import contextlib
import dataclasses
import json
import logging
import os

import keras
import numpy as np

from keras_vmoe.errors import CheckpointError

INSTALL_HINT = 'pip install "keras-vmoe[orbax]"'
# Files and folders of which an Orbax PyTree item has at least one: `_METADATA`
# (orbax >= 0.5), `checkpoint` (the older msgpack structure file, with one
# zarr folder per array), `manifest.ocdbt` / `ocdbt.process_*` (OCDBT storage).
_ITEM_MARKERS = ("_METADATA", "checkpoint", "manifest.ocdbt")
_EXPECTED = (
    "expected vmoe's Orbax layout: workdir/ckpt (with integer step folders), "
    "ckpt/<step> (with a state/ folder) or ckpt/<step>/state"
)


def _import_orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise CheckpointError(
            f"Reading vmoe's Orbax checkpoints needs orbax-checkpoint and tensorstore: "
            f"{INSTALL_HINT} ({type(error).__name__}: {error})."
        ) from error
    return ocp


def _is_item(directory):
    return any(os.path.exists(os.path.join(directory, name)) for name in _ITEM_MARKERS) or any(
        name.startswith("ocdbt.process_") for name in os.listdir(directory)
    )


def _steps(directory):
    """{step: folder} of the integer-named step folders (not orbax's temporary ones)."""
    return {
        int(name): os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    }


def orbax_state_directory(path):
    """The `state` item folder that `path` (ckpt, ckpt/<step> or its state/) names."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"Orbax checkpoint not found: {path} is not a directory.")
    if _is_item(path):
        return path
    state = os.path.join(path, "state")
    if os.path.isdir(state):
        return state
    steps = _steps(path)
    if not steps:
        raise CheckpointError(f"{path} is not an Orbax checkpoint: {_EXPECTED}.")
    step_directory = steps[max(steps)]
    state = os.path.join(step_directory, "state")
    if not os.path.isdir(state):
        raise CheckpointError(
            f"Orbax checkpoint step {step_directory} has no state/ folder "
            f"(truncated, or not written by vmoe's trainer): {_EXPECTED}."
        )
    return state


@contextlib.contextmanager
def _quiet_absl_logging():
    """Orbax logs through absl: keep its warnings about our read-only use quiet."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _map(function, tree):
    if isinstance(tree, dict):
        return {key: _map(function, value) for key, value in tree.items()}
    return function(tree)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _first_line(error):
    """`Type: first line` of an error, without tensorstore's JSON spec."""
    text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text}".rstrip(": ")


def _no_params(state, found):
    return CheckpointError(
        f"Orbax checkpoint {state} has no 'params' tree (found {sorted(found)}); "
        "expected vmoe's train state {step, params, opt_state, rngs}."
    )


def _params_structure(state):
    """The `params` subtree of the item's `_METADATA` (leaves 0), or None without one.

    Read from the JSON file rather than through `PyTreeCheckpointHandler.metadata`,
    which opens every array of the item, the optimizer state's too.
    """
    path = os.path.join(state, "_METADATA")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            entries = json.load(file)["tree_metadata"].values()
        key_paths = [tuple(str(key["key"]) for key in entry["key_metadata"]) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"Orbax checkpoint {state}: its _METADATA file is truncated or corrupt ({_first_line(error)})."
        ) from error
    params = {}
    for key_path in key_paths:
        if len(key_path) < 2 or key_path[0] != "params":
            continue
        node = params
        for key in key_path[1:-1]:
            node = node.setdefault(key, {})
        node[key_path[-1]] = 0
    if not params:
        raise _no_params(state, {key_path[0] for key_path in key_paths if key_path})
    return params


def _restore_params(ocp, state):
    """The PyTree item at `state` with (at least) its `params`, as numpy arrays."""
    params = _params_structure(state)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        if params is None:
            if not os.path.isfile(os.path.join(state, "checkpoint")):
                raise CheckpointError(
                    f"Orbax checkpoint {state} is truncated: it has no _METADATA file (nor the "
                    "`checkpoint` structure file of older orbax versions) to say which arrays it holds."
                )
            # An older checkpoint (a `checkpoint` structure file and a zarr
            # folder per array): all of it, its arrays as numpy.
            return checkpointer.restore(state)
        item = {"params": params}
        restore_args = _map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        if "partial_restore" in {field.name for field in dataclasses.fields(ocp.args.PyTreeRestore)}:
            # The params alone; the optimizer state stays on disk.
            args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        else:  # An orbax without partial restores: all of it (numpy is the default type then).
            args = ocp.args.PyTreeRestore()
        return checkpointer.restore(state, args=args)
    finally:
        checkpointer.close()


def read_vmoe_orbax_checkpoint(path, verbose=False):
    """Reads the parameters of a vmoe Orbax checkpoint into `{"Encoder/encoder_norm/scale": array, ...}`.

    Args:
        path: `workdir/ckpt` (its latest step is read), `ckpt/<step>` or
            `ckpt/<step>/state`.
        verbose: print the folder read and a progress bar.

    Returns:
        The same flat dict `read_vmoe_checkpoint` gives for a msgpack
        checkpoint: the `params` of the train state, numpy arrays.

    Raises:
        CheckpointError: orbax is not installed, `path` is not an Orbax
            checkpoint, or the checkpoint is truncated or has no `params`.
    """
    ocp = _import_orbax()
    state = orbax_state_directory(path)
    if verbose:
        print(f"Reading the params of Orbax checkpoint {state}")
    try:
        with _quiet_absl_logging():
            restored = _restore_params(ocp, state)
    except CheckpointError:
        raise
    except Exception as error:  # Orbax and tensorstore raise many types; report one.
        raise CheckpointError(
            f"Orbax checkpoint {state} is truncated or corrupt: restoring its params failed "
            f"({_first_line(error)})."
        ) from error
    params = restored.get("params") if isinstance(restored, dict) else None
    if not isinstance(params, dict) or not params:
        raise _no_params(state, restored if isinstance(restored, dict) else ())
    flat = {name: np.asarray(value) for name, value in _flatten(params)}
    if verbose:
        keras.utils.Progbar(len(flat), unit_name="parameter").update(len(flat))
    return flat
