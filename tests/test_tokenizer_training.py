"""Training a VQGAN tokenizer and fine-tuning its decoder (echoes/tokenizer_training.py), on
tiny VQGANs and images of the demo's generator."""

import numpy as np
import pytest
import torch

from echoes import shapes
from echoes.tokenizer_training import (EMACodebook, cosine_lr, patch_mean_loss, tokenize,
                                       train_tokenizer, tune_decoder)
from echoes.tokenizers import VQGAN, VQGANConfig


def small_images(n, size=16):
    """n generated images box-downsampled to size x size, as VQGAN input (n, 3, size, size)."""
    _, images, _ = shapes.generate(n, seed=99)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 64, 64)
    return torch.nn.functional.avg_pool2d(x, 64 // size)


def test_train_tokenizer_loss_falls(one_thread):
    torch.manual_seed(0)
    config = VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(),
                         resolution=16, z_channels=8, embed_dim=8, n_embed=16)
    vq = VQGAN(config)
    data = small_images(24)
    losses = train_tokenizer(vq, data, steps=25, batch_size=8, lr=3e-3,
                             generator=torch.Generator().manual_seed(0))
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert not vq.quantize.embedding.weight.requires_grad  # the codebook moves by EMA only
    assert not vq.training


def test_patch_mean_loss_reads_codes_and_trains_the_encoder():
    torch.manual_seed(0)
    reader = torch.nn.Conv2d(4, 3, 1)
    x = torch.randn(2, 3, 8, 8)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    z_q = torch.randn(2, 4, 2, 2)
    loss = patch_mean_loss(reader, z, z_q, x)
    want = torch.nn.functional.avg_pool2d(x, 4)  # (2, 3, 2, 2): each code's 4x4 patch
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(reader(z_q), want))
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and reader.weight.grad is not None


def test_train_tokenizer_adds_the_patch_mean_loss(one_thread):
    def train(patch_mean):
        torch.manual_seed(0)
        vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(),
                               resolution=16, z_channels=8, embed_dim=8, n_embed=16))
        losses = train_tokenizer(vq, small_images(24), steps=6, batch_size=8, lr=3e-3,
                                 patch_mean=patch_mean, generator=torch.Generator().manual_seed(0))
        assert len(losses) == 6 and all(np.isfinite(losses))
        return losses

    plain, with_term = train(0.0), train(1.0)
    assert with_term[0] > plain[0]  # same weights and batch at step 0, plus the extra term


def test_tune_decoder_trains_the_decoder_only_and_keeps_the_ids(one_thread):
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(),
                           resolution=16, z_channels=8, embed_dim=8, n_embed=16))
    data = small_images(24)
    train_tokenizer(vq, data, steps=10, batch_size=8, lr=3e-3,
                    generator=torch.Generator().manual_seed(0))
    ids = tokenize(vq, data)  # (24, 64)
    items = torch.arange(24).repeat(2)  # two fills per image, the second ones drawn 3x as often
    fills = ids[items]
    fills = torch.where(torch.rand(fills.shape) < 0.3, torch.randint(0, 16, fills.shape), fills)
    weights = torch.cat([torch.ones(24), torch.full((24,), 3.0)])
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    losses = tune_decoder(vq, data, ids, fills, items, 8, weights, batch_size=8, lr=3e-3,
                          generator=torch.Generator().manual_seed(0))
    assert len(losses) == 8 and all(np.isfinite(losses)) and not vq.training
    after = vq.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert torch.equal(tokenize(vq, data), ids)
    assert not vq.quantize.embedding.weight.requires_grad  # left as found: EMA codebook
    assert all(p.requires_grad for p in vq.decoder.parameters())


def test_ema_codebook_follows_latents_and_restarts_dead_codes():
    quantizer = VQGAN(VQGANConfig(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(),
                                  resolution=4, z_channels=4, embed_dim=4, n_embed=8)).quantize
    book = EMACodebook(quantizer, decay=0.5, dead_below=0.3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, generator=g)
    assert book.update(z, torch.zeros(64, dtype=torch.long), g) == 0  # init from latents
    assert all(any(torch.equal(w, v) for v in z) for w in book.weight)
    # every latent goes to code 0: it moves toward their mean, the others die and restart
    ids = torch.zeros(64, dtype=torch.long)
    restarted = sum(book.update(z, ids, g) for _ in range(4))
    assert restarted >= 7
    assert torch.allclose(book.weight[0], z.mean(0), atol=0.2)
    # one update by hand at decay 0.9: EMAs of counts and sums, Laplace-smoothed sizes
    book = EMACodebook(quantizer, decay=0.9, dead_below=0.0)
    book.update(z, ids, g)  # the initialisation
    size, total = book.size.clone(), book.sum.clone()
    ids = torch.arange(64) % 8
    book.update(z, ids, g)
    counts = torch.bincount(ids, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, ids, z)
    size, total = 0.9 * size + 0.1 * counts, 0.9 * total + 0.1 * sums
    n = size.sum()
    torch.testing.assert_close(book.weight, total / ((size + 1e-5) / (n + 8e-5) * n)[:, None])


def test_the_tokenizers_learning_rate_falls_on_a_cosine_to_a_tenth():
    assert cosine_lr(1.0, 0, 100) == pytest.approx(1.0)
    assert cosine_lr(1.0, 50, 100) == pytest.approx(0.55)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.1)
