"""Runs ruff, then the test suite once per Keras backend, each in its own process.

Usage: python tools/run_suite.py [--jobs N] jax tensorflow torch [-- extra pytest args]

First `ruff check` and `ruff format --check` (configured in pyproject.toml;
`--no-lint` skips them). Then one pytest process per backend, at most
`--jobs` at a time (default 2), started in the order given: with two, the
JAX pass (the longest; much of it one core compiling) runs beside
TensorFlow's and then PyTorch's. Each process's output goes to a log and is
printed whole when it ends. Prints one summary line per backend and a total
line, and exits non-zero if ruff or any backend fails (including a backend
that ran no test). `--jobs 1` runs them one after the other.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed)")


class Pass:
    """One backend's pytest process, its output in a log file."""

    def __init__(self, backend, pytest_args, log_dir):
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
        # Passes running side by side must not share a converted-preset cache.
        env.setdefault("KERAS_VMOE_HOME", str(Path(log_dir) / f"home-{backend}"))
        # Backends pick up all cores by default; that is what a user gets too.
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
        print(f"=== {backend}: started {' '.join(command[1:])}", flush=True)
        self.backend = backend
        self.log_path = Path(log_dir) / f"{backend}.log"
        self.log = open(self.log_path, "w")
        self.start = time.time()
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )

    def finish(self):
        """(exit code, {kind: count}, seconds), after printing the whole log."""
        code = self.process.wait()
        seconds = time.time() - self.start
        self.log.close()
        text = self.log_path.read_text()
        print(f"=== {self.backend}: finished in {seconds:.0f}s\n{text}", flush=True)
        counts = {}
        for line in text.splitlines()[-5:]:
            for number, kind in SUMMARY.findall(line):
                counts[kind.rstrip("s") if kind == "errors" else kind] = int(number)
        return code, counts, seconds


def run_backends(backends, pytest_args, jobs):
    """{backend: (code, counts, seconds)}, at most `jobs` processes at a time."""
    results, waiting, running = {}, list(backends), []
    last_note = time.time()
    with tempfile.TemporaryDirectory(prefix="keras-vmoe-suite-") as log_dir:
        while waiting or running:
            while waiting and len(running) < jobs:
                running.append(Pass(waiting.pop(0), pytest_args, log_dir))
            done = [p for p in running if p.process.poll() is not None]
            if not done:
                time.sleep(1.0)
                if time.time() - last_note >= 60:  # A sign of life for CI logs.
                    last_note = time.time()
                    print(
                        "... " + ", ".join(f"{p.backend} {last_note - p.start:.0f}s" for p in running),
                        flush=True,
                    )
                continue
            for finished in done:
                running.remove(finished)
                results[finished.backend] = finished.finish()
    return {backend: results[backend] for backend in backends}


def lint():
    """ruff's lint and format checks on the repository; True when both pass."""
    ok = True
    for command in (["check", "."], ["format", "--check", "."]):
        print(f"=== ruff {' '.join(command)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT)
        ok = ok and result.returncode == 0
    return ok


def main(argv):
    run_lint = "--no-lint" not in argv
    argv = [arg for arg in argv if arg != "--no-lint"]
    jobs = 2
    if "--jobs" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        at = argv.index("--jobs")
        jobs = max(1, int(argv[at + 1]))
        argv = argv[:at] + argv[at + 2 :]
    if "--" in argv:
        split = argv.index("--")
        backends, pytest_args = argv[:split], argv[split + 1 :]
    else:
        backends, pytest_args = argv, []
    linted = lint() if run_lint else True
    start = time.time()
    results = run_backends(backends, pytest_args, jobs)
    print("\n=== summary")
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    ok = True
    for backend, (code, counts, seconds) in results.items():
        for kind in totals:
            totals[kind] += counts.get(kind, 0)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        if code == 5:
            status = "FAILED (no test ran)"
        ok = ok and code == 0
        print(
            f"{backend:>10}: {counts.get('passed', 0)} passed, "
            f"{counts.get('failed', 0) + counts.get('error', 0)} failed, "
            f"{counts.get('skipped', 0)} skipped in {seconds:.0f}s: {status}"
        )
    print(
        f"total: {totals['passed']} passed, {totals['failed'] + totals['error']} failed, "
        f"{totals['skipped']} skipped"
    )
    print(f"wall time: {time.time() - start:.0f}s ({jobs} at a time)")
    if run_lint:
        print(f"ruff: {'ok' if linted else 'FAILED'}")
    return 0 if ok and linted else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
