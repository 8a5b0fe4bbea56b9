"""Benchmark of the fused ops in kernels/ against eager PyTorch and torch.compile.

For each fused op of kernels/ (gather_embed, pad_decoder, codebook_ce, draw_tokens with
CFG, remask) at the paper shapes (B = 64 samples of 265 audio + 256 image tokens, 133 + 128 kept
by the encoder, 70% of them masked (the paper's mask-ratio mu; the mean of its truncated normal
is 0.66), D = 1024, C = 1024; the cross-entropy on the ~0.7 * 64 * 521 masked rows; the draw on
the 64 * 265 audio rows of an i2a step, both CFG passes), three implementations:
- triton:  the fused op from kernels/ (reported as missing when its module is not there);
- eager:   the plain PyTorch reference (echoes/model.py, echoes/sampler.py), the spec;
- compile: torch.compile of that same reference;
- candidates (with `--candidate FILE [FILE ...]`): the same-named op of other kernel files, e.g.
  a changed kernel or main's version saved with `git show REV:kernels/gather_pad.py > FILE`, or
  of the kernel file a patch makes (a FILE ending in .patch: a one-file `git diff` of kernels/,
  applied to this checkout, as in bench/candidates/), each a variant named after its file,
  timed for the ops its file has (a patch: those on its "Ops:" line, where it has one). Kernel
  timings on a GPU drift between runs by more than most kernel changes (an eager backward
  measured 486, 762 and 1135 us on three H200 runs), so a change is judged against its old
  version in one run. With `--time-limit S`, the candidates of ops reached after two thirds of
  S are skipped, and main's variants get their busy times before any candidate does, so that
  a run cut at S still has main's whole table;
and up to three modes: forward, backward (from one forward kept alive) and full (both). Before
timing, each version's outputs and gradients are compared with eager's ("err vs eager"), so a
candidate is judged on its results as well as its speed.

Time is the median of `triton.testing.do_bench`, on the GPU's clock from the start of a call to
its end. do_bench clears L2 with a 256 MB fill before each call and the host queues the call
while the GPU runs the fill, so the host's work (Python, autograd, launches) shows in the time
only where it is longer than that fill plus the call's GPU work. "GPU busy" is the sum of the
durations of the kernels (and copies) one call runs, from the profiler (mean of 5 calls, in a
second pass after all the timing, L2 not cleared): what the op costs inside a training step,
where the host runs ahead of the GPU; a second table splits it by kernel (which of an op's
kernels to work on: the matmul or the Triton kernel after it, say). "host" is the CPU time to
issue one call (Python, autograd, allocations, launches), measured after the row's timing while
a spin kernel holds the GPU; where time is far above busy and host is not, the op is bound by
reading its inputs from HBM rather than L2.

The floor of each row is max(bytes / bandwidth, FLOPs / matmul peak, launch) with the card's
ceilings measured at start: a 1 GiB device-to-device copy (bandwidth), an 8192^3 bf16 matmul (peak),
an empty Triton kernel (launch, the floor of the launch-bound re-mask). The header also gives the
rate of a 1 GiB fill (write), which bounds ops that mostly write, like the gather forward. Bytes are
the compulsory traffic (each input and output once, tables once); FLOPs the minimum for the op (the
CFG draw: one matmul, since the Eq. 2 mix is linear in h). "rate" is that work divided by the time;
"floor" the floor time over the time; "peak MB" the torch.cuda.max_memory_allocated rise while the
row's function runs.

torch.compile builds each reference once per shape before its rows are timed (about a minute in
all on a fresh cache); `--no-compile` skips it. Without a GPU it says so and times the eager
references on the CPU (median of time.perf_counter); `--small` shrinks the shapes so that takes
seconds.

    python bench/kernels.py                  # paper shapes, on a GPU
    python bench/kernels.py --small          # quick, CPU or GPU
    python bench/kernels.py --ops remask draw_tokens --out results.md
    python bench/kernels.py --ops pad_decoder --candidate gather_pad_old.py
    python bench/kernels.py --candidate bench/candidates/*.patch
"""

import atexit
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._functorch.config as functorch_config

# run as `python bench/kernels.py`, this file's folder comes first on sys.path and its own name
# would shadow the `kernels` package: put the repository root first
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from echoes import model as model_ref
from echoes import sampler as sampler_ref
from echoes.cli import (UserError, check_at_least, check_finite, check_out_file, device_name,
                        parse_settings, run_cli, setting, write_text)

OPS = ["gather_embed", "pad_decoder", "codebook_ce", "draw_tokens", "remask"]


@dataclass
class Settings:
    batch: int = setting(64, "samples B")
    audio_len: int = setting(265, "audio tokens La")
    image_len: int = setting(256, "image tokens Lv")
    audio_kept: int = setting(133, "audio positions the encoder keeps")
    image_kept: int = setting(128, "image positions the encoder keeps")
    dim: int = setting(1024, "width D of the embeddings and of the head features")
    codebook: int = setting(1024, "codebook size C")
    masked_ratio: float = setting(0.7, "fraction of the tokens that are masked: the CE rows, and "
                                  "the mask ids among the gather's and pad's kept rows")
    guidance: float = setting(3.0, "CFG scale s of the draw (paper: 3 for i2a)")
    tau: float = setting(4.5, "Gumbel temperature of the re-mask (T * (1 - ratio) mid-schedule)")
    dtype: str = setting("bf16", "activation dtype (x, h); parameters stay fp32 as in the model",
                         choices=["bf16", "fp32"])
    ops: list[str] = setting(OPS, "ops to run", choices=OPS)
    modes: list[str] = setting(["forward", "backward", "full"], "modes to time (where an op "
                               "has a backward)", choices=["forward", "backward", "full"])
    compile: bool = setting(True, "also time torch.compile of the references (GPU only)")
    small: bool = setting(False, "small shapes (B 4, D 128, C 256) for a quick run")
    warmup: int = setting(25, "do_bench warmup in ms (GPU)")
    rep: int = setting(100, "do_bench measuring time in ms (GPU); CPU: time budget per row")
    seed: int = setting(0, "seed of the random inputs")
    candidate: list[str] = setting([], "kernel files (or one-file patches of kernels/) whose "
                                   "same-named ops are also timed, each as a variant named "
                                   "after its file (GPU only)")
    busy: bool = setting(True, "also measure each row's GPU busy time with the profiler (GPU)")
    time_limit: float = setting(0.0, "seconds the run has (0: no limit): the candidates of ops "
                                "reached after two thirds of it are skipped, so that main's "
                                "rows and their busy times still fit")
    out: str = setting("", "also write the table as markdown to this file")


# -----------------------------------------------------------------------------
# cases: one setup function per op


@dataclass
class Case:
    """One op at one shape: how to call it and what the floor is."""
    op: str
    shape: str
    reference: object  # the plain PyTorch function (the spec)
    call: object  # call(fn) -> list of output tensors, fn having the reference's signature
    grads: list  # leaves whose gradients backward computes (empty: forward only)
    upstream: list  # the upstream gradient of each output
    bytes: dict  # mode -> compulsory bytes
    flops: dict  # mode -> minimum FLOPs
    launch_bound: bool = False


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def leaf(t):
    return t.detach().requires_grad_(True)


def masked_and_kept(B, L, K, masked_ratio, device, g):
    """A training step's corruption, as the paper preset draws it (`Echoes.draw_corruption`): in
    each sample a random masked_ratio of the L positions is masked, and the encoder keeps a
    random K of the L positions, independently of the mask (with 265 positions, 0.7 masked and
    133 kept, ~93 of the kept rows are masked). Returns keep (B, K) sorted and unknown (B, L)
    bool."""
    order = torch.rand(B, L, generator=g, device=device).argsort(1)  # (B, L) a random order
    unknown = torch.zeros(B, L, dtype=torch.bool, device=device)
    unknown.scatter_(1, order[:, :round(masked_ratio * L)], True)
    keep = torch.rand(B, L, generator=g, device=device).argsort(1)[:, :K].sort(1).values
    return keep, unknown


def setup_gather_embed(s, device, act, g):
    """Encoder input of both modalities: out[b, k] = E[ids[b, keep[b, k]]] + pos[keep] + mod."""
    C, D = s.codebook, s.dim
    parts = []
    for L, K in [(s.audio_len, s.audio_kept), (s.image_len, s.image_kept)]:
        keep, unknown = masked_and_kept(s.batch, L, K, s.masked_ratio, device, g)
        ids = torch.randint(0, C, (s.batch, L), generator=g, device=device)
        ids[unknown] = C  # the mask id: the table's last row, hit by the kept masked rows
        weight = leaf(torch.randn(C + 1, D, generator=g, device=device) * 0.02)
        pos = leaf(torch.randn(L, D, generator=g, device=device) * 0.02)
        mod = leaf(torch.randn(D, generator=g, device=device) * 0.02)
        parts.append((ids, keep, weight, pos, mod))
    outs = [model_ref.gather_embed(*p) for p in parts]
    tables = [nbytes(*p[2:]) for p in parts]
    index = [nbytes(p[0], p[1]) for p in parts]
    fwd = sum(nbytes(o) for o in outs) + sum(tables) + sum(index)
    bwd = sum(nbytes(o) for o in outs) + sum(tables) + sum(index)  # read grad, write grads
    return Case("gather_embed", f"B{s.batch} K{s.audio_kept}+{s.image_kept} D{D} fp32",
                model_ref.gather_embed, lambda fn: [fn(*p) for p in parts],
                [t for p in parts for t in p[2:]], [torch.randn_like(o) for o in outs],
                {"forward": fwd, "backward": bwd, "full": fwd + bwd},
                {"forward": 0, "backward": 0, "full": 0})


def setup_pad_decoder(s, device, act, g):
    """Decoder input of both modalities: kept tokens back at their positions, the mask
    embedding elsewhere, plus positional and modality embeddings."""
    D = s.dim
    parts = []
    for L, K in [(s.audio_len, s.audio_kept), (s.image_len, s.image_kept)]:
        x = leaf(torch.randn(s.batch, K, D, generator=g, device=device).to(act))
        keep, unknown = masked_and_kept(s.batch, L, K, s.masked_ratio, device, g)
        mask_emb = leaf(torch.randn(D, generator=g, device=device) * 0.02)
        pos = leaf(torch.randn(L, D, generator=g, device=device) * 0.02)
        mod = leaf(torch.randn(D, generator=g, device=device) * 0.02)
        parts.append((x, keep, unknown, mask_emb, pos, mod))
    outs = [model_ref.pad_decoder(*p) for p in parts]
    inputs = sum(nbytes(*p) for p in parts)
    fwd = inputs + sum(nbytes(o) for o in outs)
    bwd = sum(nbytes(o) for o in outs) + inputs  # read grad and the indices, write the grads
    return Case("pad_decoder", f"B{s.batch} L{s.audio_len}+{s.image_len} D{D} {s.dtype}",
                model_ref.pad_decoder, lambda fn: [fn(*p) for p in parts],
                [t for p in parts for t in (p[0], p[3], p[4], p[5])],
                [torch.randn_like(o) for o in outs],
                {"forward": fwd, "backward": bwd, "full": fwd + bwd},
                {"forward": 0, "backward": 0, "full": 0})


def setup_codebook_ce(s, device, act, g):
    """Summed cross-entropy (label smoothing 0.1, MAGE) of h @ E^T + b at the masked rows; E is
    detached (MAGE's default), so backward is one matmul (grad h) and a column sum (grad b)."""
    N = round(s.masked_ratio * s.batch * (s.audio_len + s.image_len))
    C, D = s.codebook, s.dim
    h = leaf(torch.randn(N, D, generator=g, device=device).to(act))
    weight = (torch.randn(C, D, generator=g, device=device) * D ** -0.5).to(act)
    bias = leaf(torch.zeros(C, device=device).to(act))
    target = torch.randint(0, C, (N,), generator=g, device=device)
    args = (h, weight, bias, target, 0.1)
    gemm = 2 * N * D * C
    fwd = nbytes(h, weight, bias, target)
    bwd = 2 * nbytes(h, bias) + nbytes(weight, target)  # read h, E, b, targets, write grads
    return Case("codebook_ce", f"N{N} D{D} C{C} {s.dtype}", model_ref.codebook_ce,
                lambda fn: [fn(*args)], [h, bias], [torch.ones((), device=device)],
                {"forward": fwd, "backward": bwd, "full": fwd + bwd},
                {"forward": gemm, "backward": gemm, "full": 2 * gemm})


def setup_draw_tokens(s, device, act, g):
    """One i2a draw: both CFG passes of the 64 * 265 audio rows, softmax and inverse-CDF draw."""
    N, C, D = s.batch * s.audio_len, s.codebook, s.dim
    h_cond = torch.randn(N, D, generator=g, device=device).to(act)
    h_uncond = torch.randn(N, D, generator=g, device=device).to(act)
    weight = (torch.randn(C, D, generator=g, device=device) * D ** -0.5).to(act)
    bias = (torch.randn(C, generator=g, device=device) * 0.1).to(act)
    uniform = torch.rand(N, generator=g, device=device)
    args = (h_cond, h_uncond, weight, bias, s.guidance, 1.0, uniform)
    fwd = nbytes(h_cond, h_uncond, weight, bias, uniform) + N * (8 + 4)
    return Case("draw_tokens", f"N{N} D{D} C{C} CFG {s.dtype}", sampler_ref.draw_tokens,
                lambda fn: list(fn(*args)), [], [], {"forward": fwd},
                {"forward": 2 * N * D * C})


def setup_remask(s, device, act, g):
    """The re-mask of one i2a step: (64, 265) confidences, mask_len mid-schedule."""
    B, L = s.batch, s.audio_len
    logp = -torch.rand(B, L, generator=g, device=device) * 6
    u = torch.rand(B, L, generator=g, device=device).clamp(1e-9, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    unknown = torch.rand(B, L, generator=g, device=device) < 0.8
    count = unknown.sum(1)
    mask_len = (count // 2).clamp(min=1)  # (B,)
    args = (logp, gumbel, unknown, mask_len, s.tau)
    out = sampler_ref.remask(*args)
    fwd = nbytes(logp, gumbel, unknown, mask_len, out)
    return Case("remask", f"B{B} L{L}", sampler_ref.remask, lambda fn: [fn(*args)], [], [],
                {"forward": fwd}, {"forward": 0}, launch_bound=True)


SETUPS = {"gather_embed": setup_gather_embed, "pad_decoder": setup_pad_decoder,
          "codebook_ce": setup_codebook_ce, "draw_tokens": setup_draw_tokens,
          "remask": setup_remask}
TRITON_OPS = {"gather_embed": "kernels.gather_pad", "pad_decoder": "kernels.gather_pad",
              "codebook_ce": "kernels.codebook_ce", "draw_tokens": "kernels.sampling",
              "remask": "kernels.sampling"}


def triton_op(name):
    """The fused op, or (None, why) when its module is missing or fails to import."""
    try:
        return getattr(importlib.import_module(TRITON_OPS[name]), name), ""
    except ImportError as e:
        return None, f"missing ({TRITON_OPS[name]}: {e.__class__.__name__})"
    except Exception as e:  # a module that is there but broken: report, never crash
        return None, f"import error ({e.__class__.__name__}: {str(e)[:60]})"


HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def split_lines(text):
    """Lines with their ends, split at "\n" only (as git does; str.splitlines also splits at
    form feeds and other separators)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def patched_source(patch, root=ROOT):
    """(the file a one-file unified diff changes, that file's text under `root` with the diff
    applied). The patch is `git diff` output; text before the diff describes the change. Raises
    ValueError where it does not apply (the file has changed since) or is malformed."""
    lines = split_lines(patch)
    heads = [n for n, line in enumerate(lines) if line.startswith("+++ b/")]
    if len(heads) != 1:
        raise ValueError(f"a candidate patch changes exactly one file, not {len(heads)}")
    target = lines[heads[0]][6:].strip()
    source = split_lines((Path(root) / target).read_text())
    body = lines[heads[0] + 1:]
    out, i, j = [], 0, 0  # i: the next line of source to copy, j: of body to read
    while j < len(body):
        hunk = HUNK.match(body[j]) if body[j].startswith("@@") else None
        j += 1
        if hunk is None:
            if body[j - 1].startswith("@@"):
                raise ValueError(f"not a hunk header: {body[j - 1].strip()[:40]}")
            continue
        start, old, new = (int(x) if x is not None else 1 for x in hunk.groups())
        start -= old > 0  # a pure insertion names the line before it
        if start < i:
            raise ValueError(f"hunks out of order at line {start + 1} of {target}")
        out += source[i:start]
        i = start
        while old > 0 or new > 0:
            if j == len(body) or body[j].startswith("@@"):
                raise ValueError(f"a hunk of {target} ends early: the patch is cut short")
            line = body[j]
            j += 1
            if line.startswith("\\"):  # "\ No newline at end of file", after a - or context line
                continue
            # a blank context line may have lost its leading space to an editor
            kind, text = (" ", "\n") if line == "\n" else (line[0], line[1:])
            if kind in " -":  # a line the patch expects here
                if i >= len(source) or source[i].rstrip("\n") != text.rstrip("\n"):
                    raise ValueError(f"{target} has changed at line {i + 1}: rebase the patch")
                if kind == " ":
                    out.append(source[i])
                    new -= 1
                old -= 1
                i += 1
            elif kind == "+":
                out.append(text)
                new -= 1
                if j < len(body) and body[j].startswith("\\"):  # the added last line has no end
                    out[-1] = out[-1].removesuffix("\n")
            else:
                raise ValueError(f"not a line of a hunk: {line.strip()[:40]}")
            if old < 0 or new < 0:
                raise ValueError(f"a hunk of {target} is longer than its header says")
    return target, "".join(out + source[i:])


@functools.lru_cache(maxsize=None)
def candidate_folder():
    """A temp folder for the kernel files patches make (Triton reads a kernel's source from its
    file), removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="echoes_candidates_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


@functools.lru_cache(maxsize=None)
def load_candidate(path):
    """The module of the kernel file at `path`, or of the kernel file a patch at `path` makes
    (imported once), or (None, why)."""
    if path.endswith(".patch"):
        try:
            _, text = patched_source(Path(path).read_text())
        except (ValueError, OSError) as e:
            return None, f"candidate patch does not apply ({str(e)[:60]})"
        path = str(candidate_folder() / (Path(path).stem + ".py"))
        Path(path).write_text(text)
    spec = importlib.util.spec_from_file_location("candidate_" + Path(path).stem, path)
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would (dataclasses, pickling look there)
        spec.loader.exec_module(module)
    except Exception as e:  # a candidate that does not import is reported, never fatal
        sys.modules.pop(spec.name, None)
        return None, f"candidate import error ({e.__class__.__name__}: {str(e)[:60]})"
    return module, ""


def candidate_op(path, name):
    """The op `name` of the kernel file at `path`, or (None, why). A patch whose description has
    a line "Ops: NAME ..." offers only those ops (the others are main's, already timed)."""
    if path.endswith(".patch"):
        try:
            about = Path(path).read_text().split("\ndiff --git")[0]
        except (OSError, ValueError):
            about = ""  # load_candidate says why
        ops = re.search(r"^Ops:(.*)$", about, re.MULTILINE)
        if ops and name not in ops.group(1).split():
            return None, f"not changed by {Path(path).name}"
    module, why = load_candidate(path)
    if module is None:
        return None, why
    fn = getattr(module, name, None)
    return (fn, "") if fn is not None else (None, f"not in {Path(path).name}")


def candidate_names(paths):
    """One variant name per candidate file: its stem, numbered where it would repeat another
    candidate's or a built-in variant's name."""
    names = []
    for i, path in enumerate(paths):
        name = Path(path).stem
        taken = name in names or name in ("eager", "triton", "compile")
        names.append(f"{name}#{i + 1}" if taken else name)
    return names


# -----------------------------------------------------------------------------
# timing


def time_gpu(fn, grads, s):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=s.warmup, rep=s.rep, grad_to_none=grads or None,
                                   return_mode="median") * 1e3  # us


def time_cpu(fn, grads, s):
    fn()  # warm up
    times = []
    deadline = time.perf_counter() + s.rep / 1e3
    while len(times) < 3 or (len(times) < 25 and time.perf_counter() < deadline):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6  # us


def kernel_name(name, width=44):
    """A profiler event's name, short: no return type, template or argument list."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    name = name.split("(")[0].split("<")[0]
    return name if len(name) <= width else name[:width - 3] + "..."


def busy_us(fn, grads, calls=5):
    """Mean GPU busy time of one call (us): the summed durations of the kernels, copies and
    fills it runs, from the profiler; the host's launch overhead and the gaps it leaves are not
    in it. Also each kernel's share: [(short name, us per call)], longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def on_gpu(e):  # kernels, copies and fills; not the GPU-side spans of CPU annotations
        return (e.device_type == DeviceType.CUDA and e.name != "Context Sync"
                and not getattr(e, "is_user_annotation", False)
                and getattr(e, "activity_type", "") != "gpu_user_annotation")

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for t in grads:
                t.grad = None
            fn()
        torch.cuda.synchronize()
    parts = {}
    for e in prof.events():
        if on_gpu(e):
            name = kernel_name(e.name)
            parts[name] = parts.get(name, 0.0) + e.time_range.elapsed_us() / calls
    return sum(parts.values()), sorted(parts.items(), key=lambda kv: -kv[1])


def host_us(fn, grads, calls=5, spin_cycles=int(4e8)):
    """Host time to issue one call (us): Python, autograd, allocations and launches, measured
    while a spin kernel (~0.2 s) holds the GPU so that nothing waits on it. None where the spin
    ended before the calls were issued: a call waited for the GPU (a synchronising op). Few
    calls: the launch queue holds about a thousand kernels, and an eager backward with its
    sort-based index_put launches fifty; past a full queue the host waits without a sync."""
    torch.cuda.synchronize()
    torch.cuda._sleep(spin_cycles)
    spun = torch.cuda.Event()
    spun.record()  # done when the spin is
    start = time.perf_counter()
    for _ in range(calls):
        for t in grads:
            t.grad = None
        fn()
    us = (time.perf_counter() - start) / calls * 1e6
    waited = spun.query()
    torch.cuda.synchronize()
    return None if waited else us


def peak_mb(fn, device):
    """Rise of the allocator's peak while fn runs once (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def ceilings(device, s):
    """The card's (or CPU's) measured bandwidth (B/s), matmul peak (FLOP/s) and launch (s)."""
    if device.type == "cuda":
        import triton

        @triton.jit
        def _empty(x_ptr):
            pass

        n = 2 ** 30 if not s.small else 2 ** 26
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bw = 2 * n / (time_gpu(lambda: dst.copy_(src), [], s) * 1e-6)
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        flops = 2 * m ** 3 / (time_gpu(lambda: a @ b, [], s) * 1e-6)
        del a, b
        flag = torch.zeros(1, device=device)
        launch = time_gpu(lambda: _empty[(1,)](flag), [], s) * 1e-6
        return bw, flops, launch, "bf16 matmul"
    n = 2 ** 25
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    bw = 2 * n / (time_cpu(lambda: dst.copy_(src), [], s) * 1e-6)
    a = torch.randn(1024, 1024)
    flops = 2 * 1024 ** 3 / (time_cpu(lambda: a @ a, [], s) * 1e-6)
    return bw, flops, 0.0, "fp32 matmul"


def write_bandwidth(device, s):
    """The card's measured rate (B/s) of writing 1 GiB (64 MiB with --small) that nothing reads
    (a fill): the floor of an op whose traffic is mostly its output, such as the gather
    forward."""
    n = 2 ** 30 if not s.small else 2 ** 26
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    return n / (time_gpu(lambda: dst.fill_(1), [], s) * 1e-6)


def results(case, fn):
    """fn's outputs on the case's inputs and, where the op has a backward, the gradients of the
    case's leaves from its upstream gradients."""
    for t in case.grads:
        t.grad = None
    with torch.enable_grad() if case.grads else torch.no_grad():
        outs = case.call(fn)
    grads = []
    if case.grads:
        torch.autograd.backward(outs, case.upstream)
        grads = [t.grad for t in case.grads]
        for t in case.grads:
            t.grad = None
    return [o.detach() for o in outs] + grads


def difference(got, want):
    """(the worst difference between two lists of tensors, a note): ||a - b|| / ||b|| for
    floating point, the share of differing entries for bool tensors (masks). A draw's integer
    ids only pick the logp entries compared, those where the ids agree (elsewhere they are two
    tokens' log-probabilities, bound to differ), and the share that differ goes in the note."""
    worst, note, same = 0.0, "", None
    for a, b in zip(got, want, strict=True):
        if a is None or b is None or a.shape != b.shape:
            err = 0.0 if a is b else float("inf")
        elif b.is_floating_point():
            if same is not None and same.shape == b.shape:  # the logp of drawn ids
                a, b = a[same], b[same]
            err = (float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                   if b.numel() else float("inf"))  # no id agrees: nothing like eager's
        elif b.dtype != torch.bool:  # token ids: the draw's, its logp after them
            same = a == b
            note = f"ids differ: {float((~same).float().mean()):.1%}"
            continue
        else:
            err = float((a != b).float().mean())
        worst = max(worst, err if err == err else float("inf"))  # NaN: as far off as can be
    return worst, note


def mode_fn(case, fn, mode):
    """The function a row times, and the gradients to clear between runs."""
    if mode == "forward":
        def run():
            with torch.no_grad() if not case.grads else torch.enable_grad():
                return case.call(fn)
        return run, []
    if mode == "backward":
        outs = case.call(fn)
        return (lambda: torch.autograd.backward(outs, case.upstream, retain_graph=True)), \
            case.grads
    return (lambda: torch.autograd.backward(case.call(fn), case.upstream)), case.grads


# -----------------------------------------------------------------------------
# main


def measure(case, fn, mode, timer, s, device, bw, peak, launch):
    """One row: time, rate, % of floor, host time (GPU only) and peak memory of `fn` in `mode`."""
    floor = max(case.bytes[mode] / bw, case.flops[mode] / peak,
                launch if case.launch_bound else 0.0)
    try:
        run, grads = mode_fn(case, fn, mode)
        run()  # compile / autotune outside the timing
        us = timer(run, grads, s)
        sec = us * 1e-6
        if case.flops[mode] / peak >= case.bytes[mode] / bw:
            rate = f"{case.flops[mode] / sec / 1e12:.1f} TFLOP/s"
        else:
            rate = f"{case.bytes[mode] / sec / 1e9:.0f} GB/s"
        for t in case.grads:  # the peak of one call from no gradients, as in a training step
            t.grad = None
        row = dict(us=us, rate=rate, floor=100 * floor / sec, peak=peak_mb(run, device))
        if device.type == "cuda":  # here, not in the profiler's pass (see add_busy)
            try:
                row["host"] = host_us(run, grads)
            except Exception as e:  # a diagnostic: never lose the row's timing for it
                row["note"] = f"no host time ({e.__class__.__name__})"
        return row
    except Exception as e:  # report and go on: one broken op never hides the rest
        return dict(note=f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:70]}")
    finally:
        for t in case.grads:
            t.grad = None


def make_case(op, s, device, act):
    """The op's inputs at the settings' shapes, drawn from the settings' seed."""
    g = torch.Generator(device=device).manual_seed(s.seed)
    try:
        return SETUPS[op](s, device, act, g)
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(f"{op}: out of memory at these shapes; try --small") from e


def add_note(row, text):
    """Append to the row's note (a row can collect several)."""
    row["note"] = " ".join(filter(None, [row.get("note", ""), text]))


def op_rows(op, case, variants, s, timer, device, ceiling):
    """The table rows of one op: every mode of every variant ({name: (fn, why not)}, eager
    first), each with its time and speed-up against eager and its difference from eager."""
    bw, peak, launch, _ = ceiling
    errors = {}  # variant -> difference of its outputs and gradients from eager's, or why not
    try:
        want = results(case, case.reference) if len(variants) > 1 else None
    except Exception:  # the eager row below reports what is wrong
        want = None
    for variant, (fn, _) in variants.items():
        if want is not None and variant != "eager" and fn is not None:
            try:
                errors[variant] = difference(results(case, fn), want)  # (err, note)
            except Exception as e:
                errors[variant] = f"not compared ({e.__class__.__name__}: {str(e)[:50]})"
    del want
    rows = []
    modes = [m for m in s.modes if m in case.bytes] if case.grads else ["forward"]
    for mode in modes:
        for variant, (fn, why) in variants.items():
            row = dict(op=op, shape=case.shape, mode=mode, variant=variant, note=why)
            if fn is not None:
                row.update(measure(case, fn, mode, timer, s, device, bw, peak, launch))
            if isinstance(errors.get(variant), tuple):
                row["err"] = errors[variant][0]
                add_note(row, errors[variant][1])
            elif variant in errors:
                add_note(row, errors[variant])
            eager = next(r for r in rows[::-1] if r["mode"] == mode
                         and r["variant"] == "eager") if variant != "eager" else {}
            if "us" in row and "us" in eager:
                row["speedup"] = eager["us"] / row["us"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def add_busy(rows, case, variants, names=None):
    """Fill in the GPU busy time of one op's timed rows (of the variants in `names`; None: all),
    and every row's ratio against eager. Run after all the timing: the profiler can leave the
    driver slower to launch for the rest of the process, which would bias the rows timed after
    it."""
    for row in rows:
        if names is not None and row["variant"] not in names:
            continue
        for key in ("busy", "busy_speedup", "kernels"):
            row.pop(key, None)
        fn = variants[row["variant"]][0]
        if fn is None or "us" not in row:
            continue
        try:
            run, grads = mode_fn(case, fn, row["mode"])
            run()
            busy, kernels = busy_us(run, grads)
            if not 0 < busy <= 1.2 * row["us"]:  # one stream: busy cannot exceed the wall time
                add_note(row, f"profiler busy time {busy:.1f} us in a {row['us']:.1f} us call: "
                         "not shown")
            else:
                row["busy"], row["kernels"] = busy, kernels
        except Exception as e:  # the profiler is a diagnostic: never lose the row for it
            add_note(row, f"no busy time ({e.__class__.__name__})")
        finally:
            for t in case.grads:
                t.grad = None
    for row in rows:
        row.pop("busy_speedup", None)
        eager = next((r for r in rows if r["mode"] == row["mode"] and r["variant"] == "eager"
                      and "busy" in r), None)
        if "busy" in row and eager is not None and row is not eager:
            row["busy_speedup"] = eager["busy"] / row["busy"]


MAIN_VARIANTS = ("eager", "triton", "compile")


def variants_of(op, case, s, gpu, late=False):
    """{variant: (fn, why not)} of one op: eager first (the others' speed-up is against it), and
    on a GPU triton, compile and each candidate that has the op (one that fails to import or to
    apply stays, to say so; when the run is `late`, each stays untimed, to say that)."""
    variants = {"eager": (case.reference, "")}
    if gpu:
        variants["triton"] = triton_op(op)
        variants["compile"] = ((torch.compile(case.reference, dynamic=False), "") if s.compile
                               else (None, "skipped (--no-compile)"))
        for variant, path in zip(candidate_names(s.candidate), s.candidate):
            fn, why = candidate_op(path, op)
            if fn is not None and late:
                fn, why = None, f"skipped: past 2/3 of --time-limit {s.time_limit:g} s"
            if fn is not None or not why.startswith("not "):
                variants[variant] = (fn, why)
    return variants


def main(argv=None):
    s = parse_settings(Settings, argv, description=__doc__.split("\n\n")[0])
    check_finite(s)
    check_at_least(s, {"batch": 1, "audio_len": 1, "image_len": 1, "audio_kept": 1,
                       "image_kept": 1, "dim": 1, "codebook": 2, "warmup": 1, "rep": 1,
                       "masked_ratio": 0, "tau": 0, "time_limit": 0})
    if s.audio_kept > s.audio_len or s.image_kept > s.image_len or s.masked_ratio > 1:
        raise UserError("the encoder keeps at most every position (--audio-kept <= --audio-len, "
                        "--image-kept <= --image-len) and --masked-ratio is at most 1")
    if s.out:
        check_out_file(s.out)
    for path in s.candidate:
        if not os.path.isfile(path):
            raise UserError(f"--candidate {path}: no such file; give a kernel file such as "
                            "kernels/gather_pad.py from another commit")
    if s.small:
        s = dataclasses.replace(s, batch=min(s.batch, 4), dim=min(s.dim, 128),
                                codebook=min(s.codebook, 256))
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    act = {"bf16": torch.bfloat16, "fp32": torch.float32}[s.dtype]
    timer = time_gpu if gpu else time_cpu
    start = time.perf_counter()
    if gpu:
        import triton
        # the backward rows run backward with retain_graph=True, which a compiled backward that
        # donates its saved buffers refuses; whether it donates is settled by its first backward
        # (the err check's, which does not retain the graph), so donation is turned off
        functorch_config.donated_buffer = False
        name = device_name(device)
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    else:
        name, versions = f"{device_name(device)} (no CUDA GPU)", f"torch {torch.__version__}"
        print("no CUDA GPU: timing the eager PyTorch references on the CPU "
              "(median of time.perf_counter); no Triton, torch.compile or --candidate rows")
    bw, peak, launch, peak_kind = ceiling = ceilings(device, s)
    write = f"write {write_bandwidth(device, s) / 1e9:.0f} GB/s, " if gpu else ""
    header = (f"device: {name} | {versions} | measured: copy {bw / 1e9:.0f} GB/s, {write}"
              f"{peak_kind} {peak / 1e12:.1f} TFLOP/s, empty launch "
              + (f"{launch * 1e6:.1f} us" if launch else "- (no GPU)"))
    print(header)

    def save(rows):  # after every op, so a run stopped part-way still leaves its table
        if s.out:
            write_text(s.out, markdown(header, rows, time.perf_counter() - start) + "\n")

    rows = run_table(s, device, act, gpu, timer, ceiling, start, save)
    print()
    print(markdown(header, rows, time.perf_counter() - start))
    if s.out:
        print(f"wrote {s.out}")


def run_table(s, device, act, gpu, timer, ceiling, start, save):
    """Every row of the table: each op's variants timed (the candidates of ops reached after 2/3
    of --time-limit skipped), then on a GPU their busy times, main's variants of every op before
    any candidate's; `save(rows)` after each op. -> the rows."""
    rows, op_variants = [], {}
    for op in s.ops:
        case = make_case(op, s, device, act)
        late = s.time_limit > 0 and time.perf_counter() - start > s.time_limit * 2 / 3
        variants = variants_of(op, case, s, gpu, late)
        rows += op_rows(op, case, variants, s, timer, device, ceiling)
        op_variants[op] = variants
        del case
        if gpu:
            torch.cuda.empty_cache()
        save(rows)
    if gpu and s.busy:  # a second pass, after all the timing (see add_busy)
        print("GPU busy times (profiler) ...", flush=True)
        # main's variants of every op first: a run cut short loses candidates' busy times first
        for main_first in (True, False):
            for op, variants in op_variants.items():
                names = [v for v in variants if (v in MAIN_VARIANTS) == main_first]
                if not names:
                    continue
                case = make_case(op, s, device, act)  # the same seed: the same inputs
                add_busy([r for r in rows if r["op"] == op], case, variants, names)
                del case
                torch.cuda.empty_cache()
                save(rows)
    return rows


COLUMNS = ["op", "shape", "mode", "variant", "time (us)", "rate", "% of floor", "vs eager",
           "GPU busy (us)", "busy vs eager", "host (us)", "peak MB", "err vs eager", "note"]


def cells(row):
    us = row.get("us")
    return [row["op"], row["shape"], row["mode"], row["variant"],
            f"{us:.1f}" if us is not None else "-", row.get("rate", "-"),
            f"{row['floor']:.0f}%" if "floor" in row else "-",
            f"{row['speedup']:.2f}x" if "speedup" in row else "-",
            f"{row['busy']:.1f}" if "busy" in row else "-",
            f"{row['busy_speedup']:.2f}x" if "busy_speedup" in row else "-",
            ("sync" if row["host"] is None else f"{row['host']:.1f}") if "host" in row else "-",
            f"{row['peak']:.1f}" if row.get("peak") is not None else "-",
            f"{row['err']:.1e}" if "err" in row else "-", row["note"]]


def format_row(row):
    c = cells(row)
    return f"{c[0]:<13} {c[2]:<8} {c[3]:<10} {c[4]:>9} us  {c[5]:>14}  {c[6]:>5}  {c[7]:>7}  " \
           f"busy {c[8]:>8} us {c[9]:>7}  host {c[10]:>7} us  {c[11]:>7} MB  err {c[12]:>7}  " \
           f"{c[13]}"


def markdown(header, rows, seconds):
    lines = [f"{header} | {seconds:.0f} s", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    lines += ["", "vs eager: eager time / this time (higher is faster). % of floor: the floor "
              "time (max of bytes / copy bandwidth, FLOPs / matmul peak, and for the launch-bound "
              "re-mask an empty launch) over this time. GPU busy: summed kernel durations of one "
              "call (profiler), without the host's launch overhead. host: CPU time to issue one "
              "call while the GPU is held busy (Python, autograd, launches; sync: the call waited "
              "for the GPU). peak MB: rise of the allocator peak. err vs eager: the worst "
              "||a - b|| / ||b|| over the outputs and gradients (for masks: the share that "
              "differ; for the draw: its logp where its ids agree with eager's, the share of ids "
              "that differ in the note); bf16 rounding gives 1e-3 to 1e-2; bf16 guided draws "
              "(s = 3 amplifies rounding) differ in ~10% of the ids, about as far as eager's own "
              "bf16 draws are from an fp64 draw of the same inputs."]
    with_kernels = [r for r in rows if r.get("kernels")]
    if with_kernels:
        lines += ["", "GPU busy time by kernel (us per call, longest first):", "",
                  "| op | mode | variant | kernels |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['mode']} | {r['variant']} | {kernel_cell(r['kernels'])} |"
                  for r in with_kernels]
    lines += against_main(rows)
    return "\n".join(lines)


def against_main(rows):
    """Markdown lines of a table that sets each candidate's row beside main's (the triton row of
    the same op and mode) and torch.compile's: GPU busy and time, and main / candidate (above 1:
    the candidate is faster). Empty without candidate rows."""
    by = {(r["op"], r["mode"], r["variant"]): r for r in rows}
    pairs = [(r, by.get((r["op"], r["mode"], "triton"), {}),
              by.get((r["op"], r["mode"], "compile"), {})) for r in rows
             if r["variant"] not in ("eager", "triton", "compile")]
    if not pairs:
        return []

    def us(row, key):
        return f"{row[key]:.1f}" if key in row else "-"

    def ratio(row, ref, key):
        return f"{ref[key] / row[key]:.2f}x" if key in row and key in ref else "-"

    lines = ["", "Candidates against main (the triton rows) and torch.compile: ratios are their "
             "time over the candidate's, above 1 is faster:", "",
             "| op | mode | candidate | GPU busy (us) | main's busy | busy: main / cand. | "
             "busy: compile / cand. | time (us) | time: main / cand. | err vs eager |",
             "|" + "---|" * 10]
    for row, main, compiled in pairs:
        cells = [row["op"], row["mode"], row["variant"], us(row, "busy"), us(main, "busy"),
                 ratio(row, main, "busy"), ratio(row, compiled, "busy"), us(row, "us"),
                 ratio(row, main, "us"),
                 " ".join(filter(None, [f"{row['err']:.1e}" if "err" in row else "",
                                        row["note"]]))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def kernel_cell(kernels, shown=5):
    cell = ", ".join(f"{name} {us:.1f}" for name, us in kernels[:shown])
    rest = sum(us for _, us in kernels[shown:])
    return cell + (f", {len(kernels) - shown} more {rest:.1f}" if len(kernels) > shown else "")


if __name__ == "__main__":
    run_cli(main)
