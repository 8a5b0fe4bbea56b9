"""bench/kernels.py: its CPU run, candidate kernel files timed against the current ones, the
error and busy-time columns; bench/quality.py on a few demo items."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_candidate_ops_load_from_a_kernel_file(tmp_path):
    copy = tmp_path / "gather_pad_old.py"
    copy.write_text((ROOT / "kernels" / "gather_pad.py").read_text())
    fn, why = bench.candidate_op(str(copy), "pad_decoder")
    assert callable(fn) and why == "" and fn.__module__ == "candidate_gather_pad_old"
    fn, why = bench.candidate_op(str(copy), "remask")
    assert fn is None and why == "not in gather_pad_old.py"
    broken = tmp_path / "broken.py"
    broken.write_text("import a_module_that_is_not_there\n")
    fn, why = bench.candidate_op(str(broken), "pad_decoder")
    assert fn is None and why.startswith("candidate import error (ModuleNotFoundError")


def test_a_missing_candidate_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.run_cli(bench.main, ["--candidate", str(tmp_path / "nope.py")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no such file" in err[0]


def test_candidate_variants_are_named_after_their_files():
    paths = ["old/gather_pad.py", "new/gather_pad.py", "codebook_ce_cublas.py", "triton.py"]
    assert bench.candidate_names(paths) == ["gather_pad", "gather_pad#2", "codebook_ce_cublas",
                                            "triton#4"]


def test_difference_from_eager_covers_outputs_and_gradients():
    import dataclasses

    import torch
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32)
    g = torch.Generator().manual_seed(0)
    case = bench.setup_gather_embed(s, torch.device("cpu"), torch.float32, g)
    want = bench.results(case, case.reference)
    assert len(want) == 2 + len(case.grads)  # both modalities' outputs, every leaf's gradient
    assert bench.difference(bench.results(case, case.reference), want) == (0.0, "")
    scaled = bench.results(case, lambda *args: case.reference(*args) * 1.01)
    err, _ = bench.difference(scaled, want)
    assert abs(err - 0.01) < 1e-4  # outputs and gradients
    case = bench.setup_draw_tokens(s, torch.device("cpu"), torch.float32, g)
    ids, logp = bench.results(case, case.reference)
    # the draw: logp compared where the ids agree (elsewhere two tokens' log-probabilities)
    other = ids.clone()
    other[:len(ids) // 2] = (ids[:len(ids) // 2] + 1) % s.codebook
    far = torch.where(torch.arange(len(ids)) < len(ids) // 2, logp - 5, logp * 1.01)
    err, note = bench.difference([other, far], [ids, logp])
    assert abs(err - 0.01) < 1e-4 and note == "ids differ: 50.0%"
    wrong = (ids + 1) % s.codebook  # no id agrees: as far off as can be, not 0
    assert bench.difference([wrong, logp], [ids, logp]) == (float("inf"), "ids differ: 100.0%")
    nan = logp.clone()
    nan[0] = float("nan")
    assert bench.difference([ids, nan], [ids, logp])[0] == float("inf")
    assert bench.difference([ids, logp[:, None]], [ids, logp])[0] == float("inf")  # shape


def test_op_rows_with_a_candidate_and_a_wrong_version(tmp_path):
    import dataclasses

    import torch
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1, busy=False)
    device = torch.device("cpu")
    case = bench.setup_pad_decoder(s, device, torch.float32, torch.Generator().manual_seed(0))
    copy = tmp_path / "gather_pad_copy.py"
    copy.write_text((ROOT / "kernels" / "gather_pad.py").read_text())
    variants = {"eager": (case.reference, ""),
                "wrong": (lambda *args: case.reference(*args) * 2, ""),
                "gather_pad_copy": bench.candidate_op(str(copy), "pad_decoder"),
                "missing": (None, "not in it")}
    rows = bench.op_rows("pad_decoder", case, variants, s, bench.time_cpu, device,
                         bench.ceilings(device, s))
    by = {(r["mode"], r["variant"]): r for r in rows}
    assert len(rows) == 3 * 4 and all(r["op"] == "pad_decoder" for r in rows)
    for mode in ("forward", "backward", "full"):
        assert "err" not in by[mode, "eager"] and by[mode, "eager"]["us"] > 0
        assert by[mode, "gather_pad_copy"]["err"] == 0.0  # the kernel file's CPU fallback
        assert abs(by[mode, "wrong"]["err"] - 1.0) < 1e-6 and by[mode, "wrong"]["speedup"] > 0
        assert by[mode, "missing"]["note"] == "not in it" and "us" not in by[mode, "missing"]
    assert "| pad_decoder |" in bench.markdown("header", rows, 1.0)


def test_rate_and_share_of_the_floor_from_a_known_time():
    import dataclasses

    import torch
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1)
    device = torch.device("cpu")
    case = bench.setup_pad_decoder(s, device, torch.float32, torch.Generator().manual_seed(0))
    nbytes = case.bytes["forward"]
    # a copy rate that makes the floor 10 us, a call that takes 40 us: 25% of the floor
    row = bench.measure(case, case.reference, "forward", lambda run, grads, s: 40.0, s, device,
                        bw=nbytes / 10e-6, peak=1e30, launch=0.0)
    assert row["us"] == 40.0 and row["floor"] == pytest.approx(25.0)
    assert row["rate"] == f"{nbytes / 40e-6 / 1e9:.0f} GB/s"
    case = bench.setup_codebook_ce(s, device, torch.float32, torch.Generator().manual_seed(0))
    flops = case.flops["forward"]  # matmul-bound: the rate in TFLOP/s
    row = bench.measure(case, case.reference, "forward", lambda run, grads, s: 50.0, s, device,
                        bw=1e30, peak=flops / 20e-6, launch=0.0)
    assert row["floor"] == pytest.approx(40.0)
    assert row["rate"] == f"{flops / 50e-6 / 1e12:.1f} TFLOP/s"


def test_busy_times_fill_in_after_the_timing(monkeypatch):
    import dataclasses

    import torch
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1)
    device = torch.device("cpu")
    case = bench.make_case("remask", s, device, torch.float32)
    variants = {"eager": (case.reference, ""), "other": (case.reference, ""),
                "missing": (None, "")}
    rows = bench.op_rows("remask", case, variants, s, bench.time_cpu, device,
                         bench.ceilings(device, s))
    rows[0]["us"], rows[1]["us"] = 1e6, 1.0  # "other" looks far faster than its busy time
    rows[1]["note"] = "no host time (RuntimeError)"  # an earlier note stays
    # eager's busy time and kernels, then other's
    calls = iter([(40.0, [("a", 30.0), ("b", 10.0)]), (20.0, [("c", 20.0)])])
    monkeypatch.setattr(bench, "busy_us", lambda run, grads: next(calls))
    bench.add_busy(rows, case, variants)
    eager, other, missing = rows
    assert eager["busy"] == 40.0 and "busy_speedup" not in eager
    assert "busy" not in other and "not shown" in other["note"]  # 20 us busy in a 1 us call
    assert other["note"].startswith("no host time (RuntimeError) profiler busy time")
    assert "busy" not in missing and missing["note"] == ""
    other["us"], other["note"] = 1e6, ""
    calls = iter([(40.0, [("a", 30.0), ("b", 10.0)]), (20.0, [("c", 20.0)])])
    bench.add_busy(rows, case, variants)
    assert other["busy"] == 20.0 and other["busy_speedup"] == 2.0
    table = bench.markdown("header", rows, 1.0)
    assert "| remask | forward | eager | a 30.0, b 10.0 |" in table
    assert "| remask | forward | other | c 20.0 |" in table
    calls = iter([(0.0, []), (20.0, [("c", 20.0)])])  # no GPU events for eager: no busy time
    bench.add_busy(rows, case, variants)
    assert "not shown" in eager["note"] and "busy_speedup" not in other
    assert "| remask | forward | eager | a" not in bench.markdown("header", rows, 1.0)


def test_a_late_run_skips_candidates_and_profiles_them_last(tmp_path, monkeypatch):
    import dataclasses

    import torch
    copy = tmp_path / "gather_pad_copy.py"
    copy.write_text((ROOT / "kernels" / "gather_pad.py").read_text())
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1,
                            compile=False, candidate=[str(copy)], time_limit=30.0)
    case = bench.make_case("pad_decoder", s, torch.device("cpu"), torch.float32)
    variants = bench.variants_of("pad_decoder", case, s, gpu=True)
    assert list(variants) == ["eager", "triton", "compile", "gather_pad_copy"]
    assert callable(variants["gather_pad_copy"][0])
    late = bench.variants_of("pad_decoder", case, s, gpu=True, late=True)
    assert late["gather_pad_copy"] == (None, "skipped: past 2/3 of --time-limit 30 s")
    assert callable(late["triton"][0])  # main's own rows are always timed
    # the busy pass measures the named variants only, and every ratio against eager
    variants = {"eager": (case.reference, ""), "cand": (case.reference, "")}
    s = dataclasses.replace(s, modes=["forward"])
    rows = bench.op_rows("pad_decoder", case, variants, s, bench.time_cpu, torch.device("cpu"),
                         bench.ceilings(torch.device("cpu"), s))
    for row in rows:
        row["us"] = 1e6
    monkeypatch.setattr(bench, "busy_us", lambda run, grads: (40.0, [("a", 40.0)]))
    bench.add_busy(rows, case, variants, ["eager"])
    assert rows[0]["busy"] == 40.0 and "busy" not in rows[1]
    monkeypatch.setattr(bench, "busy_us", lambda run, grads: (10.0, [("b", 10.0)]))
    bench.add_busy(rows, case, variants, ["cand"])
    assert rows[0]["busy"] == 40.0 and rows[1]["busy"] == 10.0
    assert rows[1]["busy_speedup"] == 4.0


@pytest.mark.parametrize("late", [False, True])
def test_the_table_skips_late_candidates_and_profiles_main_first(tmp_path, monkeypatch, late):
    """run_table's GPU branch on CPU tensors (the ops fall back to their references there):
    past 2/3 of --time-limit the candidates are skipped, and the busy pass profiles main's
    variants of every op before any candidate's."""
    import dataclasses

    import torch
    copy = tmp_path / "gather_pad_copy.py"
    copy.write_text((ROOT / "kernels" / "gather_pad.py").read_text())
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1,
                            compile=False, candidate=[str(copy)], modes=["forward"],
                            ops=["gather_embed", "pad_decoder"], time_limit=1e-9 if late else 0)
    profiled = []
    monkeypatch.setattr(bench, "add_busy", lambda rows, case, variants, names:
                        profiled.append((rows[0]["op"], tuple(names))))
    device = torch.device("cpu")
    rows = bench.run_table(s, device, torch.float32, True, bench.time_cpu,
                           bench.ceilings(device, s), bench.time.perf_counter(), lambda rows: 0)
    cand = [r for r in rows if r["variant"] == "gather_pad_copy"]
    assert len(cand) == 2 and all(("us" in r) != late for r in cand)
    if late:
        assert all(r["note"].startswith("skipped: past 2/3 of --time-limit") for r in cand)
    assert profiled == [("gather_embed", ("eager", "triton", "compile")),
                        ("pad_decoder", ("eager", "triton", "compile")),
                        ("gather_embed", ("gather_pad_copy",)),
                        ("pad_decoder", ("gather_pad_copy",))]


def test_kernel_names_are_short():
    assert bench.kernel_name("void at::native::vectorized_elementwise_kernel<4, "
                             "at::native::FillFunctor<float>>(int, float)") == \
        "at::native::vectorized_elementwise_kernel"
    assert bench.kernel_name("_ce_rows_kernel") == "_ce_rows_kernel"
    assert bench.kernel_name("void at::native::(anonymous namespace)::CatArrayBatchedCopy<"
                             "at::native::(anonymous namespace)::OpaqueType<4u>>(int)") == \
        "at::native::CatArrayBatchedCopy"
    assert len(bench.kernel_name("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_"
                                 "warpgroupsize1x1_execute_segment_k_off_kernel__5x_cublas")) == 44
    cell = bench.kernel_cell([(f"k{i}", 10.0 - i) for i in range(7)])
    assert cell == "k0 10.0, k1 9.0, k2 8.0, k3 7.0, k4 6.0, 2 more 9.0"


def test_the_corruption_keeps_positions_independently_of_the_mask():
    """As the paper preset's training draws it (drop_masked_first off): the kept rows are
    masked in the mask's own proportion, not known ones first."""
    import torch
    keep, unknown = bench.masked_and_kept(64, 265, 133, 0.7, torch.device("cpu"),
                                          torch.Generator().manual_seed(0))
    assert keep.shape == (64, 133) and (keep.diff(1) > 0).all()  # sorted, distinct
    assert (unknown.sum(1) == 186).all()  # round(0.7 * 265) masked, 79 known
    kept_unknown = unknown.gather(1, keep).float()
    assert 0.68 < kept_unknown.mean() < 0.72  # ~93 of 133 (MAGE's known-first would be 54)
    assert (kept_unknown.sum(1) > 54).all()


def test_host_times_on_a_gpu_row_only(monkeypatch):
    import dataclasses

    import torch

    def host_cell(row):
        return bench.cells(dict(op="", shape="", mode="", variant="", note="") | row)[10]

    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, rep=1)
    case = bench.make_case("remask", s, torch.device("cpu"), torch.float32)
    ceiling = bench.ceilings(torch.device("cpu"), s)[:3]
    row = bench.measure(case, case.reference, "forward", bench.time_cpu, s, torch.device("cpu"),
                        *ceiling)
    assert "us" in row and "host" not in row and host_cell(row) == "-"
    # a GPU row (the CPU timer and tensors stand in): the host time, or sync where it waited
    monkeypatch.setattr(bench, "peak_mb", lambda run, device: 0.0)
    for host, cell in [(12.0, "12.0"), (None, "sync")]:
        monkeypatch.setattr(bench, "host_us", lambda run, grads: host)
        row = bench.measure(case, case.reference, "forward", bench.time_cpu, s,
                            torch.device("cuda"), *ceiling)
        assert host_cell(row) == cell

    def broken(run, grads):
        raise RuntimeError("no spin kernel")

    monkeypatch.setattr(bench, "host_us", broken)  # the row keeps its time
    row = bench.measure(case, case.reference, "forward", bench.time_cpu, s, torch.device("cuda"),
                        *ceiling)
    assert "us" in row and host_cell(row) == "-" and row["note"] == "no host time (RuntimeError)"


def test_main_writes_the_eager_table_on_the_cpu(tmp_path):
    if bench.torch.cuda.is_available():
        pytest.skip("on a GPU main times every variant: bench/gpu.sh runs it")
    out = tmp_path / "kernels.md"
    bench.run_cli(bench.main, ["--small", "--ops", "remask", "codebook_ce", "--rep", "5",
                               "--out", str(out)])
    table = out.read_text()
    threads = bench.torch.get_num_threads()
    assert f"device: {bench.device_name('cpu')} (no CUDA GPU)" in table  # the CPU's model
    assert f", {threads} threads (no CUDA GPU)" in table
    for mode in ("forward", "backward", "full"):
        assert f"| {mode} | eager |" in table
    assert "| codebook_ce | N" in table
    assert "| remask | B4 L265 | forward | eager |" in table


def test_a_candidate_patch_applies_to_this_checkout_or_says_why(tmp_path):
    import difflib
    old = [f"line {i}\n" for i in range(40)]
    new = ["first\n"] + old[:9] + ["changed 9\n"] + old[10:25] + old[27:] + ["last\n"]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("".join(old))
    diff = "".join(difflib.unified_diff(old, new, "a/kernels/k.py", "b/kernels/k.py", n=2))
    patch = "What it changes, and why.\n\n+++ looks like a header but is text\n" + diff
    assert diff.count("@@ -") == 4  # insertion at the top, change, deletion, append
    assert bench.patched_source(patch, tmp_path) == ("kernels/k.py", "".join(new))
    (tmp_path / "kernels" / "k.py").write_text("".join(old).replace("line 24", "line 24!"))
    with pytest.raises(ValueError, match="has changed at line 25: rebase the patch"):
        bench.patched_source(patch, tmp_path)
    (tmp_path / "kernels" / "k.py").write_text("".join(old))
    cut = diff[:diff.rindex("+last")]  # the last hunk loses its last line
    with pytest.raises(ValueError, match="ends early"):
        bench.patched_source(cut, tmp_path)
    with pytest.raises(ValueError, match="not a hunk header"):
        bench.patched_source(diff.replace("@@ -1,2", "@@@ -1,2"), tmp_path)
    two = diff + diff.replace("kernels/k.py", "kernels/j.py")
    with pytest.raises(ValueError, match="exactly one file, not 2"):
        bench.patched_source(two, tmp_path)
    only = tmp_path / "only_pad.patch"  # an "Ops:" line limits what is timed
    only.write_text("Pad change.\n\nOps: pad_decoder\n\n" + diff.replace(
        "kernels/k.py", "kernels/gather_pad.py"))
    assert bench.candidate_op(str(only), "gather_embed") == (None,
                                                             "not changed by only_pad.patch")
    stale = tmp_path / "stale.patch"  # against this checkout's kernels/ it does not apply
    stale.write_text(diff.replace("kernels/k.py", "kernels/gather_pad.py"))
    fn, why = bench.candidate_op(str(stale), "pad_decoder")
    assert fn is None and why.startswith("candidate patch does not apply (kernels/gather_pad.py")


@pytest.mark.parametrize("old, new", [
    ("a\nb\nc", "a\nb\nC\n"),  # the old file has no final newline
    ("a\nb\nc\n", "a\nB\nc"),  # the new one has none
    ("a\n\nb\nc\nd\n", "a\n\nb\nc\nD\n"),  # a blank context line
    ("x = 1\ny = '\x0c'\n", "x = 2\ny = '\x0c'\n"),  # a form feed is not a line end
])
def test_candidate_patches_apply_as_git_applies_them(tmp_path, old, new):
    import shutil
    import subprocess
    if shutil.which("git") is None:
        pytest.skip("needs git to make the diffs")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "k.py").write_text(old)
    (tmp_path / "b" / "k.py").write_text(new)
    diff = subprocess.run(["git", "diff", "--no-index", "--no-prefix", "a/k.py", "b/k.py"],
                          cwd=tmp_path, capture_output=True, text=True).stdout
    diff = diff.replace("+++ b/k.py", "+++ b/kernels/k.py")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text(old)
    assert bench.patched_source(diff, tmp_path) == ("kernels/k.py", new)
    if "\n \n" in diff:  # an editor that strips trailing blanks leaves an empty context line
        assert bench.patched_source(diff.replace("\n \n", "\n\n"), tmp_path)[1] == new


def test_variants_time_each_candidate_for_the_ops_it_has(tmp_path):
    import dataclasses

    import torch
    copy = tmp_path / "gather_pad_copy.py"
    copy.write_text((ROOT / "kernels" / "gather_pad.py").read_text())
    ce = tmp_path / "ce_copy.py"
    ce.write_text((ROOT / "kernels" / "codebook_ce.py").read_text())
    pad_only = tmp_path / "pad_only.patch"
    import difflib
    lines = (ROOT / "kernels" / "gather_pad.py").read_text().splitlines(keepends=True)
    changed = lines[:1] + ["# a changed comment\n"] + lines[1:]
    pad_only.write_text("Ops: pad_decoder\n\n" + "".join(difflib.unified_diff(
        lines, changed, "a/kernels/gather_pad.py", "b/kernels/gather_pad.py")))
    broken = tmp_path / "broken.patch"
    broken.write_text("diff --git a/kernels/x.py b/kernels/x.py\n--- a/kernels/x.py\n"
                      "+++ b/kernels/x.py\n@@ -1 +1 @@\n-a\n+b\n")
    s = dataclasses.replace(bench.Settings(), batch=2, dim=16, codebook=32, compile=False,
                            candidate=[str(copy), str(ce), str(pad_only), str(broken)])
    case = bench.make_case("gather_embed", s, torch.device("cpu"), torch.float32)
    assert list(bench.variants_of("gather_embed", case, s, gpu=False)) == ["eager"]
    got = bench.variants_of("gather_embed", case, s, gpu=True)
    assert list(got) == ["eager", "triton", "compile", "gather_pad_copy", "broken"]
    assert got["compile"] == (None, "skipped (--no-compile)")
    assert callable(got["gather_pad_copy"][0])
    assert got["broken"][0] is None and got["broken"][1].startswith("candidate patch does not")
    case = bench.make_case("pad_decoder", s, torch.device("cpu"), torch.float32)
    assert "pad_only" in bench.variants_of("pad_decoder", case, s, gpu=True)


def test_candidates_are_set_beside_main_and_compile():
    rows = [dict(op="pad_decoder", mode="backward", variant="eager", us=600.0, busy=400.0),
            dict(op="pad_decoder", mode="backward", variant="triton", us=500.0, busy=150.0),
            dict(op="pad_decoder", mode="backward", variant="compile", us=700.0, busy=130.0),
            dict(op="pad_decoder", mode="backward", variant="slot", us=400.0, busy=100.0,
                 err=1e-3, note=""),
            dict(op="pad_decoder", mode="full", variant="slot", note="error: boom")]
    assert bench.against_main(rows[:3]) == []
    table = bench.against_main(rows)
    assert "| pad_decoder | backward | slot | 100.0 | 150.0 | 1.50x | 1.30x | 400.0 | 1.25x | " \
           "1.0e-03 |" in table
    assert "| pad_decoder | full | slot | - | - | - | - | - | - | error: boom |" in table
    full_rows = [dict(shape="B64", note="") | r for r in rows]
    assert table[2] in bench.markdown("header", full_rows, 1.0)


# -----------------------------------------------------------------------------
# bench/train.py

_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
train_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_bench)


def test_train_bench_profiles_the_last_gpu_row_only(monkeypatch, capsys):
    import torch
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(train_bench, "plan", lambda s, notes: [
        ("paper", gpu, "torch", "bf16"), ("paper", gpu, "triton+compile", "bf16"),
        ("demo", cpu, "torch", "fp32")])
    monkeypatch.setattr(train_bench, "device_name", lambda device: device.type)
    profiled = []

    def fake_row(preset, device, backend, amp, s, batch=0, profile=False):
        profiled.append(profile)
        kernels = [(f"k{i}", 1000.0 * (10 - i)) for i in range(10)] if profile else []
        return {"preset": preset, "device": device.type, "kernels": backend, "amp": amp,
                "batch": 256, "step_ms": 640.0, "samples_s": 400.0, "tflops": 300.0, "mfu": 0.3,
                "busy_ms": 608.0 if profile else None, "kernels_us": kernels}

    monkeypatch.setattr(train_bench, "bench_row", fake_row)
    train_bench.main([])
    out = capsys.readouterr().out
    assert profiled == [False, True, False]
    assert "| 640.0 | 400.0 | 300.000 | 30.0% | 608.0 | 95% |" in out
    assert out.count("| - | - |") == 2
    assert ("longest kernels of one triton+compile step (ms, profiler): k0 10.0, k1 9.0" in out
            and "k7 3.0, 2 more 3.0" in out)


def test_train_bench_runs_a_cpu_step(tmp_path):
    out = tmp_path / "train.md"
    train_bench.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--cpu-amp", "fp32",
                      "--out", str(out)])
    row = out.read_text().splitlines()[2]
    assert row.startswith(f"| demo | {train_bench.device_name('cpu')} |")  # the CPU's model
    assert row.endswith("| - | - | - |")


def test_train_bench_keeps_the_rows_of_a_run_cut_short(monkeypatch, tmp_path):
    import torch
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_bench, "plan", lambda s, notes: [
        ("demo", cpu, "torch", "fp32"), ("demo", cpu, "torch", "bf16")])

    def fake_row(preset, device, backend, amp, s, batch=0, profile=False):
        if amp == "bf16":
            raise KeyboardInterrupt  # stopped at the second row (as timeout's SIGTERM would)
        return {"preset": preset, "device": "cpu", "kernels": backend, "amp": amp, "batch": 16,
                "step_ms": 70.0, "samples_s": 228.6, "tflops": 0.4, "mfu": None,
                "busy_ms": None, "kernels_us": []}

    monkeypatch.setattr(train_bench, "bench_row", fake_row)
    out = tmp_path / "train.md"
    with pytest.raises(KeyboardInterrupt):
        train_bench.main(["--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| demo")]
    assert rows == ["| demo | cpu | torch | fp32 | 16 | 70.0 | 228.6 | 0.400 | - | - | - |"]


def test_train_bench_drops_an_empty_profile(monkeypatch):
    import dataclasses
    import torch
    monkeypatch.setattr(train_bench.kernel_bench, "busy_us", lambda fn, grads, calls: (0.0, []))
    s = dataclasses.replace(train_bench.Settings(), steps=1, warmup=0)
    row = train_bench.bench_row("demo", torch.device("cpu"), "torch", "fp32", s, batch=2,
                                profile=True)
    assert row["busy_ms"] is None and row["kernels_us"] == []


# bench/sample.py

_spec = importlib.util.spec_from_file_location("bench_sample", ROOT / "bench" / "sample.py")
sample_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_bench)


def test_sample_bench_keeps_the_rows_of_a_run_cut_short(monkeypatch, tmp_path):
    calls = []

    def fake_time(model, image_ids, s, repeats, autocast_dtype, graphs, wait):
        calls.append(image_ids.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped at the second row (as timeout's SIGTERM would)
        return 0.25, [0.25]

    monkeypatch.setattr(sample_bench, "time_generate", fake_time)
    out = tmp_path / "sample.md"
    with pytest.raises(KeyboardInterrupt):
        sample_bench.main(["--out", str(out), "--no-gpu"])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| demo")]
    assert len(rows) == 1 and "| torch | latency | 1 | 0.250 | 4.00 |" in rows[0]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_scores_the_demo_bundle_on_a_few_items(tmp_path):
    quality = _quality()
    out = tmp_path / "quality.md"
    quality.run_cli(quality.main, ["--n", "12", "--no-ablation", "--n-joint", "12",
                                   "--device", "cpu", "--out", str(out)])
    table = out.read_text()
    for name in ("audio tokenizer reconstruction", "i2a, tuned", "a2i, tuned",
                 "joint consistency", "inpaint consistency (0.5-1.0 s, stretch silenced)"):
        assert f"| {name}" in table, name
    assert "ablation" not in table and "on cpu with" in table


def test_quality_refuses_a_bundle_that_is_no_checkpoint(tmp_path, capsys):
    quality = _quality()
    bad = tmp_path / "bundle.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        quality.run_cli(quality.main, ["--bundle", str(bad), "--n", "12"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(bad) in err[0], err


@pytest.mark.parametrize("script, argv, message", [
    ("sample.py", ["--guidance", "nan"], "--guidance must be a number in [-1e6, 1e6], got nan"),
    ("sample.py", ["--temperature", "1e30"], "--temperature must be a number in [0, 1e6]"),
    ("kernels.py", ["--guidance", "inf"], "--guidance must be a finite number, got inf"),
])
def test_bench_settings_out_of_range_are_one_line_errors(capsys, script, argv, message):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}_cli",
                                                  ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.run_cli(module.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
