"""Training a VQGAN tokenizer from scratch, and fine-tuning its decoder on given ids: how the
embedded demo's two small tokenizers are made (`echoes/demo.py`), usable for any `VQGAN` of
`echoes/tokenizers.py` on your own images or mels.

- `train_tokenizer`: an autoencoder loss of L1 + L2 reconstruction and the commitment term
  0.25 |z - sg(z_q)|^2 of VQ-VAE (van den Oord et al. 2017; taming-transformers' legacy
  `VectorQuantizer` puts its 0.25 on the codebook term instead, and adds a perceptual and an
  adversarial loss, which the demo's flat shapes and tones did without), an EMA codebook with
  dead-code restarts (`EMACodebook`, which replaces the codebook term), and optionally a
  patch-mean loss (`patch_mean_loss`, this project's) that makes each code carry its own patch's
  mean; Adam with a cosine decay to a tenth (`cosine_lr`).
- `tune_decoder`: the decoder side alone trained on other ids for the same images (the demo's
  model's fills), so that the ids of every image stay as they were.
- `reconstruct`, `tokenize`: inputs through the codes and to ids, in batches.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class EMACodebook:
    """Exponential-moving-average codebook updates (van den Oord et al. 2017, appendix; the
    `EMAVectorQuantizer` of taming-transformers) with dead-code restarts (Dhariwal et al. 2020,
    Jukebox): a code that is almost never chosen is moved onto a random latent of the batch.
    The codebook tensor is `quantizer.embedding.weight`, updated in place, never by gradients."""

    def __init__(self, quantizer, decay=0.99, eps=1e-5, dead_below=0.05):
        self.weight = quantizer.embedding.weight
        self.weight.requires_grad_(False)
        K, D = self.weight.shape
        self.decay, self.eps, self.dead_below = decay, eps, dead_below
        self.size = torch.ones(K, device=self.weight.device)  # EMA of each code's usage count
        self.sum = self.weight.detach().clone()  # EMA of the latents assigned to each code
        self.ready = False

    @torch.no_grad()
    def update(self, z, ids, generator=None):
        """z (N, D) latents, ids (N,) their nearest codes. Returns the number of restarted codes."""
        K, D = self.weight.shape
        if not self.ready:  # start from latents the encoder actually produces
            pick = torch.randint(0, len(z), (K,), generator=generator, device="cpu")
            self.weight.copy_(z[pick.to(z.device)])
            self.sum.copy_(self.weight)
            self.ready = True
            return 0
        counts = torch.bincount(ids, minlength=K).float()  # (K,)
        sums = torch.zeros(K, D, device=z.device).index_add_(0, ids, z.float())  # (K, D)
        self.size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.size.sum()
        size = (self.size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing
        self.weight.copy_(self.sum / size[:, None])
        dead = self.size < self.dead_below  # (K,)
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, len(z), (n_dead,), generator=generator, device="cpu")
            fresh = z[pick.to(z.device)].float()  # (n_dead, D)
            self.weight[dead] = fresh
            self.sum[dead] = fresh
            self.size[dead] = 1.0
        return n_dead


def patch_mean_loss(reader, z, z_q, x):
    """MSE between reader(code) and the mean of each code's own input patch. z, z_q (B, D, h, w)
    latents and their codes, x (B, C, H, W) the input; the reader sees the codes' values and its
    gradient reaches the encoder through z (straight-through, as the reconstruction's does)."""
    means = reader(z + (z_q - z).detach())  # (B, C, h, w)
    return F.mse_loss(means, F.adaptive_avg_pool2d(x, z.shape[-2:]))


def cosine_lr(peak, step, steps):
    """The tokenizer and decoder schedule: cosine from `peak` at step 0 down to peak / 10."""
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))


def train_tokenizer(vqgan, data, steps, batch_size=16, lr=1e-3, commitment=0.25,
                    patch_mean=0.0, generator=None, progress=False, desc="tokenizer", log=None):
    """Train a `VQGAN` as an autoencoder on `data` (N, C, H, W) in [-1, 1] (moved to the model's
    device batch by batch): loss = L1 + L2 between input and reconstruction + commitment
    * |z - sg(z_q)|^2 (+ patch_mean * the patch-mean loss below); the codebook follows the
    encoder by EMA (`EMACodebook`); Adam with a cosine decay to lr / 10. Returns the per-step
    losses (a list of floats).

    The patch-mean loss (a choice of this project, not taming's): a 1x1 convolution, trained
    alongside and thrown away afterwards, must read the mean of each code's own input patch
    (`patch_mean_loss`) from that code alone, through the straight-through estimator.
    Without it a VQGAN whose receptive field spans the image spreads a patch's content over its
    neighbours' codes: the demo's image tokenizer drew fully red and fully green patches with the
    same codes and left the colour to context, which a transformer sampling codes in parallel
    cannot reproduce (audio -> image then painted red shapes yellow and green ones blue)."""
    device = next(vqgan.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    codebook = EMACodebook(vqgan.quantize)
    params = [p for p in vqgan.parameters() if p.requires_grad]
    reader = nn.Conv2d(vqgan.config.embed_dim, data.shape[1], 1).to(device) if patch_mean else None
    if reader is not None:
        params += list(reader.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    vqgan.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        idx = torch.randint(0, len(data), (batch_size,), generator=generator)
        x = data[idx].to(device).float()  # (B, C, H, W)
        recon, ids, z, z_q = vqgan(x)
        D = z.shape[1]
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D), row-major like ids
        restarted = codebook.update(z_flat.detach(), ids.reshape(-1), generator)
        loss = (F.l1_loss(recon, x) + F.mse_loss(recon, x)
                + commitment * F.mse_loss(z, z_q.detach()))
        if reader is not None:
            loss = loss + patch_mean * patch_mean_loss(reader, z, z_q, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            used = int((codebook.size > 0.5).sum())
            bar.set_postfix(loss=f"{loss.item():.4f}", codes=used, restarted=restarted)
            if log is not None and step % 100 == 0:
                log(step, loss.item(), used)
    vqgan.eval()
    return losses


@torch.no_grad()
def reconstruct(vqgan, x, batch_size=64):
    """(N, C, H, W) inputs -> (reconstructions through the codes (N, C, H, W), ids (N, L))."""
    device = next(vqgan.parameters()).device
    out, ids = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).float()
        code = vqgan.encode(xb)
        out.append(vqgan.decode(code, vqgan.latent_size(*xb.shape[-2:])).cpu())
        ids.append(code.cpu())
    return torch.cat(out), torch.cat(ids)


@torch.no_grad()
def tokenize(vqgan, x, batch_size=256):
    device = next(vqgan.parameters()).device
    return torch.cat([vqgan.encode(x[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(x), batch_size)])


def tune_decoder(vqgan, data, clean_ids, fills, items, steps, weights=None, batch_size=16,
                 lr=5e-4, filled_share=0.7, generator=None, progress=False):
    """Fine-tune the decoder side of a `VQGAN` (post_quant_conv and decoder; encoder and codebook
    stay frozen, so every image keeps its ids) to draw each training image from its own ids
    and, for `filled_share` of a batch, from the model's fills of them (`model_fills` in
    echoes/demo.py):
    L1 + L2 against the clean image, Adam with a cosine decay to lr / 10. data (N, C, H, W) in
    [-1, 1]; clean_ids (N, L); fills (M, L), row i a fill of item items[i], drawn with
    probability proportional to weights[i] (default: all alike). Returns the per-step losses.

    Why (a choice of this project, not in taming or the paper): the demo transformer draws codes
    that are each plausible but whose outlines do not quite agree, and a decoder trained only on
    encoder outputs turns them into wobbly blobs. This one learns to draw the clean shape."""
    device = next(vqgan.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    weights = torch.ones(len(fills)) if weights is None else weights.float()
    train = [*vqgan.post_quant_conv.parameters(), *vqgan.decoder.parameters()]
    was = [(p, p.requires_grad) for p in vqgan.parameters()]
    for p in vqgan.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=lr)
    hw = vqgan.latent_size(*data.shape[-2:])
    vqgan.train()
    losses = []
    for step in tqdm(range(steps), desc="image decoder", disable=not progress, unit="step",
                     dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        rows = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        item = items[rows]  # (B,)
        use_fill = torch.rand(batch_size, 1, generator=generator) < filled_share
        ids = torch.where(use_fill, fills[rows], clean_ids[item]).to(device)
        x = data[item].to(device).float()  # (B, C, H, W)
        recon = vqgan.decode(ids, hw)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p, flag in was:
        p.requires_grad_(flag)
    vqgan.eval()
    return losses
