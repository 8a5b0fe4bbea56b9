"""The transformer and its training objective (paper Sec. 3.3 / Eq. 1)."""

import math
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from echoes.model import Echoes, EchoesConfig, TorchOps, pad_decoder, truncated_normal


def tiny_config(**overrides):
    base = dict(audio_len=10, image_len=12, audio_codebook=16, image_codebook=24, enc_dim=32,
                enc_depth=2, enc_heads=4, dec_dim=24, dec_depth=1, dec_heads=2, dropout=0.0)
    return EchoesConfig(**{**base, **overrides})


def random_ids(config, B, generator=None):
    a = torch.randint(0, config.audio_codebook, (B, config.audio_len), generator=generator)
    v = torch.randint(0, config.image_codebook, (B, config.image_len), generator=generator)
    return a, v


def test_demo_preset_logits_shapes():
    config = EchoesConfig.demo()
    model = Echoes(config, ops=TorchOps).eval()
    a, v = random_ids(config, 3)
    la, lv = model(a, v)
    assert la.shape == (3, 40, config.audio_codebook) and lv.shape == (3, 64, config.image_codebook)
    assert torch.isfinite(la).all() and torch.isfinite(lv).all()


def test_paper_preset_on_meta_device_shapes_and_parameter_count():
    with torch.device("meta"):
        model = Echoes(EchoesConfig.paper(), ops=TorchOps).eval()
        a = torch.zeros(2, 265, dtype=torch.long)
        v = torch.zeros(2, 256, dtype=torch.long)
        la, lv = model(a, v)
    assert la.shape == (2, 265, 1024) and lv.shape == (2, 256, 1024)
    counts = model.parameter_counts()
    print("paper preset parameters (M):", {k: round(n / 1e6, 2) for k, n in counts.items()})
    # the paper reports 424.4 M; the architecture it describes gives 409.4 M (README explains)
    assert abs(counts["total"] - 424.4e6) / 424.4e6 < 0.05
    assert counts["encoder"] > counts["decoder"] > counts["heads"]
    assert model.audio_mask_id == 1024 and model.image_mask_id == 1024


def test_mask_ratio_statistics_and_kept_counts():
    config = tiny_config(audio_len=265, image_len=256)
    model = Echoes(config, ops=TorchOps)
    g = torch.Generator().manual_seed(0)
    B = 4000
    audio_mask, audio_keep, image_mask, image_keep = model.draw_corruption(B, "cpu", g)
    ra = audio_mask.float().mean(1)  # (B,) realised ratios
    rv = image_mask.float().mean(1)
    # expected mean of N(0.7, 0.25) truncated to [0.2, 1]
    mu, sd, lo, hi = 0.7, 0.25, 0.2, 1.0
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    alpha, beta = (lo - mu) / sd, (hi - mu) / sd
    expected = mu + sd * (pdf(alpha) - pdf(beta)) / (cdf(beta) - cdf(alpha))
    assert model.masked_share() == pytest.approx(expected)  # what the FLOP count uses
    for r, L in ((ra, 265), (rv, 256)):
        assert abs(r.mean().item() - expected) < 0.01  # ceil adds < 1/L
        assert r.min().item() >= math.ceil(0.2 * L) / L - 1e-6 and r.max().item() <= 1.0
        assert r.std().item() > 0.15  # a ratio per sample, not one per batch
    corr = torch.corrcoef(torch.stack([ra, rv]))[0, 1].item()
    assert abs(corr) < 0.06  # the two modalities are drawn independently
    assert audio_keep.shape == (B, 133) and image_keep.shape == (B, 128)
    for keep, L in ((audio_keep, 265), (image_keep, 256)):
        assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < L
        # drops are uniform over positions and independent of the mask
        assert (torch.bincount(keep.flatten(), minlength=L).float() / B - keep.shape[1] / L
                ).abs().max() < 0.05
    dropped_masked = (~torch.zeros(B, 265, dtype=torch.bool).scatter(1, audio_keep, True)
                      & audio_mask).float().mean()
    assert abs(dropped_masked - (1 - 133 / 265) * ra.mean()) < 0.01


@pytest.mark.parametrize("overrides", [dict(full_mask_prob=0.3),
                                       dict(null_condition_prob=0.4),
                                       dict(full_mask_prob=0.5, null_condition_prob=0.5)])
def test_the_expected_masked_share_counts_the_fully_masked_samples(overrides):
    model = Echoes(tiny_config(audio_len=265, image_len=256, **overrides), ops=TorchOps)
    audio_mask, _, image_mask, _ = model.draw_corruption(8000, "cpu",
                                                         torch.Generator().manual_seed(0))
    for mask in (audio_mask, image_mask):
        assert abs(mask.float().mean().item() - model.masked_share()) < 0.01


def test_one_generator_per_sample_draws_each_sample_as_alone():
    model = Echoes(tiny_config(full_mask_prob=0.3, null_condition_prob=0.3), ops=TorchOps)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    batch = model.draw_corruption(3, "cpu", gens())
    alone = [model.draw_corruption(1, "cpu", g) for g in gens()]
    for got, parts in zip(batch, zip(*alone)):
        assert torch.equal(got, torch.cat(parts))
    with pytest.raises(ValueError, match="3 generators for 4 samples"):
        model.draw_corruption(4, "cpu", gens())


def test_truncated_normal_bounds_and_determinism():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = truncated_normal((10000,), 0.7, 0.25, 0.2, 1.0, g1)
    assert x.min() >= 0.2 and x.max() <= 1.0
    assert torch.equal(x, truncated_normal((10000,), 0.7, 0.25, 0.2, 1.0, g2))


def test_truncated_normal_far_in_one_tail_still_spreads_over_its_range():
    # [0.2, 0.6] lies 6-14 std below the mean: in float32 every CDF value there rounds to 0
    x = truncated_normal((20000,), 0.9, 0.05, 0.2, 0.6, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.min() >= 0.2 and x.max() <= 0.6
    assert x.unique().numel() > 10000
    # the density falls by exp(-0.6 / 0.05^2 * d) per d: mean 0.6 - 0.05^2 / 0.3 = 0.5917
    assert abs(x.mean().item() - 0.5917) < 0.001


def test_full_mask_fraction_masks_one_modality_and_shows_the_other():
    model = Echoes(tiny_config(full_mask_prob=1.0), ops=TorchOps)
    audio_mask, _, image_mask, _ = model.draw_corruption(64, "cpu",
                                                         torch.Generator().manual_seed(1))
    a_full, v_full = audio_mask.all(1), image_mask.all(1)
    assert (a_full ^ v_full).all()
    assert not audio_mask[v_full].any() and not image_mask[a_full].any()
    assert 10 < a_full.sum() < 54


def test_null_condition_fraction_masks_one_modality_and_draws_the_other():
    model = Echoes(tiny_config(null_condition_prob=1.0), ops=TorchOps)
    audio_mask, _, image_mask, _ = model.draw_corruption(64, "cpu",
                                                         torch.Generator().manual_seed(1))
    a_full, v_full = audio_mask.all(1), image_mask.all(1)
    assert (a_full | v_full).all() and 10 < a_full.sum() < 54
    # the other modality keeps its truncated-normal ratio (in [0.2, 1]): partly masked, mostly
    other = torch.where(a_full, image_mask.float().mean(1), audio_mask.float().mean(1))
    assert other.min() >= 0.2 and (other < 1).float().mean() > 0.5
    # off: no random numbers spent on it, so the masks are the ratio's and the ranks' alone
    c, B, g = tiny_config(null_condition_prob=0.0), 8, torch.Generator().manual_seed(2)
    got = Echoes(c, ops=TorchOps).draw_corruption(B, "cpu", torch.Generator().manual_seed(2))
    ratio = truncated_normal((B, 2), c.mask_ratio_mean, c.mask_ratio_std, c.mask_ratio_min,
                             c.mask_ratio_max, g)
    for m, L in enumerate((c.audio_len, c.image_len)):
        rank = torch.rand(B, L, generator=g).argsort(1).argsort(1)
        assert torch.equal(got[2 * m], rank < torch.ceil(ratio[:, m] * L).long()[:, None])
        torch.rand(B, L, generator=g)  # the drop's keys


def test_a_sample_with_one_modality_shown_keeps_it_when_conditions_are_nulled_too():
    model = Echoes(tiny_config(full_mask_prob=0.5, null_condition_prob=1.0), ops=TorchOps)
    audio_mask, _, image_mask, _ = model.draw_corruption(256, "cpu",
                                                         torch.Generator().manual_seed(3))
    shown = ~audio_mask.any(1) | ~image_mask.any(1)  # full_mask_prob's samples
    assert shown.sum() > 64 and not (audio_mask.all(1) & image_mask.all(1))[shown].any()


def test_drop_masked_first_keeps_every_visible_position_that_fits():
    plain = Echoes(tiny_config(), ops=TorchOps)
    model = Echoes(tiny_config(drop_masked_first=True), ops=TorchOps)
    out = model.draw_corruption(400, "cpu", torch.Generator().manual_seed(5))
    ref = plain.draw_corruption(400, "cpu", torch.Generator().manual_seed(5))
    for mask, keep, ref_mask, L in ((out[0], out[1], ref[0], 10), (out[2], out[3], ref[2], 12)):
        assert torch.equal(mask, ref_mask)  # the same masks from the same stream
        K = L - L // 2
        assert keep.shape == (400, K) and (keep.diff(dim=1) > 0).all()
        visible = (~mask).sum(1)
        kept_visible = (~mask.gather(1, keep)).sum(1)
        assert torch.equal(kept_visible, visible.clamp(max=K))
        # both cases occur: fewer visible than K (all kept) and more (a random K of them)
        assert (visible < K).any() and (visible > K).any()


def test_demo_preset_drops_nothing_and_still_masks():
    config = EchoesConfig.demo()
    assert config.drop_ratio == 0 and EchoesConfig.paper().drop_ratio == 0.5
    assert not config.detach_head_embedding and EchoesConfig.paper().detach_head_embedding
    model = Echoes(tiny_config(drop_ratio=config.drop_ratio), ops=TorchOps)
    a_mask, a_keep, v_mask, v_keep = model.draw_corruption(50, "cpu",
                                                           torch.Generator().manual_seed(0))
    assert torch.equal(a_keep, torch.arange(10).expand(50, 10))
    assert torch.equal(v_keep, torch.arange(12).expand(50, 12))
    assert a_mask.any() and v_mask.any() and not v_mask.all()


def test_dropped_and_masked_positions_reach_the_decoder_as_the_shared_mask_embedding():
    config = tiny_config()
    seen = {}

    def spy_pad(x, keep, unknown, mask_emb, pos, mod):
        out = pad_decoder(x, keep, unknown, mask_emb, pos, mod)
        seen.setdefault("calls", []).append((x, keep, unknown, out - pos - mod))
        seen.setdefault("embeddings", []).append((pos, mod))
        return out

    ops = types.SimpleNamespace(gather_embed=TorchOps.gather_embed, pad_decoder=spy_pad,
                                codebook_ce=TorchOps.codebook_ce)
    model = Echoes(config, ops=ops)
    a, v = random_ids(config, 5)
    model.training_loss(a, v, generator=torch.Generator().manual_seed(0))
    assert len(seen["calls"]) == 2  # audio, image
    a_mask, a_keep, v_mask, v_keep = model.draw_corruption(5, "cpu",
                                                           torch.Generator().manual_seed(0))
    for (_, keep, unknown, _), mask, want_keep in zip(seen["calls"], (a_mask, v_mask),
                                                      (a_keep, v_keep)):
        assert torch.equal(unknown, mask) and torch.equal(keep, want_keep)
    (pos_a, mod_a), (pos_v, mod_v) = seen["embeddings"]
    assert pos_a is model.dec_pos_audio and pos_v is model.dec_pos_image
    assert torch.equal(mod_a, model.dec_modality[0]) and torch.equal(mod_v, model.dec_modality[1])
    m = model.mask_emb.detach()
    n_mask_rows = 0
    for x, keep, unknown, content in seen["calls"]:
        B, L, D = content.shape
        kept = torch.zeros(B, L, dtype=torch.bool).scatter(1, keep, True)
        pad = ~kept | unknown
        assert unknown.any() and (~kept).any() and (kept & ~unknown).any()
        torch.testing.assert_close(content[pad], m.expand(int(pad.sum()), D))
        n_mask_rows += int(pad.sum())
        # kept known positions carry their own encoder output, not m
        for b in range(B):
            for k, l in enumerate(keep[b].tolist()):
                if not unknown[b, l]:
                    torch.testing.assert_close(content[b, l], x[b, k].detach())
    assert n_mask_rows > 0


def test_unknown_positions_at_inference_get_the_mask_embedding_too():
    config = tiny_config()
    seen = []

    def spy_pad(x, keep, unknown, mask_emb, pos, mod):
        out = pad_decoder(x, keep, unknown, mask_emb, pos, mod)
        seen.append((unknown, out - pos - mod))
        return out

    ops = types.SimpleNamespace(gather_embed=TorchOps.gather_embed, pad_decoder=spy_pad,
                                codebook_ce=TorchOps.codebook_ce)
    model = Echoes(config, ops=ops).eval()
    a, v = random_ids(config, 2)
    a[:, :4] = model.audio_mask_id
    with torch.no_grad():
        la1, _ = model(a, v)
    (unknown, content), (image_unknown, _) = seen
    assert torch.equal(unknown, a == model.audio_mask_id) and not image_unknown.any()
    m = model.mask_emb.detach()
    torch.testing.assert_close(content[:, :4], m.expand(2, 4, -1))
    assert not torch.allclose(content[:, 4:], m.expand(2, config.audio_len - 4, -1))
    model.ops = TorchOps
    with torch.no_grad():
        a2 = a.clone()
        a2[:, 4:] = (a2[:, 4:] + 1) % config.audio_codebook  # change only known tokens
        la2, _ = model(a2, v)
    assert not torch.allclose(la1, la2)  # known tokens matter


def test_loss_ignores_unmasked_positions_and_is_finite():
    config = tiny_config()
    model = Echoes(config, ops=TorchOps)
    a, v = random_ids(config, 6)
    B = a.shape[0]
    g = torch.Generator().manual_seed(7)
    audio_mask, audio_keep, image_mask, image_keep = model.draw_corruption(B, "cpu", g)
    a_in = a.masked_fill(audio_mask, model.audio_mask_id)
    v_in = v.masked_fill(image_mask, model.image_mask_id)
    ya, yv = model._encode_decode(a_in, v_in, audio_keep, image_keep)
    loss, _ = model._masked_loss(ya, yv, a, v, audio_mask, image_mask)
    # new targets at every unmasked position, the same at masked ones
    a2 = torch.where(audio_mask, a, (a + 1) % config.audio_codebook)
    v2 = torch.where(image_mask, v, (v + 1) % config.image_codebook)
    loss2, _ = model._masked_loss(ya, yv, a2, v2, audio_mask, image_mask)
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.equal(loss, loss2)
    # ...while a change at one masked position does change it
    b, l = audio_mask.nonzero()[0].tolist()
    a3 = a.clone()
    a3[b, l] = (a3[b, l] + 1) % config.audio_codebook
    loss3, _ = model._masked_loss(ya, yv, a3, v, audio_mask, image_mask)
    assert not torch.equal(loss, loss3)
    # the sum (train.py's, averaged over the whole step later) is the mean times the count
    total, _ = model._masked_loss(ya, yv, a, v, audio_mask, image_mask, reduction="sum")
    n = audio_mask.sum() + image_mask.sum()
    torch.testing.assert_close(total, loss * n)
    # Eq. 1 by hand: the MLM head, logits against the code rows of the embedding table (the
    # mask row is no class), label-smoothed cross-entropy summed over the masked tokens
    assert config.label_smoothing == 0.1
    by_hand = 0
    for y, ids, mask, embed, head, C in (
            (ya, a, audio_mask, model.audio_embed, model.audio_head, config.audio_codebook),
            (yv, v, image_mask, model.image_embed, model.image_head, config.image_codebook)):
        logits = F.linear(head(y[mask]), embed.weight[:C], head.bias)  # (N, C)
        by_hand = by_hand + F.cross_entropy(logits, ids[mask], label_smoothing=0.1,
                                            reduction="sum")
    torch.testing.assert_close(loss, by_hand / n)


def test_training_loss_stats_and_seed_determinism():
    config = tiny_config(dropout=0.1)
    model = Echoes(config, ops=TorchOps)
    a, v = random_ids(config, 4)
    torch.manual_seed(0)  # dropout draws from the global RNG
    l1, s1 = model.training_loss(a, v, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    l2, s2 = model.training_loss(a, v, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    l3, _ = model.training_loss(a, v, generator=torch.Generator().manual_seed(12))
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    assert int(s1["masked_audio"]) == int(s2["masked_audio"]) >= math.ceil(0.2 * 10) * 4
    assert 0 < int(s1["masked_image"]) <= 4 * 12
    total = s1["masked_audio"] + s1["masked_image"]
    recombined = (s1["loss_audio"] * s1["masked_audio"] + s1["loss_image"] * s1["masked_image"])
    torch.testing.assert_close(recombined / total, l1.detach())


def test_ids_of_another_integer_dtype_train_and_wrong_arguments_are_value_errors():
    model = Echoes(tiny_config(), ops=TorchOps)
    c = model.config
    a = torch.randint(0, c.audio_codebook, (2, c.audio_len))
    v = torch.randint(0, c.image_codebook, (2, c.image_len))
    loss, _ = model.training_loss(a, v, torch.Generator().manual_seed(0))
    loss32, _ = model.training_loss(a.int(), v.int(), torch.Generator().manual_seed(0))
    assert torch.equal(loss, loss32)
    with pytest.raises(ValueError, match="must be integers"):
        model.training_loss(a.float(), v, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="reduction must be"):
        model.training_loss(a, v, reduction="none")
    with pytest.raises(ValueError, match="modality must be"):
        model.head_weights("Audio")
    empty = model.draw_corruption(0, "cpu", [])  # an empty batch with one generator per sample
    full = model.draw_corruption(2, "cpu", torch.Generator().manual_seed(0))
    assert [t.shape[1:] for t in empty] == [t.shape[1:] for t in full]
    assert all(t.shape[0] == 0 for t in empty)


def test_head_embedding_is_detached_by_default_and_switchable():
    a, v = random_ids(tiny_config(), 4)
    grads = {}
    for detach in (True, False):
        model = Echoes(tiny_config(detach_head_embedding=detach, full_mask_prob=1.0), ops=TorchOps)
        W, b = model.head_weights("audio")
        assert W.requires_grad == (not detach) and b.requires_grad
        loss, _ = model.training_loss(a, v, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads[detach] = model.audio_embed.weight.grad.clone()
    # fully masked samples look up only the mask row, so with the head detached the real rows
    # get gradient from visible tokens only; with it attached every row gets some
    assert (grads[False][:-1].abs().sum(1) > 0).all()
    assert not torch.equal(grads[True], grads[False])


def test_tiny_model_overfits_one_batch(one_thread):
    torch.manual_seed(0)
    config = tiny_config(label_smoothing=0.0, audio_codebook=16, image_codebook=16)
    model = Echoes(config, ops=TorchOps)
    a, v = random_ids(config, 4, torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        # the same masks and drops every step: one fixed batch, fully memorisable
        loss, _ = model.training_loss(a, v, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert start > 2.0 and end < 0.4 * start, (start, end)


def test_flops_formula_matches_a_flop_counter():
    config = tiny_config()
    model = Echoes(config, ops=TorchOps).eval()
    a, v = random_ids(config, 3)
    # the math backend runs attention as matmuls, which the counter sees
    with (FlopCounterMode(display=False) as counter, torch.no_grad(),
          sdpa_kernel(SDPBackend.MATH)):
        model(a, v)
    assert counter.get_total_flops() == pytest.approx(3 * model.flops_per_sample(train=False),
                                                      rel=1e-6)
    # training: the encoder sees the kept tokens only; 3x for forward + backward
    assert model.flops_per_sample(train=True) < 3 * model.flops_per_sample(train=False)


def test_compiled_blocks_keep_state_dict_keys_loss_and_gradients():
    config = tiny_config()
    torch.manual_seed(0)
    plain = Echoes(config, ops=TorchOps)
    compiled = Echoes(config, ops=TorchOps)
    compiled.load_state_dict(plain.state_dict())
    # the "eager" backend checks the wiring in a second; inductor is measured by bench/train.py
    compiled.compile_blocks(backend="eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    a, v = random_ids(config, 3)
    losses = []
    for model in (plain, compiled):
        loss, _ = model.training_loss(a, v, generator=torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (dict(enc_heads=7), "enc_dim 1024 is not divisible by enc_heads 7"),
    (dict(dec_depth=0), "dec_depth must be at least 1, got 0"),
    (dict(enc_depth="2"), "enc_depth must be int, got '2'"),
    (dict(enc_dim=True), "enc_dim must be int, got True"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(mlp_ratio=0), "mlp_ratio must be above 0, got 0"),
    (dict(mask_ratio_std=float("nan")), "mask_ratio_std must be above 0, got nan"),
    (dict(mask_ratio_min=0.9, mask_ratio_max=0.5), "mask_ratio_min 0.9 is above mask_ratio_max"),
])
def test_a_config_the_model_cannot_use_is_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EchoesConfig.paper(**overrides)
    EchoesConfig.paper(dropout=0, full_mask_prob=1.0, mlp_ratio=2)  # ints for floats, bounds


def test_another_projects_kernels_module_falls_back_to_the_plain_ops(monkeypatch):
    import sys
    import types

    import echoes.model as model
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))  # no select()
    with pytest.warns(UserWarning, match="is not echoes's: using the plain PyTorch ops"):
        assert model.default_ops() is model.TorchOps
