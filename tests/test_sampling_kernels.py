"""The fused sampling ops of kernels/sampling.py against their references in echoes/sampler.py.

- Interpreter checks (run everywhere): the Triton kernels under TRITON_INTERPRET=1 on CPU, fp32,
  small odd shapes (row counts that are not powers of two, a codebook that is not a multiple of
  the tile, a reduction over D with a tail). TRITON_INTERPRET must be set before triton is first
  imported, and another test file may import triton in this process first, so every check runs
  in one subprocess (this file run as a script with the variable set); each check is then its
  own test here.
- GPU checks, bf16 and fp32, skipped with a reason when there is no CUDA device.

The draw compares ids exactly where the uniform is placed away from every cumulative-probability
boundary, and otherwise allows a mismatch only at a floating-point tie (u within 1e-5 of the
boundary between the two ids).
"""

import pytest
import torch

from echoes import sampler as ref

# -----------------------------------------------------------------------------
# helpers (plain torch; float64 where they define the truth)


def draw_inputs(N, D, C, seed, cfg=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    hc = torch.randn(N, D, generator=g)
    hu = torch.randn(N, D, generator=g) if cfg else None
    W = torch.randn(C, D, generator=g) / D ** 0.5
    b = torch.randn(C, generator=g) * 0.3 if bias else None
    u = torch.rand(N, generator=g)
    return hc, hu, W, b, u


def probs64(hc, hu, W, b, s, T):
    """softmax(Eq. 2 logits / T) in float64: (N, C)."""
    def lin(h):
        out = h.double() @ W.double().T
        return out + b.double() if b is not None else out
    logits = lin(hc) if hu is None else s * lin(hc) + (1 - s) * lin(hu)
    return torch.softmax(logits / T, dim=-1)


def u_away_from_boundaries(p, u):
    """Move each u to the middle of the bin it falls in (or of the row's largest bin when that
    bin is narrower than 1e-3), so fp32 rounding of any cumulative sum cannot change the draw."""
    cdf = p.cumsum(-1)  # (N, C)
    j = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True).squeeze(1)
    j = j.clamp(max=p.shape[1] - 1)
    j = torch.where(p.gather(1, j[:, None]).squeeze(1) < 1e-3, p.argmax(1), j)
    upper = cdf.gather(1, j[:, None]).squeeze(1)
    lower = upper - p.gather(1, j[:, None]).squeeze(1)
    return ((lower + upper) / 2 / cdf[:, -1]).float(), j


def assert_ids_agree_up_to_ties(ids, ref_ids, p, u, min_agreement, tie_tol):
    """At least `min_agreement` of rows equal; every other row a tie: u within tie_tol of all
    the cumulative probabilities between the two ids."""
    agree = (ids == ref_ids).double().mean().item()
    assert agree >= min_agreement, f"ids agree on {agree:.4%} of rows"
    cdf = (p / p.sum(-1, keepdim=True)).cumsum(-1).cpu()
    for n in torch.nonzero(ids != ref_ids).flatten().tolist():
        lo, hi = sorted((int(ids[n]), int(ref_ids[n])))
        gap = (cdf[n, lo:hi] - float(u[n])).abs().max().item()
        assert gap < tie_tol, f"row {n}: ids {lo} vs {hi} differ {gap:.2e} away from a tie"


def chi_square(counts, p):
    expected = p * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


def remask_inputs(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g) * 6 - 1e-3
    gumbel = -torch.log(-torch.log(torch.rand(B, L, generator=g).clamp(1e-9, 1 - 1e-7)))
    unknown = torch.rand(B, L, generator=g) < 0.7
    unknown[:, :2] = True  # at least two unknown positions per row
    count = unknown.sum(1)
    mask_len = 1 + (torch.rand(B, generator=g) * (count - 1).double()).long()  # [1, count-1]
    return logp, gumbel, unknown, mask_len.clamp(max=count - 1)


def assert_least_confident(mask, logp, gumbel, unknown, mask_len, tau):
    """Exactly mask_len positions per row, all unknown, none more confident than any unknown
    position left out."""
    conf = logp + tau * gumbel
    assert torch.equal(mask.sum(1), mask_len), "wrong number of re-masked positions"
    assert not (mask & ~unknown).any(), "a known position was re-masked"
    inf = torch.tensor(float("inf"), dtype=conf.dtype, device=conf.device)
    worst_chosen = torch.where(mask, conf, -inf).amax(1)
    best_left = torch.where(unknown & ~mask, conf, inf).amin(1)
    assert (worst_chosen <= best_left).all(), "a more confident position was re-masked"


# -----------------------------------------------------------------------------
# interpreter checks: run by `python tests/test_sampling_kernels.py --interpret` in a
# subprocess with TRITON_INTERPRET=1; each returns nothing or raises

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


@check
def draw_matches_reference_away_from_ties():
    from kernels import sampling
    cases = [  # (N, D, C, cfg, bias, s, T, strided h)
        (37, 48, 203, True, True, 3.0, 0.7, False),
        (37, 48, 203, False, True, 1.0, 1.0, False),
        (45, 40, 130, True, False, 2.5, 1.3, True),
        (1, 16, 1, True, True, 3.0, 1.0, False),
        (19, 32, 128, False, True, 1.0, 0.5, False),  # C a multiple of the tile
    ]
    for i, (N, D, C, cfg, bias, s, T, strided) in enumerate(cases):
        hc, hu, W, b, u = draw_inputs(N, D, C, seed=i, cfg=cfg, bias=bias)
        if strided:  # rows with a stride larger than D
            hc = torch.cat([hc, torch.randn(N, 5)], 1)[:, :D]
        p = probs64(hc, hu, W, b, s, T)
        u, expected = u_away_from_boundaries(p, u)
        ref_ids, ref_logp = ref.draw_tokens(hc, hu, W, b, s, T, u)
        # the codebook in chunks (case 2: nine, a partial one), then as one chunk
        for block_c in (16 if i == 2 else 64, 256):
            sampling._INTERPRET_BLOCK_C = block_c
            ids, logp = sampling.draw_tokens(hc, hu, W, b, s, T, u)
            at = f"case {i}, chunks of {block_c}"
            assert ids.dtype == torch.long and logp.dtype == torch.float32 and ids.shape == (N,)
            assert torch.equal(ids, ref_ids), f"{at}: ids differ from the reference"
            assert torch.equal(ids, expected), f"{at}: ids differ from the float64 draw"
            torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logp.double(), p.gather(1, ids[:, None]).squeeze(1).log(),
                                       rtol=1e-5, atol=1e-5)
    sampling._INTERPRET_BLOCK_C = 64


@check
def draw_random_uniform_agrees_up_to_ties():
    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(301, 24, 77, seed=11)
    u[:3] = torch.tensor([0.0, 1 - 2 ** -24, 0.5])  # the ends of [0, 1)
    ref_ids, ref_logp = ref.draw_tokens(hc, hu, W, b, 3.0, 0.9, u)
    p = probs64(hc, hu, W, b, 3.0, 0.9)
    for block_c in (64, 128):  # two chunks, one chunk
        sampling._INTERPRET_BLOCK_C = block_c
        ids, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 0.9, u)
        assert_ids_agree_up_to_ties(ids, ref_ids, p, u, min_agreement=0.995, tie_tol=1e-5)
        same = ids == ref_ids
        torch.testing.assert_close(logp[same], ref_logp[same], rtol=1e-5, atol=1e-5)
    sampling._INTERPRET_BLOCK_C = 64


@check
def draw_nan_logit_gives_nan_logp():
    """A row with a nan logit is never drawn from as if the nan were not there: its logp is
    nan, in chunks and as one chunk (a max over the cdf would skip the nan)."""
    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(6, 16, 37, seed=4)
    b[20] = float("nan")
    for block_c in (16, 64):
        sampling._INTERPRET_BLOCK_C = block_c
        _, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 1.0, u)
        assert torch.isnan(logp).all(), f"chunks of {block_c}: {logp}"
    sampling._INTERPRET_BLOCK_C = 64


@check
def draw_guidance_one_equals_no_guidance():
    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(53, 40, 150, seed=3)
    with_cfg = sampling.draw_tokens(hc, hu, W, b, 1.0, 0.8, u)
    without = sampling.draw_tokens(hc, None, W, b, 1.0, 0.8, u)
    assert torch.equal(with_cfg[0], without[0]) and torch.equal(with_cfg[1], without[1])


@check
def draw_frequencies_match_softmax():
    from kernels import sampling
    N, D, C, s, T = 3000, 16, 40, 2.0, 0.8
    hc, hu, W, b, _ = draw_inputs(1, D, C, seed=5)
    W = W * 0.2  # a spread of bins, none tiny: every expected count is above 10
    u = torch.rand(N, generator=torch.Generator().manual_seed(6))
    p = probs64(hc, hu, W, b, s, T)[0]
    assert p.min() * N > 10, "the chi-square bound needs expected counts above 5"
    # three codebook tiles, the last one partial, then one tile; tall row blocks keep the
    # interpreter quick
    for block_c in (16, 64):
        sampling._INTERPRET_BLOCK_C, sampling._INTERPRET_ROWS = block_c, 256
        try:
            ids, _ = sampling.draw_tokens(hc.expand(N, D), hu.expand(N, D), W, b, s, T, u)
        finally:
            sampling._INTERPRET_BLOCK_C, sampling._INTERPRET_ROWS = 64, 32
        counts = torch.bincount(ids, minlength=C).double()
        stat = chi_square(counts, p)
        assert stat < 72.0, (f"chunks of {block_c}: chi-square {stat:.1f} over {C - 1} "
                             "degrees of freedom (p < 0.001)")


@check
def remask_matches_reference():
    from kernels import sampling
    for i, (B, L, tau) in enumerate([(13, 203, 4.5), (5, 256, 0.3), (3, 5, 9.0)]):
        logp, gumbel, unknown, mask_len = remask_inputs(B, L, seed=20 + i)
        mask = sampling.remask(logp, gumbel, unknown, mask_len, tau)
        assert mask.dtype == torch.bool and mask.shape == (B, L)
        assert torch.equal(mask, ref.remask(logp, gumbel, unknown, mask_len, tau)), f"case {i}"
        assert_least_confident(mask, logp, gumbel, unknown, mask_len, tau)
        # a 0 / 1 mask of another dtype means the same, not its bytes
        assert torch.equal(sampling.remask(logp, gumbel, unknown.long(), mask_len, tau), mask)


@check
def remask_ties_and_extremes():
    from kernels import sampling
    B, L = 9, 37
    logp, gumbel, unknown, mask_len = remask_inputs(B, L, seed=30)
    logp = (logp * 2).round() / 2  # many equal confidences at tau = 0
    logp[1, 3:6] = float("-inf")  # a drawn token of zero probability
    logp[2, :] = 0.0  # certain draws; -0.0 + 0.0 mixes the two zeros
    gumbel[2, ::2] = -gumbel[2, ::2].abs()
    logp[3, :4] = torch.tensor([-3e38, 3e38, -1e-38, 1e-38])  # the ends of the key range
    unknown[4] = True  # no known position
    mask_len[5] = int(unknown[5].sum())  # every unknown position
    mask_len[6] = L  # the cut reaches the +inf of known positions
    mask_len[7] = 0  # the reference treats it as 1
    for tau in (0.0, 2.0):
        mask = sampling.remask(logp, gumbel, unknown, mask_len, tau)
        assert torch.equal(mask, ref.remask(logp, gumbel, unknown, mask_len, tau)), f"tau {tau}"


@check
def draw_fp64_stays_fp64_under_autocast():
    """Autocast leaves fp64 alone, so the reference draws from fp64 logits; so must the kernel."""
    from kernels import sampling
    hc, hu, W, b, u = (t.double() for t in draw_inputs(64, 16, 40, seed=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 1.0, u.float())
        ref_ids, ref_logp = ref.draw_tokens(hc, hu, W, b, 3.0, 1.0, u.float())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logp, ref_logp.float(), rtol=1e-5, atol=1e-5)


@check
def empty_inputs():
    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(0, 8, 10, seed=0)
    ids, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 1.0, u)
    assert ids.shape == (0,) and logp.shape == (0,) and ids.dtype == torch.long
    logp, gumbel, unknown, mask_len = remask_inputs(3, 6, seed=0)
    assert sampling.remask(logp[:0], gumbel[:0], unknown[:0], mask_len[:0], 1.0).shape == (0, 6)


@check
def cpu_tensors_use_the_reference_without_the_interpreter():
    from unittest import mock

    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(5, 8, 10, seed=0)
    logp, gumbel, unknown, mask_len = remask_inputs(2, 6, seed=0)
    with mock.patch.object(sampling, "INTERPRET", False), \
            mock.patch.object(sampling.reference, "draw_tokens", return_value="ref-draw"), \
            mock.patch.object(sampling.reference, "remask", return_value="ref-remask"):
        assert sampling.draw_tokens(hc, hu, W, b, 3.0, 1.0, u) == "ref-draw"
        assert sampling.remask(logp, gumbel, unknown, mask_len, 1.0) == "ref-remask"


def test_fp32_logits_only_for_half_inputs_and_never_turned_off_by_others(monkeypatch):
    """cuBLAS's fp32-output matmul takes bf16 / fp16 inputs only: an fp64 draw takes the plain
    matmul, and neither it nor an out-of-memory error turns the fp32 output off for later
    draws (CPU tensors that report CUDA stand in; the matmul checks dtypes as CUDA's does)."""
    import kernels
    from kernels import sampling

    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    real_mm, calls, oom = torch.mm, [], [False]

    def mm(a, b, out_dtype=None):
        a, b = a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)
        calls.append((a.dtype, out_dtype))
        if oom[0]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if out_dtype is not None and a.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16")
        return real_mm(a.to(out_dtype or a.dtype), b.to(out_dtype or a.dtype))

    monkeypatch.setattr(sampling.torch, "mm", mm)
    monkeypatch.setattr(kernels, "_MM_OUT_FP32", [True])
    h, W = torch.randn(4, 8).as_subclass(OnCuda), torch.randn(10, 8).as_subclass(OnCuda)
    assert sampling._logits(h.double(), W.double()).dtype == torch.float64
    oom[0] = True
    with pytest.raises(torch.OutOfMemoryError):
        sampling._logits(h.bfloat16(), W.bfloat16())
    oom[0] = False
    assert sampling._logits(h.bfloat16(), W.bfloat16()).dtype == torch.float32
    assert kernels._MM_OUT_FP32 == [True]
    assert calls == [(torch.float64, None), (torch.bfloat16, torch.float32),
                     (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreter(name, interpreter_results):
    assert name in interpreter_results, f"{name} did not run (the subprocess stopped early)"
    assert interpreter_results[name] is None, interpreter_results[name]


# -----------------------------------------------------------------------------
# GPU checks (bf16 and fp32)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the interpreter checks cover the CPU)")


@needs_cuda
@pytest.mark.parametrize("dtype, min_agreement, tie_tol, logp_atol", [
    (torch.float32, 0.999, 1e-5, 1e-4),
    # bf16: the kernel rounds the guided mix of h once, the reference rounds each pass's logits;
    # s = 3 amplifies that, so about 4% of draws move to a near-tied neighbour (H200 measured)
    (torch.bfloat16, 0.93, 2e-2, 3e-2),
])
@pytest.mark.parametrize("cfg", [True, False])
def test_gpu_draw_matches_reference(dtype, min_agreement, tie_tol, logp_atol, cfg):
    from kernels import sampling
    hc, hu, W, b, u = draw_inputs(1999, 256, 1000, seed=1, cfg=cfg)
    hc, W, b, u = hc.cuda().to(dtype), W.cuda().to(dtype), b.cuda().to(dtype), u.cuda()
    hu = hu.cuda().to(dtype) if cfg else None
    ids, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 0.9, u)
    # the truth: the reference in fp32 on the same (rounded) inputs
    up = (lambda t: t.float()) if dtype != torch.float32 else (lambda t: t)
    ref_ids, ref_logp = ref.draw_tokens(up(hc), up(hu) if cfg else None, up(W), up(b), 3.0, 0.9, u)
    p = probs64(hc.cpu(), hu.cpu() if cfg else None, W.cpu(), b.cpu(), 3.0, 0.9)
    assert_ids_agree_up_to_ties(ids.cpu(), ref_ids.cpu(), p, u.cpu(), min_agreement, tie_tol)
    same = ids == ref_ids
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=0, atol=logp_atol)
    if dtype == torch.bfloat16:  # and close to what the bf16 reference itself draws
        bf_ids, _ = ref.draw_tokens(hc, hu, W, b, 3.0, 0.9, u)
        assert (bf_ids == ids).double().mean().item() >= 0.9


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_draw_frequencies_match_softmax(dtype):
    from kernels import sampling
    N, D, C = 200_000, 64, 40
    hc, hu, W, b, _ = draw_inputs(1, D, C, seed=8)
    W = W * 0.3  # logits of order 1: no tiny bins, and bf16 rounding far below the bound
    hc, hu, W, b = (t.to(dtype) for t in (hc, hu, W, b))
    u = torch.rand(N, generator=torch.Generator().manual_seed(9))
    ids, _ = sampling.draw_tokens(hc.cuda().expand(N, D), hu.cuda().expand(N, D), W.cuda(),
                                  b.cuda(), 2.0, 1.0, u.cuda())
    counts = torch.bincount(ids.cpu(), minlength=C).double()
    p = probs64(hc, hu, W, b, 2.0, 1.0)[0]
    stat = chi_square(counts, p)
    assert p.min() * N > 100
    assert stat < 80.0, f"chi-square {stat:.1f} over {C - 1} degrees of freedom (p < 2e-4)"


@needs_cuda
@pytest.mark.parametrize("B, L", [(64, 265), (64, 256), (7, 521)])
def test_gpu_remask_matches_reference(B, L):
    from kernels import sampling
    logp, gumbel, unknown, mask_len = (t.cuda() for t in remask_inputs(B, L, seed=40))
    for tau in (0.0, 4.5):
        mask = sampling.remask(logp, gumbel, unknown, mask_len, tau)
        assert torch.equal(mask, ref.remask(logp, gumbel, unknown, mask_len, tau))
        assert_least_confident(mask, logp, gumbel, unknown, mask_len, tau)


@needs_cuda
def test_gpu_paper_shape_draw_under_autocast():
    """The i2a shape (64 x 265 rows, CFG, D = C = 1024) with fp32 h and weights under bf16
    autocast, as the sampler calls it: the matmul runs in bf16 like the reference's."""
    from kernels import sampling
    hc, hu, W, b, u = (t.cuda() for t in draw_inputs(64 * 265, 1024, 1024, seed=2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ids, logp = sampling.draw_tokens(hc, hu, W, b, 3.0, 1.0, u)
        ref_ids, ref_logp = ref.draw_tokens(hc, hu, W, b, 3.0, 1.0, u)
    assert ids.min() >= 0 and ids.max() < 1024 and torch.isfinite(logp).all()
    # the reference rounds each pass's logits to bf16 before the mix; the kernel rounds the mixed h
    assert (ids == ref_ids).double().mean().item() >= 0.9
    same = ids == ref_ids
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=0, atol=0.1)


def interpreter_checks():
    """The checks of the interpreter run, by name (tests/test_candidates.py runs them too)."""
    return dict(CHECKS)


if __name__ == "__main__":  # the interpreter subprocess of the `interpreter_results` fixture
    from conftest import interpreter_main
    torch.manual_seed(0)
    interpreter_main(interpreter_checks())
