"""Iterative unmasking with classifier-free guidance (paper Sec. 3.4, Code 1, Eq. 2; MAGE).

The two per-step ops below are plain PyTorch and the spec of the fused versions in
`kernels/sampling.py`. Randomness enters only through uniform draws the caller makes from a
`torch.Generator`, so both paths see the same random numbers.
"""

import torch
import torch.nn.functional as F


def draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform):
    """Draw one token per row from the guided distribution over the codebook.

    logits = s * (h_cond @ W^T + b) + (1 - s) * (h_uncond @ W^T + b)  (Eq. 2, in logit space;
    `h_uncond` None means no guidance), p = softmax(logits / token_temperature), and the token is
    the inverse-CDF draw: the first index whose cumulative probability exceeds `uniform`.
    h_* (N, D), weight (C, D), bias (C,), uniform (N,) in [0, 1)
    -> ids (N,) long and log p(ids) (N,) fp32."""
    logits = F.linear(h_cond, weight, bias).float()  # (N, C)
    if h_uncond is not None:
        logits = guidance * logits + (1 - guidance) * F.linear(h_uncond, weight, bias).float()
    logp = torch.log_softmax(logits / token_temperature, dim=-1)  # (N, C)
    cdf = logp.exp().cumsum(-1)  # (N, C)
    u = uniform.float()[:, None] * cdf[:, -1:]  # (N, 1), scaled so rounding in cdf never overflows
    ids = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1).squeeze(1)  # (N,)
    return ids, logp.gather(1, ids[:, None]).squeeze(1)


def remask(logp, gumbel, unknown, mask_len, tau):
    """Code 1's `mask_by_random_topk`: which positions go back to the mask id.

    confidence = logp + tau * gumbel at unknown positions and +inf at known ones; a position is
    re-masked when its confidence is at most the mask_len-th smallest of its row.
    logp, gumbel (B, L) fp32, unknown (B, L) bool, mask_len (B,) long in [1, unknown count - 1],
    tau float -> (B, L) bool."""
    confidence = torch.where(unknown, logp + tau * gumbel, torch.full_like(logp, float("inf")))
    cut = confidence.sort(dim=1).values.gather(1, (mask_len - 1).clamp(min=0)[:, None])  # (B, 1)
    return (confidence <= cut) & unknown
