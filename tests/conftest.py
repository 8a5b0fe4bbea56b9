"""Shared test plumbing: running Triton kernels under the interpreter in a subprocess, a command
line's main in this process (`run_command`), and a fixture that runs a test on one CPU thread.

TRITON_INTERPRET must be set before Triton is first imported, and one pytest process imports it
for many files, so each kernel test file runs its interpreter checks in a child process of its
own: the file, run as a script, calls `interpreter_main(CHECKS)`, which prints one JSON line per
check; the `interpreter_results` fixture starts that child and collects the lines.
"""

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreter_main(checks):
    """Run every check ({name: callable}) here, printing {"name", "error"} per line (error None
    when it passed), so a crash part-way still reports the checks before it."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for name, check in checks.items():
        try:
            check()
            error = None
        except Exception:
            error = traceback.format_exc()
        print(json.dumps({"name": name, "error": error}), flush=True)


def run_command(main, argv, capsys):
    """(exit code, stdout, stderr) of a command line's `main(argv)` run in this process as its
    script runs it (`echoes.cli.run_cli`: one-line errors, exit codes), without a subprocess."""
    from echoes.cli import run_cli
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_thread():
    """One intra-op thread: results do not need it, but 2 busy cores run a tiny model several
    times faster without OpenMP spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def interpreter_results(request):
    """{check name: None or its traceback} from the requesting test file run under the
    interpreter (see `interpreter_main`)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, request.module.__file__, "--interpret"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not rows:
        pytest.fail(f"interpreter run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {row["name"]: row["error"] for row in rows}
