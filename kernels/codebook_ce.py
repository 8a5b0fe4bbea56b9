"""Fused logits over the codebook + cross-entropy at the masked rows, forward and backward.

MAGE's MLM loss (paper Sec. 3.3, Eq. 1; MAGE `models_mage.py`, `MlmLayer` + the
label-smoothed `nn.CrossEntropyLoss`): logits = h @ E^T + b over the C codes, summed
cross-entropy with label smoothing eps exactly as `F.cross_entropy(label_smoothing=eps)`:

    loss_n = (1 - eps) * (lse_n - z_n,t) + eps * mean_c (lse_n - z_n,c)
           = lse_n - (1 - eps) * z_n,t - (eps / C) * sum_c z_n,c,
    d loss / d z_n,c = softmax(z_n)_c - (1 - eps) * [c == t_n] - eps / C.

The plain PyTorch reference `echoes.model.codebook_ce` is the spec: `codebook_ce` here takes
exactly its arguments and calls it for tensors that are not on a GPU (unless TRITON_INTERPRET=1).

How it is fused (in the spirit of Liger-Kernel's fused linear cross-entropy, which forms the
gradient in the forward pass):
1. the logits z = h @ E^T + b come from the same F.linear call the reference makes (cuBLAS, the
   fastest matmul on the card, bias in its epilogue), in the matmul dtype, into the buffer that
   will hold their gradient;
2. one Triton row kernel reads each row of logits once, forms the logsumexp, the target logit
   and the sum of logits in fp32 (the loss of the row, summed over the program's rows) and
   d loss / d logits in fp32 from the logsumexp: for grad h or grad E it overwrites the row in
   place with it, rounded once to the matmul dtype; for grad b it sums it over its rows in fp32
   (with only grad b wanted, nothing of size (N, C) is kept for backward).
So the [rows, C] fp32 logits (or the fp32 log-probabilities, which eager PyTorch keeps) never
exist. What backward keeps is the gradient of the logits in the matmul dtype (bf16 under
autocast): two matmuls in all, as eager, and backward is one cuBLAS matmul per wanted input,
scaled by the upstream gradient: grad h = dZ @ E, grad E = dZ^T @ h (only when E is not
detached; fp32 accumulation, as eager), grad b = column sums of dZ (fp32). The table's scaling
by the upstream gradient and the bias gradient (the sum of the row kernel's per-program
column sums) come from one small kernel.

Dtypes follow the reference: under autocast the matmul runs in the autocast dtype (h, E and b
are cast once and the logits come out in it, exactly the reference's bf16 linear) and everything
after is fp32; without autocast the matmul dtype is that of h and E (fp32 matmuls follow torch's
TF32 setting, like the reference). One difference: for fp32 h under autocast (the model's case)
grad h comes in fp32 from cuBLAS's accumulators (`kernels.mm_fp32`), where the reference rounds
it to bf16 before widening it. Targets must be valid class indices (no ignore_index): the model
only passes the masked rows. Codebooks wider than MAX_C columns use the reference.

Floor: FLOPs 2*N*C*D for the forward's matmul and 2*N*C*D per wanted input (h, E) in backward;
bytes: the (N, C) logits written by the matmul and read (and, for grad h or grad E, rewritten)
once by the row kernel, plus h, E and the targets. Imports: torch, triton, the reference from
echoes/model.py and `mm_fp32`, `on_device` from kernels/__init__.py.
"""

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from echoes.model import codebook_ce as codebook_ce_reference
from kernels import mm_fp32, on_device

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the row kernel holds BLOCK_R whole rows of logits in registers: 2 rows on a GPU (16 B loads,
# 4 warps up to 1024 columns, 8 above; ~56 registers, so all 8 programs per SM stay resident),
# with up to 8 programs per SM each looping over row blocks so the bias partial sums stay small;
# under the interpreter, 8 rows and at most 2 programs so that test shapes run the loop and a
# tail block
BLOCK_R = 8 if INTERPRET else 2
PROGRAMS_PER_SM = 8
SCALE_ROWS = 2 if INTERPRET else 4  # table rows per program of the backward's scaling kernel
SCALE_PARTIALS = 1 if INTERPRET else 256  # bias partial rows the scaling kernel adds at a time
# whole rows stop fitting in registers past 2048 columns (sm_90, bf16 with the gradient: 208
# spilled bytes a thread at 4096 columns, 2 KB at 8192), so wider codebooks take the reference
MAX_C = 2048


def _use_triton(t):
    return t.is_cuda or INTERPRET  # read at import, as triton.jit reads it


@functools.lru_cache(maxsize=None)
def _max_programs(device):
    if INTERPRET or device.type != "cuda":
        return 2
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _ce_rows_kernel(z, target, lsum, bsum, N, C, eps, n_prog,
                    STORE_GRAD: tl.constexpr, SUM_GRAD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """lsum[program] = the sum over the program's rows n of lse_n - (1 - eps) z[n, t_n] -
    eps/C sum_c z[n, c], from the logits z (N, C). With the gradient of the logits
    g[n, c] = softmax(z_n)_c - (1 - eps)[c == t_n] - eps/C (formed in fp32): STORE_GRAD
    overwrites z[n, c] with it (in z's dtype; grad h and grad E are matmuls with it), SUM_GRAD
    writes bsum[program, c] = its sum over the program's rows (fp32; the bias gradient).

    Grid (n_prog,), program p taking row blocks p, p + n_prog, ...; a row block is BLOCK_R whole
    rows (BLOCK_C >= C). Bytes (HBM): N*C*z_bytes read, and with STORE_GRAD written; with
    SUM_GRAD n_prog*C*4 bias partials; N*8 targets. FLOPs: ~10*N*C (exp, sums)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    colsum = tl.zeros([BLOCK_C], tl.float32)
    total = 0.0
    for rb in range(pid, tl.cdiv(N, BLOCK_R), n_prog):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
        rmask = rows < N
        m2 = rmask[:, None] & cmask[None, :]
        ptrs = z + rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)  # (R, BLOCK_C) logits
        xm = tl.where(m2, x, float("-inf"))
        m = tl.where(rmask, tl.max(xm, axis=1), 0.0)  # (R,)
        e = tl.exp(xm - m[:, None])  # (R, BLOCK_C) the only exp: 0 at padding columns
        # padding rows (all -inf): a sum of 1, so lse is 0 there and never -inf - -inf
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)  # (R,)
        lse = m + tl.log(s)
        t = tl.load(target + rows, mask=rmask, other=0).to(tl.int32)
        # the target logit by one load per row (0 for a target outside [0, C), as no column
        # would match it), read before the row is overwritten below
        t_ok = rmask & (t >= 0) & (t < C)
        z_t = tl.load(z + rows.to(tl.int64) * C + t, mask=t_ok, other=0.0).to(tl.float32)
        z_s = tl.sum(x, axis=1)  # masked loads gave 0 outside the row
        # no smoothing term without smoothing: 0 * z_s is nan for a code of logit -inf
        smooth = tl.where(eps != 0.0, (eps / C) * z_s, 0.0)
        total += tl.sum(tl.where(rmask, lse - (1.0 - eps) * z_t - smooth, 0.0))
        if STORE_GRAD or SUM_GRAD:
            hit = cols[None, :] == t[:, None]  # (R, BLOCK_C) the target column
            g = e * (1.0 / s)[:, None] - eps / C - tl.where(hit, 1.0 - eps, 0.0)
            g = tl.where(m2, g, 0.0)  # (R, BLOCK_C)
            if STORE_GRAD:
                # a row spans all warps: every warp's z_t load is done before any overwrites
                tl.debug_barrier()
                tl.store(ptrs, g.to(z.dtype.element_ty), mask=m2)
            if SUM_GRAD:
                colsum += tl.sum(g, axis=0)
    tl.store(lsum + pid, total)
    if SUM_GRAD:
        tl.store(bsum + pid * C + cols, colsum, mask=cmask)


@triton.jit
def _ce_scale_kernel(w, bsum, upstream, wg, gb, C, D, P,
                     W_SCALE: tl.constexpr, B_GRAD: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """The backward's small work in one launch, scaled by the upstream gradient g (a 0-dim
    tensor): wg = w * g rounded once to wg's dtype (the table grad h is formed with), and
    gb = g * the column sums of bsum (P, C), the row kernel's partial column sums of
    d loss / d z (the bias gradient). Grid (cdiv(C, BLOCK_R),). Bytes: C*D*(w + wg element
    sizes) + C*(4*P + gb element size); FLOPs: C*D + C*P."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,) codes
    rmask = rows < C
    g = tl.load(upstream).to(tl.float32)
    if W_SCALE:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (cols < D)[None, :]
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(w + offs, mask=m2, other=0.0).to(tl.float32)
            tl.store(wg + offs, (x * g).to(wg.dtype.element_ty), mask=m2)
    if B_GRAD:
        acc = tl.zeros([BLOCK_P, BLOCK_R], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)  # (P,) partial rows
            acc += tl.load(bsum + parts.to(tl.int64)[:, None] * C + rows[None, :],
                           mask=(parts < P)[:, None] & rmask[None, :], other=0.0)
        b = tl.sum(acc, axis=0)  # (R,)
        tl.store(gb + rows, (b * g).to(gb.dtype.element_ty), mask=rmask)


class CodebookCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, bias, target, label_smoothing, cdtype, grad_enabled):
        N, D = h.shape
        C = weight.shape[0]
        # needs_input_grad stays True under torch.no_grad (evaluation): then nothing is kept
        need_h, need_w, need_b = (n and grad_enabled for n in ctx.needs_input_grad[:3])
        store = need_h or need_w  # the (N, C) gradient, for the matmuls of grad h and grad E
        dev = h.device
        h_c = h.detach().to(cdtype).contiguous()  # (N, D) in the matmul dtype
        w_c = weight.detach().to(cdtype).contiguous()  # (C, D)
        target = target.contiguous()
        with torch.autocast(device_type=dev.type, enabled=False):  # the reference's F.linear
            dz = F.linear(h_c, w_c, None if bias is None else bias.detach().to(cdtype))  # (N, C)
        n_prog = max(1, min(triton.cdiv(N, BLOCK_R), _max_programs(dev)))
        # (n_prog,) per-program sums of the rows' losses
        lsum = (torch.empty if N > 0 else torch.zeros)(n_prog, device=dev, dtype=torch.float32)
        # (n_prog, C) per-program column sums of dz: every program writes its row
        bsum = (torch.empty if N > 0 else torch.zeros)(n_prog if need_b else 1, C, device=dev,
                                                       dtype=torch.float32)
        if N > 0:
            block_c = triton.next_power_of_2(C)
            _ce_rows_kernel[(n_prog,)](dz, target, lsum, bsum, N, C, float(label_smoothing),
                                       n_prog, STORE_GRAD=store, SUM_GRAD=need_b,
                                       BLOCK_R=BLOCK_R, BLOCK_C=block_c,
                                       num_warps=1 if INTERPRET else (4 if block_c <= 1024
                                                                      else 8))
        ctx.save_for_backward(dz if store else None, w_c if need_h else None,
                              h_c if need_w else None, bsum if need_b else None)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype, cdtype)
        ctx.C = C
        return lsum.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dz, w_c, h_c, bsum = ctx.saved_tensors  # dz (N, C), None when only b needs a gradient
        hdtype, wdtype, bdtype, cdtype = ctx.dtypes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        C = ctx.C
        gh = gw = None
        # one launch scales the (C, D) table (rather than the (N, C) gradient) and the bias sums
        wg = torch.empty_like(w_c) if need_h else None  # (C, D)
        gb = torch.empty(C, device=grad.device, dtype=bdtype) if need_b else None  # (C,)
        if need_h or need_b:
            D = w_c.shape[1] if need_h else 0
            _ce_scale_kernel[(triton.cdiv(C, SCALE_ROWS),)](
                w_c if need_h else grad, bsum if need_b else grad, grad.contiguous(),
                wg if need_h else grad, gb if need_b else grad, C, D,
                bsum.shape[0] if need_b else 0, W_SCALE=need_h, B_GRAD=need_b,
                BLOCK_R=SCALE_ROWS, BLOCK_D=min(1024, triton.next_power_of_2(max(D, 1))),
                BLOCK_P=SCALE_PARTIALS,
                num_warps=1 if INTERPRET else 4)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            if need_h:
                if hdtype == cdtype:
                    gh = torch.mm(dz, wg)  # (N, D)
                else:
                    # fp32 h under autocast (the model's case): cuBLAS writes it in fp32 itself
                    gh = mm_fp32(dz, wg) if hdtype == torch.float32 else None  # (N, D)
                if gh is None:  # cast in row chunks: never a full cdtype and hdtype copy both
                    N = dz.shape[0]
                    gh = torch.empty(N, wg.shape[1], device=dz.device, dtype=hdtype)  # (N, D)
                    step = max(1024, triton.cdiv(N, 4))
                    for r0 in range(0, N, step):
                        gh[r0:r0 + step] = torch.mm(dz[r0:r0 + step], wg)
            if need_w:
                gw = (torch.mm(dz.t(), h_c).float() * grad.float()).to(wdtype)  # (C, D)
        return gh, gw, gb, None, None, None, None


def codebook_ce(h, weight, bias, target, label_smoothing=0.0):
    """Summed cross-entropy of logits = h @ weight^T + bias against target, computed in fp32.
    h (N, D), weight (C, D), bias (C,) or None, target (N,) long -> scalar. Fused Triton version
    of `echoes.model.codebook_ce` (same arguments)."""
    if not _use_triton(h) or weight.shape[0] > MAX_C:
        return codebook_ce_reference(h, weight, bias, target, label_smoothing)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and h.dtype != torch.float64:
        # what the reference's F.linear runs in (autocast leaves fp64 alone)
        cdtype = torch.get_autocast_dtype(device_type)
    else:
        cdtype = torch.promote_types(h.dtype, weight.dtype)
    with on_device(h):
        return CodebookCE.apply(h, weight, bias, target, label_smoothing, cdtype,
                                torch.is_grad_enabled())
