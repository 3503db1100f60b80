"""Reads vmoe's partitioned checkpoints with `msgpack` and numpy only.

A checkpoint is `prefix.index` plus `prefix.data-NNNNN-of-MMMMM` files, all
flax msgpack with vmoe's extension types (`vmoe/checkpoints/serialization.py`):

- the index holds `{"version", "shard_count", "index": tree}`, each leaf an
  `IndexInfo` (global shape and dtype, the global slices of its chunks, and
  the shard that holds each chunk);
- each data file holds `{magic: True, "<leaf number>": [[sub-chunks, slice]]}`,
  leaves numbered in the order JAX flattens the index tree (sorted keys).

msgpack never runs code, so reading a checkpoint is safe.
"""

import os

import keras
import ml_dtypes
import msgpack
import numpy as np

from keras_vmoe.errors import CheckpointError  # noqa: F401 (also importable from here, as before)

_ARRAY_CHUNKS_MAGIC_KEY = "__msgpack_array_chunk_a87ca2__"
# vmoe's `_MsgpackExtType` codes.
_NDARRAY, _NPSCALAR, _SHAPED_ARRAY, _SLICE, _SLICE_ND, _INDEX_INFO = 1, 3, 4, 5, 6, 8


def _dtype(name):
    name = name.decode() if isinstance(name, bytes) else name
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ndarray(data):
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    return np.frombuffer(buffer, dtype=_dtype(dtype_name)).reshape(shape)


def _slice(data):
    start, stop, step = msgpack.unpackb(data, raw=True)
    return slice(start, stop, step)


def _slice_nd(data):
    return tuple(_slice(s) for s in msgpack.unpackb(data, raw=True))


def _ext_hook(code, data):
    if code == _NDARRAY:
        return _ndarray(data)
    if code == _NPSCALAR:
        return _ndarray(data)[()]
    if code == _SHAPED_ARRAY:
        shape, dtype_name, _, _ = msgpack.unpackb(data, raw=True)
        return {"shape": tuple(shape), "dtype": _dtype(dtype_name)}
    if code == _SLICE:
        return _slice(data)
    if code == _SLICE_ND:
        return _slice_nd(data)
    if code == _INDEX_INFO:
        global_shape, global_slices, shards = msgpack.unpackb(data, raw=True)
        return {
            "global_shape": _ext_hook(_SHAPED_ARRAY, global_shape),
            "global_slices": [_slice_nd(s) for s in global_slices],
            "shards": list(shards),
        }
    return msgpack.ExtType(code, data)


def _unpack_file(path):
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    with open(path, "rb") as file:
        content = file.read()
    try:
        return msgpack.unpackb(content, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, ValueError, msgpack.exceptions.UnpackException) as error:
        raise CheckpointError(
            f"Checkpoint file {path} is truncated or corrupt ({type(error).__name__}: {error})."
        ) from error


def _flatten(tree, prefix=""):
    """(path, leaf) pairs in JAX's flattening order (sorted dict keys)."""
    if isinstance(tree, dict) and "global_shape" not in tree:
        for key in sorted(tree):
            yield from _flatten(tree[key], f"{prefix}/{key}" if prefix else key)
    else:
        yield prefix, tree


def _read_index(prefix):
    """(leaves, data files) of `prefix.index`: [(path, IndexInfo)], [file names]."""
    index_file = prefix + ".index"
    index = _unpack_file(index_file)
    if not isinstance(index, dict) or "index" not in index or "shard_count" not in index:
        raise CheckpointError(f"{index_file} is not a vmoe checkpoint index.")
    leaves = list(_flatten(index["index"]))
    for path, info in leaves:
        if not isinstance(info, dict) or "global_shape" not in info:
            raise CheckpointError(f"{index_file}: entry {path!r} is not an array description.")
    shard_count = int(index["shard_count"])
    shards = sorted({shard for _, info in leaves for shard in info["shards"]})
    return leaves, [f"{prefix}.data-{shard:05d}-of-{shard_count:05d}" for shard in shards]


def checkpoint_data_files(prefix):
    """The data files `prefix.index` says hold the parameters."""
    return _read_index(os.fspath(prefix))[1]


def read_vmoe_checkpoint(prefix, verbose=False):
    """Reads a vmoe checkpoint into `{"Encoder/encoder_norm/scale": array, ...}`.

    Args:
        prefix: path without the `.index` / `.data-*` suffix.
        verbose: show a progress bar over the data files.

    Raises:
        CheckpointError: naming the file that is missing or truncated, or the
            parameter whose chunks do not cover it.
    """
    leaves, data_files = _read_index(os.fspath(prefix))
    arrays, filled = [], []
    for _, info in leaves:
        shape, dtype = info["global_shape"]["shape"], info["global_shape"]["dtype"]
        arrays.append(np.zeros(shape, dtype))
        filled.append(np.zeros(shape, bool))
    progress = keras.utils.Progbar(len(data_files), unit_name="file") if verbose else None
    for file_number, data_file in enumerate(data_files, start=1):
        content = _unpack_file(data_file)
        if not isinstance(content, dict) or _ARRAY_CHUNKS_MAGIC_KEY not in content:
            raise CheckpointError(f"{data_file} is not a vmoe checkpoint data file.")
        for key, chunks in content.items():
            if key == _ARRAY_CHUNKS_MAGIC_KEY:
                continue
            number = int(key)
            if not 0 <= number < len(leaves):
                raise CheckpointError(f"{data_file} holds array #{number}, unknown to the index.")
            path = leaves[number][0]
            for subchunks, global_slice in chunks:
                flat = np.concatenate([np.asarray(c).ravel() for c in subchunks])
                region = tuple(slice(s.start, s.stop) for s in global_slice)
                target = arrays[number][region] if region else arrays[number]
                if flat.size != np.size(target):
                    raise CheckpointError(
                        f"{data_file}: a chunk of {path!r} has {flat.size} values for "
                        f"a slice of shape {np.shape(target)}; the file is corrupt."
                    )
                if region:
                    arrays[number][region] = flat.reshape(target.shape)
                    filled[number][region] = True
                else:
                    arrays[number][...] = flat.reshape(arrays[number].shape)
                    filled[number][...] = True
        if progress is not None:
            progress.update(file_number)
    for (path, _), mask in zip(leaves, filled):
        if not mask.all():
            raise CheckpointError(
                f"Parameter {path!r} is not fully present in the data files of "
                f"{prefix} (a shard is missing or truncated)."
            )
    return {path: array for (path, _), array in zip(leaves, arrays)}
