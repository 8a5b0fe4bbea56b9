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
gradient in the forward pass): one program owns BLOCK_M rows and
1. sweeps the C codes in BLOCK_N tiles, computing each logits tile with tl.dot (fp32
   accumulators) and folding it into an online softmax (running max and sum of exponentials),
   the target logit and the sum of logits; the loss of each row follows;
2. when a gradient is wanted, sweeps the tiles again and writes d loss / d logits, formed in fp32
   from the final logsumexp, rounded once to the matmul dtype, plus its column sums (the bias
   gradient) in fp32.
The logits tile of pass 1 is parked in the output buffer of pass 2 (the same program reads it
back a moment later, from L2), so the logits are never recomputed and the [rows, C] fp32 logits
(or fp32 log-probabilities, which eager PyTorch keeps) never exist. What backward keeps is the
gradient of the logits in the matmul dtype (bf16 under autocast): two matmuls in all, as eager,
and backward is one cuBLAS matmul per wanted input, scaled by the upstream gradient:
grad h = dZ @ E, grad E = dZ^T @ h (only when E is not detached; fp32 accumulation, as eager),
grad b = column sums of dZ (fp32).

Dtypes follow the reference: under autocast the matmul runs in the autocast dtype (h and E are
cast once, the bias is rounded to it, the logits are rounded to it as the reference's bf16 linear
does) and everything after is fp32; without autocast the matmul dtype is that of h and E (fp32
matmuls use IEEE fp32, like PyTorch's default). Targets must be valid class indices (no
ignore_index): the model only passes the masked rows.
"""

import os

import torch
import triton
import triton.language as tl

from echoes.model import codebook_ce as codebook_ce_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _zero_bias_partials(nargs):
    # configs differ in BLOCK_M, so a config tried during autotuning may leave rows of the
    # per-block bias sums that the chosen one does not write: clear them before every run
    nargs["bsum"].zero_()


def _configs():
    """(tensor-core configs for bf16 / fp16 matmuls, configs for IEEE fp32 matmuls)."""
    if INTERPRET:  # the interpreter runs one config; small blocks so test shapes hit the tails
        one = [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), num_warps=1,
                             pre_hook=_zero_bias_partials)]
        return one, one
    # Hopper, bf16: 128 x 128 tiles with 64-wide K steps over 8 warps (2 warpgroups of wgmma),
    # 3 stages; 64-row variants give more programs when the masked row count is small (93
    # programs of 128 rows for 12k rows on 132 SMs). IEEE fp32 has no tensor cores and keeps
    # more live registers per element: smaller tiles, 2 stages. Every config here compiles for
    # sm_90 without spilling registers (tests/test_kernels_compile.py); 128 x 256 in bf16
    # spilled 784 B per thread, and the bf16 shapes spilled in fp32.
    low = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]
    ieee = [(64, 64, 32, 4, 2), (32, 128, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2)]
    return tuple([triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w,
                                num_stages=st, pre_hook=_zero_bias_partials)
                  for m, n, k, w, st in shapes] for shapes in (low, ieee))


LOW_CONFIGS, IEEE_CONFIGS = _configs()
CONFIGS = LOW_CONFIGS + [c for c in IEEE_CONFIGS if c not in LOW_CONFIGS]  # interpreter: one
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONFIGS)


def _configs_for(configs, nargs, **kwargs):
    """Autotune prune: the configs of the launch's matmul precision (IEEE fp32 or not)."""
    ieee = kwargs.get("IEEE", nargs.get("IEEE"))
    return [c for c in configs if c in (IEEE_CONFIGS if ieee else LOW_CONFIGS)]


def _use_triton(t):
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@triton.autotune(configs=CONFIGS, key=["C", "D", "N_BUCKET", "STORE_GRAD", "IEEE"],
                 prune_configs_by=dict(early_config_prune=_configs_for))
@triton.jit
def _ce_fwd_kernel(h, w, bias, target, loss, dz, bsum, N, C, D, s_hn, s_wc, eps, N_BUCKET,
                   STORE_GRAD: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """loss[n] = lse_n - (1 - eps) z[n, t_n] - eps/C sum_c z[n, c] with z = h @ w^T + bias;
    with STORE_GRAD, dz[n, c] = softmax(z_n)_c - (1 - eps)[c == t_n] - eps/C (matmul dtype) and
    bsum[program, c] = sum over the program's rows of dz[n, c] (fp32).

    Grid (cdiv(N, BLOCK_M),). FLOPs: 2*N*C*D (tensor cores) + ~10*N*C (softmax, once per pass).
    Bytes (HBM): N*D + C*D in the matmul dtype read once (w is re-read per program from L2:
    cdiv(N, BLOCK_M)*C*D), N*(8 + 4) for targets and losses; with STORE_GRAD, N*C written in the
    matmul dtype (pass 1's parked tile is re-read from L2 and overwritten) and
    cdiv(N, BLOCK_M)*C*4 bias partials."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    t = tl.load(target + rows, mask=rmask, other=0).to(tl.int32)  # (M,)
    cdt = h.dtype.element_ty
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    s_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(z - m_i)
    z_t = tl.zeros([BLOCK_M], tl.float32)  # target logit
    z_s = tl.zeros([BLOCK_M], tl.float32)  # sum of logits (label smoothing)
    # pass 1: logits tile by tile, online softmax statistics
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)  # (Nc,)
        cmask = cols < C
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            a = tl.load(h + rows64[:, None] * s_hn + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)  # (M, Kc)
            b = tl.load(w + cols.to(tl.int64)[:, None] * s_wc + ks[None, :],
                        mask=cmask[:, None] & kmask[None, :], other=0.0)  # (Nc, Kc)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        bv = tl.load(bias + cols, mask=cmask, other=0.0).to(cdt).to(tl.float32)
        z = acc + bv[None, :]  # (M, Nc)
        if ROUND:  # the reference's low-precision linear rounds its output
            z = z.to(cdt).to(tl.float32)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        z_t += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
        z_s += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        if STORE_GRAD:  # park the tile where its gradient goes
            tl.store(dz + rows64[:, None] * C + cols[None, :], z.to(cdt),
                     mask=rmask[:, None] & cmask[None, :])
    lse = m_i + tl.log(s_i)  # (M,)
    tl.store(loss + rows, lse - (1.0 - eps) * z_t - (eps / C) * z_s, mask=rmask)
    if STORE_GRAD:
        # pass 2: d loss / d z in fp32 from the parked logits; the barrier orders the other
        # threads' stores of pass 1 before these loads
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            cmask = cols < C
            m2 = rmask[:, None] & cmask[None, :]
            ptrs = dz + rows64[:, None] * C + cols[None, :]
            z = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)  # (M, Nc)
            g = tl.exp(z - lse[:, None]) - eps / C
            g = g - tl.where(cols[None, :] == t[:, None], 1.0 - eps, 0.0)
            g = tl.where(m2, g, 0.0)
            tl.store(ptrs, g.to(cdt), mask=m2)
            tl.store(bsum + pid * C + cols, tl.sum(g, axis=0), mask=cmask)


class CodebookCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, bias, target, label_smoothing, cdtype):
        N, D = h.shape
        C = weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        store = need_h or need_w or need_b
        dev = h.device
        h_c = h.detach().to(cdtype).contiguous()  # (N, D) in the matmul dtype
        w_c = weight.detach().to(cdtype).contiguous()  # (C, D)
        bias = bias.detach().contiguous()
        target = target.contiguous()
        loss = torch.empty(N, device=dev, dtype=torch.float32)  # (N,) per-row losses
        dz = torch.empty(N if store else 0, C, device=dev, dtype=cdtype)  # (N, C) d loss / d z
        bsum = torch.empty(triton.cdiv(N, MIN_BLOCK_M) if store else 1, C, device=dev,
                           dtype=torch.float32)  # per-program column sums of dz
        if N > 0:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            _ce_fwd_kernel[grid](h_c, w_c, bias, target, loss, dz, bsum, N, C, D,
                                 h_c.stride(0), w_c.stride(0), float(label_smoothing),
                                 triton.next_power_of_2(N), STORE_GRAD=store,
                                 ROUND=cdtype != torch.float32, IEEE=cdtype == torch.float32)
        ctx.save_for_backward(dz, w_c if need_h else None, h_c if need_w else None,
                              bsum if need_b else None)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype, cdtype)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        dz, w_c, h_c, bsum = ctx.saved_tensors  # dz (N, C)
        hdtype, wdtype, bdtype, cdtype = ctx.dtypes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad.float()  # () upstream gradient of the summed loss
        gh = gw = gb = None
        with torch.autocast(device_type=dz.device.type, enabled=False):
            if need_h:  # scale the (C, D) table rather than the (N, C) gradient
                wg = (w_c.float() * g).to(cdtype)  # (C, D)
                if hdtype == cdtype:
                    gh = torch.mm(dz, wg)  # (N, D)
                else:  # cast in row chunks: never both a full cdtype and a full hdtype copy
                    N = dz.shape[0]
                    gh = torch.empty(N, wg.shape[1], device=dz.device, dtype=hdtype)  # (N, D)
                    step = max(1024, triton.cdiv(N, 4))
                    for r0 in range(0, N, step):
                        gh[r0:r0 + step] = torch.mm(dz[r0:r0 + step], wg)
            if need_w:
                gw = (torch.mm(dz.t(), h_c).float() * g).to(wdtype)  # (C, D)
            if need_b:
                gb = (bsum.sum(0) * g).to(bdtype)  # (C,)
        return gh, gw, gb, None, None, None


def codebook_ce(h, weight, bias, target, label_smoothing=0.0):
    """Summed cross-entropy of logits = h @ weight^T + bias against target, computed in fp32.
    h (N, D), weight (C, D), bias (C,), target (N,) long -> scalar. Fused Triton version of
    `echoes.model.codebook_ce` (same arguments)."""
    if not _use_triton(h):
        return codebook_ce_reference(h, weight, bias, target, label_smoothing)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        cdtype = torch.get_autocast_dtype(device_type)  # what the reference's F.linear runs in
    else:
        cdtype = torch.promote_types(h.dtype, weight.dtype)
    return CodebookCE.apply(h, weight, bias, target, label_smoothing, cdtype)
