"""What a compiled program exchanges between devices, read from its HLO text.

`collective_report(hlo_text)` lists every collective of an XLA program
(JAX: `jax.jit(f).lower(...).compile().as_text()`; for a Keras model,
`keras_vmoe.distribution.step_collectives`): its kind, per-device result
shape, the devices per group, and bytes. The HLO is the SPMD program one
device runs, so every size is per device.

Bytes are counted two ways:
- `buffer_bytes`: the size of the collective's per-device result;
- `sent_bytes`: what one device sends with the usual ring / pairwise
  algorithms on n devices per group: all-to-all (n-1)/n of its buffer,
  all-gather (n-1)/n of the gathered result, reduce-scatter (n-1) times its
  result shard, all-reduce 2(n-1)/n of the buffer, collective-permute all of it.
"""

import collections
import math
import re

KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

# `%name = <result type> <kind>(` or `<kind>-start(`; `-done` ops repeat a start.
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


Collective = collections.namedtuple(
    "Collective",
    ["kind", "name", "shapes", "dtype", "group_size", "buffer_bytes", "sent_bytes", "op_name"],
)


def _group_size(line):
    """Devices per replica group, from any of the HLO spellings."""
    # Explicit: replica_groups={{0,1,2,3},{4,5,6,7}}.
    match = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if match:
        return len(match.group(1).split(","))
    # Iota: replica_groups=[2,4]<=[8] (2 groups of 4).
    match = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if match:
        return int(match.group(1).split(",")[-1])
    # Mesh: replica_groups=mesh['axis_0'=2,'axis_1'=4] ... {'axis_1'}.
    match = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if match:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        axes = re.findall(r"'([^']+)'", match.group(2))
        return math.prod(int(sizes[axis]) for axis in axes)
    # collective-permute: source_target_pairs={{0,1},...}: a pair at a time.
    if "source_target_pairs" in line:
        return 2
    return None


def _sent_bytes(kind, buffer_bytes, n):
    if not n or n < 2:
        return 0
    if kind == "all-to-all":
        return buffer_bytes * (n - 1) // n
    if kind == "all-gather":
        return buffer_bytes * (n - 1) // n
    if kind == "reduce-scatter":
        return buffer_bytes * (n - 1)
    if kind == "all-reduce":
        return 2 * buffer_bytes * (n - 1) // n
    return buffer_bytes  # collective-permute


def parse_collectives(hlo_text):
    """Every collective op of `hlo_text`, as `Collective` tuples."""
    collectives = []
    for line in hlo_text.splitlines():
        match = _OP.match(line)
        if not match:
            continue
        kind = match.group("kind")
        arrays = _ARRAY.findall(match.group("type"))
        if f"{kind}-start(" in line and kind in ("all-gather", "collective-permute"):
            # Their async start returns (operands, results[, context]): keep the results.
            arrays = arrays[1:2] if kind == "collective-permute" else arrays[len(arrays) // 2 :]
        shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays]
        dtypes = [dtype for dtype, _ in arrays]
        buffer_bytes = sum(
            math.prod(shape) * DTYPE_BYTES.get(dtype, 4) for shape, dtype in zip(shapes, dtypes)
        )
        n = _group_size(line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        collectives.append(
            Collective(
                kind=kind,
                name=match.group("name"),
                shapes=shapes,
                dtype=dtypes[0] if len(set(dtypes)) == 1 else ",".join(dtypes),
                group_size=n,
                buffer_bytes=buffer_bytes,
                sent_bytes=_sent_bytes(kind, buffer_bytes, n),
                op_name=op_name.group(1) if op_name else "",
            )
        )
    return collectives


class CollectiveReport:
    """The collectives of one compiled program (per device)."""

    def __init__(self, collectives):
        self.collectives = list(collectives)

    def of_kind(self, kind):
        return [c for c in self.collectives if c.kind == kind]

    def counts(self):
        """{kind: number of ops}, every kind listed."""
        return {kind: len(self.of_kind(kind)) for kind in KINDS}

    def buffer_bytes(self):
        """{kind: summed per-device result bytes}."""
        return {kind: sum(c.buffer_bytes for c in self.of_kind(kind)) for kind in KINDS}

    def sent_bytes(self):
        """{kind: bytes one device sends (ring estimate)}."""
        return {kind: sum(c.sent_bytes for c in self.of_kind(kind)) for kind in KINDS}

    def total_sent_bytes(self):
        return sum(self.sent_bytes().values())

    def gathers_shape(self, shape):
        """True if an all-gather's result has exactly `shape` (e.g. a whole
        expert bank, which expert parallelism must never gather)."""
        return any(tuple(shape) in c.shapes for c in self.of_kind("all-gather"))

    def table(self):
        """A Markdown table: one row per kind."""
        counts, buffers, sent = self.counts(), self.buffer_bytes(), self.sent_bytes()
        rows = [
            "| collective | ops | buffer bytes / device | sent bytes / device |",
            "|---|---|---|---|",
        ]
        for kind in KINDS:
            rows.append(f"| {kind} | {counts[kind]} | {buffers[kind]:,} | {sent[kind]:,} |")
        total_buffers, total_sent = sum(buffers.values()), sum(sent.values())
        rows.append(f"| total | {len(self.collectives)} | {total_buffers:,} | {total_sent:,} |")
        return "\n".join(rows)

    def details(self):
        """One line per op: kind, shapes, group size, bytes."""
        lines = []
        for c in self.collectives:
            shapes = ", ".join(f"{c.dtype}[{','.join(map(str, s))}]" for s in c.shapes)
            lines.append(
                f"{c.kind:<18} {shapes:<28} group of {c.group_size}  "
                f"{c.buffer_bytes:>10,} B buffer  {c.sent_bytes:>10,} B sent"
            )
        return "\n".join(lines)

    def __repr__(self):
        counts = ", ".join(f"{kind}={n}" for kind, n in self.counts().items())
        return f"<CollectiveReport {counts}; {self.total_sent_bytes():,} bytes sent per device>"


def collective_report(hlo_text):
    """A `CollectiveReport` of the compiled HLO text of one program."""
    if not isinstance(hlo_text, str):
        raise ValueError(
            "collective_report takes the HLO text of a compiled program (a str, e.g. "
            f"jax.jit(f).lower(...).compile().as_text()), got {type(hlo_text).__name__}."
        )
    return CollectiveReport(parse_collectives(hlo_text))
