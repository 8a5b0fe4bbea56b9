"""Fused Triton ops for the hot paths of echoes, and the one switch that picks them.

One file per fused op (the gather and the pad, two sides of one data movement, share one), each
holding the Triton kernel(s) and autograd wrapper next to an import of its plain PyTorch
reference (the spec, defined where the plain path uses it):
- `gather_pad.py`: `gather_embed` (encoder input at kept positions) and `pad_decoder` (decoder
  input with the shared mask embedding), forward and backward; reference in `echoes/model.py`;
- `codebook_ce.py`: `codebook_ce`, logits over the codebook + cross-entropy at masked rows without
  keeping the fp32 logits; reference in `echoes/model.py`;
- `sampling.py`: `draw_tokens` (CFG mix, softmax and categorical draw over the codebook) and
  `remask` (Gumbel top-k re-mask); reference in `echoes/sampler.py`.

`select(backend)` returns the op set: "triton" or "torch" as asked; "auto" or None defer to the
environment variable ECHOES_KERNELS ("auto", "triton" or "torch") and, without it, pick Triton
when CUDA and Triton are both present (or Triton's interpreter is on, TRITON_INTERPRET=1, as in
the tests), PyTorch otherwise. The Triton ops themselves fall back to the reference for tensors
that are not on a GPU (unless TRITON_INTERPRET=1), so a model on the CPU of a GPU machine still
runs.
"""

import functools
import os
import types

BACKENDS = ("auto", "triton", "torch")


def triton_available():
    """True when Triton imports and a CUDA device is present (or the interpreter is on)."""
    try:
        import triton  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def missing_triton():
    """True on a CUDA machine without Triton: "auto" then takes the plain PyTorch path, which the
    scripts say (the CUDA builds of torch on Linux bring Triton; other installs may not)."""
    import torch
    return torch.cuda.is_available() and not triton_available()


def resolve(backend=None):
    """The backend name an argument (or ECHOES_KERNELS) resolves to: "triton" or "torch"."""
    # "auto" (the scripts' default) and None both defer to the environment variable
    if backend in (None, "", "auto"):
        backend = os.environ.get("ECHOES_KERNELS") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' needs Triton and a CUDA GPU "
                           "(or TRITON_INTERPRET=1); use 'torch' or 'auto'")
    return backend


@functools.lru_cache(maxsize=None)
def _ops(name):
    if name == "torch":
        from echoes import model, sampler
        return types.SimpleNamespace(
            name="torch", gather_embed=model.gather_embed, pad_decoder=model.pad_decoder,
            codebook_ce=model.codebook_ce, draw_tokens=sampler.draw_tokens,
            remask=sampler.remask)
    from kernels import codebook_ce, gather_pad, sampling
    return types.SimpleNamespace(
        name="triton", gather_embed=gather_pad.gather_embed, pad_decoder=gather_pad.pad_decoder,
        codebook_ce=codebook_ce.codebook_ce, draw_tokens=sampling.draw_tokens,
        remask=sampling.remask)


def on_device(t):
    """A context in which `t`'s GPU is the current one, for Triton launches: Triton launches on
    the current device, not on its tensors' (a model on cuda:1 would hand its pointers to
    cuda:0), while PyTorch ops follow their tensors. A no-op for tensors off the GPU."""
    import contextlib

    import torch
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_MM_OUT_FP32 = [True]  # torch.mm(..., out_dtype=torch.float32) works here (torch >= 2.8, CUDA)


def mm_fp32(a, b):
    """a @ b stored in fp32 straight from cuBLAS's fp32 accumulators, for bf16 / fp16 CUDA
    tensors: no half-precision product is rounded or kept. None where there is no such matmul
    (other dtypes or devices; torch < 2.8, said once): the caller takes its own path."""
    import warnings

    import torch
    if not (a.is_cuda and b.is_cuda and a.dtype in (torch.float16, torch.bfloat16)
            and b.dtype == a.dtype and _MM_OUT_FP32[0]):
        return None
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:  # the caller's, not a sign of an older torch
        raise
    except (TypeError, RuntimeError, NotImplementedError) as e:  # torch < 2.8
        _MM_OUT_FP32[0] = False
        warnings.warn(f"no fp32-output matmul in this torch ({e.__class__.__name__}): half "
                      "precision products are rounded before they are widened")
        return None


def select(backend=None):
    """The op set for `backend` ("auto", "triton", "torch" or None: see the module docstring)."""
    return _ops(resolve(backend))
