"""Shared test plumbing: running Triton kernels under the interpreter in a subprocess, a command
line's main in this process (`run_command`), the seeded weights of the reference vectors
(`recipe_weights`), and a fixture that runs a test on one CPU thread.

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


def recipe_weights(model, keep=()):
    """The weights of the reference vectors made from public code (tests/reference/README.md):
    one `torch.Generator().manual_seed(0)`, then for each state-dict entry in order, except
    num_batches_tracked and the entries whose names start with `keep` (kept as they are):
    running_mean 0.1 randn, running_var 0.5 + rand, a BatchNorm weight 0.8 + 0.4 rand, any bias
    (a name ending in "bias") 0.1 randn, any other weight randn * sqrt(2 / fan_in)."""
    g = torch.Generator().manual_seed(0)
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    out = {}
    for k, v in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if leaf == "num_batches_tracked" or k.startswith(tuple(keep)):
            x = v.clone()
        elif leaf == "running_mean":
            x = 0.1 * torch.randn(v.shape, generator=g)
        elif leaf == "running_var":
            x = 0.5 + torch.rand(v.shape, generator=g)
        elif module in norms and leaf == "weight":
            x = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif leaf.endswith("bias"):  # nn.MultiheadAttention's in_proj_bias too
            x = 0.1 * torch.randn(v.shape, generator=g)
        else:  # conv and linear weights: He-scaled normal
            x = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        out[k] = x.to(v.dtype)
    return out


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
