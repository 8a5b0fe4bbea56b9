"""Fused sampling ops: the guided categorical draw over the codebook and the Gumbel top-k re-mask.

Triton versions of the two per-step ops of the decoding loop (paper Sec. 3.4, Code 1, Eq. 2;
MAGE's `mask_by_random_topk`). Their plain PyTorch references in `echoes/sampler.py` are the spec:
they are imported here, never copied, and run instead of the kernels for tensors that are not on
a GPU (unless TRITON_INTERPRET=1, which runs the kernels on the CPU for tests).

- `draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform)`: logits over
  the codebook, the CFG mix, the tempered softmax and the inverse-CDF draw, in two launches that
  never write the (N, C) logits to memory. Eq. 2 mixes in logit space, and logits are linear in
  h, so s * (h_c W^T + b) + (1 - s) * (h_u W^T + b) = (s h_c + (1 - s) h_u) W^T + b: the mix is
  applied to the h tiles as they are loaded, and one matmul per tile serves both passes of CFG.
- `remask(logp, gumbel, unknown, mask_len, tau)`: per row, the mask_len-th smallest confidence by
  a 4-way bisection on the float bits (no sort), and the new mask, in one launch.

Both consume the caller's random numbers (`uniform`, `gumbel`), so for the same generator they give
the reference's results: the re-mask exactly (its confidences are rounded as the reference's are,
with no fused multiply-add), the draw except where u * total lies within rounding (~1e-6 in fp32,
more in bf16, where the reference rounds each pass's logits and the kernel the mixed h) of a
cumulative sum.
"""

import os

import torch
import triton
import triton.language as tl

from echoes import sampler as reference


def _use_triton(t):
    """Kernels for GPU tensors, or for any tensor under the interpreter; else the reference."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# -----------------------------------------------------------------------------
# draw_tokens: logits tile by tile, per-tile logsumexp, then the inverse-CDF draw


@triton.jit
def _logits_tile(hc_ptr, hu_ptr, w_ptr, b_ptr, rows, cols, N, C, D,
                 stride_hc, stride_hu, stride_w, s_cond, s_uncond, temperature,
                 HAS_UNCOND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = ((s h_c + (1 - s) h_u) @ W^T + b) / T for rows x cols, fp32 accumulate; -inf at
    columns >= C. Both kernels call this, so they see the same logits up to the accumulation
    order of the matmul (their tiles are tuned separately)."""
    row_ok = rows < N
    col_ok = cols < C
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(w_ptr + cols64[None, :] * stride_w + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_C)
        h = tl.load(hc_ptr + rows64[:, None] * stride_hc + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if HAS_UNCOND:
            hu = tl.load(hu_ptr + rows64[:, None] * stride_hu + ks[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            h = s_cond * h.to(tl.float32) + s_uncond * hu.to(tl.float32)  # Eq. 2, mixed in fp32
        acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc / temperature, float("-inf"))


@triton.jit
def _tile_lse_kernel(hc_ptr, hu_ptr, w_ptr, b_ptr, lse_ptr, N, C, D,
                     stride_hc, stride_hu, stride_w, s_cond, s_uncond, temperature, n_tiles,
                     HAS_UNCOND: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1: lse[n, t] = logsumexp of row n's logits over codebook tile t."""
    pid = tl.program_id(0)
    rb = pid // n_tiles  # the tile index runs fastest: programs sharing h rows run together
    t = pid % n_tiles
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
    z = _logits_tile(hc_ptr, hu_ptr, w_ptr, b_ptr, rows, cols, N, C, D,
                     stride_hc, stride_hu, stride_w, s_cond, s_uncond, temperature,
                     HAS_UNCOND, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
    m = tl.max(z, axis=1)  # (BLOCK_M,)
    m = tl.where(m == float("-inf"), 0.0, m)  # a tile of -inf logits (a -inf bias) has lse -inf
    lse = m + tl.log(tl.sum(tl.exp(z - m[:, None]), axis=1))
    tl.store(lse_ptr + rows.to(tl.int64) * n_tiles + t, lse, mask=rows < N)


@triton.jit
def _draw_kernel(hc_ptr, hu_ptr, w_ptr, b_ptr, lse_ptr, u_ptr, ids_ptr, logp_ptr, N, C, D,
                 stride_hc, stride_hu, stride_w, s_cond, s_uncond, temperature, n_tiles,
                 HAS_UNCOND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_C: tl.constexpr, TILES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 2: from the tile masses, each row's crossing tile k* (the tile where the cumulative
    mass first exceeds u * total); the program of tile t recomputes its logits only when some
    row of its block has k* = t, scans them and writes those rows' ids and log-probabilities."""
    pid = tl.program_id(0)
    rb = pid // n_tiles
    t = pid % n_tiles
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tiles = tl.arange(0, TILES)
    tile_ok = tiles < n_tiles
    lse = tl.load(lse_ptr + rows.to(tl.int64)[:, None] * n_tiles + tiles[None, :],
                  mask=row_ok[:, None] & tile_ok[None, :], other=float("-inf"))  # (BM, TILES)
    big = tl.max(lse, axis=1)
    big = tl.where(row_ok & (big > float("-inf")), big, 0.0)  # (BM,) the shift of the softmax
    mass = tl.exp(lse - big[:, None])  # (BM, TILES) unnormalised tile probabilities
    total = tl.where(row_ok, tl.sum(mass, axis=1), 1.0)
    target = tl.load(u_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * total
    # k* = number of tiles whose inclusive cumulative mass is <= target; when rounding puts
    # target at or past the total, the last tile with any mass (so no zero-probability id)
    below = (tl.cumsum(mass, axis=1) <= target[:, None]) & tile_ok[None, :]
    kstar = tl.sum(below.to(tl.int32), axis=1)
    last_tile = tl.max(tl.where(mass > 0, tiles[None, :], -1), axis=1)
    kstar = tl.maximum(tl.minimum(kstar, last_tile), 0)
    carry = tl.sum(tl.where(tiles[None, :] < kstar[:, None], mass, 0.0), axis=1)  # mass before k*
    mine = row_ok & (kstar == t)
    if tl.sum(mine.to(tl.int32), axis=0) > 0:
        local = tl.arange(0, BLOCK_C)
        cols = t * BLOCK_C + local
        z = _logits_tile(hc_ptr, hu_ptr, w_ptr, b_ptr, rows, cols, N, C, D,
                         stride_hc, stride_hu, stride_w, s_cond, s_uncond, temperature,
                         HAS_UNCOND, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
        p = tl.exp(z - big[:, None])  # (BM, BLOCK_C), 0 at columns >= C
        cdf = carry[:, None] + tl.cumsum(p, axis=1)
        # searchsorted(right=True): the first column whose cdf exceeds target; if rounding leaves
        # none in this tile, its last column with nonzero probability
        count = tl.sum((cdf <= target[:, None]).to(tl.int32), axis=1)
        last = tl.max(tl.where(p > 0, local[None, :], -1), axis=1)
        pos = tl.maximum(tl.minimum(count, last), 0)
        z_pos = tl.sum(tl.where(local[None, :] == pos[:, None], z, 0.0), axis=1)
        tl.store(ids_ptr + rows, (t * BLOCK_C + pos).to(tl.int64), mask=mine)
        tl.store(logp_ptr + rows, z_pos - big - tl.log(total), mask=mine)


def _gemm_configs():
    """Hopper-friendly tiles (wgmma wants 64-row multiples per warp group); the codebook tile
    BLOCK_C is fixed by the wrapper since both passes must share it."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4),
                                 (128, 128, 8, 2)]]


_KEY = ["C", "D", "HAS_UNCOND", "HAS_BIAS", "DOT_PRECISION", "BLOCK_C"]
_tile_lse_tuned = triton.autotune(_gemm_configs(), key=_KEY)(_tile_lse_kernel)
_draw_tuned = triton.autotune(_gemm_configs(), key=_KEY)(_draw_kernel)

# the interpreter runs one config (multi-config autotune needs a driver); small tiles so tests
# exercise several codebook tiles, tails and a multi-step reduction over D
_INTERPRET_TILES = dict(BLOCK_M=32, BLOCK_K=32)
_INTERPRET_BLOCK_C = 64


def _compute_dtype(h):
    """The matmul input dtype the reference's F.linear would use: autocast's when it is on."""
    try:
        if torch.is_autocast_enabled(h.device.type):
            return torch.get_autocast_dtype(h.device.type)
    except (TypeError, AttributeError):  # older torch: device-less autocast queries
        if h.is_cuda and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return h.dtype


def _rows(x):
    """A 2-D tensor whose last dim is contiguous (the kernels take a row stride only)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform):
    """Draw one token per row from softmax(Eq. 2 logits / token_temperature) by inverse CDF.

    Same signature and semantics as `echoes.sampler.draw_tokens` (the reference):
      logits = s (h_c W^T + b) + (1 - s) (h_u W^T + b) = (s h_c + (1 - s) h_u) W^T + b,
      z = logits / T,  id = first j with sum_{i<=j} exp(z_i) > u sum_i exp(z_i),
      logp = z_id - logsumexp(z);  h_uncond None: no guidance (the mix is skipped).
    h_* (N, D), weight (C, D), bias (C,) or None, uniform (N,) in [0, 1) -> ids (N,) long and
    logp (N,) fp32. The matmul runs in h's dtype (autocast's under autocast) with fp32
    accumulation; fp32 inputs use IEEE fp32 unless torch allows TF32 for matmuls.

    Launches (BLOCK_C = 128 codebook columns per tile, n_t = ceil(C / BLOCK_C) tiles,
    grid = ceil(N / BLOCK_M) * n_t programs each, tile index fastest so the programs that share
    h rows run together and W stays in L2):
      1. per (row block, tile): the logits tile (the h tiles are mixed as they are loaded, so CFG
         costs one matmul, not two), its logsumexp -> lse (N, n_t) fp32;
      2. per (row block, tile): from lse each row's crossing tile k*; a program whose tile is some
         row's k* recomputes the same logits, scans exp(z - max) on top of the mass of the tiles
         before k*, and writes id and logp for those rows. (N, C) logits never reach memory.
    Bytes moved (bf16, CFG): h_c and h_u read once per pass from DRAM, 2 * 2 * N * D * 2; W (C*D*2)
    and lse (N * n_t * 4, written and read) stay in L2; u, ids, logp N * 16.
    FLOPs: 2 * 2 N D C on tensor cores (one matmul per pass; eager CFG does two per call), plus
    ~20 N C elementwise (exp, scans) and 3 N D for the mix per codebook tile.
    """
    if not _use_triton(h_cond):
        return reference.draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature,
                                     uniform)
    N, D = h_cond.shape
    C = weight.shape[0]
    device = h_cond.device
    dtype = _compute_dtype(h_cond)
    ids = torch.empty(N, dtype=torch.long, device=device)
    logp = torch.empty(N, dtype=torch.float32, device=device)
    if N == 0:
        return ids, logp
    h_cond = _rows(h_cond)
    has_uncond = h_uncond is not None
    h_uncond = _rows(h_uncond) if has_uncond else h_cond
    weight = _rows(weight.to(dtype))
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else weight  # any pointer when there is no bias
    uniform = uniform.contiguous()
    s = float(guidance) if has_uncond else 1.0
    precision = ("ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision()
                 == "highest" else "tf32")
    if _interpreting():
        block_c, tiles, lse_kernel, draw_kernel = (_INTERPRET_BLOCK_C, _INTERPRET_TILES,
                                                   _tile_lse_kernel, _draw_kernel)
    else:
        block_c, tiles, lse_kernel, draw_kernel = 128, {}, _tile_lse_tuned, _draw_tuned
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    n_tiles = triton.cdiv(C, block_c)
    lse = torch.empty((N, n_tiles), dtype=torch.float32, device=device)  # (N, n_t)
    common = (N, C, D, h_cond.stride(0), h_uncond.stride(0), weight.stride(0), s, 1.0 - s,
              float(token_temperature), n_tiles)
    flags = dict(HAS_UNCOND=has_uncond, HAS_BIAS=has_bias, DOT_PRECISION=precision,
                 BLOCK_C=block_c, **tiles)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * n_tiles,)

    lse_kernel[grid](h_cond, h_uncond, weight, bias, lse, *common, **flags)
    draw_kernel[grid](h_cond, h_uncond, weight, bias, lse, uniform, ids, logp, *common,
                      TILES=max(2, triton.next_power_of_2(n_tiles)), **flags)
    return ids, logp


# -----------------------------------------------------------------------------
# remask: the mask_len-th smallest confidence per row by bisection on the float bits


@triton.jit
def _remask_kernel(logp_ptr, gumbel_ptr, unknown_ptr, mask_len_ptr, out_ptr, tau, L,
                   BLOCK_L: tl.constexpr):
    """One program per row: confidence, its order-preserving int32 key, a 4-way bisection for
    a key v with exactly k keys <= v (or, at ties, the k-th smallest key), then the mask."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_L)
    ok = offs < L
    base = row.to(tl.int64) * L
    unknown = tl.load(unknown_ptr + base + offs, mask=ok, other=0) != 0
    lp = tl.load(logp_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gumbel_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
    confidence = tl.where(unknown, lp + tau * g, float("inf"))
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
    # one or two warps for rows up to 1024: the row counts stay in warp shuffles
    warps = 1 if block <= 512 else (2 if block <= 1024 else 4)
    _remask_kernel[(B,)](logp.contiguous(), gumbel.contiguous(),
                         unknown.contiguous().view(torch.uint8), mask_len.contiguous(),
                         out.view(torch.uint8), float(tau), L, BLOCK_L=block,
                         num_warps=warps, enable_fp_fusion=False)
    return out
