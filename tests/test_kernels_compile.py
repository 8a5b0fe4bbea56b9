"""Every Triton kernel compiles for a Hopper GPU (sm_90) and fits one, checked on a machine without
a GPU.

The interpreter (the other kernel tests) runs kernels as NumPy: it does not type-check the way the
GPU compiler does (a name bound to tensors of two shapes in the two arms of an `if` compiles under
the interpreter and fails on a GPU), and it allocates no registers or shared memory. Here each
public op runs on CPU tensors at the paper's batch and widths (B = 64, D = C = 1024) with its
kernel launches recorded instead of run (the outputs are left as garbage); each distinct launch
(every autotune config of it) is then compiled by Triton's own compiler for sm_90 down to a cubin,
with ptxas from Triton's wheel, and its resources are read back with cuobjdump: the shared memory
must fit an H100 and nothing may spill to local memory.

The launches are those of the paper preset's GPU paths: training under bf16 autocast with fp32
parameters (gather, pad, cross-entropy forward and backward) and sampling (mix, draw, re-mask);
plus the fp32 variants. Compiling takes about 20 s on two cores the first time; Triton's cache
makes later runs take a few seconds.

    python tests/test_kernels_compile.py     # kernel, registers, spills, shared, programs per SM
"""

import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from test_gather_pad import make_gather_inputs, make_pad_inputs

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: H100 / H200
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SM_LIMITS = dict(regs=65536, threads=2048, blocks=32, shared=233472)  # one sm_90 SM (228 KiB)
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                torch.uint8: "u8", torch.bool: "u1"}


def _tools():
    """(triton, the directory of its bundled CUDA tools) or None when this Triton cannot compile
    for NVIDIA GPUs here."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return None
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bindir, t)) for t in ("ptxas", "cuobjdump")):
        return None
    return triton, bindir


pytestmark = pytest.mark.skipif(
    _tools() is None or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs Triton with its NVIDIA backend and bundled ptxas / cuobjdump, and no "
           "TRITON_INTERPRET (the kernels must be the compiled ones)")


# -----------------------------------------------------------------------------
# recording the launches of the public ops


def _kernels(module):
    """The module's kernels: its JIT functions and autotuners (helpers included; never launched)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, Autotuner))}


def _spec(value):
    """(Triton type, divisible by 16) of one runtime argument, as Triton's launcher specialises."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


def _launch(module, name, kernel, args, kwargs):
    """The compile jobs (one per autotune config) of one recorded launch, as picklable tuples:
    (module, kernel name, config label, signature, constexprs, attributes, options)."""
    from triton.runtime.autotuner import Autotuner
    configs = [None]
    fn = kernel
    if isinstance(kernel, Autotuner):  # every config the autotuner would time for this launch
        fn, configs = kernel.fn, kernel.configs
        prune = getattr(kernel, "early_config_prune", None)
        if prune:
            configs = prune(configs, dict(zip(fn.arg_names, args)), **kwargs)
    jobs = []
    for config in configs:
        kw = dict(kwargs)
        if config is not None:
            kw.update({k: v for k, v in config.all_kwargs().items() if v is not None})
        # keywords that are not parameters are compile options (num_warps, enable_fp_fusion, ...)
        options = {k: v for k, v in kw.items() if k not in fn.arg_names}
        bound = dict(zip(fn.arg_names, args))
        bound.update({k: v for k, v in kw.items() if k in fn.arg_names})
        missing = [a for a in fn.arg_names if a not in bound]
        assert not missing, f"{name}: no value recorded for {missing}"
        signature, constexprs, attrs = {}, {}, {}
        for i, arg in enumerate(fn.arg_names):
            value = bound[arg]
            plain = fn.params[i].do_not_specialize  # neither "== 1" nor "% 16" specialised
            if i in fn.constexprs or (type(value) is int and value == 1 and not plain):
                signature[arg] = "constexpr"  # Triton's launcher also specialises ints equal to 1
                constexprs[(i,)] = value
            else:
                signature[arg], aligned = _spec(value)
                if aligned and not plain:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        label = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults"
        if config is not None:
            label = ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + ", " + label
        jobs.append((module.__name__, name, label, signature, constexprs, attrs, options))
    return jobs


def _run_ops():
    """Run every public op's GPU path on CPU tensors; the launches are recorded (see
    `recorded_jobs`), so outputs and gradients are garbage and only the calls matter."""
    from kernels import codebook_ce, gather_pad, sampling
    g = torch.Generator().manual_seed(0)
    B, C, D = 64, 1024, 1024  # the paper's batch: the backwards' batch splits are real loops
    for pdtype in (torch.float32, torch.bfloat16):  # gather: fp32 parameters, or all-bf16
        for inference in (False, True):  # training, and the sampler's stride-0 keep
            ids, keep, p, _ = make_gather_inputs(B, 265, 133, C, D, "cpu", pdtype, inference)
            gather_pad.gather_embed(ids, keep, p["weight"], p["pos"], p["mod"]).sum().backward()
    ids, keep, p, _ = make_gather_inputs(2, 9, 5, 1, D, "cpu")  # one code: the mask id is 1
    gather_pad.gather_embed(ids, keep, p["weight"], p["pos"], p["mod"]).sum().backward()
    for xdtype in (torch.bfloat16, torch.float32):  # pad: bf16 (autocast) or fp32 activations
        for inference in (False, True):
            x, keep, unknown, p, _ = make_pad_inputs(B, 256, 128, D, "cpu", xdtype,
                                                     inference=inference)
            gather_pad.pad_decoder(x, keep, unknown, p["mask_emb"], p["pos"],
                                   p["mod"]).sum().backward()
            with torch.no_grad():  # the sampler's call: parameters that want grads, none formed
                gather_pad.pad_decoder(x, keep, unknown, p["mask_emb"], p["pos"], p["mod"])
    for dtype in (torch.bfloat16, torch.float32):  # cross-entropy: bf16 (autocast) or fp32
        N = 300
        h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(C, D, generator=g).to(dtype)
        bias = torch.zeros(C, dtype=dtype, requires_grad=True)
        target = torch.randint(0, C, (N,), generator=g)
        codebook_ce.codebook_ce(h, weight, bias, target, 0.1).backward()
        codebook_ce.codebook_ce(h.detach(), weight, bias.detach(), target, 0.1)  # loss only
    for dtype in (torch.bfloat16, torch.float32):  # the draw, with and without CFG
        N = 64
        h_c, h_u = (torch.randn(N, D, generator=g).to(dtype) for _ in range(2))
        weight = torch.randn(C, D, generator=g).to(dtype)
        bias = torch.randn(C, generator=g).to(dtype)
        u = torch.rand(N, generator=g)
        sampling.draw_tokens(h_c, h_u, weight, bias, 3.0, 1.0, u)
        sampling.draw_tokens(h_c, None, weight, None, 1.0, 1.0, u)
    logp = -torch.rand(B, 265, generator=g)
    unknown = torch.rand(B, 265, generator=g) < 0.8
    sampling.remask(logp, torch.rand(B, 265, generator=g), unknown, unknown.sum(1) // 2, 4.5)


@functools.lru_cache(maxsize=None)
def recorded_jobs():
    """The distinct compile jobs of all public ops (see `_launch`)."""
    from kernels import codebook_ce, gather_pad, sampling
    modules = (gather_pad, codebook_ce, sampling)
    jobs, saved = [], []

    def recorder(module, name, kernel):
        def run(*args, grid, warmup=False, **kwargs):
            jobs.extend(_launch(module, name, kernel, args, kwargs))
        return run

    def logits_fp32(h, weight):  # on a GPU the draw's logits come from an fp32-output matmul
        return torch.mm(h.float(), weight.float().t())

    patches = [(m, "_use_triton", lambda t: True) for m in modules]
    patches.append((sampling, "_logits", logits_fp32))
    for module in modules:
        patches += [(k, "run", recorder(module, n, k)) for n, k in _kernels(module).items()]
    try:
        for obj, attr, value in patches:
            saved.append((obj, attr, obj.__dict__.get(attr, None), attr in obj.__dict__))
            setattr(obj, attr, value)
        _run_ops()
    finally:
        for obj, attr, value, had in reversed(saved):
            if had:
                setattr(obj, attr, value)
            else:
                delattr(obj, attr)
    unique = {}
    for job in jobs:
        unique.setdefault(repr(job), job)
    return list(unique.values())


# -----------------------------------------------------------------------------
# compiling


def compile_job(job):
    """Compile one job for sm_90; returns (kernel, config, registers, spill bytes, shared bytes)
    read from the cubin, or raises with the compiler's message."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    module, name, label, signature, constexprs, attrs, options = job
    kernel = getattr(importlib.import_module(module), name)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget(*TARGET), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(_tools()[1], "cuobjdump"), "--dump-resource-usage",
                                f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    shared = compiled.metadata.shared + int(found.get("SHARED", 0))
    spill = int(found.get("STACK", 0)) + int(found.get("LOCAL", 0))
    return f"{module.split('.')[-1]}.{name}", label, int(found["REG"]), spill, shared


@functools.lru_cache(maxsize=None)
def compiled():
    """compile_job of every recorded job, two at a time (each in its own process)."""
    jobs = recorded_jobs()
    with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(compile_job, job) for job in jobs]
        results = []
        for job, future in zip(jobs, futures):
            try:
                results.append(("ok", job, future.result()))
            except Exception as e:  # noqa: BLE001 -- reported per kernel by the test
                results.append(("error", job, f"{e.__class__.__name__}: {str(e)[:2000]}"))
    return results


def programs_per_sm(regs, warps, shared):
    """How many programs of a kernel an sm_90 SM holds at once: registers are allocated per
    warp in units of 256 (8 per thread), and each block reserves 1 KiB of shared memory."""
    by_regs = SM_LIMITS["regs"] // (-(-regs // 8) * 8 * 32 * warps)
    by_shared = SM_LIMITS["shared"] // (shared + 1024)
    return min(by_regs, SM_LIMITS["threads"] // (32 * warps), SM_LIMITS["blocks"], by_shared)


# -----------------------------------------------------------------------------
# tests


def test_every_public_op_launches_kernels():
    names = {(job[0].split(".")[-1], job[1]) for job in recorded_jobs()}
    assert {("gather_pad", "_gather_fwd_kernel"), ("gather_pad", "_gather_bwd_kernel"),
            ("gather_pad", "_pad_fwd_kernel"), ("gather_pad", "_pad_bwd_kernel"),
            ("sampling", "_draw_rows_kernel"), ("sampling", "_mix_kernel"),
            ("sampling", "_remask_kernel")} <= names
    assert any(module.endswith("codebook_ce") for module, *_ in recorded_jobs())


def test_every_kernel_compiles_for_sm90():
    errors = [f"{job[1]} [{job[2]}]: {result}" for status, job, result in compiled()
              if status == "error"]
    assert not errors, "\n".join(errors)


def test_every_kernel_fits_an_h100_without_spilling():
    bad = [f"{kernel} [{label}]: {regs} registers, {spill} B spilled, {shared} B shared"
           for status, _, result in compiled() if status == "ok"
           for kernel, label, regs, spill, shared in [result]
           if spill > 0 or shared > SHARED_LIMIT]
    assert not bad, "\n".join(bad)


def test_programs_per_sm_follows_the_sm90_limits():
    assert programs_per_sm(156, 4, 5120) == 3  # registers: 160 x 128 threads of 65536
    assert programs_per_sm(56, 4, 5120) == 9
    assert programs_per_sm(16, 4, 0) == 16  # threads: 2048 a SM
    assert programs_per_sm(16, 1, 0) == 32  # blocks
    assert programs_per_sm(32, 4, 100 * 1024) == 2  # shared memory


if __name__ == "__main__":
    if _tools() is None:
        sys.exit("this Triton cannot compile for NVIDIA GPUs here (no backend or bundled ptxas)")
    print(f"{'kernel':<32} {'regs':>4} {'spill B':>7} {'shared B':>8} {'per SM':>6}  config")
    for status, job, result in compiled():
        if status == "error":
            print(f"{job[0].split('.')[-1] + '.' + job[1]:<32} compile error: "
                  f"{result.splitlines()[0][:100]}")
            continue
        kernel, label, regs, spill, shared = result
        fit = programs_per_sm(regs, job[6].get("num_warps", 4), shared)
        print(f"{kernel:<32} {regs:>4} {spill:>7} {shared:>8} {fit:>6}  {label}")
