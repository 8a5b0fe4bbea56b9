"""The sampler: iterative unmasking with CFG (paper Sec. 3.4, Code 1, Eq. 2; echoes/sampler.py).

A tiny random `Echoes` stands in for a trained one: every property checked here (determinism,
the schedule, what the unconditional pass sees, which tokens may change) holds for any weights.
"""

import math
import types

import pytest
import torch

from echoes import sampler
from echoes.model import Echoes, EchoesConfig, TorchOps
from echoes.sampler import (audio_keep_before, audio_keep_outside, generate, hidden_columns,
                            mask_lengths, sample_generators, time_range_columns)

AUDIO_GRID = (4, 6)  # rows x columns of the tiny audio ids: La = 24


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = EchoesConfig(audio_len=24, image_len=16, audio_codebook=16, image_codebook=20,
                          enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                          dec_heads=2, dropout=0.0)
    model = Echoes(config, ops=TorchOps).eval()
    with torch.no_grad():  # sharper logits than the init's, so that guidance changes the draws
        model.audio_head.bias.normal_(0, 2.0)
        model.image_head.bias.normal_(0, 2.0)
    return model


def random_ids(model, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return (torch.randint(0, c.audio_codebook, (B, c.audio_len), generator=g),
            torch.randint(0, c.image_codebook, (B, c.image_len), generator=g))


def spy_on(model):
    """Record the ids of every forward pass the sampler makes."""
    calls, inner = [], model.features

    def features(audio_ids, image_ids):
        calls.append((audio_ids.clone(), image_ids.clone()))
        return inner(audio_ids, image_ids)

    model.features = features
    return calls


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_same_ids_different_seed_differs():
    model = tiny_model()
    _, image = random_ids(model, 3)
    a1, _ = generate(model, "i2a", image_ids=image, steps=6, generator=seeded(1))
    a2, _ = generate(model, "i2a", image_ids=image, steps=6, generator=seeded(1))
    a3, _ = generate(model, "i2a", image_ids=image, steps=6, generator=seeded(2))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_same_input_in_a_batch_of_4_gives_identical_ids():
    model = tiny_model()
    _, image = random_ids(model, 4)
    alone, _ = generate(model, "i2a", image_ids=image[:1], steps=6, generator=seeded(5))
    batch, _ = generate(model, "i2a", image_ids=image, steps=6, generator=seeded(5))
    assert torch.equal(batch[0], alone[0])
    # with explicit per-sample streams the position in the batch does not matter either: four
    # copies of one input, each stream also run alone
    gens = lambda: sample_generators(11, 4)  # noqa: E731
    copies, _ = generate(model, "i2a", image_ids=image[:1].expand(4, -1), steps=6,
                         generator=gens())
    for j in range(4):
        one, _ = generate(model, "i2a", image_ids=image[:1], steps=6, generator=[gens()[j]])
        assert torch.equal(copies[j], one[0])
    assert len({tuple(r.tolist()) for r in copies}) > 1  # distinct streams, distinct samples
    # cutting the list into batches changes nothing
    whole, _ = generate(model, "i2a", image_ids=image, steps=6, generator=gens())
    g = gens()
    parts = torch.cat([generate(model, "i2a", image_ids=image[:3], steps=6, generator=g[:3])[0],
                       generate(model, "i2a", image_ids=image[3:], steps=6, generator=g[3:])[0]])
    assert torch.equal(whole, parts)


def test_joint_batch_size_and_per_sample_streams():
    model = tiny_model()
    a4, v4 = generate(model, "joint", batch_size=4, steps=5, generator=seeded(3))
    a1, v1 = generate(model, "joint", batch_size=1, steps=5, generator=seeded(3))
    assert a4.shape == (4, 24) and v4.shape == (4, 16)
    assert torch.equal(a4[0], a1[0]) and torch.equal(v4[0], v1[0])


# -----------------------------------------------------------------------------
# what the loop keeps, fills and re-masks


@pytest.mark.parametrize("mode", ["i2a", "a2i", "joint"])
def test_condition_unchanged_and_no_mask_id_left(mode):
    model = tiny_model()
    audio, image = random_ids(model, 3)
    kwargs = {"i2a": dict(image_ids=image), "a2i": dict(audio_ids=audio),
              "joint": dict(batch_size=3)}[mode]
    a, v = generate(model, mode, steps=5, generator=seeded(0), **kwargs)
    c = model.config
    assert a.dtype == v.dtype == torch.long
    assert ((a >= 0) & (a < c.audio_codebook)).all() and ((v >= 0) & (v < c.image_codebook)).all()
    if mode == "i2a":
        assert torch.equal(v, image)
    if mode == "a2i":
        assert torch.equal(a, audio)


def expected_unknown(initial, before, step, steps):
    """The count after `step` (sampler.py's loop, step 3), written out apart from the sampler."""
    if before == 0 or step == steps - 1:
        return 0
    target = math.floor(initial * math.cos(math.pi / 2 * (step + 1) / steps))
    return max(1, min(before - 1, target))


def test_unknown_count_follows_the_schedule_per_sample():
    model = tiny_model()
    audio, image = random_ids(model, 5)
    La, steps = model.config.audio_len, 7
    # samples start with 24, 17, 9, 1 and 0 unknown positions
    keep = torch.ones(5, La, dtype=torch.bool)
    for b, n in enumerate([24, 17, 9, 1, 0]):
        keep[b, torch.randperm(La, generator=seeded(b))[:n]] = False
    calls = spy_on(model)
    out, _ = generate(model, "inpaint", audio_ids=audio, image_ids=image, audio_keep=keep,
                      steps=steps, guidance=1.0, generator=seeded(0))
    states = [a for a, _ in calls] + [out]  # the ids before each step, then the result
    assert len(states) == steps + 1
    initial = (~keep).sum(1).tolist()
    for t in range(steps):
        before = (states[t] == model.audio_mask_id).sum(1).tolist()
        after = (states[t + 1] == model.audio_mask_id).sum(1).tolist()
        assert after == [expected_unknown(i, b, t, steps) for i, b in zip(initial, before)], t
        # known tokens never change, and a token once unmasked stays
        known = states[t] != model.audio_mask_id
        assert torch.equal(states[t + 1][known], states[t][known])
    assert torch.equal(out[keep], audio[keep])
    assert torch.equal(out[4], audio[4])  # nothing to generate: left alone


def test_joint_each_modality_has_its_own_schedule():
    model = tiny_model()
    calls, steps = spy_on(model), 6
    out = generate(model, "joint", batch_size=2, steps=steps, generator=seeded(4))
    for m, L, mid in ((0, 24, model.audio_mask_id), (1, 16, model.image_mask_id)):
        states = [call[m] for call in calls] + [out[m]]
        assert (states[0] == mid).all()
        for t in range(steps):
            before = (states[t] == mid).sum(1).tolist()
            after = (states[t + 1] == mid).sum(1).tolist()
            assert after == [expected_unknown(L, b, t, steps) for b in before]


def test_callback_sees_every_step():
    model = tiny_model()
    _, image = random_ids(model, 2)
    seen = []
    a, v = generate(model, "i2a", image_ids=image, steps=5, generator=seeded(0),
                    callback=lambda step, ids: seen.append((step, ids["audio"].clone())))
    assert [step for step, _ in seen] == [0, 1, 2, 3, 4]
    unknown = [int((ids == model.audio_mask_id).sum()) for _, ids in seen]
    assert unknown == sorted(unknown, reverse=True) and unknown[-1] == 0
    assert torch.equal(seen[-1][1], a)


def test_mask_lengths_clamp():
    initial = torch.tensor([100, 100, 100, 5])
    unknown = torch.tensor([100, 3, 1, 5])
    # step 0 of 10: floor(100 * cos(pi/20)) = 98 -> 98, clamped to 2, clamped up to 1; 5 -> 4
    assert mask_lengths(initial, unknown, 0, 10).tolist() == [98, 2, 1, 4]


def test_gumbel_noise_is_finite_at_the_ends():
    u = torch.tensor([0.0, 1e-45, 0.5, 1 - 2 ** -24, 1.0])
    assert torch.isfinite(sampler.gumbel_noise(u)).all()


def test_the_model_ops_switch_governs_sampling():
    model = tiny_model()
    used = []

    def draw(*args):
        used.append("draw")
        return sampler.draw_tokens(*args)

    def remask(*args):
        used.append("remask")
        return sampler.remask(*args)

    model.ops = types.SimpleNamespace(**{k: getattr(TorchOps, k) for k in
                                         ("gather_embed", "pad_decoder", "codebook_ce")},
                                      draw_tokens=draw, remask=remask)
    _, image = random_ids(model, 2)
    generate(model, "i2a", image_ids=image, steps=3, generator=seeded(0))
    assert used.count("draw") == 3 and used.count("remask") == 2  # no re-mask at the last step


def test_one_step_draws_from_the_guided_mix_and_remasks_the_least_confident():
    # one i2a step, every argument of the draw and the re-mask checked against Code 1 / Eq. 2
    # worked out here from the model's own features
    model, B, steps, step, T, s = tiny_model(), 3, 6, 1, 4.5, 2.5
    c = model.config
    _, image = random_ids(model, B)
    audio = torch.full((B, c.audio_len), model.audio_mask_id)
    audio[:, ::3] = 5  # some known audio tokens: never drawn over, never re-masked
    seen = {}

    def draw(h_cond, h_uncond, weight, bias, guidance, token_temperature, uniform):
        seen["draw"] = h_cond, h_uncond, weight, bias, guidance, uniform
        return sampler.draw_tokens(h_cond, h_uncond, weight, bias, guidance, token_temperature,
                                   uniform)

    def remask(logp, gumbel, unknown, mask_len, tau):
        seen["remask"] = logp, gumbel, unknown, mask_len, tau
        return sampler.remask(logp, gumbel, unknown, mask_len, tau)

    model.ops = types.SimpleNamespace(**{k: getattr(TorchOps, k) for k in
                                         ("gather_embed", "pad_decoder", "codebook_ce")},
                                      draw_tokens=draw, remask=remask)
    uniforms = {"audio": (torch.rand(B, c.audio_len), torch.rand(B, c.audio_len))}
    unknown = audio == model.audio_mask_id
    initial = {"audio": torch.full((B,), c.audio_len)}  # as if all were unknown at step 0
    with torch.no_grad():
        out = sampler.unmask_step(model, {"audio": audio, "image": image}, ("audio",), initial,
                                  step, steps, uniforms, uncond="image", temperature=T,
                                  guidance=s)["audio"]
        h_cond = model.features(audio, image)[0].flatten(0, 1)  # (B La, D): the image shown
        nulled = torch.full_like(image, model.image_mask_id)
        h_uncond = model.features(audio, nulled)[0].flatten(0, 1)  # the image masked
    got_cond, got_uncond, weight, bias, guidance, uniform = seen["draw"]
    torch.testing.assert_close(got_cond, h_cond)
    torch.testing.assert_close(got_uncond, h_uncond)
    assert torch.equal(weight, model.audio_embed.weight[:c.audio_codebook])
    assert torch.equal(bias, model.audio_head.bias) and guidance == s
    assert torch.equal(uniform, uniforms["audio"][0].flatten())
    logp, gumbel, got_unknown, mask_len, tau = seen["remask"]
    assert tau == pytest.approx(T * (1 - (step + 1) / steps))  # annealed: T (1 - ratio)
    torch.testing.assert_close(gumbel, -torch.log(-torch.log(uniforms["audio"][1])))
    assert torch.equal(got_unknown, unknown)
    n = math.floor(c.audio_len * math.cos(math.pi / 2 * (step + 1) / steps))
    assert mask_len.tolist() == [min(n, int(k) - 1) for k in unknown.sum(1)]
    # logp: the drawn token's log-probability under the mix s * z_c + (1 - s) * z_u
    z = s * (h_cond @ weight.T + bias) + (1 - s) * (h_uncond @ weight.T + bias)  # (B La, C)
    drawn = out.masked_fill(out == model.audio_mask_id, 0)  # the re-masked hold the mask id
    confidence = torch.where(unknown, logp + tau * gumbel, torch.inf)
    for b in range(B):  # the mask_len least confident unknown positions go back
        back = torch.nonzero(out[b] == model.audio_mask_id).flatten()
        assert torch.equal(back, confidence[b].topk(int(mask_len[b]), largest=False)
                           .indices.sort().values)
        assert torch.equal(out[b, ~unknown[b]], audio[b, ~unknown[b]])
    kept = unknown & (out != model.audio_mask_id)  # drawn and kept: logp is theirs
    want = torch.log_softmax(z, -1).gather(1, drawn.flatten()[:, None]).view(B, -1)
    torch.testing.assert_close(logp[kept], want[kept], rtol=1e-4, atol=1e-4)


def test_gumbel_noise_is_standard_gumbel():
    g = sampler.gumbel_noise(torch.rand(200_000, generator=seeded(0)))
    assert abs(g.mean().item() - 0.5772) < 0.01  # the Euler-Mascheroni constant
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.03
    u = torch.linspace(0.01, 0.99, 50)
    assert (sampler.gumbel_noise(u).diff() > 0).all()  # larger u, larger noise


# -----------------------------------------------------------------------------
# classifier-free guidance (Eq. 2)


def test_guidance_one_is_exactly_unguided():
    model = tiny_model()
    _, image = random_ids(model, 3)
    calls = spy_on(model)
    guided_one, _ = generate(model, "i2a", image_ids=image, steps=6, guidance=1.0,
                             generator=sample_generators(9, 3))
    assert all(a.shape[0] == 3 for a, _ in calls)  # one pass of B: no unconditional twin
    # the unguided loop itself: no condition to mask at all
    c = model.config
    audio0 = torch.full((3, c.audio_len), model.audio_mask_id)
    plain, _ = sampler.unmask(model, audio0, image, ("audio",), sample_generators(9, 3),
                              uncond=None, steps=6, guidance=3.0)
    assert torch.equal(guided_one, plain)
    guided_three, _ = generate(model, "i2a", image_ids=image, steps=6, guidance=3.0,
                               generator=sample_generators(9, 3))
    assert not torch.equal(guided_one, guided_three)


def test_guidance_defaults_to_the_papers_per_mode():
    model = tiny_model()
    audio, image = random_ids(model, 2)
    for mode, kwargs, batch in (("a2i", dict(audio_ids=audio), 2),
                                ("i2a", dict(image_ids=image), 4)):
        calls = spy_on(model)
        default = generate(model, mode, steps=4, generator=sample_generators(0, 2), **kwargs)
        assert [a.shape[0] for a, _ in calls] == [batch] * 4, mode  # a2i: no CFG twin
        paper = generate(model, mode, steps=4, guidance=sampler.PAPER_GUIDANCE[mode],
                         generator=sample_generators(0, 2), **kwargs)
        assert all(torch.equal(x, y) for x, y in zip(default, paper)), mode
    assert sampler.PAPER_GUIDANCE["i2a"] == 3.0 and sampler.PAPER_GUIDANCE["a2i"] == 1.0
    default = generate(model, "i2a", steps=4, generator=sample_generators(0, 2), image_ids=image)
    other = generate(model, "i2a", steps=4, guidance=2.0, generator=sample_generators(0, 2),
                     image_ids=image)
    assert not torch.equal(default[0], other[0])  # the scale shows in the draws


@pytest.mark.parametrize("mode", ["i2a", "a2i", "inpaint"])
def test_unconditional_pass_sees_a_fully_masked_condition(mode):
    model = tiny_model()
    audio, image = random_ids(model, 2)
    keep = audio_keep_outside(0.0, 0.5, AUDIO_GRID, 1.0)
    kwargs = {"i2a": dict(image_ids=image), "a2i": dict(audio_ids=audio),
              "inpaint": dict(audio_ids=audio, image_ids=image, audio_keep=keep)}[mode]
    calls = spy_on(model)
    generate(model, mode, steps=4, guidance=3.0, generator=seeded(0), **kwargs)
    assert len(calls) == 4
    for a, v in calls:
        assert a.shape[0] == v.shape[0] == 4  # cond and uncond in one batch of 2B
        if mode == "a2i":  # condition = audio
            assert torch.equal(a[:2], audio) and (a[2:] == model.audio_mask_id).all()
            assert torch.equal(v[:2], v[2:])
        else:  # condition = image; the audio being generated is the same in both halves
            assert torch.equal(v[:2], image) and (v[2:] == model.image_mask_id).all()
            assert torch.equal(a[:2], a[2:])


# -----------------------------------------------------------------------------
# inpainting and continuation


def test_inpainting_keeps_every_token_outside_the_range():
    model = tiny_model()
    audio, image = random_ids(model, 3)
    keep = audio_keep_outside(0.35, 0.6, AUDIO_GRID, 1.0)  # columns 2 and 3 of 6
    grid = keep.view(AUDIO_GRID)
    assert grid.all(0).tolist() == [True, True, False, False, True, True]
    assert (grid == grid[0]).all()  # all mel rows of a column
    assert hidden_columns(keep, AUDIO_GRID).tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="audio_keep must be"):
        hidden_columns(keep[:-1], AUDIO_GRID)
    a, v = generate(model, "inpaint", audio_ids=audio, image_ids=image, audio_keep=keep,
                    steps=5, generator=seeded(0))
    assert torch.equal(a[:, keep], audio[:, keep]) and torch.equal(v, image)
    assert (a != model.audio_mask_id).all()
    assert not torch.equal(a[:, ~keep], audio[:, ~keep])


@pytest.mark.parametrize("with_image", [True, False])
def test_continuation_keeps_the_start(with_image):
    model = tiny_model()
    audio, image = random_ids(model, 2)
    keep = audio_keep_before(0.5, AUDIO_GRID, 1.0)  # columns 0-2 kept, 3-5 generated
    assert keep.view(AUDIO_GRID).all(0).tolist() == [True] * 3 + [False] * 3
    calls = spy_on(model)
    a, _ = generate(model, "continue", audio_ids=audio, audio_keep=keep, steps=4,
                    image_ids=image if with_image else None, generator=seeded(0))
    assert torch.equal(a[:, keep], audio[:, keep]) and (a != model.audio_mask_id).all()
    assert calls[0][0].shape[0] == (4 if with_image else 2)  # CFG only when an image guides
    if not with_image:
        assert (calls[0][1] == model.image_mask_id).all()


def test_time_range_columns():
    # 4 columns over 2 s: [0, .5), [.5, 1), [1, 1.5), [1.5, 2)
    assert time_range_columns(0.5, 1.0, 4, 2.0).tolist() == [False, True, False, False]
    assert time_range_columns(0.4, 1.01, 4, 2.0).tolist() == [True, True, True, False]
    assert time_range_columns(0.0, 2.0, 4, 2.0).all()
    # boundaries that floats miss: 3 * (1.0 / 5) > 0.6 and 3 * 0.1 > 0.3
    assert time_range_columns(0.6, 1.0, 5, 1.0).tolist() == [False] * 3 + [True] * 2
    assert time_range_columns(0.3, 0.7, 10, 1.0).tolist() == [False] * 3 + [True] * 4 + [False] * 3
    for start, end in ((-0.1, 1.0), (1.0, 2.5), (1.5, 1.0), (1.0, 1.0), (3.0, 4.0)):
        with pytest.raises(ValueError, match="outside the clip"):
            time_range_columns(start, end, 4, 2.0)


# -----------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="x2y"), "unknown mode"),
    (dict(mode="i2a"), "needs image_ids"),
    (dict(mode="i2a", image=True, audio=True), "takes no audio_ids"),
    (dict(mode="joint", image=True), "takes no image_ids"),
    (dict(mode="inpaint", image=True, audio=True), "needs audio_keep"),
    (dict(mode="i2a", image=True, audio_keep=torch.ones(24, dtype=torch.bool)), "only for"),
    (dict(mode="inpaint", image=True, audio=True, audio_keep=torch.ones(23, dtype=torch.bool)),
     "audio_keep"),
    (dict(mode="i2a", image=True, steps=0), "steps"),
    (dict(mode="i2a", image=True, guidance=float("nan")), "guidance"),
    (dict(mode="i2a", image=True, token_temperature=0.0), "token_temperature"),
    (dict(mode="i2a", image=True, temperature=-1.0), "temperature"),
    (dict(mode="joint", batch_size=0), "batch_size"),
    (dict(mode="i2a", image_ids=torch.zeros(2, 15, dtype=torch.long)), r"\(B, 16\)"),
    (dict(mode="i2a", image_ids=torch.full((2, 16), 20)), "must lie in"),
    (dict(mode="i2a", image_ids=torch.zeros(2, 16)), "integer"),
    (dict(mode="i2a", image=True, generator=[seeded(0)]), "one torch.Generator per sample"),
    (dict(mode="i2a", image=True, generator=[seeded(0)] * 2), "more than once"),
    (dict(mode="inpaint", image=True, audio=True, audio_keep=torch.tensor(True)), "audio_keep"),
    (dict(mode="i2a", image_ids=torch.full((2, 16), 20, dtype=torch.uint16)), "must lie in"),
])
def test_impossible_arguments_raise(kwargs, message):
    model = tiny_model()
    audio, image = random_ids(model, 2)
    kwargs = dict(kwargs)
    if kwargs.pop("image", False):
        kwargs["image_ids"] = image
    if kwargs.pop("audio", False):
        kwargs["audio_ids"] = audio
    with pytest.raises(ValueError, match=message):
        generate(model, kwargs.pop("mode"), steps=kwargs.pop("steps", 2), **kwargs)


def test_model_is_left_in_its_training_mode():
    model = tiny_model().train()
    model.audio_head.eval()  # a part the caller froze stays frozen
    _, image = random_ids(model, 1)
    generate(model, "i2a", image_ids=image, steps=2, generator=seeded(0))
    assert model.training and model.encoder[0].training and not model.audio_head.training


def test_outputs_are_new_tensors_the_caller_may_change():
    model = tiny_model()
    audio, image = random_ids(model, 2)
    given = image.clone()
    a, v = generate(model, "i2a", image_ids=image, steps=2, generator=seeded(0))
    assert torch.equal(v, image)
    a[0, 0] = 1  # not inference tensors, and not the input
    v[0, 0] = (image[0, 0] + 1) % model.config.image_codebook
    assert torch.equal(image, given)


def test_one_audio_keep_row_serves_the_whole_batch():
    model = tiny_model()
    audio, image = random_ids(model, 3)
    keep = audio_keep_outside(0.35, 0.6, AUDIO_GRID, 1.0)
    rows = generate(model, "inpaint", audio_ids=audio, image_ids=image, audio_keep=keep[None],
                    steps=3, generator=sample_generators(4, 3))
    flat = generate(model, "inpaint", audio_ids=audio, image_ids=image, audio_keep=keep,
                    steps=3, generator=sample_generators(4, 3))
    assert all(torch.equal(x, y) for x, y in zip(rows, flat))


def test_sampling_defaults_are_checked():
    sampler.check_sampling_defaults({"steps": 12, "guidance": {"i2a": 3.0, "a2i": 1}})
    for bad in ({"temprature": 9.0}, {"temperature": "hot"}, {"guidance": {"i2a": None}},
                {"steps": {"x2y": 4}}, {"guidance": True}, [1, 2],
                {"guidance": {"every mode": 5.0}}, {"guidance": {"all modes": 5.0}}):
        with pytest.raises(ValueError):
            sampler.check_sampling_defaults(bad)


def test_the_kernel_switch_reads_the_environment_for_auto(monkeypatch):
    import kernels
    monkeypatch.setenv("ECHOES_KERNELS", "torch")
    assert kernels.resolve("auto") == kernels.resolve(None) == "torch"
    monkeypatch.setenv("ECHOES_KERNELS", "bogus")
    with pytest.raises(ValueError):
        kernels.resolve("auto")
    assert kernels.resolve("torch") == "torch"  # an explicit choice wins over the environment


def test_a_cuda_machine_without_triton_runs_the_plain_path_and_says_so(monkeypatch):
    import sys

    import kernels
    monkeypatch.delenv("ECHOES_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert kernels.missing_triton() and kernels.resolve("auto") == "torch"
    with pytest.raises(RuntimeError, match="needs Triton"):
        kernels.resolve("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not kernels.missing_triton()  # a CPU machine needs no Triton


# -----------------------------------------------------------------------------
# CUDA graphs: the same ids with fewer launches


def test_cuda_graphs_are_ignored_on_a_cpu():
    model = tiny_model()
    _, image = random_ids(model, 2)
    with_graphs = generate(model, "i2a", image_ids=image, steps=4, cuda_graphs=True,
                           generator=sample_generators(3, 2))
    without = generate(model, "i2a", image_ids=image, steps=4, cuda_graphs=False,
                       generator=sample_generators(3, 2))
    assert all(torch.equal(a, b) for a, b in zip(with_graphs, without))


def cuda_model(backend):
    """`tiny_model` on the GPU with the "torch" or "triton" op set."""
    import kernels
    model = tiny_model().cuda()
    model.ops = kernels.select(backend)
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("mode", ["i2a", "a2i", "joint"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replay_gives_the_same_ids(mode, autocast, backend):
    model = cuda_model(backend)
    audio, image = (x.cuda() for x in random_ids(model, 3))
    given = {"i2a": dict(image_ids=image), "a2i": dict(audio_ids=audio),
             "joint": dict(batch_size=3)}[mode]
    out = {}
    for graphs in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out[graphs] = generate(model, mode, steps=6, guidance=2.0, cuda_graphs=graphs,
                                   generator=sample_generators(5, 3), **given)
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


def test_triton_ops_enter_their_tensors_gpu():
    """Triton launches on the current device: every op makes its tensors' GPU current (a CPU
    tensor reporting cuda:1 stands in; the context is only made, not entered)."""
    import contextlib

    from kernels import on_device
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)

    class OnSecondGpu(torch.Tensor):
        is_cuda = True
        device = torch.device("cuda", 1)

    assert on_device(torch.zeros(1).as_subclass(OnSecondGpu)).idx == 1


def test_every_triton_op_enters_on_device_before_it_launches(monkeypatch):
    from kernels import codebook_ce, gather_pad, sampling

    class Entered(Exception):
        pass

    def on_device(t):
        raise Entered

    for module in (codebook_ce, gather_pad, sampling):
        monkeypatch.setattr(module, "on_device", on_device)
        monkeypatch.setattr(module, "_use_triton", lambda t: True)  # as for a GPU tensor
    B, L, K, C, D = 2, 6, 4, 5, 8
    ids, keep = torch.randint(0, C, (B, L)), torch.arange(K).expand(B, K)
    unknown = torch.rand(B, L) < 0.5
    logp = torch.randn(B, L)
    calls = {
        "gather_embed": lambda: gather_pad.gather_embed(ids, keep, torch.randn(C + 1, D),
                                                        torch.randn(L, D), torch.randn(D)),
        "pad_decoder": lambda: gather_pad.pad_decoder(torch.randn(B, K, D), keep, unknown,
                                                      torch.randn(D), torch.randn(L, D),
                                                      torch.randn(D)),
        "codebook_ce": lambda: codebook_ce.codebook_ce(torch.randn(3, D), torch.randn(C, D),
                                                       torch.randn(C), torch.randint(0, C, (3,))),
        "draw_tokens": lambda: sampling.draw_tokens(torch.randn(3, D), torch.randn(3, D),
                                                    torch.randn(C, D), torch.randn(C), 3.0, 1.0,
                                                    torch.rand(3)),
        # without guidance the mix is skipped: the draw kernel's own launch
        "draw_tokens unguided": lambda: sampling.draw_tokens(torch.randn(3, D), None,
                                                             torch.randn(C, D), torch.randn(C),
                                                             1.0, 1.0, torch.rand(3)),
        "remask": lambda: sampling.remask(logp, torch.randn(B, L), unknown,
                                          torch.full((B,), 2), 1.0),
    }
    for name, call in calls.items():
        with pytest.raises(Entered):
            call()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_model_on_the_second_gpu_samples_as_on_the_first(graphs):
    model = cuda_model("triton")
    _, image = (x.cuda() for x in random_ids(model, 2))
    want = generate(model, "i2a", image_ids=image, steps=4, cuda_graphs=graphs,
                    generator=sample_generators(3, 2))
    model = model.to("cuda:1")
    got = generate(model, "i2a", image_ids=image.to("cuda:1"), steps=4, cuda_graphs=graphs,
                   generator=sample_generators(3, 2))
    assert torch.cuda.current_device() == 0
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(want, got))


# -----------------------------------------------------------------------------
# a step never waits for the GPU


# ops whose result size or value the host must read back from the device before it can go on
SYNCING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "masked_scatter",
               "is_nonzero", "item", "unique", "_unique2", "repeat_interleave"}


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten ops run under it; an index by a bool mask gets a name of its own."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index":  # x[bool mask] needs the mask's count on the host
            indices = args[1] if len(args) > 1 else (kwargs or {}).get("indices", [])
            if any(i is not None and i.dtype == torch.bool for i in indices):
                name = "index by a bool mask"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["i2a", "joint", "inpaint"])
def test_a_step_reads_nothing_back_from_the_device(mode, monkeypatch):
    """Shapes inside a step never depend on the ids (the draw runs on every position), so on a GPU
    the host queues a step without waiting for the one before it."""
    model = tiny_model()
    audio, image = random_ids(model, 2)
    given = {"i2a": dict(image_ids=image), "joint": dict(batch_size=2),
             "inpaint": dict(audio_ids=audio, image_ids=image,
                             audio_keep=audio_keep_outside(0.35, 0.6, AUDIO_GRID, 1.0))}[mode]
    recorder, step = OpRecorder(), sampler.unmask_step

    def recorded_step(*args, **kwargs):
        with recorder:
            return step(*args, **kwargs)

    monkeypatch.setattr(sampler, "unmask_step", recorded_step)
    generate(model, mode, steps=4, guidance=2.0, generator=sample_generators(1, 2), **given)
    assert {"searchsorted", "sort"} <= set(recorder.ops)  # it saw the draw and the re-mask
    syncing = sorted({op for op in recorder.ops
                      if op in SYNCING_OPS or op == "index by a bool mask"})
    assert not syncing, f"a sampling step reads back from the device: {syncing}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_steps_after_the_first_never_wait_for_the_gpu(backend, graphs, monkeypatch):
    """Steps 1.. and their random numbers run with torch's sync debug mode set to "error" (the
    first step compiles, autotunes and captures, which may synchronize), and step 1 is queued
    behind a ~0.5 s spin kernel without waiting for it."""
    model = cuda_model(backend)
    _, image = (x.cuda() for x in random_ids(model, 2))
    step, uniforms, done = sampler.unmask_step, sampler.draw_uniforms, []

    def checked(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error" if done else "default")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    def checked_step(model, ids, targets, initial, i, *args, **kwargs):
        if i != 1:
            out = checked(step)(model, ids, targets, initial, i, *args, **kwargs)
            done.append(i)
            return out
        torch.cuda._sleep(10 ** 9)  # ~0.5 s of GPU time at ~2 GHz
        asleep = torch.cuda.Event()
        asleep.record()
        out = checked(step)(model, ids, targets, initial, i, *args, **kwargs)
        assert not asleep.query(), "step 1 waited for the GPU"
        done.append(i)
        return out

    monkeypatch.setattr(sampler, "unmask_step", checked_step)
    monkeypatch.setattr(sampler, "draw_uniforms", checked(uniforms))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, "i2a", image_ids=image, steps=5, cuda_graphs=graphs,
                 generator=sample_generators(2, 2))
    assert done == [0, 1, 2, 3, 4]
