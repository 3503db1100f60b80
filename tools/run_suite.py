"""Runs ruff, then the test suite once per Keras backend, each in its own process.

Usage: python tools/run_suite.py jax tensorflow torch [-- extra pytest args]

First `ruff check` and `ruff format --check` (configured in pyproject.toml;
`--no-lint` skips them). Prints one summary line per backend and a total
line, and exits non-zero if ruff or any backend fails (including a backend
that ran no test).
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed)")


def run_backend(backend, pytest_args):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
    # Backends pick up all cores by default; that is what a user gets too.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += pytest_args
    print(f"=== {backend}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        last_lines = (last_lines + [line])[-5:]
    code = process.wait()
    counts = {}
    for line in last_lines:
        for number, kind in SUMMARY.findall(line):
            counts[kind.rstrip("s") if kind == "errors" else kind] = int(number)
    return code, counts, time.time() - start


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
    if "--" in argv:
        split = argv.index("--")
        backends, pytest_args = argv[:split], argv[split + 1 :]
    else:
        backends, pytest_args = argv, []
    linted = lint() if run_lint else True
    results = {}
    for backend in backends:
        results[backend] = run_backend(backend, pytest_args)
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
    if run_lint:
        print(f"ruff: {'ok' if linted else 'FAILED'}")
    return 0 if ok and linted else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
