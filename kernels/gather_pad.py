"""Fused masked-token gather (encoder input) and pad (decoder input), forward and backward.

The two data-movement ops around MAGE's encoder (paper Sec. 3.3, Fig. 1; MAGE
`models_mage.py`, `forward_encoder` / `forward_decoder`). Their plain PyTorch references,
`echoes.model.gather_embed` and `echoes.model.pad_decoder`, are the spec: the public functions here
take exactly their arguments and call them for tensors that are not on a GPU (unless
TRITON_INTERPRET=1) and for fp64 ones (the kernels add and sum in fp32).

- `gather_embed(ids, keep, weight, pos, mod)`: out[b, k] = weight[ids[b, l]] + pos[l] + mod with
  l = keep[b, k]. One pass: token id, table row and positional row are gathered inside the kernel,
  so neither `ids.gather(1, keep)` nor `pos[keep]` is materialised. Backward scatters the upstream
  gradient into one zeroed fp32 buffer with atomics; the rows of a block that hit the mask id's
  row (the table's last, ~65% of the kept rows in training) are summed first, so that row gets
  one atomic per block, not one per row.
- `pad_decoder(x, keep, unknown, mask_emb, pos, mod)`: out[b, l] = x[b, k] where keep[b, k] = l
  and the token at l is known, else mask_emb; plus pos[l] + mod. The kernel works from the output
  side: a block of positions l finds its k by comparing against keep[b, :] (K integer compares per
  position, far cheaper than the row it moves), so no inverse index is built and nothing is
  assumed about keep's order. When a gradient is wanted, the forward also writes the k it found
  for each position as a (B, L) int32 slot index (-1: dropped). Backward reads it and the upstream
  gradient once: it writes grad x for every kept row (zero where the token is unknown) and sums
  grad pos / mask_emb / mod over the batch in registers, one fp32 atomic per block and batch
  split.

Dtypes follow the reference under autocast (neither op is on autocast's lists): the output dtype is
the promotion of the inputs' dtypes (gather: weight, pos, mod; pad: x, pos, mod), everything is
summed in fp32 and rounded once, mask_emb is first rounded to x's dtype as the reference does, and
parameter gradients are accumulated in fp32 and returned in the parameter's dtype. `keep` must hold
distinct positions per sample (as the reference's scatter needs); `keep` may be an expanded view
(inference: arange(L).expand(B, L)) and `x` a strided slice: no copies are made.

Imports: torch, triton, the references from echoes/model.py and `on_device` from
kernels/__init__.py.
"""

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from echoes.model import gather_embed as gather_embed_reference
from echoes.model import pad_decoder as pad_decoder_reference
from kernels import on_device

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block sizes. On a GPU: rows x 256 columns per program for the streaming forwards and the gather
# backward (4 warps, 16 B vector accesses); 16 x 128 tiles and enough batch splits for ~1k
# programs in the pad backward. Under the interpreter, small blocks so that small test shapes hit
# every tail.
if INTERPRET:
    GATHER_FWD = dict(BLOCK_R=8, BLOCK_D=32, num_warps=1)
    GATHER_BWD = dict(BLOCK_R=16, BLOCK_D=32, num_warps=1)
    PAD_FWD = dict(BLOCK_L=8, BLOCK_D=32, BLOCK_KC=16, num_warps=1)
    PAD_BWD = dict(BLOCK_L=8, BLOCK_D=32, num_warps=1)
    PAD_BWD_PROGRAMS = 16  # target program count; sets the batch split
else:
    GATHER_FWD = dict(BLOCK_R=8, BLOCK_D=256, num_warps=4)
    GATHER_BWD = dict(BLOCK_R=16, BLOCK_D=256, num_warps=4)
    PAD_FWD = dict(BLOCK_L=16, BLOCK_D=256, BLOCK_KC=256, num_warps=4)
    PAD_BWD = dict(BLOCK_L=16, BLOCK_D=128, num_warps=4)
    PAD_BWD_PROGRAMS = 1024


def _use_triton(t):
    return t.is_cuda or INTERPRET  # read at import, as triton.jit reads it


def _config(base, D):
    """A launch config from one of the block-size dicts above, BLOCK_D cut to D's power of 2."""
    return dict(base, BLOCK_D=min(base["BLOCK_D"], triton.next_power_of_2(D)))


# -----------------------------------------------------------------------------
# gather_embed


@triton.jit
def _gather_fwd_kernel(ids, keep, weight, pos, mod, out, N, K, D,
                       s_ib, s_il, s_kb, s_kk, s_wc, s_pl,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = weight[ids[b, keep[b, k]]] + pos[keep[b, k]] + mod for rows r = b * K + k.

    Grid (cdiv(B * K, BLOCK_R), cdiv(D, BLOCK_D)). Bytes: B*K*D*(out + table + pos element
    sizes) at most (table and pos rows repeat, mostly L2 hits), so the floor is the output write,
    B*K*D*out_bytes; FLOPs: 2*B*K*D adds."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < N
    b = rows // K
    k = rows - b * K
    l = tl.load(keep + b * s_kb + k * s_kk, mask=rmask, other=0)  # (R,) position
    tok = tl.load(ids + b * s_ib + l * s_il, mask=rmask, other=0)  # (R,) token id
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (Dc,)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    # the table and positional rows are read again and again (L2 hits): they stay in L2 before
    # the output rows, which are written once and not read back by this kernel
    w = tl.load(weight + tok.to(tl.int64)[:, None] * s_wc + cols[None, :], mask=m2, other=0.0,
                eviction_policy="evict_last")  # (R, Dc) table rows
    p = tl.load(pos + l.to(tl.int64)[:, None] * s_pl + cols[None, :], mask=m2, other=0.0,
                eviction_policy="evict_last")  # (R, Dc) positional rows
    m = tl.load(mod + cols, mask=cmask, other=0.0)  # (Dc,)
    y = w.to(tl.float32) + p.to(tl.float32) + m.to(tl.float32)[None, :]  # (R, Dc)
    tl.store(out + rows.to(tl.int64)[:, None] * D + cols[None, :],
             y.to(out.dtype.element_ty), mask=m2, eviction_policy="evict_first")


@triton.jit(do_not_specialize=["hot"])  # a codebook of one code makes hot 1, a constant
def _gather_bwd_kernel(grad, ids, keep, gw, gp, gm, N, K, D, hot,
                       s_ib, s_il, s_kb, s_kk,
                       W_GRAD: tl.constexpr, P_GRAD: tl.constexpr, M_GRAD: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad weight[t] += sum of grad rows with token t; grad pos[l] += grad rows at position l;
    grad mod += all grad rows; fp32 buffers, atomics.

    The rows of the block whose token is `hot` (the table's last row, the mask id, ~65% of the
    kept rows in training) are summed in registers and added with one atomic per block, so the
    mask id's row is not hit by one atomic per row; every other row adds itself (codes repeat
    rarely within a block). Grid (cdiv(B * K, BLOCK_R), cdiv(D, BLOCK_D)). Bytes: B*K*D*grad_bytes
    read + B*K*16 index bytes + at most (2*B*K + 2*cdiv(B*K, BLOCK_R))*D fp32 atomics (table and
    positional rows, the mask id's row and mod once per block); FLOPs: 3*B*K*D adds."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    rmask = rows < N
    b = rows // K
    k = rows - b * K
    l = tl.load(keep + b * s_kb + k * s_kk, mask=rmask, other=0)  # (R,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (Dc,)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    g = tl.load(grad + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m2,
                other=0.0).to(tl.float32)  # (R, Dc)
    if W_GRAD:
        tok = tl.load(ids + b * s_ib + l * s_il, mask=rmask, other=0)
        is_hot = (tok == hot) & rmask  # (R,)
        tl.atomic_add(gw + tok.to(tl.int64)[:, None] * D + cols[None, :], g,
                      mask=m2 & ~is_hot[:, None], sem="relaxed")
        hot_sum = tl.sum(tl.where(is_hot[:, None], g, 0.0), axis=0)  # (Dc,)
        n_hot = tl.sum(tl.where(m2 & is_hot[:, None], 1, 0), axis=0)  # (Dc,) hot rows
        tl.atomic_add(gw + hot.to(tl.int64) * D + cols, hot_sum, mask=n_hot > 0, sem="relaxed")
    if P_GRAD:
        tl.atomic_add(gp + l.to(tl.int64)[:, None] * D + cols[None, :], g, mask=m2,
                      sem="relaxed")
    if M_GRAD:
        tl.atomic_add(gm + cols, tl.sum(g, axis=0), mask=cmask, sem="relaxed")


class GatherEmbed(torch.autograd.Function):

    @staticmethod
    def forward(ctx, ids, keep, weight, pos, mod):
        B, L = ids.shape
        K = keep.shape[1]
        D = weight.shape[1]
        weight, pos, mod = weight.contiguous(), pos.contiguous(), mod.contiguous()
        dtype = torch.promote_types(torch.promote_types(weight.dtype, pos.dtype), mod.dtype)
        out = torch.empty(B, K, D, device=weight.device, dtype=dtype)  # (B, K, D)
        N = B * K
        if N > 0 and D > 0:
            cfg = _config(GATHER_FWD, D)
            grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
            _gather_fwd_kernel[grid](ids, keep, weight, pos, mod, out, N, K, D,
                                     ids.stride(0), ids.stride(1), keep.stride(0),
                                     keep.stride(1), weight.stride(0), pos.stride(0), **cfg)
        ctx.save_for_backward(ids, keep)
        ctx.shapes = (weight.shape, weight.dtype, pos.shape, pos.dtype, mod.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ids, keep = ctx.saved_tensors
        (wshape, wdtype, pshape, pdtype, mdtype) = ctx.shapes
        need_w, need_p, need_m = ctx.needs_input_grad[2:5]
        B, K, D = grad.shape
        N = B * K
        dev = grad.device
        grad = grad.contiguous()  # (B, K, D)
        # one zeroed fp32 buffer for the three sums: rows [0, C+1) weight, then L pos, then mod
        C1, L = wshape[0], pshape[0]
        acc = torch.zeros(C1 + L + 1, D, device=dev, dtype=torch.float32)
        if N > 0 and D > 0 and (need_w or need_p or need_m):
            cfg = _config(GATHER_BWD, D)
            grid = (triton.cdiv(N, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
            _gather_bwd_kernel[grid](grad, ids, keep, acc[:C1], acc[C1:C1 + L], acc[C1 + L],
                                     N, K, D, C1 - 1, ids.stride(0), ids.stride(1),
                                     keep.stride(0), keep.stride(1), W_GRAD=need_w,
                                     P_GRAD=need_p, M_GRAD=need_m, **cfg)
        return (None, None, acc[:C1].to(wdtype) if need_w else None,
                acc[C1:C1 + L].to(pdtype) if need_p else None,
                acc[C1 + L].to(mdtype) if need_m else None)


def gather_embed(ids, keep, weight, pos, mod):
    """Encoder input at the kept positions: out[b, k] = weight[ids[b, i]] + pos[i] + mod with
    i = keep[b, k]. ids (B, L) long, keep (B, K) long, weight (C+1, D), pos (L, D), mod (D,)
    -> (B, K, D). Fused Triton version of `echoes.model.gather_embed` (same arguments)."""
    D = weight.shape[-1]
    documented = weight.dim() == 2 and pos.shape == (ids.shape[-1], D) and mod.shape == (D,)
    # other shapes: the reference broadcasts them; fp64: the kernels add and sum in fp32
    if (not _use_triton(weight) or not documented
            or torch.float64 in (weight.dtype, pos.dtype, mod.dtype)):
        return gather_embed_reference(ids, keep, weight, pos, mod)
    with on_device(weight):  # backward runs where autograd sets the device: on the tensors'
        return GatherEmbed.apply(ids, keep, weight, pos, mod)


# -----------------------------------------------------------------------------
# pad_decoder


@triton.jit
def _kept_index(keep_row, s_kk, ls, K, BLOCK_L: tl.constexpr, BLOCK_KC: tl.constexpr):
    """k with keep[b, k] == l for each position l of the block, -1 where l was dropped."""
    kidx = tl.full([BLOCK_L], -1, tl.int32)
    for k0 in range(0, K, BLOCK_KC):
        ks = k0 + tl.arange(0, BLOCK_KC)  # (KC,)
        kv = tl.load(keep_row + ks * s_kk, mask=ks < K, other=-1)
        hit = kv[None, :] == ls[:, None]  # (Lb, KC)
        kidx = tl.maximum(kidx, tl.max(tl.where(hit, ks[None, :], -1), axis=1))
    return kidx


@triton.jit
def _pad_fwd_kernel(x, keep, unknown, mask_emb, pos, mod, out, slot, L, K, D, n_lb,
                    s_xb, s_xk, s_kb, s_kk, s_ub, s_pl, STORE_SLOT: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KC: tl.constexpr):
    """out[b, l] = (x[b, k] if keep[b, k] == l and not unknown[b, l] else mask_emb) + pos[l] + mod;
    with STORE_SLOT, slot[b, l] = that k (-1 where l was dropped), int32, for the backward.

    Grid (B * cdiv(L, BLOCK_L), cdiv(D, BLOCK_D)). Bytes: B*L*D*out_bytes written +
    (kept, known rows) * D * x_bytes read + L*D pos (L2 hits); floor B*L*D*out_bytes +
    B*K*D*x_bytes. FLOPs: 2*B*L*D adds, plus B*L*K*cdiv(D, BLOCK_D) integer compares."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid // n_lb
    ls = (pid - b * n_lb) * BLOCK_L + tl.arange(0, BLOCK_L)  # (Lb,)
    lmask = ls < L
    b = b.to(tl.int64)
    kidx = _kept_index(keep + b * s_kb, s_kk, ls, K, BLOCK_L, BLOCK_KC)  # (Lb,)
    if STORE_SLOT:
        if pid_d == 0:  # one program per position block writes its slots
            tl.store(slot + b * L + ls, kidx, mask=lmask)
    unk = tl.load(unknown + b * s_ub + ls, mask=lmask, other=1)  # (Lb,)
    take = (kidx >= 0) & (unk == 0)  # (Lb,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (Dc,)
    cmask = cols < D
    m2 = lmask[:, None] & cmask[None, :]  # (Lb, Dc)
    xv = tl.load(x + b * s_xb + kidx.to(tl.int64)[:, None] * s_xk + cols[None, :],
                 mask=m2 & take[:, None], other=0.0)  # (Lb, Dc) the kept, known rows
    me = tl.load(mask_emb + cols, mask=cmask, other=0.0).to(x.dtype.element_ty)  # ref: .to(x.dtype)
    p = tl.load(pos + ls.to(tl.int64)[:, None] * s_pl + cols[None, :], mask=m2, other=0.0)
    m = tl.load(mod + cols, mask=cmask, other=0.0)  # (Dc,)
    y = tl.where(take[:, None], xv.to(tl.float32), me.to(tl.float32)[None, :])  # (Lb, Dc)
    y = y + p.to(tl.float32) + m.to(tl.float32)[None, :]  # (Lb, Dc)
    rows = (b * L + ls).to(tl.int64)  # (Lb,) output rows
    tl.store(out + rows[:, None] * D + cols[None, :], y.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _pad_bwd_kernel(grad, slot, unknown, gx, gp, gme, gm, B, L, K, D, b_per, s_ub,
                    X_GRAD: tl.constexpr, P_GRAD: tl.constexpr, E_GRAD: tl.constexpr,
                    M_GRAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad x[b, k] = grad[b, keep[b, k]] where that token is known, else 0; grad pos[l] =
    sum_b grad[b, l]; grad mask_emb = sum of grad rows that took it; grad mod = sum of all rows.

    slot[b, l] (int32, from the forward) is the k with keep[b, k] == l, -1 where l was dropped.
    Each program owns a (BLOCK_L, BLOCK_D) tile of positions for b_per samples, sums its tile over
    those samples in registers (no reduction inside the loop) and adds it to the fp32 buffers with
    one atomic per element. Grid (cdiv(L, BLOCK_L), cdiv(D, BLOCK_D), cdiv(B, b_per)). Bytes:
    B*L*D*grad_bytes read + B*K*D*x_bytes written + B*L*5 index bytes +
    (L + 2*cdiv(L, BLOCK_L))*D*cdiv(B, b_per) fp32 atomics (mask_emb and mod once per program);
    FLOPs: 3*B*L*D adds."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    ls = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # (Lb,)
    lmask = ls < L
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = lmask[:, None] & cmask[None, :]
    acc_p = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    acc_e = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    b0 = pid_b * b_per
    b1 = tl.minimum(b0 + b_per, B)
    for b in range(b0, b1):
        kidx = tl.load(slot + b * L + ls, mask=lmask, other=-1)  # (Lb,)
        unk = tl.load(unknown + b * s_ub + ls, mask=lmask, other=1)
        take = (kidx >= 0) & (unk == 0)
        rows = (b * L + ls).to(tl.int64)
        g = tl.load(grad + rows[:, None] * D + cols[None, :], mask=m2, other=0.0)
        g = g.to(tl.float32)  # (Lb, Dc)
        acc_p += g
        if E_GRAD:
            acc_e += tl.where(take[:, None], 0.0, g)
        if X_GRAD:
            xrows = (b * K + kidx).to(tl.int64)
            tl.store(gx + xrows[:, None] * D + cols[None, :],
                     tl.where(take[:, None], g, 0.0).to(gx.dtype.element_ty),
                     mask=m2 & (kidx >= 0)[:, None])
    if P_GRAD:
        tl.atomic_add(gp + ls.to(tl.int64)[:, None] * D + cols[None, :], acc_p, mask=m2,
                      sem="relaxed")
    if E_GRAD:
        tl.atomic_add(gme + cols, tl.sum(acc_e, axis=0), mask=cmask, sem="relaxed")
    if M_GRAD:
        tl.atomic_add(gm + cols, tl.sum(acc_p, axis=0), mask=cmask, sem="relaxed")


class PadDecoder(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, keep, unknown, mask_emb, pos, mod, grad_enabled):
        B, K, D = x.shape
        L = unknown.shape[1]
        if x.stride(2) != 1:
            x = x.contiguous()
        mask_emb, pos, mod = mask_emb.contiguous(), pos.contiguous(), mod.contiguous()
        unk = unknown.to(torch.bool).contiguous().view(torch.uint8)  # (B, L)
        dtype = torch.promote_types(torch.promote_types(x.dtype, pos.dtype), mod.dtype)
        out = torch.empty(B, L, D, device=x.device, dtype=dtype)  # (B, L, D)
        # needs_input_grad stays True under torch.no_grad: then no slot index is kept
        store_slot = grad_enabled and any(ctx.needs_input_grad)
        slot = torch.empty(B, L, device=x.device, dtype=torch.int32) if store_slot else None
        if B * L > 0 and D > 0:
            cfg = _config(PAD_FWD, D)
            n_lb = triton.cdiv(L, cfg["BLOCK_L"])
            grid = (B * n_lb, triton.cdiv(D, cfg["BLOCK_D"]))
            _pad_fwd_kernel[grid](x, keep, unk, mask_emb, pos, mod, out,
                                  slot if store_slot else out, L, K, D, n_lb,
                                  x.stride(0), x.stride(1), keep.stride(0), keep.stride(1),
                                  unk.stride(0), pos.stride(0), STORE_SLOT=store_slot, **cfg)
        ctx.save_for_backward(slot, unk)
        ctx.meta = (x.dtype, K, mask_emb.dtype, pos.dtype, mod.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        slot, unk = ctx.saved_tensors  # (B, L) int32 and uint8
        xdtype, K, edtype, pdtype, mdtype = ctx.meta
        need_x, _, _, need_e, need_p, need_m, _ = ctx.needs_input_grad
        B, L, D = grad.shape
        dev = grad.device
        grad = grad.contiguous()  # (B, L, D)
        gx = torch.empty(B, K, D, device=dev, dtype=xdtype) if need_x else None  # (B, K, D)
        # one fp32 buffer for the three parameter sums: rows [0, L) pos, L mask_emb, L + 1 mod
        acc = torch.zeros(L + 2, D, device=dev, dtype=torch.float32)
        if B * L > 0 and D > 0 and (need_x or need_e or need_p or need_m):
            cfg = _config(PAD_BWD, D)
            n_l, n_d = triton.cdiv(L, cfg["BLOCK_L"]), triton.cdiv(D, cfg["BLOCK_D"])
            splits = max(1, min(B, triton.cdiv(PAD_BWD_PROGRAMS, n_l * n_d)))
            b_per = triton.cdiv(B, splits)
            grid = (n_l, n_d, triton.cdiv(B, b_per))
            _pad_bwd_kernel[grid](grad, slot, unk, gx if need_x else grad, acc[:L], acc[L],
                                  acc[L + 1], B, L, K, D, b_per, unk.stride(0), X_GRAD=need_x,
                                  P_GRAD=need_p, E_GRAD=need_e, M_GRAD=need_m, **cfg)
        return (gx, None, None, acc[L].to(edtype) if need_e else None,
                acc[:L].to(pdtype) if need_p else None, acc[L + 1].to(mdtype) if need_m else None,
                None)


def pad_decoder(x, keep, unknown, mask_emb, pos, mod):
    """Decoder input over all positions: out[b, l] = x[b, k] where l = keep[b, k] and the token at
    l is known, else the shared mask embedding; plus pos[l] + mod.
    x (B, K, D), keep (B, K) long, unknown (B, L) bool, mask_emb (D,), pos (L, D), mod (D,)
    -> (B, L, D). Fused Triton version of `echoes.model.pad_decoder` (same arguments)."""
    D = x.shape[-1]
    documented = (x.dim() == 3 and pos.shape == (unknown.shape[-1], D)
                  and mask_emb.shape == mod.shape == (D,))
    # other shapes: the reference broadcasts them; fp64: the kernels add and sum in fp32
    if (not _use_triton(x) or not documented
            or torch.float64 in (x.dtype, mask_emb.dtype, pos.dtype, mod.dtype)):
        return pad_decoder_reference(x, keep, unknown, mask_emb, pos, mod)
    with on_device(x):  # backward runs where autograd sets the device: on the tensors'
        return PadDecoder.apply(x, keep, unknown, mask_emb, pos, mod, torch.is_grad_enabled())
