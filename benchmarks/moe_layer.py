"""Speed and dispatch memory of one MoE layer against the dense MLP of equal active FLOPs.

Run from the repository root (one process per backend, one after the other):

    python benchmarks/moe_layer.py                       # everything, all three backends
    python benchmarks/moe_layer.py --parts headline      # the acceptance configuration only
    python benchmarks/moe_layer.py --parts small_groups  # one 64-token image, with the expert floor
    python benchmarks/moe_layer.py --parts accelerator --backends jax torch   # on a GPU / TPU only
    python benchmarks/moe_layer.py --quick               # tiny shapes: a smoke test, < 2 minutes
    python benchmarks/moe_layer.py --parts routers --rounds 7 3   # the routers, fewer rounds
    python benchmarks/moe_layer.py --backends torch --out benchmarks/results/torch.json
    python benchmarks/moe_layer.py --parts small_groups --malloc keep-freed   # freed memory reused

What it measures
    Workload: 16 images x 256 tokens (4096 tokens), hidden 384, expert MLP
    1536, float32, one CPU thread per process. Candidates:
    - `dense`: `keras_vmoe.layers.Mlp` with mlp_dim = K x 1536, the same
      active FLOPs as a top-K MoE. Every ratio is taken to it.
    - `sparse_moe`: `keras_vmoe.layers.SparseMoE` (token choice, E=8, K=2),
      at routing groups of one image (256) and of the batch (4096), capacity
      factor 1.0 and 1.25.
    - `soft_moe`: `keras_vmoe.layers.SoftMoE` with E x P = K x 256 slots per
      image, so its experts do the dense MLP's FLOPs (P = 64 for E=8, K=2).
    - `vmoe_einsum`: google-research/vmoe's one-hot einsum dispatch
      (`moe_references.OneHotEinsumMoE`), same groups and capacities.
    - `dense_masked`: keras-hub's Mixtral block, every expert on every token
      (`moe_references.DenseMaskedMoE`); it costs about E / K x dense.
    - `experts_only`: no router, no dispatch: `SparseMoE`'s own expert bank
      on the tokens repeated K times as E x (K x tokens / E) slots
      (`moe_references.ExpertsOnly`), the floor under any dispatch of the
      same expert FLOPs; time above it is routing, dispatch and combine.
    - `--parts small_groups`: one image of 64 tokens (16 per expert at E=8,
      K=2: serving one image at a time) with `dense`, `experts_only`,
      `sparse_moe`, `soft_moe` and `vmoe_einsum`, 4 x the rounds.
    - `--parts accelerator` (not in the default parts; for a GPU or TPU):
      bfloat16, 32 x 1,024 tokens, hidden 1024, MLP 4096, E = 8 and 64,
      K = 2: `sparse_moe` with padded experts (`padded`) against grouped
      matmuls (`grouped`: `jax.lax.ragged_dot`, `torch.nn.functional.
      grouped_mm`), `soft_moe` and the dense MLP; the throughput fraction of
      the dense MLP is 1 / the ratio.
    - `--parts routers`: `SparseMoE` with each router of the router study
      (token choice, Sinkhorn token / expert choice, sparsity-constrained
      token / expert choice, sparse top-k, expert choice) at groups of one
      image and equal per-token compute; compare each to token choice.
    Each backend runs the layers the way Keras runs them: `jax-jit`
    (`jax.jit` of `stateless_call`), `tf-graph` (`tf.function(jit_compile=
    False)`: what `jit_compile="auto"` picks on a CPU-only machine) and
    `tf-xla` (`jit_compile=True`: what "auto" picks when TensorFlow sees a
    GPU), `torch-eager` (Keras does not compile on torch). The forward pass uses
    training=False; the training step is the loss sum(outputs x a fixed
    cotangent) + the auxiliary losses, with gradients of the weights and the
    inputs.

How it measures
    All candidates (and TensorFlow's two modes) of one configuration live in
    the same process and are timed round-robin, so a slow phase of the machine
    hits all of them. The first call (trace + compile + one run) is reported
    apart; the table shows the median over the rounds and its ratio to
    `dense` in the same mode. The sweeps (`--parts sweeps`) vary the tokens
    per expert (tokens x K / E from 16 to 1024), E (8, 32, 128), K (1, 2) and
    the capacity factor. The memory probe (`--parts memory`) runs each of
    `dense`, `sparse_moe` and `vmoe_einsum` at both group sizes in a fresh
    process: after a warm-up on a tiny copy, with the layer built and the
    function compiled ahead of time (jax-jit) or traced (tf-graph), it resets
    the peak RSS and reports how much one forward call raises it (ru_maxrss),
    next to the analytic size of the routing tables and expert inputs.
    `--parts memory_scale` does the same for one routing group of 16,384
    tokens with E = 64, K = 2 (the dense MLP and `sparse_moe`), over one
    forward and backward call.
    `--quick` shrinks every shape (hidden 64, 4 x 64 tokens) and the rounds,
    and by default runs the headline and the memory probe only.
    `--malloc` sets the workers' glibc malloc up (`use_malloc`): training
    steps write their gradients into new buffers, and by default glibc gives
    freed blocks of 128 KiB and more back to the system, so each step faults
    them in again. With `keep-freed` it keeps them: JAX's training step at
    one image (small groups) measured 1.66-1.90x the dense MLP's with it,
    2.0-2.3x without, the spread between processes narrower. A diagnostic,
    not a recommendation: whole JAX models ran 40% slower with it at batch 1.

How to read it
    Ratios are the result; milliseconds depend on the machine. A ratio of 1.0
    means the MoE layer costs what the dense MLP doing the same active work
    costs. Compare timings only within one run. The JSON (--out) keeps every
    round's time, the first-call times, and the machine: CPU, core count,
    library versions, date and load average.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

BENCHMARK_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARK_DIR.parent
WORKER = BENCHMARK_DIR / "moe_layer_worker.py"

BACKENDS = ("jax", "tensorflow", "torch")
# The modes each backend's process times, as Keras runs a layer there.
MODES = {"jax": ("jax-jit",), "tensorflow": ("tf-graph", "tf-xla"), "torch": ("torch-eager",)}
# The memory probe's mode per backend: one whose compilation can happen
# before the measured call (XLA under tf.function compiles at the first call;
# tf-graph is also what Keras runs on a CPU-only machine).
MEMORY_MODES = {"jax": "jax-jit", "tensorflow": "tf-graph", "torch": "torch-eager"}
MEMORY_CANDIDATES = ("dense", "sparse_moe", "vmoe_einsum")
PARTS = ("headline", "small_groups", "sweeps", "memory", "memory_scale", "routers", "accelerator")
# The router study's routers, timed against token choice at the headline workload.
STUDY_ROUTERS = (
    "token_choice",
    "sinkhorn_token_choice",
    "sinkhorn_expert_choice",
    "sparse_token_choice",
    "sparse_expert_choice",
    "sparse_top_k",
    "expert_choice",
)
PHASES = ("forward", "train")
# Tokens of the tiny copy a memory probe warms its process up on.
WARM_UP_TOKENS = 16

# One thread per process: the numbers compare implementations, not thread pools.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One candidate layer; `group_size` and `capacity_factor` apply to the
    capacity-based ones (`sparse_moe`, `vmoe_einsum`)."""

    candidate: str
    group_size: int | None = None
    capacity_factor: float | None = None
    router: str = "token_choice"
    # `sparse_moe` only: grouped matmuls forced on (True) or off (False);
    # None: the device's choice (`keras_vmoe.ops.uses_grouped_gemm`).
    grouped_gemm: bool | None = None

    def tiny(self):
        """The same candidate for `Benchmark.tiny` inputs."""
        return dataclasses.replace(self, group_size=self.group_size and WARM_UP_TOKENS)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One workload and expert configuration, and the cases timed together."""

    name: str
    num_images: int
    tokens_per_image: int
    hidden_dim: int
    mlp_dim: int
    num_experts: int
    num_selected_experts: int
    cases: tuple[Case, ...]
    forward_rounds: int
    train_rounds: int
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, spec):
        return cls(**{**spec, "cases": tuple(Case(**case) for case in spec["cases"])})

    @property
    def num_tokens(self):
        return self.num_images * self.tokens_per_image

    @property
    def input_shape(self):
        return (self.num_images, self.tokens_per_image, self.hidden_dim)

    @property
    def dense_mlp_dim(self):
        """The dense MLP with a top-K MoE's active FLOPs: K x mlp_dim."""
        return self.num_selected_experts * self.mlp_dim

    @property
    def slots_per_expert(self):
        """Soft MoE slots per expert with the dense MLP's expert FLOPs.

        Each slot goes through one expert MLP of width mlp_dim, so E x P slots
        per image cost what K x tokens_per_image tokens cost in K experts,
        i.e. what the dense MLP of width K x mlp_dim costs on the image:
        P = K x tokens_per_image / E. With E=8, K=2 and 256-token images that
        is the issue's 64 slots per expert (and P = 32 against Mlp(1536) for
        K=1). Soft MoE's extra cost (logits, dispatch and combine einsums,
        about 3 x tokens x slots x D multiply-adds) over its experts' cost is
        1.5 x tokens_per_image / mlp_dim whatever P is: 1.25 at 256 / 1536.
        """
        return max(1, self.num_selected_experts * self.tokens_per_image // self.num_experts)

    def label(self, case):
        if case.candidate == "dense":
            return f"dense mlp={self.dense_mlp_dim}"
        if case.candidate == "soft_moe":
            return f"soft_moe P={self.slots_per_expert}"
        if case.router != "token_choice":
            return f"{case.router} g={case.group_size} cf={case.capacity_factor}"
        if case.group_size is not None:
            label = f"{case.candidate} g={case.group_size} cf={case.capacity_factor}"
            if case.grouped_gemm is not None:
                label += " grouped" if case.grouped_gemm else " padded"
            return label
        return case.candidate

    def title(self):
        dtype = "" if self.dtype == "float32" else f", {self.dtype}"
        return (
            f"{self.name}: {self.num_images} x {self.tokens_per_image} tokens, "
            f"hidden {self.hidden_dim}, mlp {self.mlp_dim}, E={self.num_experts}, "
            f"K={self.num_selected_experts}{dtype}"
        )

    def tiny(self):
        """A tiny copy of the workload, to warm a process up."""
        return dataclasses.replace(
            self, num_images=1, tokens_per_image=WARM_UP_TOKENS, hidden_dim=8, mlp_dim=16
        )


@dataclasses.dataclass(frozen=True)
class Scale:
    """Shapes and rounds of a full or a quick run."""

    num_images: int
    tokens_per_image: int
    hidden_dim: int
    mlp_dim: int
    forward_rounds: int
    train_rounds: int
    sweep_forward_rounds: int
    sweep_train_rounds: int
    # (images, tokens per image) of the tokens-per-expert sweep at E=8, K=2.
    sweep_token_shapes: tuple[tuple[int, int], ...]


FULL = Scale(
    num_images=16,
    tokens_per_image=256,
    hidden_dim=384,
    mlp_dim=1536,
    forward_rounds=15,
    train_rounds=5,
    sweep_forward_rounds=7,
    sweep_train_rounds=3,
    sweep_token_shapes=((1, 64), (1, 256), (4, 256), (16, 256)),
)
QUICK = Scale(
    num_images=4,
    tokens_per_image=64,
    hidden_dim=64,
    mlp_dim=128,
    forward_rounds=3,
    train_rounds=2,
    sweep_forward_rounds=2,
    sweep_train_rounds=1,
    sweep_token_shapes=((1, 16), (4, 64)),
)


def make_benchmark(scale, name, num_experts, k, cases, num_images=None, tokens_per_image=None, sweep=False):
    return Benchmark(
        name=name,
        num_images=num_images or scale.num_images,
        tokens_per_image=tokens_per_image or scale.tokens_per_image,
        hidden_dim=scale.hidden_dim,
        mlp_dim=scale.mlp_dim,
        num_experts=num_experts,
        num_selected_experts=k,
        cases=tuple(cases),
        forward_rounds=scale.sweep_forward_rounds if sweep else scale.forward_rounds,
        train_rounds=scale.sweep_train_rounds if sweep else scale.train_rounds,
    )


def headline_benchmark(scale):
    """E=8, K=2: the issue's acceptance configuration."""
    image, batch = scale.tokens_per_image, scale.num_images * scale.tokens_per_image
    cases = [
        Case("dense"),
        Case("sparse_moe", image, 1.0),
        Case("sparse_moe", image, 1.25),
        Case("sparse_moe", batch, 1.0),
        Case("soft_moe"),
        Case("vmoe_einsum", image, 1.0),
        Case("vmoe_einsum", image, 1.25),
        Case("vmoe_einsum", batch, 1.0),
        Case("dense_masked"),
    ]
    return make_benchmark(scale, "headline", 8, 2, cases)


def small_groups_benchmark(scale):
    """One image of a quarter of the headline's tokens (64 at full scale):
    16 tokens per expert at E=8, K=2, serving one image at a time. With
    `experts_only`, the expert matmuls alone, the floor under any dispatch.
    Small steps, so many rounds."""
    image = scale.tokens_per_image // 4
    cases = [
        Case("dense"),
        Case("experts_only"),
        Case("sparse_moe", image, 1.0),
        Case("soft_moe"),
        Case("vmoe_einsum", image, 1.0),
    ]
    benchmark = make_benchmark(scale, "small groups", 8, 2, cases, 1, image)
    return dataclasses.replace(
        benchmark, forward_rounds=4 * scale.forward_rounds, train_rounds=4 * scale.train_rounds
    )


def accelerator_benchmarks(scale, quick):
    """For a GPU or TPU: bfloat16, 32 x 1,024 tokens (quick: the quick
    scale), hidden 1024, MLP 4096, E = 8 and 64, K = 2, groups of one
    1,024-token image: the sparse layer's padded experts against its
    grouped matmuls (`ragged_dot` / `grouped_mm`), Soft MoE, the dense MLP.
    Not part of the default parts: on a CPU it takes hours."""
    shape = (scale.num_images, scale.tokens_per_image) if quick else (32, 1024)
    width = (scale.hidden_dim, scale.mlp_dim) if quick else (1024, 4096)
    accelerator = dataclasses.replace(scale, hidden_dim=width[0], mlp_dim=width[1])
    benchmarks = []
    for num_experts in (8, 64):
        group = shape[1]
        cases = [
            Case("dense"),
            Case("sparse_moe", group, 1.0, grouped_gemm=False),
            Case("sparse_moe", group, 1.0, grouped_gemm=True),
            Case("soft_moe"),
        ]
        name = f"accelerator E={num_experts}"
        benchmark = make_benchmark(accelerator, name, num_experts, 2, cases, *shape, sweep=True)
        benchmarks.append(dataclasses.replace(benchmark, dtype="bfloat16"))
    return benchmarks


def routers_benchmark(scale):
    """Every router of the router study in a `SparseMoE` at the headline
    workload (groups of one image), at equal per-token compute: capacity
    factor 1.0 for token choice (K x S slots), K = 2 for expert choice."""
    image = scale.tokens_per_image
    cases = [Case("dense")]
    for router in STUDY_ROUTERS:
        capacity_factor = 2.0 if router.endswith("expert_choice") else 1.0
        cases.append(Case("sparse_moe", image, capacity_factor, router))
    return make_benchmark(scale, "routers", 8, 2, cases)


def sweep_benchmarks(scale):
    """Tokens per expert (tokens x K / E), E, K and the capacity factor.

    Routing groups are one image. `dense_masked` runs only where E / K <= 8:
    beyond, it costs tens of dense MLPs per call on a CPU.
    """
    benchmarks = []
    for num_images, tokens_per_image in scale.sweep_token_shapes:
        tokens_per_expert = num_images * tokens_per_image * 2 // 8
        cases = [
            Case("dense"),
            Case("sparse_moe", tokens_per_image, 1.0),
            Case("soft_moe"),
            Case("vmoe_einsum", tokens_per_image, 1.0),
            Case("dense_masked"),
        ]
        name = f"tokens/expert={tokens_per_expert}"
        benchmarks.append(make_benchmark(scale, name, 8, 2, cases, num_images, tokens_per_image, sweep=True))
    image = scale.tokens_per_image
    for num_experts in (8, 32, 128):
        for k in (1, 2):
            cases = [
                Case("dense"),
                Case("sparse_moe", image, 1.0),
                Case("sparse_moe", image, 1.25),
                Case("soft_moe"),
                Case("vmoe_einsum", image, 1.0),
                Case("vmoe_einsum", image, 1.25),
            ]
            if num_experts <= 8 * k:
                cases.append(Case("dense_masked"))
            name = f"E={num_experts} K={k}"
            benchmarks.append(make_benchmark(scale, name, num_experts, k, cases, sweep=True))
    return benchmarks


def memory_probes(scale, quick):
    """(benchmark, case) pairs whose dispatch memory is measured: the dense
    MLP and both dispatches at groups of one image and of the whole batch
    (quick: both dispatches at the batch group only)."""
    benchmark = headline_benchmark(scale)
    image, batch = scale.tokens_per_image, scale.num_images * scale.tokens_per_image
    cases = [] if quick else [Case("dense")]
    for group_size in (batch,) if quick else (image, batch):
        cases += [Case("sparse_moe", group_size, 1.0), Case("vmoe_einsum", group_size, 1.0)]
    return [(benchmark, case) for case in cases]


def memory_scale_probes(scale, quick):
    """One routing group of 16,384 tokens (quick: 1,024) with E = 64, K = 2:
    the dense MLP and `sparse_moe`, forward and backward. (The one-hot
    einsum dispatch would hold two (S, E, C) tables: 4.3 GB here.)"""
    tokens = 1024 if quick else 16384
    cases = [Case("dense"), Case("sparse_moe", tokens, 1.0)]
    benchmark = make_benchmark(scale, "memory at scale", 64, 2, cases, 1, tokens)
    return [(benchmark, case) for case in cases]


# Worker processes -------------------------------------------------------------


def worker_env(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, **SINGLE_THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def limit_threads(backend):
    """One thread inside a worker: the environment asks for it, and each
    backend's own switches too, before anything runs an op."""
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        if torch.get_num_interop_threads() != 1:  # Settable once, before any parallel work.
            torch.set_num_interop_threads(1)
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def write_report(report, out):
    """Prints the errors and writes the JSON report to `out` (if given)."""
    for error in report["errors"]:
        print(f"\nERROR {error}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {out}")


def run_worker(backend, task):
    """Runs `task` in a fresh process of `backend`; returns its JSON answer.

    The worker's progress lines are echoed; its stderr (library warnings) is
    shown only if it fails.
    """
    with tempfile.TemporaryDirectory() as folder:
        task_path, result_path = Path(folder, "task.json"), Path(folder, "result.json")
        task_path.write_text(json.dumps(task))
        with open(Path(folder, "stderr.txt"), "w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), str(task_path), str(result_path)],
                env=worker_env(backend),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            for line in process.stdout:
                print(line, end="", file=sys.stderr, flush=True)
            if process.wait() != 0:
                stderr.seek(0)
                tail = stderr.read()[-4000:]
                return {"error": f"{backend} worker exited with {process.returncode}:\n{tail}"}
        return json.loads(result_path.read_text())


def run_script_worker(script, backend, task):
    """Runs `script --worker TASK RESULT` in a fresh one-thread process of
    `backend` (the pattern of patch_merger.py and serving.py); returns the
    JSON it wrote, or {"error": ...} with the end of its stderr."""
    with tempfile.TemporaryDirectory() as folder:
        task_path, result_path = Path(folder, "task.json"), Path(folder, "result.json")
        task_path.write_text(json.dumps(task))
        process = subprocess.run(
            [sys.executable, str(script), "--worker", str(task_path), str(result_path)],
            env=worker_env(backend),
            stdout=sys.stderr,
            stderr=subprocess.PIPE,
            text=True,
        )
        if not result_path.exists():
            return {"error": f"{backend} worker exited with {process.returncode}:\n{process.stderr[-4000:]}"}
        return json.loads(result_path.read_text())


def answer_task(run, task_path, result_path):
    """A worker's side of `run_script_worker`: `run(task)`, or the traceback."""
    import traceback

    task = json.loads(Path(task_path).read_text())
    try:
        answer = run(task)
    except Exception:
        answer = {"error": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(answer))


def run_timings(backends, benchmarks):
    """{backend: worker answer} for the timing of `benchmarks`."""
    task = {"task": "timing", "benchmarks": [dataclasses.asdict(b) for b in benchmarks]}
    return {backend: run_worker(backend, task) for backend in backends}


def run_memory(backends, probes, training=False):
    """One record per (backend, probe), each measured in its own process;
    `training`: a forward and backward call instead of a forward one."""
    records = []
    for backend in backends:
        for benchmark, case in probes:
            task = {
                "task": "memory",
                "benchmark": dataclasses.asdict(benchmark),
                "case": dataclasses.asdict(case),
                "mode": MEMORY_MODES[backend],
                "training": training,
            }
            records.append(
                {
                    "backend": backend,
                    "mode": MEMORY_MODES[backend],
                    "training": training,
                    "label": benchmark.label(case),
                    **dataclasses.asdict(case),
                    **run_worker(backend, task),
                }
            )
    return records


# Results ------------------------------------------------------------------------


def collect(benchmarks, answers):
    """Merges the workers' answers per benchmark and adds ratios to dense."""
    collected = []
    for benchmark in benchmarks:
        dense = benchmark.label(Case("dense"))
        results = {}
        for answer in answers.values():
            for mode, phases in answer.get("results", {}).get(benchmark.name, {}).items():
                for measurements in phases.values():
                    baseline = measurements.get(dense, {}).get("median_ms")
                    for measurement in measurements.values():
                        measurement["ratio_to_dense"] = baseline and measurement["median_ms"] / baseline
                results[mode] = phases
        collected.append(
            {
                "benchmark": dataclasses.asdict(benchmark),
                "title": benchmark.title(),
                "labels": [benchmark.label(case) for case in benchmark.cases],
                "results": results,
            }
        )
    return collected


def format_table(header, rows):
    """Text table: first column left-aligned, the others right-aligned."""
    lines = [header, *rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]

    def format_line(line):
        first, *rest = [str(cell) for cell in line]
        return "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])])

    return "\n".join(format_line(line) for line in lines)


def timing_table(benchmark, phase, modes):
    """Median ms and ratio to dense per case (rows) and mode (columns)."""
    rows = []
    for label in benchmark["labels"]:
        cells = []
        for mode in modes:
            measurement = benchmark["results"].get(mode, {}).get(phase, {}).get(label)
            if measurement is None:
                cells.append("-")
            elif measurement["ratio_to_dense"] is None:
                cells.append(f"{measurement['median_ms']:.1f} ms")
            else:
                cells.append(f"{measurement['median_ms']:.1f} ms {measurement['ratio_to_dense']:5.2f}x")
        rows.append([label, *cells])
    return format_table(["case", *modes], rows)


def first_call_table(benchmark, modes):
    """First-call seconds (trace + compile + run), forward / train."""
    rows = []
    for label in benchmark["labels"]:
        cells = []
        for mode in modes:
            phases = benchmark["results"].get(mode, {})
            times = [phases.get(phase, {}).get(label, {}).get("first_call_s") for phase in PHASES]
            cells.append(" / ".join("-" if t is None else f"{t:.2f}" for t in times))
        rows.append([label, *cells])
    return format_table(["case", *modes], rows)


def print_benchmark(benchmark, modes):
    print(f"\n== {benchmark['title']}")
    print("forward pass, median ms per call and ratio to dense in the same mode:")
    print(timing_table(benchmark, "forward", modes))
    print("training step, median ms per call and ratio to dense in the same mode:")
    print(timing_table(benchmark, "train", modes))
    print("first call (trace + compile + run), seconds, forward / train:")
    print(first_call_table(benchmark, modes))


def memory_table(records):
    header = ["case", "backend mode", "peak RSS increase", "capacity", "routing tables", "expert inputs"]
    rows = []
    for record in records:
        if "error" in record:
            rows.append([record["label"], record["mode"], "failed", "", "", ""])
            continue
        analytic = "routing_tables_mb" in record
        rows.append(
            [
                record["label"],
                record["mode"],
                f"{record['peak_rss_increase_mb']:.1f} MB",
                record.get("capacity", ""),
                f"{record['routing_tables_mb']:.1f} MB" if analytic else "",
                f"{record['expert_inputs_mb']:.1f} MB" if analytic else "",
            ]
        )
    return format_table(header, rows)


# Environment variables that change how a process gets its memory (glibc's
# malloc, PyTorch's CPU allocator); recorded with every result.
MEMORY_ENV = (
    "GLIBC_TUNABLES",
    "THP_MEM_ALLOC_ENABLE",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "LD_PRELOAD",
)
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# `--malloc keep-freed`: every block from glibc's heap (no block mmapped on
# its own) and the heap never given back to the system, so that a step's new
# buffers (its gradients) land in pages an earlier step touched.
KEEP_FREED_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
MALLOC_SETTINGS = ("default", "huge-pages", "keep-freed")


def memory_settings():
    """The system's transparent-huge-page mode and the memory variables set."""
    try:
        modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split()
        mode = next((m.strip("[]") for m in modes if m.startswith("[")), None)
    except OSError:
        mode = None
    return {
        "transparent_hugepage": mode,
        "memory_env": {name: os.environ[name] for name in MEMORY_ENV if name in os.environ},
    }


def use_huge_pages():
    """Asks glibc's malloc, in the worker processes started from here on, to
    back its large blocks with transparent huge pages (glibc >= 2.35, the
    system mode `madvise` or `always`): large fresh buffers, such as a
    training step's weight gradients, then fault in 512 times fewer pages."""
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGE_PAGES_TUNABLE not in tunables:
        os.environ["GLIBC_TUNABLES"] = ":".join(tunables + [HUGE_PAGES_TUNABLE])


def use_malloc(setting):
    """Sets glibc's malloc up for the worker processes started from here on:
    "default" leaves it as it is, "huge-pages" (`use_huge_pages`),
    "keep-freed" (`KEEP_FREED_ENV`). Each result records what it ran with
    (`memory_settings`)."""
    if setting == "huge-pages":
        use_huge_pages()
    elif setting == "keep-freed":
        os.environ.update(KEEP_FREED_ENV)
    elif setting != "default":
        raise ValueError(f"unknown malloc setting {setting!r}; expected one of {', '.join(MALLOC_SETTINGS)}.")


def add_malloc_argument(parser):
    """`--malloc {default,huge-pages,keep-freed}` (see `use_malloc`)."""
    parser.add_argument(
        "--malloc",
        choices=MALLOC_SETTINGS,
        default="default",
        help="how the workers' glibc malloc hands out memory: as set (default), large blocks in "
        "transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), or freed memory kept for "
        "reuse (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ 4 GiB, MALLOC_TOP_PAD_ 256 MiB)",
    )


def machine_info():
    def cpu_model():
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor()

    versions = {}
    for package in ("keras", "jax", "jaxlib", "tensorflow", "torch", "numpy", "keras-vmoe"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **memory_settings(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "load_average_at_start": os.getloadavg(),
        "threads_per_process": 1,
        "libraries": versions,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=None,
        help="what to run (default: all; with --quick: headline and memory)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and rounds (a smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results file (default: benchmarks/results/moe_layer-<date>.json; none with --quick)",
    )
    parser.add_argument(
        "--rounds",
        nargs=2,
        type=int,
        metavar=("FORWARD", "TRAIN"),
        default=None,
        help="timed rounds of the forward pass and of the training step (default: the scale's)",
    )
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    if args.parts is None:
        args.parts = ["headline", "memory"] if args.quick else [p for p in PARTS if p != "accelerator"]
    if args.out is None and not args.quick:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = BENCHMARK_DIR / "results" / f"moe_layer-{stamp}.json"
    return args


def main(argv=None):
    """Runs the benchmark; returns the results that --out receives."""
    args = parse_args(argv)
    use_malloc(args.malloc)
    scale = QUICK if args.quick else FULL
    if args.rounds:
        forward, train = args.rounds
        scale = dataclasses.replace(
            scale,
            forward_rounds=forward,
            train_rounds=train,
            sweep_forward_rounds=forward,
            sweep_train_rounds=train,
        )
    report = {
        "machine": machine_info(),
        "quick": args.quick,
        "parts": args.parts,
        "ops_overrides": {},
        "errors": [],
    }
    benchmarks = []
    if "headline" in args.parts:
        benchmarks.append(headline_benchmark(scale))
    if "small_groups" in args.parts:
        benchmarks.append(small_groups_benchmark(scale))
    if "sweeps" in args.parts:
        benchmarks += sweep_benchmarks(scale)
    if "routers" in args.parts:
        benchmarks.append(routers_benchmark(scale))
    if "accelerator" in args.parts:
        benchmarks += accelerator_benchmarks(scale, args.quick)
    if benchmarks:
        answers = run_timings(args.backends, benchmarks)
        report["benchmarks"] = collect(benchmarks, answers)
        for backend, answer in answers.items():
            report["ops_overrides"][backend] = answer.get("ops_overrides")
            report["errors"] += [f"{backend}: {e}" for e in answer.get("errors", [])]
            if "error" in answer:
                report["errors"].append(answer["error"])
    if "memory" in args.parts:
        report["memory"] = run_memory(args.backends, memory_probes(scale, args.quick))
        report["errors"] += [r["error"] for r in report["memory"] if "error" in r]
    if "memory_scale" in args.parts:
        report["memory_scale"] = run_memory(args.backends, memory_scale_probes(scale, args.quick), True)
        report["errors"] += [r["error"] for r in report["memory_scale"] if "error" in r]

    modes = [mode for backend in args.backends for mode in MODES[backend]]
    for backend, overrides in report["ops_overrides"].items():
        implementations = ", ".join(f"{op}: {name}" for op, name in sorted((overrides or {}).items()))
        print(f"keras_vmoe.ops overrides on {backend}: {implementations or 'none (generic keras.ops)'}")
    for benchmark in report.get("benchmarks", []):
        print_benchmark(benchmark, modes)
    if "memory" in report:
        print(f"\n== dispatch memory, one forward call: {headline_benchmark(scale).title()}")
        print(memory_table(report["memory"]))
    if "memory_scale" in report:
        title = memory_scale_probes(scale, args.quick)[0][0].title()
        print(f"\n== {title}; one forward and backward call")
        print(memory_table(report["memory_scale"]))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
