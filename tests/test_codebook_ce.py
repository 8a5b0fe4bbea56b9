"""kernels/codebook_ce.py: the fused codebook logits + label-smoothed cross-entropy against its
reference in echoes/model.py, the loss and every gradient from one upstream gradient.

- everywhere: the Triton kernel under the interpreter (TRITON_INTERPRET=1, fp32, row / code /
  width counts that leave tail blocks, with and without label smoothing, detached and trained
  table, one row, no rows), run in one subprocess because the interpreter must be switched on
  before Triton is first imported and other test files may import it first; the CPU fallback;
- with CUDA: fp32, and bf16 autocast with fp32 or bf16 features and fp32 table and bias (the
  training setting), at the paper's widths and at odd ones, against the reference under the same
  autocast.
"""

import functools

import pytest
import torch

from echoes.model import codebook_ce as codebook_ce_reference

# name, shape and options, atol, rtol (fp32 under the interpreter); atol is relative to the
# largest magnitude of the compared reference tensor
INTERPRETER_CASES = [
    ("smoothing_all_grads", dict(N=37, C=75, D=40, eps=0.1, grads=("h", "weight", "bias")),
     1e-5, 1e-5),
    ("no_smoothing_detached_table", dict(N=37, C=75, D=40, eps=0.0, grads=("h", "bias")),
     1e-5, 1e-5),
    ("one_row_features_only", dict(N=1, C=33, D=17, eps=0.1, grads=("h",)), 1e-5, 1e-5),
    ("table_and_bias_only", dict(N=50, C=48, D=32, eps=0.2, grads=("weight", "bias")),
     1e-5, 1e-5),
    ("bias_only", dict(N=29, C=40, D=24, eps=0.1, grads=("bias",)), 1e-5, 1e-5),
    ("no_rows", dict(N=0, C=33, D=17, eps=0.1, grads=("h", "weight", "bias")), 1e-5, 1e-5),
    # wider than the scaling kernel's 1024-column block: its loop over D runs twice, a tail
    ("wide_features", dict(N=5, C=6, D=1100, eps=0.1, grads=("h", "bias")), 1e-5, 1e-5),
]


def make_inputs(N, C, D, device, h_dtype=torch.float32, param_dtype=torch.float32,
                grads=("h", "bias"), seed=0, **_):
    """Features and table scaled so logits are O(1), like a trained head."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, h_dtype).requires_grad_("h" in grads)
    weight = (torch.randn(C, D, generator=g) / D ** 0.5).to(device, param_dtype)
    bias = (0.5 * torch.randn(C, generator=g)).to(device, param_dtype)
    weight.requires_grad_("weight" in grads)
    bias.requires_grad_("bias" in grads)
    target = torch.randint(0, C, (N,), generator=g).to(device)
    dy = (torch.rand((), generator=g) + 0.5).to(device)  # upstream gradient of the sum
    return h, weight, bias, target, dy


def loss_and_grads(fn, h, weight, bias, target, eps, dy):
    loss = fn(h, weight, bias, target, eps)
    wanted = [t for t in (h, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wanted, dy) if wanted else []
    return loss.detach(), list(grads)


def check_ce(atol, rtol, device="cpu", autocast=False, eps=0.1, **shape):
    from kernels.codebook_ce import codebook_ce
    h, weight, bias, target, dy = make_inputs(device=device, **shape)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss, grads = loss_and_grads(codebook_ce, h, weight, bias, target, eps, dy)
        want, want_grads = loss_and_grads(codebook_ce_reference, h, weight, bias, target, eps, dy)
    assert loss.dtype == want.dtype == torch.float32 and loss.shape == want.shape == ()
    assert len(grads) == len(want_grads) > 0
    for got, exp in zip([loss, *grads], [want, *want_grads]):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        scale = exp.abs().max().item() if exp.numel() else 1.0
        torch.testing.assert_close(got, exp, atol=atol * scale, rtol=rtol)


def check_evaluation_keeps_no_gradient():
    """Under torch.no_grad (evaluation) with parameters that require grad: the reference's loss,
    and the kernel is told not to form the gradient; with grad enabled it is, and with only the
    bias wanting one it sums the gradient without storing the (N, C) of it."""
    import kernels.codebook_ce as ce
    h, weight, bias, target, _ = make_inputs(N=21, C=30, D=16, device="cpu",
                                             grads=("h", "weight", "bias"))
    kernel, flags = ce._ce_rows_kernel, []

    class Spy:  # records each launch's STORE_GRAD and SUM_GRAD and runs the kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                flags.append((kwargs["STORE_GRAD"], kwargs["SUM_GRAD"]))
                return kernel[grid](*args, **kwargs)
            return launch

    ce._ce_rows_kernel = Spy()
    try:
        with torch.no_grad():
            loss = ce.codebook_ce(h, weight, bias, target, 0.1)
        ce.codebook_ce(h, weight, bias, target, 0.1)
        ce.codebook_ce(h.detach(), weight.detach(), bias, target, 0.1)
        ce.codebook_ce(h, weight, None, target, 0.1)
    finally:
        ce._ce_rows_kernel = kernel
    torch.testing.assert_close(loss, codebook_ce_reference(h, weight, bias, target, 0.1),
                               atol=1e-5, rtol=1e-5)
    assert flags == [(False, False), (True, True), (False, True), (True, False)]


def check_second_derivative_refused():
    """The backward is made of kernels and matmuls on detached tensors: differentiating it again
    raises instead of leaving out h's part."""
    from kernels.codebook_ce import codebook_ce
    h, weight, bias, target, _ = make_inputs(N=5, C=7, D=4, device="cpu")
    dy = torch.ones((), requires_grad=True)  # an upstream gradient with a graph of its own
    (grad_h,) = torch.autograd.grad(codebook_ce(h, weight, bias, target, 0.1), h, dy,
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_h.sum().backward()


def check_no_bias_and_fp64_under_autocast():
    """What the reference also takes: no bias (F.linear's None), and fp64 inputs under autocast,
    which autocast leaves in fp64."""
    from kernels.codebook_ce import codebook_ce
    h, weight, _, target, dy = make_inputs(N=13, C=21, D=8, device="cpu", grads=("h", "weight"))
    for got, exp in zip(loss_and_grads(codebook_ce, h, weight, None, target, 0.1, dy),
                        loss_and_grads(codebook_ce_reference, h, weight, None, target, 0.1, dy)):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    h, weight, bias, target, dy = make_inputs(N=13, C=21, D=8, device="cpu",
                                              h_dtype=torch.float64, param_dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(codebook_ce, h, weight, bias, target, 0.1, dy)
        exp = loss_and_grads(codebook_ce_reference, h, weight, bias, target, 0.1, dy)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # bf16 would be ~1e-3 off


def check_code_of_logit_minus_inf():
    """A code no row can take (bias -inf): the loss is finite without smoothing (0 * -inf in
    the smoothing term would make it nan) and inf with it, as the reference's."""
    from kernels.codebook_ce import codebook_ce
    h, weight, bias, target, dy = make_inputs(N=9, C=11, D=6, device="cpu",
                                              grads=("h", "bias"))
    with torch.no_grad():
        bias[4] = float("-inf")
    target = torch.where(target == 4, 5, target)
    for eps in (0.0, 0.1):
        got = codebook_ce(h, weight, bias, target, eps)
        want = codebook_ce_reference(h, weight, bias, target, eps)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(got) == (eps == 0.0), (eps, got)
    (got_h,) = torch.autograd.grad(codebook_ce(h, weight, bias, target, 0.0), h, dy)
    (want_h,) = torch.autograd.grad(codebook_ce_reference(h, weight, bias, target, 0.0), h, dy)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)


OTHER_CHECKS = {"evaluation_keeps_no_gradient": check_evaluation_keeps_no_gradient,
                "code_of_logit_minus_inf": check_code_of_logit_minus_inf,
                "second_derivative_refused": check_second_derivative_refused,
                "no_bias_and_fp64_under_autocast": check_no_bias_and_fp64_under_autocast}


def interpreter_checks():
    return {**{name: functools.partial(check_ce, atol, rtol, **shape)
               for name, shape, atol, rtol in INTERPRETER_CASES}, **OTHER_CHECKS}


@pytest.mark.parametrize("name", [c[0] for c in INTERPRETER_CASES] + list(OTHER_CHECKS))
def test_interpreter_matches_reference(name, interpreter_results):
    assert name in interpreter_results, f"{name} did not run (the subprocess stopped early)"
    assert interpreter_results[name] is None, interpreter_results[name]


def test_cpu_tensors_fall_back_to_the_reference(monkeypatch):
    import kernels.codebook_ce
    monkeypatch.setattr(kernels.codebook_ce, "INTERPRET", False)  # read at import otherwise
    from kernels.codebook_ce import codebook_ce
    h, weight, bias, target, _ = make_inputs(N=9, C=12, D=8, device="cpu")
    torch.testing.assert_close(codebook_ce(h, weight, bias, target, 0.1),
                               codebook_ce_reference(h, weight, bias, target, 0.1),
                               atol=0, rtol=0)


def test_codebooks_wider_than_the_row_kernel_takes_use_the_reference(monkeypatch):
    import kernels.codebook_ce
    monkeypatch.setattr(kernels.codebook_ce, "_use_triton", lambda t: True)  # as on a GPU
    monkeypatch.setattr(kernels.codebook_ce, "MAX_C", 8)
    h, weight, bias, target, _ = make_inputs(N=9, C=12, D=8, device="cpu")
    torch.testing.assert_close(kernels.codebook_ce.codebook_ce(h, weight, bias, target, 0.1),
                               codebook_ce_reference(h, weight, bias, target, 0.1),
                               atol=0, rtol=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("h_dtype, autocast, atol, rtol", [
    (torch.float32, False, 1e-5, 1e-4),
    (torch.float32, True, 2e-2, 2e-2),  # LayerNorm output under autocast is fp32
    (torch.bfloat16, True, 2e-2, 2e-2),
])
@pytest.mark.parametrize("shape", [
    dict(N=3001, C=1024, D=1024, eps=0.1, grads=("h", "bias")),  # the model's default
    dict(N=777, C=1000, D=200, eps=0.1, grads=("h", "weight", "bias")),
    dict(N=130, C=1024, D=1024, eps=0.0, grads=("h", "weight", "bias")),
])
def test_codebook_ce_gpu(shape, h_dtype, autocast, atol, rtol):
    check_ce(atol, rtol, device="cuda", h_dtype=h_dtype, autocast=autocast, **shape)


@cuda
def test_gpu_peak_memory_at_most_half_of_eager():
    from kernels.codebook_ce import codebook_ce
    h, weight, bias, target, dy = make_inputs(N=12000, C=1024, D=1024, device="cuda",
                                              grads=("h", "bias"))
    peaks = []
    for fn in (codebook_ce, codebook_ce, codebook_ce_reference):  # first call tunes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_and_grads(fn, h, weight, bias, target, 0.1, dy)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    fused, eager = peaks[1] / 2**20, peaks[2] / 2**20
    assert fused <= 0.5 * eager, f"fused {fused:.1f} MiB, eager {eager:.1f} MiB"


if __name__ == "__main__":  # the interpreter subprocess of the `interpreter_results` fixture
    from conftest import interpreter_main
    interpreter_main(interpreter_checks())
