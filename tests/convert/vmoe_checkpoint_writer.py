"""Writes checkpoints in vmoe's partitioned msgpack format, for tests only.

It lets tests build checkpoints of configurations the shared fixtures do not
cover (other shard counts, chunked arrays, truncated files).
"""

import msgpack
import numpy as np

MAGIC = "__msgpack_array_chunk_a87ca2__"


def _ext(code, payload):
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


def _ndarray(array):
    array = np.ascontiguousarray(array)
    return _ext(1, (list(array.shape), array.dtype.name, array.tobytes("C")))


def _slice_nd_bytes(slices):
    """vmoe's SliceNd encoding: a packed tuple of packed (start, stop, step)."""
    return msgpack.packb(
        tuple(msgpack.packb((s.start, s.stop, None), use_bin_type=True) for s in slices),
        use_bin_type=True,
    )


def unflatten(flat):
    """{'a/b': x} -> {'a': {'b': x}}: a flat parameter dict as flax's nested tree."""
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def write_vmoe_checkpoint(prefix, params, shard_count=2, split_first_axis=False):
    """Writes `params` ({path: array}) as `prefix.index` + `prefix.data-*`.

    Leaves are spread round-robin over the shards; with `split_first_axis`
    arrays with a first axis > 1 are cut in two chunks on different shards.
    """
    # Number leaves in JAX's flattening order of the nested index tree.
    order = sorted(params, key=lambda path: path.split("/"))
    shards = [dict({MAGIC: True}) for _ in range(shard_count)]
    index = {}
    for number, path in enumerate(order):
        array = np.asarray(params[path])
        full = [slice(0, n) for n in array.shape]
        if split_first_axis and array.ndim and array.shape[0] > 1:
            half = array.shape[0] // 2
            pieces = [[slice(0, half)] + full[1:], [slice(half, array.shape[0])] + full[1:]]
        else:
            pieces = [full]
        slices, owners = [], []
        for part, region in enumerate(pieces):
            shard = (number + part) % shard_count
            chunk = array[tuple(region)] if region else array
            shards[shard].setdefault(str(number), []).append(
                [[_ndarray(chunk.ravel())], msgpack.ExtType(6, _slice_nd_bytes(region))]
            )
            slices.append(_slice_nd_bytes(region))
            owners.append(shard)
        shaped = msgpack.packb((list(array.shape), array.dtype.name, False, {}), use_bin_type=True)
        index[path] = _ext(8, (shaped, tuple(slices), tuple(owners)))
    content = {"version": "20220622", "shard_count": shard_count, "index": unflatten(index)}
    with open(f"{prefix}.index", "wb") as file:
        file.write(msgpack.packb(content, use_bin_type=True))
    for shard, data in enumerate(shards):
        with open(f"{prefix}.data-{shard:05d}-of-{shard_count:05d}", "wb") as file:
            file.write(msgpack.packb(data, use_bin_type=True))
