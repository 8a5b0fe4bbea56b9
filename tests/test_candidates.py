"""bench/candidates/: every kernel change waiting there for a GPU run still applies to this
checkout and passes the tests of the file it changes, so that `bench/gpu.sh` times only correct
candidates.

Each patch is applied to a copy of kernels/ in a temporary folder that goes first on PYTHONPATH;
the changed file's test module then runs its interpreter checks (fp32, small odd shapes, against
the references) and tests/test_kernels_compile.py compiles every kernel for sm_90, both in child
processes that import `kernels` from that copy. (A patch that only changes GPU block sizes leaves
the interpreter's own blocks as they are: for it the first check is a guard against typos and the
compile check is the one that tells.)
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PATCHES = sorted((ROOT / "bench" / "candidates").glob("*.patch"))
TESTS = {"kernels/gather_pad.py": "tests/test_gather_pad.py",
         "kernels/codebook_ce.py": "tests/test_codebook_ce.py",
         "kernels/sampling.py": "tests/test_sampling_kernels.py"}


@pytest.fixture(params=PATCHES or [pytest.param(None, marks=pytest.mark.skip(
    reason="no kernel change waits for a GPU in bench/candidates/"))],
    ids=[p.stem for p in PATCHES] or ["none"])
def patched(request, tmp_path):
    """(the file the patch changes, the folder holding the patched copy of kernels/, the
    environment that puts it first on sys.path). Children run in that folder: `python -c` and
    `python -m` put their working directory first on sys.path."""
    target, text = bench.patched_source(request.param.read_text())
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    (tmp_path / target).write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
               PYTHONWARNINGS="ignore")
    module = target[:-3].replace("/", ".")
    where = subprocess.run([sys.executable, "-c", f"import {module} as m; print(m.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.strip() == str(tmp_path / target), where.stderr[-2000:]
    return target, tmp_path, env


def test_every_candidate_says_what_it_aims_at():
    for path in PATCHES:
        about = path.read_text().split("diff --git")[0].strip()
        assert "aims at" in " ".join(about.lower().split()) and len(about.splitlines()) >= 3, \
            path.name


def test_candidate_passes_the_interpreter_checks(patched):
    target, folder, env = patched
    assert target in TESTS, f"no test module for {target}: add it to TESTS"
    proc = subprocess.run([sys.executable, str(ROOT / TESTS[target]), "--interpret"],
                          env=dict(env, TRITON_INTERPRET="1"), cwd=folder, capture_output=True,
                          text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = {row["name"]: row["error"] for row in rows if row["error"] is not None}
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
    checks = importlib.import_module(Path(TESTS[target]).stem).interpreter_checks()
    assert proc.returncode == 0 and [row["name"] for row in rows] == list(checks), \
        f"the interpreter run stopped early (exit {proc.returncode}):\n{proc.stderr[-3000:]}"


def test_candidate_compiles_for_sm90(patched):
    compile_test = importlib.import_module("test_kernels_compile")
    if compile_test._tools() is None:
        pytest.skip("needs Triton with its NVIDIA backend and bundled ptxas / cuobjdump")
    _, folder, env = patched
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_kernels_compile.py")], env=env,
                          cwd=folder, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "passed" in summary and "skipped" not in summary, \
        proc.stdout[-3000:] + proc.stderr[-2000:]
