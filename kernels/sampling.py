"""Fused sampling ops: the guided categorical draw over the codebook and the Gumbel top-k re-mask.

Triton versions of the two per-step ops of the decoding loop (paper Sec. 3.4, Code 1, Eq. 2;
MAGE's `mask_by_random_topk`). Their plain PyTorch references in `echoes/sampler.py` are the spec:
they are imported here, never copied, and run instead of the kernels for tensors that are not on
a GPU (unless TRITON_INTERPRET=1, which runs the kernels on the CPU for tests).

- `draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform)`: logits over
  the codebook, the CFG mix, the tempered softmax and the inverse-CDF draw. Eq. 2 mixes in logit
  space, and logits are linear in h, so s * (h_c W^T + b) + (1 - s) * (h_u W^T + b) =
  (s h_c + (1 - s) h_u) W^T + b: one Triton launch mixes h, one cuBLAS matmul (the fastest on
  the card) serves both passes of CFG and writes fp32 logits, one Triton launch per row block
  does the bias, temperature, softmax statistics and the inverse-CDF scan.
- `remask(logp, gumbel, unknown, mask_len, tau)`: per row, the mask_len-th smallest confidence by
  a 4-way bisection on the float bits (no sort), and the new mask, in one launch.

The two stay separate launches rather than one draw-and-re-mask kernel: the draw is parallel
over rows (b, l) and the codebook, the re-mask needs all of a sample's L confidences
at once, so one kernel would either wait on a grid-wide barrier or run a sample's L draws in one
program (1 program for the whole step at batch 1). The draw's (N,) log-probabilities, the only
thing passed between them, are 4 bytes a row.

Both consume the caller's random numbers (`uniform`, `gumbel`), so for the same generator they give
the reference's results: the re-mask exactly (its confidences are rounded as the reference's are,
with no fused multiply-add), the draw except where u * total lies within rounding (~1e-6 in fp32,
more in bf16, where the reference rounds each pass's logits and the kernel the mixed h) of a
cumulative sum.

Imports: torch, triton, the references from echoes/sampler.py and `mm_fp32`, `on_device` from
kernels/__init__.py.
"""

import os

import torch
import triton
import triton.language as tl

from echoes import sampler as reference
from kernels import mm_fp32, on_device


# read once, as triton.jit reads it: set after import, the kernels would still be compiled ones
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(t):
    """Kernels for GPU tensors, or for any tensor under the interpreter; else the reference."""
    return t.is_cuda or INTERPRET


# -----------------------------------------------------------------------------
# draw_tokens: the CFG mix of h, one cuBLAS matmul to fp32 logits, then a row kernel that does
# the tempered softmax and the inverse-CDF draw


@triton.jit
def _mix_kernel(hc_ptr, hu_ptr, out_ptr, N, D, stride_hc, stride_hu, s_cond, s_uncond,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = s h_c + (1 - s) h_u, in fp32 and rounded once to out's dtype (Eq. 2 moved onto h).

    Grid (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D)). Bytes: 2 N D read + N D written (h's element size);
    FLOPs: 3 N D."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (Dc,)
    ok = (rows < N)[:, None] & (cols < D)[None, :]  # (R, Dc)
    rows64 = rows.to(tl.int64)[:, None]  # (R, 1)
    hc = tl.load(hc_ptr + rows64 * stride_hc + cols[None, :], mask=ok, other=0.0)  # (R, Dc)
    hu = tl.load(hu_ptr + rows64 * stride_hu + cols[None, :], mask=ok, other=0.0)  # (R, Dc)
    h = s_cond * hc.to(tl.float32) + s_uncond * hu.to(tl.float32)  # (R, Dc)
    tl.store(out_ptr + rows64 * D + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scaled_logits(z_ptr, b_ptr, rows64, cols, row_ok, C, stride_z, temperature,
                   HAS_BIAS: tl.constexpr):
    """z = (logits + b) / T in fp32 at rows x cols, -inf at columns >= C or rows >= N. Every
    read of a logit goes through here, so the two passes and the final pick see the same z."""
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
    z = z.to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(ok, z / temperature, float("-inf"))


@triton.jit
def _draw_chunks(z_ptr, b_ptr, rows64, row_ok, u, C, stride_z, temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The draw over a codebook wider than one chunk -> (big, total, count, last) per row: the
    softmax shift, the sum of exp(z - big), the number of columns whose cdf is <= u * total and
    the last column with any mass."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        z = _scaled_logits(z_ptr, b_ptr, rows64, c0 + tl.arange(0, BLOCK_C), row_ok, C,
                           stride_z, temperature, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf logits stay 0
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
    big = tl.where(m == float("-inf"), 0.0, m)  # (R,) the shift of the softmax
    total = tl.where(row_ok, s, 1.0)
    target = u * total
    # searchsorted(right=True) on the running cdf: the columns whose cdf is <= target; when
    # rounding puts target at or past the total, the last column with any mass
    carry = tl.zeros([BLOCK_R], tl.float32)
    count = tl.zeros([BLOCK_R], tl.int32)
    last = tl.full([BLOCK_R], -1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z = _scaled_logits(z_ptr, b_ptr, rows64, cols, row_ok, C, stride_z, temperature,
                           HAS_BIAS)
        p = tl.exp(z - big[:, None])  # (R, BLOCK_C), 0 at columns >= C
        cdf = carry[:, None] + tl.cumsum(p, axis=1)
        count += tl.sum((cdf <= target[:, None]).to(tl.int32), axis=1)
        last = tl.maximum(last, tl.max(tl.where(p > 0, cols[None, :], -1), axis=1))
        carry = tl.max(cdf, axis=1)  # the inclusive cdf at the chunk's end (p >= 0)
    return big, total, count, last


@triton.jit
def _draw_rows_kernel(z_ptr, b_ptr, u_ptr, ids_ptr, logp_ptr, N, C, stride_z, temperature,
                      HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      ONE_CHUNK: tl.constexpr):
    """Per row: z = (logits + b) / T, m = max z, total = sum exp(z - m), the inverse-CDF pick
    id = #{j : sum_{i<=j} exp(z_i - m) <= u total} (clamped to the last column of nonzero
    probability) and logp = z_id - m - log(total).

    Grid (cdiv(N, BLOCK_R),). ONE_CHUNK (C <= BLOCK_C): each row is read once and its exps taken
    once, and total is the scan's own last cdf value, so u * total never lies past it (a sum in
    another order could leave it past, picking the last column with any mass). Otherwise the
    codebook is swept in BLOCK_C chunks twice (online max and sum, then the scan with the carried
    cumulative mass), the second sweep hitting L1/L2. Bytes: N C read once (twice in chunks, the
    second read from cache; logits' element size), C bias, N (4 + 8 + 4) for u, ids, logp;
    FLOPs ~ 5 N C (scale, exp, cumsum, compares), twice the exps in chunks."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (R,)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        z = _scaled_logits(z_ptr, b_ptr, rows64, cols, row_ok, C, stride_z, temperature,
                           HAS_BIAS)  # (R, BLOCK_C)
        m = tl.max(z, axis=1)  # (R,)
        big = tl.where(m == float("-inf"), 0.0, m)  # (R,) the shift; rows of -inf logits stay 0
        p = tl.exp(z - big[:, None])  # (R, BLOCK_C), 0 at columns >= C
        cdf = tl.cumsum(p, axis=1)  # (R, BLOCK_C)
        # the inclusive cdf at the last column (not a max, which would skip a nan)
        total = tl.where(row_ok, tl.sum(tl.where(cols[None, :] == C - 1, cdf, 0.0), axis=1), 1.0)
        target = u * total
        # searchsorted(right=True): the columns whose cdf is <= target; clamped to the last
        # column with any mass for u * total rounding up to total
        count = tl.sum((cdf <= target[:, None]).to(tl.int32), axis=1)  # (R,)
        last = tl.max(tl.where(p > 0, cols[None, :], -1), axis=1)  # (R,)
    else:
        big, total, count, last = _draw_chunks(z_ptr, b_ptr, rows64, row_ok, u, C, stride_z,
                                               temperature, HAS_BIAS, BLOCK_R, BLOCK_C)
    pos = tl.maximum(tl.minimum(count, last), 0)  # (R,) the drawn id
    z_pos = tl.load(z_ptr + rows64 * stride_z + pos, mask=row_ok, other=0.0)  # (R,)
    z_pos = z_pos.to(tl.float32)
    if HAS_BIAS:  # the same operations as _scaled_logits, so the same value
        z_pos = z_pos + tl.load(b_ptr + pos, mask=row_ok, other=0.0).to(tl.float32)
    z_pos = z_pos / temperature
    tl.store(ids_ptr + rows, pos.to(tl.int64), mask=row_ok)
    tl.store(logp_ptr + rows, z_pos - big - tl.log(total), mask=row_ok)


# GPU: 2 rows x the whole codebook (up to 2048 columns) per program, 16 B loads (~60 registers at
# C = 1024: 8 programs per SM); the interpreter takes the two below, small so tests sweep several
# chunks with a tail (tests change them)
_INTERPRET_ROWS = 32
_INTERPRET_BLOCK_C = 64
_MIX = dict(BLOCK_R=16, BLOCK_D=256, num_warps=4)
_INTERPRET_MIX = dict(BLOCK_R=8, BLOCK_D=32, num_warps=1)


def _compute_dtype(h):
    """The matmul input dtype the reference's F.linear would use: autocast's when it is on
    (autocast leaves fp64 alone)."""
    if h.dtype == torch.float64:
        return h.dtype
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _rows(x):
    """A 2-D tensor whose last dim is contiguous (the kernels take a row stride only)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _logits(h, weight):
    """h @ W^T with fp32 accumulation, stored in fp32: cuBLAS with an fp32 output for bf16 / fp16
    inputs (rounding the logits to bf16 would move ~8% of CFG draws), plain fp32 otherwise (TF32
    as torch's matmul settings allow, like the reference's F.linear; fp64 keeps its dtype)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = mm_fp32(h, weight.t())
        return torch.mm(h, weight.t()) if logits is None else logits


def draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform):
    """Draw one token per row from softmax(Eq. 2 logits / token_temperature) by inverse CDF.

    Same signature and semantics as `echoes.sampler.draw_tokens` (the reference):
      logits = s (h_c W^T + b) + (1 - s) (h_u W^T + b) = (s h_c + (1 - s) h_u) W^T + b,
      z = logits / T,  id = first j with sum_{i<=j} exp(z_i) > u sum_i exp(z_i),
      logp = z_id - logsumexp(z);  h_uncond None: no guidance (the mix is skipped).
    h_* (N, D), weight (C, D), bias (C,) or None, uniform (N,) in [0, 1) -> ids (N,) long and
    logp (N,) fp32. The matmul runs in h's dtype (autocast's under autocast, the bias rounded to
    it as F.linear does) with fp32 accumulation and fp32 logits; fp32 inputs use IEEE fp32 unless
    torch allows TF32 for matmuls.

    Launches (logits are linear in h, so CFG costs one matmul, not two):
      1. with CFG, `_mix_kernel`: h = s h_c + (1 - s) h_u in fp32, rounded once to the matmul
         dtype, grid (cdiv(N, 16), cdiv(D, 256));
      2. cuBLAS: logits = h W^T, (N, C) fp32 (`torch.mm(..., out_dtype=torch.float32)` for bf16);
      3. `_draw_rows_kernel`, grid (cdiv(N, 2),): per row the bias, 1/T, the softmax statistics,
         the inverse-CDF scan, id and logp.
    Bytes moved (bf16, CFG): mix 3 N D * 2; matmul N D * 2 + C D * 2 read, N C * 4 written; draw
    N C * 4 read (once up to 2048 codes, else plus a cached re-read), N * 16 for u, ids, logp. At the paper's i2a shape
    (N = 16960, D = C = 1024): ~104 + 35 + 69 + 69 MB, ~66 us at 4.2 TB/s, overlapping the
    35.6 GFLOP matmul (~50 us at 708 TFLOP/s).
    FLOPs: 2 N D C on tensor cores (eager CFG does two such matmuls per call), 3 N D for the mix,
    ~5 N C elementwise for the draw (~8 N C past 2048 codes). The (N, C) fp32 logits are the only large temporary.
    """
    if not _use_triton(h_cond):
        return reference.draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature,
                                     uniform)
    N, D = h_cond.shape
    C = weight.shape[0]
    if C == 0:
        raise ValueError("draw_tokens needs a codebook of at least one code, got 0")
    device = h_cond.device
    dtype = _compute_dtype(h_cond)
    ids = torch.empty(N, dtype=torch.long, device=device)
    logp = torch.empty(N, dtype=torch.float32, device=device)
    if N == 0:
        return ids, logp
    h_cond = _rows(h_cond)
    if h_uncond is not None:
        h_uncond = _rows(h_uncond)
        s = float(guidance)
        h = torch.empty((N, D), dtype=dtype, device=device)  # (N, D) the guided features
        cfg = dict(_INTERPRET_MIX if INTERPRET else _MIX)
        cfg["BLOCK_D"] = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(D)))
        grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
        with on_device(h):
            _mix_kernel[grid](h_cond, h_uncond, h, N, D, h_cond.stride(0), h_uncond.stride(0),
                              s, 1.0 - s, **cfg)
    else:
        h = h_cond.to(dtype)
    logits = _logits(h, weight.to(dtype))  # (N, C) fp32
    has_bias = bias is not None
    bias = bias.to(dtype).contiguous() if has_bias else logits  # any pointer when there is none
    uniform = uniform.contiguous()
    if INTERPRET:
        block_r, block_c, warps = _INTERPRET_ROWS, _INTERPRET_BLOCK_C, 1
    else:
        block_r, block_c = 2, 2048
        warps = 4 if min(block_c, triton.next_power_of_2(C)) <= 1024 else 8
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    with on_device(logits):
        _draw_rows_kernel[(triton.cdiv(N, block_r),)](
            logits, bias, uniform, ids, logp, N, C, logits.stride(0), float(token_temperature),
            HAS_BIAS=has_bias, BLOCK_R=block_r, BLOCK_C=block_c, ONE_CHUNK=C <= block_c,
            num_warps=warps)
    return ids, logp


# -----------------------------------------------------------------------------
# remask: the mask_len-th smallest confidence per row by bisection on the float bits


@triton.jit
def _remask_kernel(logp_ptr, gumbel_ptr, unknown_ptr, mask_len_ptr, out_ptr, tau, L,
                   BLOCK_L: tl.constexpr):
    """One program per row: confidence, its order-preserving int32 key, a 4-way bisection for
    a key v with exactly k keys <= v (or, at ties, the k-th smallest key), then the mask."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_L)  # (Lb,) positions, Lb >= L
    ok = offs < L
    base = row.to(tl.int64) * L
    unknown = tl.load(unknown_ptr + base + offs, mask=ok, other=0) != 0  # (Lb,)
    lp = tl.load(logp_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)  # (Lb,)
    g = tl.load(gumbel_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)  # (Lb,)
    confidence = tl.where(unknown, lp + tau * g, float("inf"))  # (Lb,)
    # float -> int32 with the same order: flip the magnitude bits of negative numbers
    bits = confidence.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(ok, key, 0x7FFFFFFF)  # padding lanes sort after every valid one
    k = tl.load(mask_len_ptr + row).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 1), L)  # the reference clamps mask_len - 1 at 0
    # invariant: count(key <= hi) >= k, and the k-th smallest key is in [lo, hi]; int64 bounds
    # so spans never overflow. Stop early once count(key <= hi) == k: any such hi separates the
    # k smallest from the rest (with random confidences that takes ~7 steps, not 17)
    lo = tl.min(key, axis=0).to(tl.int64)
    hi = tl.max(tl.where(ok, key, -2147483648), axis=0).to(tl.int64)
    lo = tl.where(L == k, hi, lo)
    while lo < hi:
        span = hi - lo
        m1 = lo + span // 4
        m2 = lo + span // 2
        m3 = lo + span - span // 4
        c1 = tl.sum((key <= m1.to(tl.int32)).to(tl.int32), axis=0)
        c2 = tl.sum((key <= m2.to(tl.int32)).to(tl.int32), axis=0)
        c3 = tl.sum((key <= m3.to(tl.int32)).to(tl.int32), axis=0)
        new_hi = tl.where(c1 >= k, m1, tl.where(c2 >= k, m2, tl.where(c3 >= k, m3, hi)))
        new_lo = tl.where(c1 >= k, lo, tl.where(c2 >= k, m1 + 1,
                                                tl.where(c3 >= k, m2 + 1, m3 + 1)))
        exact = (c1 == k) | ((c1 < k) & (c2 == k)) | ((c2 < k) & (c3 == k))
        hi = new_hi
        lo = tl.where(exact, new_hi, new_lo)
    # the cut is the largest confidence at or below hi: the k-th smallest value of the row
    cut = tl.max(tl.where(key <= hi.to(tl.int32), confidence, float("-inf")), axis=0)
    tl.store(out_ptr + base + offs, ((confidence <= cut) & unknown).to(tl.int8), mask=ok)


def remask(logp, gumbel, unknown, mask_len, tau):
    """Code 1's `mask_by_random_topk`: which positions go back to the mask id.

    Same signature and semantics as `echoes.sampler.remask` (the reference):
      c = logp + tau * gumbel at unknown positions, +inf at known ones;
      cut = the mask_len-th smallest c of the row; new mask = (c <= cut) & unknown.
    logp, gumbel (B, L) fp32, unknown (B, L) bool, mask_len (B,) long (clamped to [1, L]),
    tau float -> (B, L) bool. Ties at the cut are all re-masked, as in the reference.

    One launch, grid (B,), one program per row holding the whole row (L <= a few thousand).
    The cut is found without sorting: confidences map to int32 keys of the same order, and a
    4-way bisection over the key range (3 row counts per step) narrows [lo, hi] until exactly
    mask_len keys are <= hi, or, when ties straddle the cut, until lo = hi = the mask_len-th
    smallest key; at most 17 steps for a 2^32 key range, ~7 for random confidences.
    Bytes moved: B * L * (4 + 4 + 1) read, B * L written, B * 8 for mask_len. FLOPs: ~6 B * L
    integer compares and adds per step. At the paper shapes (64 x 265, 170 KB) the launch dominates.
    """
    if not _use_triton(logp):
        return reference.remask(logp, gumbel, unknown, mask_len, tau)
    B, L = logp.shape
    out = torch.empty((B, L), dtype=torch.bool, device=logp.device)
    if B == 0 or L == 0:
        return out
    block = triton.next_power_of_2(L)
    # one warp up to 512 positions (the row counts stay in warp shuffles), two up to 1024
    warps = 1 if block <= 512 else (2 if block <= 1024 else 4)
    with on_device(out):
        _remask_kernel[(B,)](logp.contiguous(), gumbel.contiguous(),
                             unknown.to(torch.bool).contiguous().view(torch.uint8),
                             mask_len.contiguous(),
                             out.view(torch.uint8), float(tau), L, BLOCK_L=block,
                             num_warps=warps, enable_fp_fusion=False)
    return out
