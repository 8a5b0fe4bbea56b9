"""Tests for echoes/tokenizers.py and echoes/audio.py: reproduction of the reference
implementations' outputs (taming, SpecVQGAN, its MelGAN, hifi-gan, librosa), checkpoint layouts,
preset structure, the mel recipe, Griffin-Lim, resampling, and file round trips. CPU only, small
shapes."""

import argparse
import math
import os

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from echoes.cli import UserError
from echoes.audio import (
    HiFiGAN, MelGAN, crop_mel, fit_clip, griffin_lim, load_audio, load_hifigan, load_melgan,
    mel_filterbank, mel_spectrogram, resample, save_mel_png, save_wav)
from echoes.tokenizers import (
    VQGAN, AudioTokenizer, ImageTokenizer, VQGANConfig, load_image, load_vqgan, n_params)

# reference vectors: outputs of taming-transformers, SpecVQGAN (codebook model, MelGAN), hifi-gan
# and librosa's mel recipe at small random configurations (tests/reference/README.md)
REFERENCE = os.path.join(os.path.dirname(__file__), "reference")


def reference(name):
    return torch.load(os.path.join(REFERENCE, name), weights_only=True)


def tiny_vqgan(in_channels=3, resolution=16, **kw):
    torch.manual_seed(0)
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(resolution // 2,),
               resolution=resolution, in_channels=in_channels, out_ch=in_channels, z_channels=8,
               embed_dim=8, n_embed=16)
    return VQGAN(**{**cfg, **kw}).eval()


def tone(freq, seconds, sr, amplitude=0.5):
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr  # float64: exact phase
    return amplitude * torch.sin(2 * math.pi * freq * t)


def peak_hz(wav, sr):
    spectrum = torch.fft.rfft(wav.double() * torch.hann_window(wav.shape[-1], dtype=torch.float64))
    return spectrum.abs().argmax().item() * sr / wav.shape[-1]


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# -----------------------------------------------------------------------------
# reference implementations


@pytest.mark.parametrize("name", ["taming_vqgan.pt", "specvqgan_codebook.pt"])
def test_vqgan_reproduces_reference(name, tmp_path):
    ref = reference(name)
    assert any(k.startswith("loss.") for k in ref["ckpt"]["state_dict"])
    path = tmp_path / "last.ckpt"
    torch.save(ref["ckpt"], path)  # the Lightning layout, loss.* keys included
    model = load_vqgan(path, **ref["config"])
    assert set(model.state_dict()) == {k for k in ref["ckpt"]["state_dict"]
                                       if not k.startswith("loss.")}
    with torch.no_grad():
        ids = model.encode(ref["x"])
        decoded = model.decode(ref["ids"], tuple(ref["hw"]))
        z = model.encode_latent(ref["x"]).permute(0, 2, 3, 1).flatten(1, 2)  # (B, h w, D)
    assert ids.dtype == torch.long and ids.shape == ref["ids"].shape
    assert model.latent_size(*ref["x"].shape[-2:]) == tuple(ref["hw"])
    # the same ids, but where two codes are equally near (float rounding may pick either)
    dist = ((z[..., None, :] - model.quantize.embedding.weight) ** 2).sum(-1)  # (B, h w, n)
    near = dist.gather(-1, ref["ids"][..., None]) - dist.gather(-1, ids[..., None])  # (B, h w, 1)
    assert (ids == ref["ids"]).float().mean() >= 0.99
    assert near.abs().max() <= 1e-5 * dist.abs().max()
    torch.testing.assert_close(decoded, ref["decoded"], rtol=1e-5, atol=1e-5)


def test_melgan_reproduces_reference(tmp_path):
    ref = reference("specvqgan_melgan.pt")
    path = tmp_path / "best_netG.pt"
    torch.save(ref["state_dict"], path)  # released as a bare state dict
    model = load_melgan(path, ngf=ref["ngf"], n_residual_layers=ref["n_residual_layers"])
    with torch.no_grad():
        wav = model(ref["mel"])  # the [0, 1] mel goes in as it is
    assert wav.shape == (1, 1, 256 * ref["mel"].shape[-1])
    torch.testing.assert_close(wav, ref["wav"], rtol=1e-5, atol=1e-6)


def test_hifigan_reproduces_reference(tmp_path):
    ref = reference("hifigan_v1.pt")
    path = tmp_path / "g_02500000"
    torch.save({"generator": ref["generator"]}, path)  # hifi-gan's own layout
    model = load_hifigan(path, dict(ref["config"]))
    with torch.no_grad():
        wav = model(ref["mel"])
    torch.testing.assert_close(wav, ref["wav"], rtol=1e-5, atol=1e-6)


def test_mel_recipe_reproduces_librosa():
    ref = reference("mel_recipe.pt")
    torch.testing.assert_close(mel_filterbank(), ref["filterbank"], rtol=1e-5, atol=1e-8)
    mel01 = mel_spectrogram(ref["wav"])
    assert mel01.shape == (1, *ref["mel01"].shape)
    torch.testing.assert_close(mel01[0], ref["mel01"], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# checkpoints in the released layouts


@pytest.mark.parametrize("layout", ["lightning", "bare"])
def test_vqgan_checkpoint_roundtrip(layout, tmp_path):
    model = tiny_vqgan()
    sd = model.state_dict()
    if layout == "lightning":
        obj = {"state_dict": {**sd, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
                              "loss.logvar": torch.zeros(())}, "epoch": 3, "global_step": 7}
    else:
        obj = sd
    path = tmp_path / "vqgan.ckpt"
    torch.save(obj, path)
    loaded = load_vqgan(path, config=model.config)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x))
        ids = model.encode(x)
        torch.testing.assert_close(loaded.decode(ids, (8, 8)), model.decode(ids, (8, 8)))


def test_vqgan_wrong_files_fail_with_one_line(tmp_path):
    model = tiny_vqgan()
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": tiny_vqgan(ch_mult=(1, 2, 2)).state_dict()}, other)
    with pytest.raises(UserError) as e:
        load_vqgan(other, config=model.config)
    msg = one_line(e)
    assert "unexpected" in msg and "decoder.up.2." in msg and "in all" in msg

    truncated = tmp_path / "few.ckpt"
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "quantize.embedding.weight"}, truncated)
    with pytest.raises(UserError) as e:
        load_vqgan(truncated, config=model.config)
    assert "missing 1 keys (quantize.embedding.weight)" in one_line(e)

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError) as e:
        load_vqgan(text, config=model.config)
    one_line(e)

    with pytest.raises(UserError) as e:
        load_vqgan(tmp_path / "absent.ckpt")
    assert "not found" in one_line(e)

    pickled = tmp_path / "pickled.ckpt"  # needs full unpickling: refused unless trusted
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(UserError) as e:
        load_vqgan(pickled, config=model.config)
    assert "--trust-checkpoints" in one_line(e)
    assert load_vqgan(pickled, trusted=True, config=model.config) is not None


def without_weight_norm(sd):
    """A state dict as `remove_weight_norm()` leaves it: each `X.weight_g / weight_v` pair
    replaced by the weight it stands for, `X.weight` = g v / |v|."""
    out = {k: v for k, v in sd.items() if not k.endswith((".weight_g", ".weight_v"))}
    for k in sd:
        if k.endswith(".weight_v"):
            base, v = k.removesuffix(".weight_v"), sd[k]
            out[f"{base}.weight"] = sd[f"{base}.weight_g"] * v / v.norm(dim=(1, 2), keepdim=True)
    return out


def test_melgan_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MelGAN(ngf=4, n_residual_layers=1).eval()
    sd = model.state_dict()
    assert {"model.1.weight_g", "model.1.weight_v", "model.1.bias", "model.4.block.2.weight_v",
            "model.4.shortcut.weight_g", "model.16.weight_v"} <= set(sd)
    mel = torch.rand(1, 80, 5)
    with torch.no_grad():
        want = model(mel)
    # newer torch saves weight norm as parametrizations: accept that layout too
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
               .replace(".weight_v", ".parametrizations.weight.original1"): v
               for k, v in sd.items()}
    # and a generator exported after remove_weight_norm(): plain weights
    for name, obj in [("old", sd), ("new", renamed), ("removed", without_weight_norm(sd))]:
        path = tmp_path / f"{name}_netG.pt"
        torch.save(obj, path)
        with torch.no_grad():
            got = load_melgan(path, ngf=4, n_residual_layers=1)(mel)
        torch.testing.assert_close(got, want)
    # a filter that is all zeros (g = 0): exported as zeros, loaded as zeros, not 0 / 0
    sd["model.1.weight_g"][3] = 0.0
    with torch.no_grad():
        want = MelGAN(ngf=4, n_residual_layers=1).eval()
        want.load_state_dict(sd)
        want = want(mel)
    torch.save(without_weight_norm(sd), tmp_path / "zero_netG.pt")
    with torch.no_grad():
        got = load_melgan(tmp_path / "zero_netG.pt", ngf=4, n_residual_layers=1)(mel)
    torch.testing.assert_close(got, want)
    with pytest.raises(UserError) as e:
        load_melgan(tmp_path / "old_netG.pt")  # default ngf 32 does not fit
    assert "wrong shape" in one_line(e)


@pytest.mark.parametrize("kind", ["1", "2"])
def test_hifigan_checkpoint_roundtrip(kind, tmp_path):
    torch.manual_seed(0)
    config = dict(resblock=kind, upsample_rates=[8, 8, 2, 2], upsample_kernel_sizes=[16, 16, 4, 4],
                  upsample_initial_channel=32, resblock_kernel_sizes=[3, 7],
                  resblock_dilation_sizes=[[1, 3, 5]] * 2 if kind == "1" else [[1, 3]] * 2)
    model = HiFiGAN(config).eval()
    sd = model.state_dict()
    key = "resblocks.3.convs2.2.weight_g" if kind == "1" else "resblocks.3.convs.1.weight_v"
    assert key in sd
    path, removed = tmp_path / "g_00001000", tmp_path / "generator_inference.pt"
    torch.save({"generator": sd, "steps": 1000}, path)
    torch.save({"generator": without_weight_norm(sd)}, removed)  # after remove_weight_norm()
    assert "conv_post.weight" in without_weight_norm(sd) and "conv_post.weight_g" in sd
    mel = torch.rand(1, 80, 4)
    with torch.no_grad():
        want = model(mel)
        got = load_hifigan(path, config)(mel)
        got_removed = load_hifigan(removed, config)(mel)
    assert want.shape == (1, 1, 1024)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_removed, want)


# -----------------------------------------------------------------------------
# preset structure (meta device: no memory, no compute)


def test_image_preset_structure():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig.imagenet_f16_1024())
        ids = model.encode(torch.empty(2, 3, 256, 256))
        out = model.decode(ids, (16, 16))
    assert round(n_params(model) / 1e6, 2) == 72.14
    assert ids.shape == (2, 256) and ids.dtype == torch.long and out.shape == (2, 3, 256, 256)
    assert model.quantize.embedding.weight.shape == (1024, 256)
    # attention at the 16x16 level only: encoder level 4 (2 blocks), decoder up.4 (3 blocks)
    assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 0, 3]


def test_audio_preset_structure():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig.vggsound_codebook())
        ids = model.encode(torch.empty(2, 1, 80, 848))
        out = model.decode(ids, model.latent_size(80, 848))
    assert model.latent_size(80, 848) == (5, 53)
    assert ids.shape == (2, 265) and out.shape == (2, 1, 80, 848)
    assert round(n_params(model) / 1e6, 1) == 72.1  # the public config, not the paper's 54.5 M
    # the nominal width 848 halves to 53 at level 4: attention there though the map is 5x53
    assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 0, 3]
    with torch.device("meta"):
        image = VQGAN()
    assert set(model.state_dict()) == set(image.state_dict())


def test_audio_preset_runs_at_small_width():
    model = VQGAN(VQGANConfig.vggsound_codebook(ch=32, ch_mult=(1, 1, 1, 1, 1), z_channels=8,
                                                 embed_dim=8, n_embed=16)).eval()
    with torch.no_grad():
        ids = model.encode(torch.rand(1, 1, 80, 848) * 2 - 1)
        out = model.decode(ids, (5, 53))
    assert ids.shape == (1, 265) and ids.min() >= 0 and ids.max() < 16
    assert out.shape == (1, 1, 80, 848) and torch.isfinite(out).all()


# -----------------------------------------------------------------------------
# mel recipe, Griffin-Lim, resampling


def slaney_filterbank(sr, n_fft, n_mels, fmin, fmax):
    """Direct evaluation: each band is a triangle from f_lo to f_hi with its apex at f_mid
    (mel-spaced on Slaney's scale) and height 2 / (f_hi - f_lo)."""
    def to_mel(f):
        return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)

    def to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    lo, hi = to_mel(fmin), to_mel(fmax)
    points = [to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for b in range(n_mels):
        f_lo, f_mid, f_hi = points[b:b + 3]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if f_lo < f <= f_mid:
                out[b, k] = (f - f_lo) / (f_mid - f_lo)
            elif f_mid < f < f_hi:
                out[b, k] = (f_hi - f) / (f_hi - f_mid)
        out[b] *= 2 / (f_hi - f_lo)
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("args", [(22050, 1024, 80, 125.0, 7600.0), (16000, 512, 40, 0.0, 8000.0)])
def test_filterbank_matches_slaney_formula(args):
    fb = mel_filterbank(*args)
    assert fb.shape == (args[2], args[1] // 2 + 1)
    torch.testing.assert_close(fb, slaney_filterbank(*args), rtol=1e-4, atol=1e-7)


def test_mel_of_10_seconds_is_80_by_848():
    wav = torch.randn(220500, generator=torch.Generator().manual_seed(0)) * 0.1
    assert mel_spectrogram(wav).shape == (1, 80, 862)
    for seconds in (3.0, 10.0, 12.5):
        clip = fit_clip(wav.repeat(2)[:int(seconds * 22050)])
        assert clip.shape == (220500,)
        mel01 = crop_mel(mel_spectrogram(clip))
        assert mel01.shape == (1, 80, 848)
        assert mel01.min() >= 0 and mel01.max() <= 1 and mel01.max() > 0.5
    batch = mel_spectrogram(torch.stack([wav[:22050], 0.5 * wav[:22050]]))
    assert batch.shape == (2, 80, 87)
    assert (mel_spectrogram(torch.zeros(22050)) == 0).all()  # silence: the recipe's floor, 0
    # the crop: the first 860 of 862 frames kept, then the middle 848 from frame 6 on, where
    # AudioTokenizer.crop_offset says the rendering starts
    frames = torch.arange(862.0).expand(1, 80, 862)  # each frame holds its index
    cropped = crop_mel(frames)
    assert cropped[0, 0, 0] == 6 and cropped[0, 0, -1] == 853
    assert AudioTokenizer(tiny_vqgan(in_channels=1, resolution=32)).crop_offset() == 6


@pytest.mark.parametrize("freq", [262.0, 1000.0, 4000.0])
def test_tone_lands_in_its_mel_band(freq):
    mel01 = mel_spectrogram(tone(freq, 0.5, 22050).float())[0]  # (80, frames)
    band = mel_filterbank()[:, round(freq * 1024 / 22050)].argmax()
    assert mel01.mean(-1).argmax() == band


def test_griffin_lim_keeps_pitch():
    mel01 = mel_spectrogram(tone(440.0, 1.0, 22050).float())
    wav = griffin_lim(mel01, n_iter=16, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 256 * mel01.shape[-1])
    assert abs(peak_hz(wav[0], 22050) - 440.0) < 440.0 * 0.02
    assert wav.abs().max() > 0.1
    # the phases converge: the rendering's |STFT| nears the magnitudes it was given, the more
    # the longer it iterates (spectral convergence)
    from echoes.audio import _stft_mag, mel01_to_linear
    rich = mel_spectrogram(sum(tone(f, 1.0, 22050) for f in (220.0, 660.0, 1500.0)).float())
    mag = mel01_to_linear(rich)  # (1, K, T)

    def convergence(n_iter):
        y = griffin_lim(rich, n_iter=n_iter, generator=torch.Generator().manual_seed(0))
        got = _stft_mag(y, 1024, 256)[..., :mag.shape[-1]]
        return float((got - mag).norm() / mag.norm())

    errors = [convergence(n) for n in (0, 4, 32)]  # 0.64, 0.26, 0.17 (momentum backwards: 0.22)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.2, errors
    assert griffin_lim(mel01[..., :3], n_iter=2).shape == (1, 768)  # the fewest frames it takes
    with pytest.raises(ValueError, match="needs more than 2 frames"):
        griffin_lim(mel01[..., :2])


def test_resample_is_band_limited():
    sr = 44100
    kept = resample(tone(1000.0, 1.0, sr).float(), sr, 22050)
    assert kept.shape == (22050,)
    assert abs(peak_hz(kept, 22050) - 1000.0) < 2.0
    ideal = tone(1000.0, 1.0, 22050)
    error = (kept.double() - ideal)[1000:-1000].pow(2).mean() / ideal.pow(2).mean()
    assert error < 1e-6  # -60 dB
    for freq in (11500.0, 13000.0, 16000.0, 20000.0):  # would alias below 11 kHz if kept
        out = resample(tone(freq, 1.0, sr).float(), sr, 22050)[1000:-1000]
        assert out.pow(2).mean() < 1e-6 * 0.125
    stereo = torch.stack([tone(1000.0, 0.5, 48000), tone(2000.0, 0.5, 48000)]).float()
    out = resample(stereo, 48000, 22050)  # a 147/320 ratio
    assert out.shape == (2, 11025)
    assert abs(peak_hz(out[1], 22050) - 2000.0) < 3.0
    for sr in (48000, 16000, 8000):  # the common rates, down and up: the ideal tone, -60 dB
        kept = resample(tone(1000.0, 1.0, sr).float(), sr, 22050)
        ideal = tone(1000.0, 1.0, 22050)
        error = (kept.double() - ideal)[1000:-1000].pow(2).mean() / ideal.pow(2).mean()
        assert error < 1e-6, (sr, error)


def test_resample_with_a_huge_ratio_matches_the_exact_filter():
    """44101 -> 22050 Hz reduces to 22050 / 44101: too many phases for the polyphase conv, so
    each output's taps come from an interpolated table; against taps computed exactly."""
    sr, n = 44101, 3000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = resample(x.float(), sr, 22050)
    assert got.shape == (-(-n * 22050 // sr),)
    fc = 0.95 * 22050 / sr
    half = 64 / fc
    j = torch.arange(0, got.shape[0], 37)  # a spread of outputs, their times j * sr / 22050
    d = (j.double()[:, None] * sr / 22050) - torch.arange(n, dtype=torch.float64)[None, :]
    i0 = torch.special.i0
    window = i0(8.6 * (1 - (d / half) ** 2).clamp(min=0).sqrt()) / i0(torch.tensor(8.6).double())
    taps = fc * torch.sinc(fc * d) * window * (d.abs() <= half)  # Kaiser-windowed sinc, exactly
    want = (taps * x).sum(1)  # (len(j),) every tap in float64
    assert torch.allclose(got[j].double(), want, rtol=0, atol=1e-5 * want.abs().max())
    tone_in = resample(tone(1000.0, 1.0, sr).float(), sr, 22050)
    ideal = tone(1000.0, 1.0, 22050)
    error = (tone_in.double() - ideal)[1000:-1000].pow(2).mean() / ideal.pow(2).mean()
    assert error < 1e-6  # -60 dB


# -----------------------------------------------------------------------------
# tokenizers on files


def test_image_tokenizer_roundtrip(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (30, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "b.jpg")
    tok = ImageTokenizer(tiny_vqgan())
    assert tok.grid == (8, 8)
    ids = tok.encode_files([tmp_path / "a.png", str(tmp_path / "b.jpg")])
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    images = tok.decode_to_images(ids)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    images[0].save(tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").size == (16, 16)


def test_load_image_resizes_short_side_and_centre_crops():
    image = np.zeros((30, 90, 3), np.uint8)
    image[:, 30:60] = 255  # a white centre square between black sides
    x = load_image(image, 10)
    assert x.shape == (3, 10, 10) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 2:8].mean() > 0.95


def test_inpainting_silences_the_mel_under_the_hidden_columns():
    vq = tiny_vqgan(in_channels=1, resolution=32)
    tok = AudioTokenizer(vq, n_samples=256 * 31, n_frames=32)  # grid (40, 16): 2 frames a column
    hidden = torch.zeros(16, dtype=torch.bool)
    hidden[6:11] = True  # frames 12 .. 21
    mel = torch.rand(2, 80, 32) + 0.01
    out = tok.silence_columns(mel, hidden)
    assert (out[..., 12:22] == 0).all()
    assert torch.equal(out[..., :12], mel[..., :12]) and torch.equal(out[..., 22:], mel[..., 22:])
    # two clips that differ only well inside the hidden stretch encode alike
    a = tone(440.0, 256 * 31 / 22050, 22050).float()
    b = a.clone()
    b[16 * 256:18 * 256] += 0.5 * torch.randn(512, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(tok.wav_to_mel(a), tok.wav_to_mel(b))
    assert torch.equal(tok.encode_waveforms(a, hidden), tok.encode_waveforms(b, hidden))
    with pytest.raises(ValueError, match=r"hidden columns must be \(16,\), got \(640,\)"):
        tok.silence_columns(mel, torch.zeros(640, dtype=torch.bool))  # an audio_keep, say


def test_splice_keeps_the_input_outside_the_stretch_and_aligns_the_rendering():
    vq = tiny_vqgan(in_channels=1, resolution=32)
    tok = AudioTokenizer(vq)  # VGGSound's recipe: the rendering starts 6 hops into the clip
    shift, n = tok.crop_offset() * 256, tok.n_samples
    assert shift == 1536
    rendering = torch.linspace(-0.5, 0.5, 848 * 256)  # (T_r,) every sample its own value
    original = torch.full((n - 1000,), 0.25)  # shorter than the clip: padded with silence
    hidden = torch.zeros(tok.grid[1], dtype=torch.bool)
    hidden[100:200] = True
    out = tok.splice(rendering, original, hidden, fade=0.01)
    edges = tok.column_edges()
    a, b = round(edges[100] * 22050), round(edges[200] * 22050)
    assert out.shape == (n,)
    torch.testing.assert_close(out[a:b], rendering[a - shift:b - shift])  # aligned, whole
    assert (out[:a - 221] == 0.25).all() and (out[b + 221:n - 1000] == 0.25).all()
    assert (out[n - 1000:] == 0).all()
    fade_in = out[a - 221:a] - 0.25  # from the input towards the rendering, monotone weights
    weights = fade_in / (rendering[a - 221 - shift:a - shift] - 0.25)
    assert (weights.diff() >= -1e-6).all() and 0 <= weights.min() and weights.max() <= 1
    # nothing regenerated: the input, fit to the clip
    torch.testing.assert_close(tok.splice(rendering, original, torch.zeros_like(hidden)),
                               torch.cat([original, torch.zeros(1000)]))
    # two stretches: the input is kept between them as around them
    hidden[100:200], hidden[300:310] = False, True
    hidden[10:20] = True
    out = tok.splice(rendering, original, hidden, fade=0.01)
    for first, last in ((10, 20), (300, 310)):
        a, b = round(edges[first] * 22050), round(edges[last] * 22050)
        torch.testing.assert_close(out[a:b], rendering[a - shift:b - shift])
    between = out[round(edges[20] * 22050) + 221:round(edges[300] * 22050) - 221]
    assert between.numel() > 0 and (between == 0.25).all()


def test_splice_fades_where_the_rendering_ends_and_scales_only_what_it_uses():
    tok = AudioTokenizer(tiny_vqgan(in_channels=1, resolution=32))  # VGGSound's recipe
    shift, n, w = tok.crop_offset() * 256, tok.n_samples, tok.grid[1]
    rendering = torch.full((848 * 256,), 0.5)
    rendering[-1000] = 3.0  # a peak in a part the splice throws away: no reason to scale
    original = torch.full((n,), -0.25)
    edges = tok.column_edges()
    smooth = lambda x: float(x.diff().abs().max()) < 0.005  # noqa: E731  (no step, no click)
    # from the clip's start: silence where the rendering does not reach, then a fade in
    hidden = torch.arange(w) < 30
    out = tok.splice(rendering, original, hidden, fade=0.02)
    b = round(edges[30] * 22050)
    assert (out[:shift] == 0).all() and smooth(out[:b])
    torch.testing.assert_close(out[shift + 441:b], torch.full((b - shift - 441,), 0.5))
    # to the clip's end: a fade out into the silence after the rendering's last sample
    hidden = torch.arange(w) >= w - 30
    out = tok.splice(torch.full_like(rendering, 0.5), original, hidden, fade=0.02)
    end = shift + len(rendering)
    assert end < n and (out[end:] == 0).all() and smooth(out[round(edges[w - 30] * 22050):])
    out = tok.splice(rendering, original, hidden, fade=0.02)  # now the peak is in what it uses
    assert float(out[end - 1000]) == pytest.approx(1.0)
    assert float(out[end - 2000]) == pytest.approx(0.5 / 3)
    # an input louder than full scale (a resampler's overshoot): the whole clip scaled down
    loud = original.clone()
    loud[1000] = 1.25
    out = tok.splice(rendering, loud, torch.arange(w) == w // 2)
    assert float(out.abs().max()) == pytest.approx(1.0)
    assert float(out[0]) == pytest.approx(-0.25 / 1.25)


def test_column_edges_follow_the_crop_and_the_centred_frames():
    from fractions import Fraction

    from echoes.sampler import time_range_columns
    vq = tiny_vqgan(in_channels=1, resolution=32)
    # VGGSound's recipe: 862 frames, 860 kept, a centre crop of 848 from frame 6 (the tiny
    # VQGAN halves the time axis: 424 columns of 2 frames where the released one has 53 of 16)
    tok = AudioTokenizer(vq)
    edges, cols = tok.column_edges(), tok.grid[1]
    hop = Fraction(256, 22050)
    assert cols == 424 and len(edges) == cols + 1 and edges[0] == 0 and edges[-1] == 10
    assert edges[1] == (6 + 2 - Fraction(1, 2)) * hop  # column 0: frames 6 and 7
    assert edges[-2] == (6 + 846 - Fraction(1, 2)) * hop  # the last column: frames 852, 853
    assert all(a < b for a, b in zip(edges, edges[1:]))
    # 0.09..0.095 s is in frame 8 (centred at 0.0929 s), which column 1 holds; an even split of
    # 10 s into 424 columns (0.0236 s each) would say columns 3 and 4
    assert time_range_columns(0.09, 0.095, cols, 10.0, edges).nonzero().flatten().tolist() == [1]
    assert time_range_columns(0.09, 0.095, cols, 10.0).nonzero().flatten().tolist() == [3, 4]
    with pytest.raises(ValueError, match="424 columns need 425 edges, got 54"):
        time_range_columns(0.1, 0.2, cols, 10.0, edges[:54])
    # no crop (the demo's recipe): the edges sit half a hop before each column's first frame
    tok = AudioTokenizer(vq, n_samples=256 * 31, n_frames=32)
    assert tok.column_edges()[1:3] == [(2 - Fraction(1, 2)) * hop, (4 - Fraction(1, 2)) * hop]


def test_audio_tokenizer_roundtrip(tmp_path):
    sr = 44100
    left, right = tone(440.0, 0.4, sr), 0.3 * torch.randn(int(0.4 * sr), dtype=torch.float64)
    soundfile.write(tmp_path / "in.wav", torch.stack([left, right], 1).numpy(), sr)
    wav = load_audio(tmp_path / "in.wav")
    assert wav.shape == (8820,) and wav.dtype == torch.float32
    vq = tiny_vqgan(in_channels=1, resolution=32)
    tok = AudioTokenizer(vq, n_samples=256 * 31, n_frames=32)
    assert tok.grid == (40, 16) and tok.sample_rate == 22050
    ids = tok.encode_files([tmp_path / "in.wav"])
    assert ids.shape == (1, 640)
    mel01 = tok.decode_to_mel(ids)
    assert mel01.shape == (1, 80, 32) and mel01.min() >= 0 and mel01.max() <= 1
    out = tok.mel_to_wav(mel01, generator=torch.Generator().manual_seed(0))  # Griffin-Lim
    assert out.shape == (1, 256 * 32) and torch.isfinite(out).all()
    save_wav(out[0], tmp_path / "out.wav")
    data, rate = soundfile.read(tmp_path / "out.wav")
    assert rate == 22050 and data.shape == (256 * 32,)
    tok = AudioTokenizer(vq, vocoder=MelGAN(ngf=4, n_residual_layers=1), n_samples=256 * 31,
                         n_frames=32)
    assert tok.decode_to_wav(ids).shape == (1, 256 * 32)


def test_save_mel_png_puts_low_frequencies_at_the_bottom(tmp_path):
    mel01 = torch.zeros(1, 80, 12)
    mel01[:, 0] = 1.0  # the lowest band at full level
    save_mel_png(mel01, tmp_path / "mel.png", scale=2)
    image = np.asarray(Image.open(tmp_path / "mel.png"))
    assert image.shape == (160, 24, 3)
    assert image[-1].mean() > 150 and image[0].mean() < 100  # bright bottom row, dark top


def test_unreadable_files_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(UserError) as e:
        load_audio(bad)
    one_line(e)
    with pytest.raises(UserError) as e:
        load_audio(tmp_path / "absent.wav")
    assert "not found" in one_line(e)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UserError) as e:
        ImageTokenizer(tiny_vqgan()).encode_files([bad])
    one_line(e)
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "absent.png", 16)
    assert "not found" in one_line(e)


def test_images_of_16_bit_and_float_grey_levels_are_scaled_not_clipped(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((20, 20), 0.5, np.float32), "F").save(tmp_path / "grey.tiff")
    for name in ("grey16.png", "grey.tiff"):
        x = load_image(tmp_path / name, 16)
        assert abs(float(x.mean())) < 0.01, name  # mid-grey, not white or black
    dark = np.full((20, 20), 250, np.uint16)  # 250 of 65535: near black, however few levels
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode == "I;16"
    assert float(load_image(tmp_path / "dark16.png", 16).mean()) < -0.99


def test_transparent_pixels_are_composited_over_white(tmp_path):
    from PIL import Image
    rgba = np.zeros((20, 20, 4), np.uint8)  # black everywhere: its alpha tells the halves apart
    rgba[:10, :, 3] = 255  # top half opaque black
    rgba[10:, :, 3] = 0  # bottom half transparent: white, not the black it holds
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    for image in (tmp_path / "half.png", rgba):
        x = load_image(image, 20)
        torch.testing.assert_close(x[:, :10], torch.full((3, 10, 20), -1.0))
        torch.testing.assert_close(x[:, 10:], torch.full((3, 10, 20), 1.0))
    rgba[:, :, 3] = 128  # half transparent black over white: mid-grey
    assert abs(float(load_image(rgba, 20).mean())) < 0.01
    assert abs(float(load_image(Image.fromarray(rgba[..., 2:], "LA").convert("La"), 20).mean())
               ) < 0.01  # premultiplied grey and alpha
    grey16 = np.full((20, 20), 5000, np.uint16)
    grey16[10:] = 1234  # 16-bit grey with one level transparent
    Image.fromarray(grey16).save(tmp_path / "grey16.png", transparency=1234)
    x = load_image(tmp_path / "grey16.png", 20)
    assert float(x[:, 10:].min()) == 1.0 and float(x[:, :10].max()) < -0.8
    palette = Image.new("P", (20, 20), 1)  # palette image, index 1 (black) marked transparent
    palette.putpalette([255, 0, 0, 0, 0, 0])
    palette.save(tmp_path / "palette.png", transparency=1)
    assert float(load_image(tmp_path / "palette.png", 20).min()) == 1.0
    palette.putpalette([0, 0, 0, 0] * 2, "RGBA")  # a palette with alpha, in memory only
    assert float(load_image(palette, 20).min()) == 1.0


def test_cielab_images_are_converted_to_srgb_not_copied_channel_by_channel(tmp_path):
    from PIL import Image
    # Pillow's LAB: L 0..255 for 0..100, a and b offset by 128 (128 = neutral): mid grey
    lab = Image.new("LAB", (20, 20), (int(53.6 * 2.55), 128, 128))
    x = load_image(lab, 20)
    assert float(x.std(dim=0).max()) < 0.02  # grey: equal R, G and B (a copy gives 137, 128, 128)
    assert abs(float(x.mean()) - (128 / 127.5 - 1)) < 0.03  # L* 53.6 is sRGB 128
    red = load_image(Image.new("LAB", (20, 20), (136, 128 + 60, 128 + 30)), 20)  # a* > 0: red
    assert float(red[0].mean()) > float(red[1].mean()) + 0.3  # a copy puts 188 in G, 136 in R
    lab.save(tmp_path / "lab.tif")
    torch.testing.assert_close(load_image(tmp_path / "lab.tif", 20), x)


def test_a_waveform_with_nan_is_refused_not_written_as_clicks(tmp_path):
    from echoes.cli import UserError
    with pytest.raises(UserError, match="holds NaN or infinite samples"):
        save_wav(torch.tensor([0.5, float("nan"), -0.5]), tmp_path / "o.wav")
    assert not list(tmp_path.iterdir())
    save_wav(torch.tensor([0.5, 2.0, -0.5]), tmp_path / "o.wav")  # clipped to full scale
    assert soundfile.read(tmp_path / "o.wav", dtype="int16")[0].tolist() == [16384, 32767, -16384]


def test_vqgan_takes_tamings_ddconfig_as_written(tmp_path):
    cfg = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
               ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
               embed_dim=8, n_embed=32)
    model = VQGAN(**cfg)
    assert model.config.z_channels == 8
    with pytest.raises(ValueError, match="double_z=True is a KL autoencoder"):
        VQGAN(**{**cfg, "double_z": True})
    path = tmp_path / "last.ckpt"  # a released file loads with the ddconfig dict as config
    torch.save({"state_dict": model.state_dict()}, path)
    assert load_vqgan(path, cfg).config == model.config
    assert load_vqgan(path, config=cfg).config == model.config
    with pytest.raises(UserError, match="the VQGAN config given builds no model.*check its"):
        load_vqgan(path, {**cfg, "n_layers": 3})


def test_unusable_images_and_audio_are_one_line(tmp_path, monkeypatch):
    from PIL import Image, ImageOps

    from echoes.cli import UserError
    Image.new("RGB", (2000, 1)).save(tmp_path / "thin.png")
    with pytest.raises(UserError, match="thin.png is 2000 x 1, wider than 20:1"):
        load_image(tmp_path / "thin.png", 16)
    soundfile.write(tmp_path / "slow.wav", np.zeros(100, np.float32), 8)
    with pytest.raises(UserError, match="sample rate of 8 Hz"):
        load_audio(tmp_path / "slow.wav")

    def broken_exif(image):
        raise TypeError("bad operand type for abs()")  # what a corrupt EXIF block gives

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.jpg")
    monkeypatch.setattr(ImageOps, "exif_transpose", broken_exif)
    assert load_image(tmp_path / "red.jpg", 16)[0].mean() > 0.9  # the pixels as stored


def test_reading_only_the_clip_gives_the_clip_of_the_whole_file(tmp_path):
    t = np.arange(44100 * 3) / 44100
    soundfile.write(tmp_path / "long.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
                    44100)
    whole = load_audio(tmp_path / "long.wav", 22050)
    start = load_audio(tmp_path / "long.wav", 22050, seconds=1.0)
    assert len(start) < len(whole)
    torch.testing.assert_close(start[:22050], whole[:22050], atol=0, rtol=0)
