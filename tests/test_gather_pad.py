"""kernels/gather_pad.py: the fused gather (encoder input) and pad (decoder input) against their
references in echoes/model.py, outputs and every gradient from one upstream gradient.

- everywhere: the Triton kernels under the interpreter (TRITON_INTERPRET=1, fp32, small odd
  shapes with tail blocks), run in one subprocess because the interpreter must be switched on
  before Triton is first imported and other test files may import it first; the CPU fallback;
- with CUDA: fp32 and bf16 (all-bf16 parameters, and bf16 activations with fp32 parameters under
  autocast) at the paper's widths, against the reference on fp32 copies of the inputs, plus the
  output dtype against the reference in the same dtypes and autocast.
"""


import functools

import pytest
import torch

from echoes.model import gather_embed as gather_embed_reference
from echoes.model import pad_decoder as pad_decoder_reference

# name, op, shape and options, atol, rtol (fp32 under the interpreter)
INTERPRETER_CASES = [
    ("gather_random_keep", "gather", dict(B=3, L=37, K=19, C=29, D=72), 1e-5, 1e-5),
    ("gather_inference_keep", "gather",
     dict(B=2, L=21, K=21, C=5, D=40, inference=True, grads=("weight", "mod")), 1e-5, 1e-5),
    ("gather_pos_only", "gather", dict(B=4, L=13, K=9, C=7, D=24, grads=("pos",)), 1e-5, 1e-5),
    ("gather_no_mask_ids", "gather", dict(B=3, L=17, K=9, C=11, D=40, mask_frac=0.0), 1e-5, 1e-5),
    ("pad_random_keep", "pad", dict(B=3, L=37, K=19, D=72), 1e-5, 1e-5),
    ("pad_inference_keep", "pad",
     dict(B=2, L=21, K=21, D=40, inference=True, grads=("x", "mask_emb", "mod")), 1e-5, 1e-5),
    ("pad_batch_splits", "pad", dict(B=7, L=11, K=6, D=16, grads=("x", "pos")), 1e-5, 1e-5),
]


def make_gather_inputs(B, L, K, C, D, device, param_dtype=torch.float32, inference=False,
                       grads=("weight", "pos", "mod"), mask_frac=0.7, seed=0):
    """ids with a mask-id share like training (rows collide on the mask row), keep unsorted."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, C, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < mask_frac] = C  # the mask id, row C of the table
    if inference:
        keep = torch.arange(L).expand(B, L)  # (B, L), stride 0 over the batch
    else:
        keep = torch.rand(B, L, generator=g).argsort(1)[:, :K]  # (B, K) distinct, unsorted
    params = dict(weight=torch.randn(C + 1, D, generator=g), pos=torch.randn(L, D, generator=g),
                  mod=torch.randn(D, generator=g))
    params = {k: v.to(device, param_dtype).requires_grad_(k in grads) for k, v in params.items()}
    dy = torch.randn(B, keep.shape[1], D, generator=g).to(device)
    return ids.to(device), keep.to(device), params, dy


def make_pad_inputs(B, L, K, D, device, x_dtype=torch.float32, param_dtype=torch.float32,
                    inference=False, grads=("x", "mask_emb", "pos", "mod"), unknown_frac=0.6,
                    seed=0):
    """x is a strided slice of a wider tensor, as the model passes it; keep unsorted."""
    g = torch.Generator().manual_seed(seed)
    if inference:
        keep = torch.arange(L).expand(B, L)  # (B, L)
    else:
        keep = torch.rand(B, L, generator=g).argsort(1)[:, :K]  # (B, K)
    K = keep.shape[1]
    unknown = torch.rand(B, L, generator=g) < unknown_frac  # (B, L)
    wide = torch.randn(B, K + 5, D, generator=g).to(device, x_dtype)
    x = wide[:, 2:K + 2].detach().requires_grad_("x" in grads)  # (B, K, D), not contiguous
    params = dict(mask_emb=torch.randn(D, generator=g), pos=torch.randn(L, D, generator=g),
                  mod=torch.randn(D, generator=g))
    params = {k: v.to(device, param_dtype).requires_grad_(k in grads) for k, v in params.items()}
    dy = torch.randn(B, L, D, generator=g).to(device)
    return x, keep.to(device), unknown.to(device), params, dy


def outputs_and_grads(fn, args, leaves, dy):
    """The op's output and the gradients of `leaves` that require grad, from one upstream dy."""
    out = fn(*args)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, dy.to(out.dtype)) if wanted else []
    return out.detach(), list(grads)


def check_gather(atol, rtol, device="cpu", param_dtype=torch.float32, **shape):
    from kernels.gather_pad import gather_embed
    ids, keep, p, dy = make_gather_inputs(device=device, param_dtype=param_dtype, **shape)
    leaves = [p["weight"], p["pos"], p["mod"]]
    out, grads = outputs_and_grads(gather_embed, (ids, keep, *leaves), leaves, dy)
    ref_out = gather_embed_reference(ids, keep, *leaves)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    # truth: the reference on fp32 copies (bf16 references round at every add)
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    dy = dy.to(out.dtype).float()  # the upstream gradient the op itself got
    want, want_grads = outputs_and_grads(gather_embed_reference, (ids, keep, *leaves32),
                                         leaves32, dy)
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    assert len(grads) == len(want_grads) > 0
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.float(), exp, atol=atol, rtol=rtol)


def check_pad(atol, rtol, device="cpu", x_dtype=torch.float32, param_dtype=torch.float32,
              autocast=False, **shape):
    from kernels.gather_pad import pad_decoder
    x, keep, unknown, p, dy = make_pad_inputs(device=device, x_dtype=x_dtype,
                                              param_dtype=param_dtype, **shape)
    leaves = [x, p["mask_emb"], p["pos"], p["mod"]]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out, grads = outputs_and_grads(pad_decoder, (x, keep, unknown, *leaves[1:]), leaves, dy)
        ref_out = pad_decoder_reference(x, keep, unknown, *leaves[1:])
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    # truth: the reference on fp32 copies, with mask_emb rounded to x's dtype as it does
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    me32 = leaves32[1]
    if x_dtype != torch.float32:
        leaves32[1] = me32.detach().to(x_dtype).float().requires_grad_(me32.requires_grad)
    dy = dy.to(out.dtype).float()  # the upstream gradient the op itself got
    want, want_grads = outputs_and_grads(pad_decoder_reference, (leaves32[0], keep, unknown,
                                                                 *leaves32[1:]), leaves32, dy)
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)
    assert len(grads) == len(want_grads) > 0
    for got, exp in zip(grads, want_grads):
        # a gradient returned in bf16 (that of a bf16 x) is the truth rounded once
        torch.testing.assert_close(got.float(), exp.to(got.dtype).float(), atol=atol, rtol=rtol)


def check_second_derivatives_refused():
    """Both backwards are kernels: differentiating them again raises instead of leaving out the
    inputs' parts."""
    from kernels.gather_pad import gather_embed, pad_decoder
    ids, keep, p, dy = make_gather_inputs(B=2, L=9, K=5, C=6, D=8, device="cpu")
    dy.requires_grad_()  # an upstream gradient with a graph of its own
    out = gather_embed(ids, keep, p["weight"], p["pos"], p["mod"])
    (grad_w,) = torch.autograd.grad(out, p["weight"], dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_w.sum().backward()
    x, keep, unknown, p, dy = make_pad_inputs(B=2, L=9, K=5, D=8, device="cpu")
    dy.requires_grad_()
    out = pad_decoder(x, keep, unknown, p["mask_emb"], p["pos"], p["mod"])
    (grad_x,) = torch.autograd.grad(out, x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def check_no_grad_matches_reference():
    """Under torch.no_grad (the sampler) with parameters that require grad, the forwards alone."""
    from kernels.gather_pad import gather_embed, pad_decoder
    ids, keep, p, _ = make_gather_inputs(B=3, L=21, K=21, C=9, D=40, device="cpu", inference=True)
    args = (ids, keep, p["weight"], p["pos"], p["mod"])
    with torch.no_grad():
        out = gather_embed(*args)
    assert not out.requires_grad
    torch.testing.assert_close(out, gather_embed_reference(*args), atol=1e-5, rtol=1e-5)
    x, keep, unknown, p, _ = make_pad_inputs(B=3, L=37, K=19, D=72, device="cpu")
    args = (x, keep, unknown, p["mask_emb"], p["pos"], p["mod"])
    with torch.no_grad():
        out = pad_decoder(*args)
    assert not out.requires_grad
    torch.testing.assert_close(out, pad_decoder_reference(*args), atol=1e-5, rtol=1e-5)


def check_odd_arguments_match_reference():
    """What the reference takes besides the documented shapes and dtypes: broadcastable pos /
    mod and fp64 parameters (handed to the reference: exactly its results) and D = 0."""
    from kernels.gather_pad import gather_embed, pad_decoder
    ids, keep, p, dy = make_gather_inputs(B=2, L=9, K=5, C=6, D=8, device="cpu")
    for mod in (p["mod"][None], p["mod"][:1].reshape(())):  # (1, D) and 0-d
        got, want = (outputs_and_grads(op, (ids, keep, p["weight"], p["pos"], mod),
                                       list(p.values()), dy)
                     for op in (gather_embed, gather_embed_reference))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    empty = gather_embed(ids, keep, p["weight"][:, :0], p["pos"][:, :0], p["mod"][:0])
    assert empty.shape == (2, 5, 0)
    ids, keep, p, dy = make_gather_inputs(B=2, L=9, K=5, C=6, D=8, device="cpu",
                                          param_dtype=torch.float64)
    got, want = (outputs_and_grads(op, (ids, keep, *p.values()), list(p.values()), dy.double())
                 for op in (gather_embed, gather_embed_reference))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    x, keep, unknown, p, dy = make_pad_inputs(B=2, L=9, K=5, D=8, device="cpu")
    args = (x, keep, unknown, p["mask_emb"], p["pos"][None], p["mod"])
    for a, b in zip(outputs_and_grads(pad_decoder, args, [x, *p.values()], dy),
                    outputs_and_grads(pad_decoder_reference, args, [x, *p.values()], dy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x, keep, unknown, p, dy = make_pad_inputs(B=2, L=9, K=5, D=8, device="cpu",
                                              x_dtype=torch.float64)
    args = (x, keep, unknown, *p.values())
    for a, b in zip(outputs_and_grads(pad_decoder, args, [x, *p.values()], dy.double()),
                    outputs_and_grads(pad_decoder_reference, args, [x, *p.values()], dy.double())):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


CHECKS = {"gather": check_gather, "pad": check_pad}
OTHER_CHECKS = {"second_derivatives_refused": check_second_derivatives_refused,
                "no_grad_matches_reference": check_no_grad_matches_reference,
                "odd_arguments_match_reference": check_odd_arguments_match_reference}


def interpreter_checks():
    return {**{name: functools.partial(CHECKS[op], atol, rtol, **shape)
               for name, op, shape, atol, rtol in INTERPRETER_CASES}, **OTHER_CHECKS}


@pytest.mark.parametrize("name", [c[0] for c in INTERPRETER_CASES] + list(OTHER_CHECKS))
def test_interpreter_matches_reference(name, interpreter_results):
    assert name in interpreter_results, f"{name} did not run (the subprocess stopped early)"
    assert interpreter_results[name] is None, interpreter_results[name]


def test_cpu_tensors_fall_back_to_the_reference(monkeypatch):
    import kernels.gather_pad
    monkeypatch.setattr(kernels.gather_pad, "INTERPRET", False)  # read at import otherwise
    from kernels.gather_pad import gather_embed, pad_decoder
    ids, keep, p, _ = make_gather_inputs(B=2, L=9, K=5, C=6, D=8, device="cpu")
    torch.testing.assert_close(gather_embed(ids, keep, p["weight"], p["pos"], p["mod"]),
                               gather_embed_reference(ids, keep, p["weight"], p["pos"], p["mod"]),
                               atol=0, rtol=0)
    x, keep, unknown, p, _ = make_pad_inputs(B=2, L=9, K=5, D=8, device="cpu")
    args = (x, keep, unknown, p["mask_emb"], p["pos"], p["mod"])
    torch.testing.assert_close(pad_decoder(*args), pad_decoder_reference(*args), atol=0, rtol=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("param_dtype, atol, rtol", [
    # the mask id's weight gradient sums ~700 rows in another order than the reference: 1e-4
    (torch.float32, 1e-4, 1e-4),
    (torch.bfloat16, 2e-2, 2e-2),
])
@pytest.mark.parametrize("shape", [
    dict(B=8, L=265, K=133, C=1024, D=1024),  # audio at the paper's widths
    dict(B=5, L=77, K=38, C=100, D=200, mask_frac=0.9),  # odd, heavy mask-row collisions
    dict(B=3, L=256, K=256, C=1024, D=1024, inference=True),
])
def test_gather_gpu(shape, param_dtype, atol, rtol):
    check_gather(atol, rtol, device="cuda", param_dtype=param_dtype, **shape)


@cuda
@pytest.mark.parametrize("x_dtype, param_dtype, autocast, atol, rtol", [
    # parameter gradients sum B * L rows in another order than the reference: 1e-4
    (torch.float32, torch.float32, False, 1e-4, 1e-4),
    (torch.bfloat16, torch.float32, True, 1e-4, 1e-4),  # the training setting
    (torch.bfloat16, torch.bfloat16, False, 2e-2, 2e-2),
])
@pytest.mark.parametrize("shape", [
    dict(B=8, L=265, K=133, D=1024),
    dict(B=5, L=77, K=38, D=200),
    dict(B=3, L=256, K=256, D=1024, inference=True),
])
def test_pad_gpu(shape, x_dtype, param_dtype, autocast, atol, rtol):
    check_pad(atol, rtol, device="cuda", x_dtype=x_dtype, param_dtype=param_dtype,
              autocast=autocast, **shape)


if __name__ == "__main__":  # the interpreter subprocess of the `interpreter_results` fixture
    from conftest import interpreter_main
    interpreter_main(interpreter_checks())
